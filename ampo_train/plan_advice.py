"""`ampo-train plan`'s verdict: does one process fit its GPU, and if not, the one setting to change.

The candidates are tried in order, least invasive first, each alone on the memory model
(``ampo_train.memory_model``); the first that fits is the advice: gradient checkpointing, a
smaller micro-batch, vLLM's sleep mode, a smaller vLLM share, smaller LM-head chunks, activation
offloading, a bf16 LoRA base, more processes under FSDP2 (full fine-tuning), LoRA. A vLLM engine
must also hold its own weights and the KV cache of one sequence of ``max_model_len`` tokens in its
share (``rollout.vllm.gpu_memory_utilization``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator

from ampo_train.config import TrainConfig
from ampo_train.memory_model import GIB, Batch, Layout, Precision, Setup, kv_bytes_per_token, lora_count, peak

CUDA_RESERVED_GIB = 1.0   # CUDA context, kernels and communication buffers: outside PyTorch's allocator
LAYOUT_NAMES = {"fsdp2": "FSDP2", "zero3": "DeepSpeed ZeRO-3"}


def usable_bytes(gpu_bytes: float) -> float:
    return gpu_bytes - CUDA_RESERVED_GIB * GIB


def max_model_len(cfg: TrainConfig, setup: Setup, row_tokens: int) -> int:
    """What the trainer's vLLM engine is built with (``rollout.student_target``)."""
    longest = row_tokens - max(cfg.rollout.max_new_tokens, cfg.target_length) + cfg.rollout.max_new_tokens
    limit = setup.shape.max_positions or longest
    return cfg.rollout.vllm.max_model_len or min(longest, limit)


def vllm_room(cfg: TrainConfig, setup: Setup, row_tokens: int) -> dict:
    """The vLLM engine's share split into its weights and the KV cache left: ``kv_tokens``, and how
    many sequences of ``max_model_len`` fit at once (``sequences``); ``min_fraction``: the share
    that holds the weights and one such sequence."""
    from ampo_train.plan import engine_bytes_per_param

    share = setup.engine.fraction * setup.engine.gpu_bytes
    per_param = engine_bytes_per_param(cfg, not cfg.cpu)
    weights = setup.shape.params * per_param + (setup.lora.trainable * per_param if setup.lora else 0)
    per_token = kv_bytes_per_token(setup.shape, per_param)
    length = max_model_len(cfg, setup, row_tokens)
    kv_tokens = max(0, int((share - weights) // per_token))
    need = (weights + length * per_token) / setup.engine.gpu_bytes if setup.engine.gpu_bytes else 1.0
    return {"weights": weights, "kv_tokens": kv_tokens, "max_model_len": length, "sequences": kv_tokens // length,
            "min_fraction": need}


def check(cfg: TrainConfig, setup: Setup, gpu_bytes: float, row_tokens: int) -> tuple[bool, str, float]:
    """(fits, the phase at the peak, peak bytes): memory within the usable GPU and, with vLLM on a
    GPU, room in its share for one full-length sequence."""
    phase, top = peak(setup)
    room_ok = True
    if setup.engine.kind == "vllm" and not cfg.cpu:
        room_ok = vllm_room(cfg, setup, row_tokens)["sequences"] >= 1
    return top <= usable_bytes(gpu_bytes) and room_ok, phase, top


def candidates(cfg: TrainConfig, setup: Setup, rows: tuple[int, int, int]) -> Iterator[tuple[str, Setup]]:
    """(the setting to change, the setup with it), least invasive first. ``rows``: (rows per
    micro-batch, tokens per row, response tokens per row)."""
    per_micro, row, response = rows
    if not setup.checkpointing:
        yield "set gradient_checkpointing=true", setup.but(checkpointing=True)
    smaller = per_micro // 2
    while smaller >= 1:
        key = f"set micro_batch_tokens={smaller * row}" if cfg.micro_batch_tokens else f"set micro_batch_size={smaller}"
        yield key, setup.but(batch=Batch(smaller * row, smaller * response))
        smaller //= 2
    yield from _engine_candidates(cfg, setup, row)
    if not setup.layout.shards_parameters:
        for chunk in (128, 64):
            if chunk < setup.chunk:
                yield f"set logit_chunk_size={chunk}", setup.but(chunk=chunk)
    if setup.checkpointing and not setup.offload and not cfg.cpu:
        yield "set activation_offload=true", setup.but(offload=True)
    if setup.lora is not None and setup.precision.weight_bytes == 4:
        yield "set dtype=bfloat16 (a bf16 base under the float32 adapter)", setup.but(precision=Precision("bfloat16", setup.precision.mixed_precision))
    yield from _scale_candidates(cfg, setup)


def _engine_candidates(cfg: TrainConfig, setup: Setup, row: int) -> Iterator[tuple[str, Setup]]:
    engine = setup.engine
    if engine.kind != "vllm" or cfg.cpu:
        return
    if not engine.sleep:
        yield "set rollout.vllm.sleep_mode=true", setup.but(engine=replace(engine, sleep=True))
    floor = vllm_room(cfg, setup, row)["min_fraction"]
    if floor > engine.fraction:  # the share cannot hold one sequence: the smallest share that does
        step = round(min(0.95, -(-floor * 20 // 1) / 20), 2)
        yield f"set rollout.vllm.gpu_memory_utilization={step}", setup.but(engine=replace(engine, fraction=step))
        return
    fraction = round(engine.fraction - 0.05, 2)
    while fraction >= floor and fraction > 0:
        yield f"set rollout.vllm.gpu_memory_utilization={fraction}", setup.but(engine=replace(engine, fraction=fraction))
        fraction = round(fraction - 0.05, 2)


def _scale_candidates(cfg: TrainConfig, setup: Setup) -> Iterator[tuple[str, Setup]]:
    if setup.lora is not None:
        return
    current = setup.layout.processes
    for n in (2, 4, 8, 16, 32):
        if n > current and not cfg.prompts_per_step % n and not cfg.prompts_per_update % n:
            name = setup.layout.name if setup.layout.shards_parameters else "fsdp2"
            how = f"launch {n} processes with {LAYOUT_NAMES[name]} (examples/accelerate/{name}.yaml, num_processes: {n})"
            yield how, setup.but(layout=Layout(name, n))
    lora = lora_count(setup.shape, 16, "all-linear")
    yield "set lora.r=16 (LoRA on every linear layer)", setup.but(lora=lora, layout=Layout(
        "ddp" if current > 1 else "single", current))


def launch_problem(cfg: TrainConfig, setup: Setup) -> str | None:
    """Settings the trainer refuses before loading anything, for this launch."""
    n = setup.layout.processes
    for name, value in (("prompts_per_step", cfg.prompts_per_step), ("mini_batch_prompts", cfg.prompts_per_update)):
        if value % n:
            return f"{name} ({value}) must be a multiple of the number of processes ({n})"
    if setup.lora is not None and setup.layout.name in ("fsdp2", "zero2", "zero3"):
        return f"LoRA under {setup.layout.name} is not supported: launch it with DDP (examples/accelerate/ddp.yaml)"
    return None


def verdict(cfg: TrainConfig, setup: Setup, gpu_bytes: float, steps):
    """The plan's last line: fits, or does not with the one setting to change."""
    from ampo_train.plan import Verdict

    problem = launch_problem(cfg, setup)
    if problem:
        return Verdict(False, f"cannot run: {problem}")
    usable = usable_bytes(gpu_bytes) / GIB
    ok, phase, top = check(cfg, setup, gpu_bytes, steps.row_tokens)
    if ok:
        return Verdict(True, f"fits: peak {top / GIB:.1f} GiB per process ({phase}) of {usable:.1f} GiB usable")
    why = (f"peak {top / GIB:.1f} GiB per process ({phase}) of {usable:.1f} GiB usable"
           if top > usable_bytes(gpu_bytes) else "the vLLM share cannot hold one full-length sequence")
    response = max(cfg.rollout.max_new_tokens, cfg.target_length)
    best = None
    for key, changed in candidates(cfg, setup, (steps.rows_per_micro, steps.row_tokens, response)):
        fits, changed_phase, changed_top = check(cfg, changed, gpu_bytes, steps.row_tokens)
        if fits:
            return Verdict(False, f"does not fit: {why}; {key}: {changed_top / GIB:.1f} GiB ({changed_phase})")
        if best is None or changed_top < best[1]:
            best = (key, changed_top)
    hint = f"; the closest single change, {best[0]}, needs {best[1] / GIB:.1f} GiB" if best else ""
    return Verdict(False, f"does not fit: {why}; no single setting makes it fit{hint}")
