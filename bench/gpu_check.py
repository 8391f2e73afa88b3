"""What ampo costs on a CUDA GPU, next to TRL, in one command that fits one 8-minute device call.

    bash bench/gpu_wheels.sh                      # here: the wheels the device lacks, into .whl/
    python bench/gpu_check.py                     # on the GPU: writes $OUT (or --out) gpu-check.json
    python bench/gpu_check.py --smoke             # any machine, toy sizes (CI runs it; 2-4 minutes on 2 cores)

The check (issue 32), in this order (each part skipped with its reason when a package, CUDA or the
time budget is missing; a part that fails is recorded and the next one runs):

1. ``lm_head``: which log-prob path ``logprob_kernel: auto`` picks on this device for the probe
   student's head (LoRA and full) and why; the chunked head and the fused Triton kernel against
   float64 (log-probs, entropy, gradients of the hidden states and the head's weight; float32 and
   bf16 autocast; peaked logits) at Qwen's vocabulary (151,936), and through a Qwen2-shaped model
   against the model's own full logits. (On a CPU the fused kernel runs under Triton's interpreter
   when triton is installed.)
2. ``cost``: one update of a random Qwen2-0.5B-shaped student (LoRA and full) on 8 rows of 128 +
   1k/4k/8k/16k/32k response tokens (micro-batches of 2 rows, gradient checkpointing, bf16 autocast
   on every arm), arms ``ours-chunked``, ``ours-fused`` (``logprob_kernel``) and TRL 1.16's
   ``GRPOTrainer`` loss path (``bench/update_probe.py``): one full-size warm-up, then the best of 2
   timed updates, ``torch.cuda.synchronize`` around each, the peak memory reset before each
   (``torch.cuda.max_memory_allocated`` growth; on a CPU peak RSS growth); what each arm actually
   ran (gradient checkpointing, attention implementation, log-prob path) and the card's name
   beside every number. Lengths that the time budget cannot fit (or memory: an out-of-memory is
   a result) are recorded as such.
3. ``student_run``: ``ampo-train run`` for 3 steps of that student's layers (with the fixture
   world's character vocabulary) on the tests' fixture world: LoRA r=16, bf16, gradient
   checkpointing, adaptive guidance, rollouts of up to 4,096 tokens; the phase times
   (generate, log-probs, guidance, update) and response lengths of every step.

Earlier parts, measured on an H200 on 2026-12-04 (docs/performance.md), run when named in
``--parts``: ``fp16_scaler`` (Accelerate's GradScaler skips an overflowing update), ``tiny_run`` (3
steps on a tiny world, ``--world``), ``generation`` (rollout throughput, guidance's share of a
step), ``chunk_sweep`` and ``decode_overhead``. ``--smoke`` runs the check and ``fp16_scaler`` and
``generation`` at toy sizes.

Each part runs in a child process of its own (a CUDA error or an Accelerate state in one cannot
reach the next, and memory peaks are the part's own). ``gpu-check.json`` is rewritten after every
part and, by the long parts, after every measured cell, so a run cut off still reports what it
measured. The table on the console is its summary.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = ("lm_head", "cost", "student_run")  # the check: one device call under 8 minutes
EARLIER_PARTS = ("fp16_scaler", "tiny_run", "generation")  # measured before (docs/performance.md)
# The evidence behind the GPU defaults of ampo_train.lm_head: the chunk size, the decode loop's overhead.
EXTRA_PARTS = ("chunk_sweep", "decode_overhead")
ALL_PARTS = (*PARTS, *EARLIER_PARTS, *EXTRA_PARTS)
SMOKE_PARTS = (*PARTS, "fp16_scaler", "generation")  # what CI's --smoke runs (student_run covers tiny_run's path)
# Seconds kept back for the parts after ``cost`` on a GPU (the cost part skips lengths to leave them).
RESERVE = {"student_run": 120}
COST_ARMS = ("ours-chunked", "ours-fused", "trl")
# Sizes per mode: the GPU run and the CPU smoke run (the same code at toy sizes).
SIZES = {
    "full": dict(vocab=151936, tokens=[1024, 4096, 8192, 16384, 32768], rows=8, micro=2, gen_batch=64,
                 gen_tokens=256, gen_small=(8, 256), score_lengths=[2048, 4096, 8192], lm_rows=4, lm_tokens=1024,
                 lm_layers=2, f64_rows=2048, f64_hidden=896, run_tokens=4096),
    "smoke": dict(vocab=1000, tokens=[32, 64], rows=4, micro=2, gen_batch=4, gen_tokens=16, gen_small=(2, 8),
                  score_lengths=[64, 128], lm_rows=2, lm_tokens=48, lm_layers=2, f64_rows=48, f64_hidden=32,
                  run_tokens=16),
}
SMOKE_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, max_position_embeddings=1024)


def _child_env() -> dict:
    """This environment with the repository first on PYTHONPATH (what is already there, e.g. a
    folder of carried wheels, stays after it)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _device_name() -> str:
    """The card (or the CPU) every figure was measured on."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _toy(smoke: bool) -> dict:
    """The probe model's shape overrides: the toy shape in smoke runs, Qwen2-0.5B's otherwise."""
    return dict(SMOKE_SHAPE) if smoke else {}


# ----------------------------------------------------------------------------- 1. correctness


def _fused_problem(device: str) -> str | None:
    """None when the fused kernel can run here (CUDA, or a CPU under Triton's interpreter), else why not."""
    import torch

    from ampo_train.lm_head import select_logprob_kernel

    try:
        select_logprob_kernel("fused", torch.nn.Linear(2, 2), torch.device(device))
    except ValueError as exc:
        return str(exc)
    return None


def _selection(size: dict, device: str) -> dict:
    """What ``logprob_kernel: auto`` picks for the probe student's head here, LoRA and full, and why."""
    from ampo_train.lm_head import select_logprob_kernel, triton_available, triton_interpreting
    from bench.update_probe import UpdateProbe, lora_config, random_qwen2

    out = {"triton_importable": triton_available(), "triton_interpret": triton_interpreting()}
    for mode in ("lora", "full"):
        probe = UpdateProbe(vocab=size["vocab"], rows=1, response_tokens=8, shape="qwen2", qwen2=SMOKE_SHAPE,
                            device=device, lora=mode == "lora")
        model = random_qwen2(probe, num_hidden_layers=1)
        if mode == "lora":
            from peft import get_peft_model

            model = get_peft_model(model, lora_config(probe))
        import torch

        choice = select_logprob_kernel("auto", model.get_output_embeddings(), torch.device(device))
        out[mode] = {"head": type(model.get_output_embeddings()).__name__, "auto_picks": choice.kernel,
                     "why": choice.reason}
    return out


def _float64_head(hidden, weight, targets, w_lp, w_ent, rows_per_chunk: int = 512):
    """float64 log-probs, entropies and the gradients of ``sum(w_lp * logp + w_ent * H)`` w.r.t.
    hidden and weight, from the textbook formulas, a block of rows at a time."""
    import torch

    h, w = hidden.double(), weight.double()
    lps, ents, grad_h, grad_w = [], [], [], torch.zeros_like(w)
    for start in range(0, h.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        logp = torch.log_softmax(h[rows] @ w.T, -1)
        p = logp.exp()
        ent = -(p * logp).sum(-1)
        onehot = torch.zeros_like(p).scatter_(-1, targets[rows, None], 1.0)
        dz = w_lp[rows, None].double() * (onehot - p) - w_ent[rows, None].double() * p * (logp + ent[:, None])
        lps.append(logp.gather(-1, targets[rows, None]).squeeze(-1))
        ents.append(ent)
        grad_h.append(dz @ w)
        grad_w += dz.T @ h[rows]
    return torch.cat(lps), torch.cat(ents), torch.cat(grad_h), grad_w


def _head_case(size: dict, device: str, logit_std: float, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    n, h, v = size["f64_rows"], size["f64_hidden"], size["vocab"]
    hidden = torch.randn(n, h, generator=gen).to(device)
    weight = (torch.randn(v, h, generator=gen) * (logit_std / h ** 0.5)).to(device)
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    return hidden, weight, targets, torch.randn(n, generator=gen).to(device), torch.randn(n, generator=gen).to(device)


def _head_vs_float64(size: dict, device: str, kernels: list[str]) -> dict:
    """Each kernel's log-probs, entropies and gradients (hidden, weight) against ``_float64_head``:
    logits of standard deviation 3 (float32 and bf16 autocast) and peaked ones (50: entropies near
    0, logits in the hundreds; float32)."""
    import torch

    from ampo_train.lm_head import HeadPass, head_logprobs

    out = {}
    for case, logit_std in (("normal", 3.0), ("peaked", 50.0)):
        hidden, weight, targets, w_lp, w_ent = _head_case(size, device, logit_std, seed=1)
        lp0, ent0, gh0, gw0 = _float64_head(hidden, weight, targets, w_lp, w_ent)
        peaked_rows = ent0 < 1e-3
        for precision in ("fp32", "bf16") if case == "normal" else ("fp32",):
            for kernel in kernels:
                head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=device)
                with torch.no_grad():
                    head.weight.copy_(weight)
                h = hidden.clone().requires_grad_()
                with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    lp, ent = head_logprobs(h, head, targets, HeadPass(1.0, with_entropy=True, kernel=kernel))
                ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
                _sync()
                cell = {"logprob_max_abs_diff": float((lp.double() - lp0).abs().max()),
                        "entropy_max_abs_diff": float((ent.double() - ent0).abs().max()),
                        "grad_hidden_rel_diff": float((h.grad.double() - gh0).norm() / gh0.norm()),
                        "grad_weight_rel_diff": float((head.weight.grad.double() - gw0).norm() / gw0.norm())}
                if case == "peaked" and bool(peaked_rows.any()):
                    cell["entropy_worst_rel_diff_peaked_rows"] = float(
                        ((ent.double() - ent0).abs() / ent0)[peaked_rows].max())
                out[f"{case}/{precision}/{kernel}"] = cell
        out[f"{case}/rows_x_vocab"] = [int(hidden.shape[0]), int(weight.shape[0])]
        out[f"{case}/min_entropy"] = float(ent0.min())
    return out


def _model_vs_full_logits(size: dict, device: str, kernels: list[str], shape: dict) -> dict:
    """Through a 2-layer Qwen2-shaped model: each kernel against the model's own full logits
    (values, every parameter's gradient), float32 and bf16 autocast."""
    import torch

    from ampo_train.data import Row, collate
    from ampo_train.forward import response_logprobs
    from bench.update_probe import UpdateProbe, random_qwen2

    probe = UpdateProbe(vocab=size["vocab"], rows=size["lm_rows"], response_tokens=size["lm_tokens"],
                        shape="qwen2", qwen2=shape, device=device)
    model = random_qwen2(probe, num_hidden_layers=size["lm_layers"])
    gen = torch.Generator().manual_seed(0)
    rows = [Row(torch.randint(10, size["vocab"], (32,), generator=gen).tolist(),
                torch.randint(10, size["vocab"], (size["lm_tokens"] - 37 * i,), generator=gen).tolist(), 0.0)
            for i in range(size["lm_rows"])]
    mb = collate(rows, 0).to(device)
    weights = torch.randn(mb.response_ids.shape, generator=gen).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    out = {"tokens": int(mb.response_mask.sum())}
    for name, autocast in (("fp32", False), ("bf16", True)):
        results = {}
        for path in ("full_logits", *kernels):
            model.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                lp, ent = response_logprobs(model, mb, 1.0, None if path == "full_logits" else 256,
                                            with_entropy=True, kernel=path if path != "full_logits" else "chunked")
            ((lp * weights).sum() + (ent * weights).sum() * 0.1).backward()
            grads = torch.cat([p.grad.float().flatten() for p in params if p.grad is not None])
            results[path] = (lp.detach().float(), ent.detach().float(), grads)
        b_lp, b_ent, b_g = results["full_logits"]
        mask = mb.response_mask
        for kernel in kernels:
            a_lp, a_ent, a_g = results[kernel]
            out[f"{name}/{kernel}"] = {"logprob_max_abs_diff": float((a_lp - b_lp).abs()[mask].max()),
                                       "entropy_max_abs_diff": float((a_ent - b_ent).abs()[mask].max()),
                                       "grad_rel_diff": float((a_g - b_g).norm() / b_g.norm())}
    return out


def part_lm_head(smoke: bool, size: dict, work: Path) -> dict:
    """The log-prob path ``auto`` picks here, and both paths against float64 and the full logits."""
    device = _device()
    problem = _fused_problem(device)
    kernels = ["chunked"] + (["fused"] if problem is None else [])
    out = {"device": _device_name(), "selection": _selection(size, device),
           "fused": "ran" if problem is None else f"not run: {problem}",
           "head_vs_float64": _head_vs_float64(size, device, kernels),
           "model_vs_full_logits": _model_vs_full_logits(size, device, kernels, _toy(smoke))}
    f64, model = out["head_vs_float64"], out["model_vs_full_logits"]
    out["ok"] = all(f64[f"normal/fp32/{k}"]["logprob_max_abs_diff"] < 1e-4 and
                    f64[f"normal/fp32/{k}"]["grad_hidden_rel_diff"] < 1e-3 and
                    f64[f"normal/fp32/{k}"]["grad_weight_rel_diff"] < 1e-3 and
                    f64[f"peaked/fp32/{k}"]["entropy_max_abs_diff"] < 1e-3 and
                    model[f"fp32/{k}"]["grad_rel_diff"] < 1e-3 and model[f"bf16/{k}"]["grad_rel_diff"] < 5e-2
                    for k in kernels)
    # the goal under float32: log-probs within 1e-5, gradients within 1e-3 (relative) of float64
    out["goal_met_fp32"] = {k: f64[f"normal/fp32/{k}"]["logprob_max_abs_diff"] < 1e-5 and
                            max(f64[f"normal/fp32/{k}"]["grad_hidden_rel_diff"],
                                f64[f"normal/fp32/{k}"]["grad_weight_rel_diff"]) < 1e-3 for k in kernels}
    return out


def part_fp16_scaler(smoke: bool, size: dict, work: Path) -> dict:
    """An overflowing fp16 update, then finite ones, through the trainer's Optimization.apply."""
    import torch
    from accelerate import Accelerator

    from ampo_train.metrics import StepStats
    from ampo_train.policy import Policy
    from ampo_train.update import Optimization
    from bench.update_probe import UpdateProbe, random_qwen2

    device = _device()
    if device == "cuda":
        accelerator = Accelerator(mixed_precision="fp16")  # Accelerate builds its GradScaler itself
    else:  # what Accelerate builds on a GPU, with a CPU GradScaler (as tests/test_training_extras.py)
        accelerator = Accelerator(cpu=True)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
        accelerator.native_amp = True
        accelerator.state._mixed_precision = "fp16"
    probe = UpdateProbe(vocab=size["vocab"], rows=1, response_tokens=8, shape="qwen2", qwen2=_toy(smoke), device=device)
    model = random_qwen2(probe, **SMOKE_SHAPE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    optimization = Optimization(accelerator, model, optimizer, scheduler, max_grad_norm=1.0)
    policy = Policy(model, None, 0)
    stats = StepStats()
    ids = torch.randint(10, size["vocab"], (2, 16), device=accelerator.device)
    seen = []
    for poison in (True, False, False):
        with accelerator.autocast():
            loss = model(input_ids=ids).logits.float().pow(2).mean()
        accelerator.backward(loss * float("inf") if poison else loss)
        norm = optimization.apply(policy, stats)
        seen.append({"poisoned": poison, "grad_norm": norm if norm == norm and abs(norm) != float("inf") else str(norm),
                     "scale": float(accelerator.scaler.get_scale()),
                     "skipped_so_far": stats.summary()["skipped_updates"]})
    ok = seen[0]["skipped_so_far"] == 1 and seen[2]["skipped_so_far"] == 1 and seen[1]["scale"] < 2.0 ** 16
    return {"ok": ok, "scaler": type(accelerator.scaler).__name__, "device": str(accelerator.device), "updates": seen}


def part_tiny_run(smoke: bool, size: dict, work: Path, world: Path | None) -> dict:
    """``ampo-train run`` on a tiny world: 3 steps, bf16 (on a GPU), LoRA, adaptive guidance."""
    import torch

    if world is None and smoke:
        world = _fixture_world(work / "world")
    if world is None or not (world / "train.yaml").is_file():
        return {"skipped": f"no tiny world at {world} (--world DIR: a folder built by `ampo-cache tiny-world build` "
                           "with its store built by `ampo-cache build`)"}
    out_dir = work / "tiny-run"
    overrides = ["max_steps=3", "save_steps=100", "log_every=1", f"output_dir={out_dir}", "eval=null",
                 "lora={r: 8, alpha: 16}", "lr=1e-4", "tensorboard=false",
                 f"mixed_precision={'bf16' if torch.cuda.is_available() else 'no'}"]
    if smoke:
        overrides += ["prompts_per_step=4", "mini_batch_prompts=2", "group_size=4", "rollout.max_new_tokens=16"]
    env = _child_env()
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cli.train", "run", "--config", str(world / "train.yaml"), *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    result = {"seconds": round(time.perf_counter() - started, 1), "returncode": done.returncode}
    if done.returncode != 0:
        return {**result, "ok": False, "stderr": done.stderr[-2000:]}
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    keys = ("reward", "guidance/fraction", "guidance/injected", "grad_norm", "entropy", "time/step",
            "time/generate", "time/update")
    steps = [{k: m.get(k) for k in ("step", *keys)} for m in lines]
    ok = [m["step"] for m in lines] == [1, 2, 3] and all(m.get("grad_norm") is not None for m in lines)
    return {**result, "ok": ok, "device": "cuda" if torch.cuda.is_available() else "cpu", "steps": steps}


def _fixture_world(root: Path) -> Path:
    """The tests' one-second world (a random student, a store of three teachers' traces) with a
    train.yaml: what a smoke run trains when no tiny world is given."""
    from tests.trainer_fixtures import base_config, make_world, write_config

    world = make_world(root, num_prompts=8, covered=0.75)
    write_config(root / "train.yaml", base_config(world, root / "out"))
    return root


# ----------------------------------------------------------------------------- 2. cost


def _measure_update(update, batch, device: str, repeats: int = 2) -> dict:
    """One full-size warm-up (kernel selection, Triton compilation, the allocator's growth), then
    ``repeats`` timed updates: the fastest one's seconds and the largest peak."""
    update(batch)
    _sync()
    runs = [_timed_update(update, batch, device) for _ in range(repeats)]
    best = min(runs, key=lambda r: r["seconds"])
    return {**best, "peak_mib": max(r["peak_mib"] for r in runs),
            "peak_growth_mib": max(r["peak_growth_mib"] for r in runs), "seconds_runs": [r["seconds"] for r in runs]}


def _timed_update(update, batch, device: str) -> dict:
    """One update between two ``torch.cuda.synchronize``, the peak memory reset just before it."""
    import gc

    import torch

    from bench.update_probe import hwm_kib, reset_hwm, rss_kib

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_kib() * 1024
        reset_hwm()
    _sync()
    started = time.perf_counter()
    update(batch)
    _sync()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else hwm_kib() * 1024
    return {"seconds": round(seconds, 3), "peak_mib": round(peak / 2 ** 20, 1),
            "peak_growth_mib": round((peak - before) / 2 ** 20, 1)}


def _error(exc: Exception) -> dict:
    return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}


def _free_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _arm_update(arm: str, probe, work: Path) -> dict:
    """One arm's measured update (``_measure_update``), or the error it raised (out of memory is a
    result too); its model is freed before the next arm builds one."""
    from bench.update_probe import make_update, probe_batch

    update = None
    try:
        update = make_update(arm, probe, work)
        return {**_measure_update(update, probe_batch(probe), probe.device), "ran": update.ran}
    except Exception as exc:  # noqa: BLE001
        return _error(exc)
    finally:
        del update
        _free_cuda()


class _CostArms:
    """Each (arm, mode)'s update, built once at the longest length and kept for every length (a
    model build per cell would eat the budget), and how long its last cell took."""

    def __init__(self, size: dict, smoke: bool, work: Path):
        self.size, self.smoke, self.work = size, smoke, work
        self.device = _device()
        self.updates: dict[tuple[str, str], object] = {}
        self.last: dict[tuple[str, str], tuple[int, float]] = {}  # (tokens, seconds of one update)

    def probe(self, mode: str, tokens: int):
        from bench.update_probe import UpdateProbe

        shape = {**_toy(self.smoke), "max_position_embeddings": max(self.size["tokens"]) + 1024}
        return UpdateProbe(vocab=self.size["vocab"], rows=self.size["rows"], response_tokens=tokens, prompt_tokens=128,
                           micro_batch=self.size["micro"], lora=mode == "lora", shape="qwen2", qwen2=shape,
                           device=self.device, autocast=self.device == "cuda", gradient_checkpointing=True)

    def too_long(self, arm: str, mode: str, tokens: int, deadline: float) -> str | None:
        """Why this cell cannot fit before ``deadline`` (3 updates, scaled from the arm's last
        cell by length^1.3, plus a build if the arm has none yet), else None."""
        left = deadline - time.time()
        done = self.last.get((arm, mode))
        need = (3 * done[1] * (tokens / done[0]) ** 1.3 if done else 0.0) + (0 if (arm, mode) in self.updates else 20)
        return None if need < left else f"time budget: about {need:.0f} s needed, {left:.0f} s left"

    def cell(self, arm: str, mode: str, tokens: int, deadline: float) -> dict:
        from bench.update_probe import make_update, probe_batch

        skip = self.too_long(arm, mode, tokens, deadline)
        if skip:
            return {"skipped": skip}
        try:
            if (arm, mode) not in self.updates:
                self.updates[(arm, mode)] = make_update(arm, self.probe(mode, max(self.size["tokens"])),
                                                        self.work / f"{arm}-{mode}")
            update = self.updates[(arm, mode)]
            result = _measure_update(update, probe_batch(self.probe(mode, tokens)), self.device)
            self.last[(arm, mode)] = (tokens, result["seconds"])
            return {**result, "ran": update.ran}
        except Exception as exc:  # noqa: BLE001 (out of memory at 32k is a result)
            return _error(exc)
        finally:
            _free_cuda()


def _ratios(row: dict, arms: list[str]) -> None:
    """ours / TRL time and memory-growth ratios, for each of our arms that TRL ran beside."""
    trl = row.get("trl", {})
    for arm in arms:
        ours = row.get(arm, {})
        if arm != "trl" and "seconds" in ours and "seconds" in trl:
            row[f"{arm}_vs_trl"] = {"seconds": round(ours["seconds"] / trl["seconds"], 3),
                                    "peak_growth": round(ours["peak_growth_mib"] / max(trl["peak_growth_mib"], 1e-9), 3)}


def part_cost(smoke: bool, size: dict, work: Path) -> dict:
    """Ours (chunked and fused) vs TRL: one update of 8 rows per (length, mode)."""
    device = _device()
    arms = [a for a in COST_ARMS if a != "trl" or importlib.util.find_spec("trl")]
    fused_problem = _fused_problem(device) if device == "cuda" else "the fused kernel runs on CUDA (timing Triton's " \
        "CPU interpreter means nothing; the lm_head part runs it there for correctness)"
    built = _CostArms(size, smoke, work)
    rows, card = [], _device_name()
    for tokens in size["tokens"]:
        for mode in ("lora", "full"):
            row = {"mode": mode, "response_tokens": tokens, "device": card}
            for arm in arms:
                row[arm] = {"skipped": fused_problem} if arm == "ours-fused" and fused_problem else \
                    built.cell(arm, mode, tokens, DEADLINE)
            _ratios(row, arms)
            rows.append(row)
            print(json.dumps(row), flush=True)
            _save_partial({"ok": False, "partial": True, "arms": arms, "rows": rows})
    note = None if "trl" in arms else "trl is not installed: ours alone (pip install -e '.[bench]')"
    return {"ok": all("seconds" in r[a] or "skipped" in r[a] for r in rows for a in arms if a != "trl"),
            "arms": arms, "rows": rows, "note": note, "device": card,
            "settings": {"rows": size["rows"], "micro_batch_rows": size["micro"], "prompt_tokens": 128,
                         "gradient_checkpointing_requested": True, "bf16_autocast": device == "cuda",
                         "loss_type": "dr_grpo", "warmup": "one full-size update", "timed": "best of 2"}}


# ----------------------------------------------------------------------------- 3. a run of that student


def _qwen2_student(folder: Path, smoke: bool) -> Path:
    """A random student of Qwen2-0.5B's layers (the toy shape in smoke runs) with the fixture
    world's character tokenizer and vocabulary, saved for ``ampo-train run``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from bench.update_probe import QWEN2_05B
    from tests.trainer_fixtures import make_tokenizer, save_model

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(**{**QWEN2_05B, **_toy(smoke), "vocab_size": len(tokenizer), "max_position_embeddings": 8192,
                            "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id})
    return save_model(Qwen2ForCausalLM(config), tokenizer, folder)


RUN_KEYS = ("reward", "guidance/fraction", "guidance/injected", "grad_norm", "entropy", "completions/mean_length",
            "completions/max_length", "time/step", "time/generate", "time/logprobs", "time/guidance", "time/update")


def part_student_run(smoke: bool, size: dict, work: Path) -> dict:
    """``ampo-train run``, 3 steps, of ``_qwen2_student`` on the fixture world: the phase times."""
    import torch

    from tests.trainer_fixtures import base_config, make_world, write_config

    world = make_world(work / "world", num_prompts=8, covered=0.75)
    out_dir = work / "run"
    config = base_config(world, out_dir, student=str(_qwen2_student(work / "qwen2-student", smoke)))
    write_config(work / "train.yaml", config)
    cuda = torch.cuda.is_available()
    overrides = ["max_steps=3", "save_steps=100", "log_every=1", "eval=null", "lora={r: 16, alpha: 32}", "lr=1e-5",
                 "tensorboard=false", "gradient_checkpointing=true", "logprob_kernel=auto", "micro_batch_size=4",
                 f"rollout.max_new_tokens={size['run_tokens']}", f"mixed_precision={'bf16' if cuda else 'no'}"]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cli.train", "run", "--config", str(work / "train.yaml"), *overrides],
                          cwd=ROOT, env=_child_env(), capture_output=True, text=True,
                          timeout=max(30, int(DEADLINE - time.time())))
    result = {"seconds": round(time.perf_counter() - started, 1), "returncode": done.returncode,
              "device": _device_name(), "overrides": overrides}
    if done.returncode != 0:
        return {**result, "ok": False, "stderr": done.stderr[-2000:]}
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [{k: m.get(k) for k in ("step", *RUN_KEYS)} for m in lines]
    ok = [m["step"] for m in lines] == [1, 2, 3] and all(m.get("grad_norm") is not None for m in lines)
    return {**result, "ok": ok, "steps": steps}


# ----------------------------------------------------------------------------- earlier parts: generation


def _char_tokenizer():
    """One token per character (exact offsets, as comprehension scoring needs), ids 0-2 for pad,
    unk and EOS (the probe model's), and a chat template."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789 .,:?=+-*x\\{}<>|\n":
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<eos>")
    tokenizer.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    return tokenizer


def part_generation(smoke: bool, size: dict, work: Path) -> dict:
    import torch

    from ampo_train.comprehension import Scoring, score_candidates
    from ampo_train.config import RolloutSettings
    from ampo_train.rollout import open_engine
    from bench.update_probe import UpdateProbe, make_update, probe_batch, random_qwen2

    device = _device()
    tokenizer = _char_tokenizer()
    probe = UpdateProbe(vocab=size["vocab"], rows=1, response_tokens=8, shape="qwen2", qwen2=_toy(smoke), device=device)
    model = random_qwen2(probe)
    if device == "cuda":
        model = model.to(torch.bfloat16)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    decode = {}
    for batch, tokens in ((size["gen_batch"], size["gen_tokens"]), size["gen_small"]):
        engine = open_engine("transformers", RolloutSettings(max_new_tokens=tokens), model, tokenizer)
        prompts = [torch.randint(10, len(tokenizer), (64,), generator=gen).tolist() for _ in range(batch)]
        # A first pass at the same size: a sequence length seen for the first time also pays kernel
        # selection (on the H200 a cold pass ran 2.3x slower per step); steps repeat across training.
        engine.generate(prompts, 1)
        _sync()
        started = time.perf_counter()
        groups = engine.generate(prompts, 1)
        _sync()
        seconds = time.perf_counter() - started
        generated = sum(len(g[0].token_ids) for g in groups)
        steps = max(len(g[0].token_ids) for g in groups)
        decode[f"{batch}x{tokens}"] = {"seconds": round(seconds, 2), "tokens": generated,
                                       "tokens_per_second": round(generated / seconds, 1),
                                       "seconds_per_step": seconds / steps}
    per_step = decode[f"{size['gen_small'][0]}x{size['gen_small'][1]}"]["seconds_per_step"]
    model.float()
    # A LoRA update of 8 rows per length (the cost part's setting), for the GRPO step it is compared with.
    scoring = []
    for length in size["score_lengths"]:
        traces = ["".join(chr(97 + (i * 7 + j) % 26) for j in range(length - 12)) + " \\boxed{42}" for i in range(4)]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            score_candidates(model, tokenizer, "What is 6 x 7?", traces[:1], "42", Scoring(chunk_size=256))  # warm-up
            _sync()
            started = time.perf_counter()
            score_candidates(model, tokenizer, "What is 6 x 7?", traces, "42", Scoring(chunk_size=256))
            _sync()
        score_s = time.perf_counter() - started
        update_probe = UpdateProbe(vocab=size["vocab"], rows=size["rows"], response_tokens=length, prompt_tokens=64,
                                   micro_batch=size["micro"], lora=True, shape="qwen2", qwen2=_toy(smoke), device=device,
                                   autocast=device == "cuda", gradient_checkpointing=True)
        update = make_update("ours", update_probe, work / f"gen-update-{length}")
        update_s = _measure_update(update, probe_batch(update_probe), device)["seconds"]
        update = None
        rollout_s = per_step * length  # 8 rollouts of `length` tokens decode in `length` steps at batch 8
        scoring.append({"candidate_tokens": length, "candidates": 4, "score_seconds": round(score_s, 3),
                        "grpo_step_seconds_per_prompt": round(rollout_s + update_s, 2),
                        "rollout_seconds_estimated": round(rollout_s, 2), "update_seconds": round(update_s, 3),
                        "guidance_fraction": round(score_s / (rollout_s + update_s), 4)})
        print(json.dumps(scoring[-1]), flush=True)
        _save_partial({"ok": False, "partial": True, "decode": decode, "guidance": scoring})
    return {"ok": True, "decode": decode, "guidance": scoring,
            "note": "rollout time of a prompt's 8 samples = decode steps x the measured seconds per step at batch "
                    "8 (decoding is memory-bound: the per-step time barely grows with the batch); the update: 8 rows "
                    "of that length, LoRA, measured"}


# ----------------------------------------------------------------------------- extra parts


def part_chunk_sweep(smoke: bool, size: dict, work: Path) -> dict:
    """One update (8 rows, LoRA and full, shortest and longest length) through ours at several
    LM-head chunk sizes (``logit_chunk_size``), beside TRL; best of 2."""


    from bench.update_probe import UpdateProbe

    device = _device()
    variants = [("trl", 256), ("ours", 256), ("ours", 1024), ("ours", 4096)]
    rows = []
    for mode in ("lora", "full"):
        for tokens in (size["tokens"][0], size["tokens"][-1]):
            row = {"mode": mode, "response_tokens": tokens}
            for arm, chunk in variants:
                if arm == "trl" and not importlib.util.find_spec("trl"):
                    continue
                name = arm if arm == "trl" else f"ours_chunk{chunk}"
                probe = UpdateProbe(vocab=size["vocab"], rows=size["rows"], response_tokens=tokens, prompt_tokens=128,
                                    micro_batch=size["micro"], lora=mode == "lora", shape="qwen2", qwen2=_toy(smoke),
                                    device=device, autocast=device == "cuda", gradient_checkpointing=True,
                                    logit_chunk_size=chunk)
                row[name] = _arm_update(arm, probe, work / f"{name}-{mode}-{tokens}")
            rows.append(row)
            print(json.dumps(row), flush=True)
            _save_partial({"ok": False, "partial": True, "rows": rows})
    return {"ok": True, "rows": rows}


def part_decode_overhead(smoke: bool, size: dict, work: Path) -> dict:
    """Seconds per decoding step at batch 64: ``model.generate`` alone, and through our
    TransformersRollout (which also records each sampled token's log-prob)."""
    import torch

    from ampo_train.config import RolloutSettings
    from ampo_train.rollout import open_engine
    from bench.update_probe import UpdateProbe, random_qwen2

    device = _device()
    tokenizer = _char_tokenizer()
    probe = UpdateProbe(vocab=size["vocab"], rows=1, response_tokens=8, shape="qwen2", qwen2=_toy(smoke),
                        device=device)
    model = random_qwen2(probe)
    if device == "cuda":
        model = model.to(torch.bfloat16)
    model.eval()
    steps = 128 if not smoke else 8
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, len(tokenizer), (64,), generator=gen).tolist() for _ in range(64 if not smoke else 4)]
    ids = torch.tensor(prompts, device=device)
    result = {}
    engine = open_engine("transformers", RolloutSettings(max_new_tokens=steps), model, tokenizer)
    for name in ("generate", "ours", "generate", "ours"):
        _sync()
        started = time.perf_counter()
        if name == "generate":
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                     max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0, eos_token_id=2)
            made = out.shape[1] - ids.shape[1]
        else:
            made = max(len(g[0].token_ids) for g in engine.generate(prompts, 1))
        _sync()
        result.setdefault(name, []).append((time.perf_counter() - started) / made)
    return {"ok": True, "batch": len(prompts), "steps": steps,
            "seconds_per_step": {k: [round(v, 4) for v in vals] for k, vals in result.items()}}


# ----------------------------------------------------------------------------- the parent

PARTIAL: Path | None = None  # a child's result file: long parts save what they have after each row
REPORT: Path | None = None  # gpu-check.json, which a child's partial results are merged into as well
PART: str | None = None  # the child's part
DEADLINE = float("inf")  # time.time() by which a child's part must be done (its share of --budget)


def _save_partial(result: dict) -> None:
    """A long part's results so far, into its own file and into gpu-check.json (a run cut off
    mid-part still reports every cell it measured)."""
    if PARTIAL is None:
        return
    PARTIAL.write_text(json.dumps(result, indent=1, default=str))
    if REPORT is not None and REPORT.exists():
        report = json.loads(REPORT.read_text())
        report["parts"][PART] = result
        REPORT.write_text(json.dumps(report, indent=1, default=str))


def run_part(name: str, args, out: Path) -> dict:
    """``name`` in a child process, within ``args.budget`` seconds; its result dict (or the failure)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--out", str(out),
           "--budget", str(int(args.budget))]
    if args.smoke:
        cmd.append("--smoke")
    if args.world:
        cmd += ["--world", str(args.world)]
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=_child_env(), capture_output=True,
                              text=True, timeout=max(30, int(args.budget) + 15))
    except subprocess.TimeoutExpired:
        partial = out / f"part-{name}.json"
        saved = json.loads(partial.read_text()) if partial.exists() else {}
        return {**saved, "ok": False, "error": "timed out (the rows above were measured before)",
                "seconds": round(time.perf_counter() - started, 1)}
    result_file = out / f"part-{name}.json"
    if done.returncode != 0 or not result_file.exists():
        return {"ok": False, "error": f"exit {done.returncode}", "stderr": done.stderr[-3000:],
                "seconds": round(time.perf_counter() - started, 1)}
    result = json.loads(result_file.read_text())
    result["seconds_part"] = round(time.perf_counter() - started, 1)
    return result


def child(name: str, args, out: Path) -> None:
    global PARTIAL, REPORT, PART, DEADLINE
    PARTIAL, REPORT, PART = out / f"part-{name}.json", out / "gpu-check.json", name
    DEADLINE = time.time() + args.budget
    PARTIAL.unlink(missing_ok=True)
    if name == "lm_head" and _device() == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined: run on CPU tensors
    size = SIZES["smoke" if args.smoke else "full"]
    work = Path(tempfile.mkdtemp(prefix=f"gpu-check-{name}-"))
    try:
        if name == "tiny_run":
            result = part_tiny_run(args.smoke, size, work, args.world)
        else:
            result = globals()[f"part_{name}"](args.smoke, size, work)
    except Exception as exc:  # recorded, so that the next part still runs
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:1000], "traceback": traceback.format_exc()[-3000:]}
    (out / f"part-{name}.json").write_text(json.dumps(result, indent=1, default=str))


def environment() -> dict:
    import torch

    from ampo_train.lm_head import triton_available

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "device": _device_name(), "triton_importable": triton_available()}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0),
                    gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1))
    from importlib.metadata import PackageNotFoundError, version

    for package in ("transformers", "peft", "accelerate", "trl", "triton", "datasets", "duckdb", "math-verify",
                    "pyarrow"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = "not installed"
    return info


def _lm_head_detail(part: dict) -> str:
    f64 = part["head_vs_float64"]
    kernels = [k for k in ("chunked", "fused") if f"normal/fp32/{k}" in f64]
    auto = part["selection"]
    text = f"auto picks {auto['lora']['auto_picks']} (LoRA), {auto['full']['auto_picks']} (full); " + "; ".join(
        f"{k} vs float64: logp {f64[f'normal/fp32/{k}']['logprob_max_abs_diff']:.1e}, "
        f"grad {max(f64[f'normal/fp32/{k}']['grad_hidden_rel_diff'], f64[f'normal/fp32/{k}']['grad_weight_rel_diff']):.1e}"
        f", peaked entropy {f64[f'peaked/fp32/{k}']['entropy_max_abs_diff']:.1e}" for k in kernels)
    return text if "fused" in kernels else f"{text}; fused {part['fused']}"


def _cost_detail(part: dict) -> str:
    def cell(r, arm):
        c = r.get(arm, {})
        return f"{c['seconds']} s {c['peak_growth_mib']} MiB" if "seconds" in c else (c.get("skipped") or c.get("error", "?"))[:40]

    return "; ".join(f"{r['mode']} {r['response_tokens']}: " + ", ".join(f"{a} {cell(r, a)}" for a in part["arms"])
                     for r in part["rows"])


def _detail(name: str, part: dict) -> str:
    if "skipped" in part or "error" in part:
        return part.get("skipped") or part.get("error") or ""
    if name == "lm_head" and "head_vs_float64" in part:
        return _lm_head_detail(part)
    if name == "cost" and "rows" in part:
        return _cost_detail(part)
    if name in ("student_run", "tiny_run") and "steps" in part:
        phases = ("generate", "logprobs", "guidance", "update")
        return f"{len(part['steps'])} steps, {part['seconds']} s; last step " + ", ".join(
            f"{p} {part['steps'][-1].get(f'time/{p}') or 0:.2f} s" for p in phases)
    if name == "fp16_scaler" and "updates" in part:
        return "scales " + " -> ".join(f"{u['scale']:g}" for u in part["updates"])
    if name == "chunk_sweep" and "rows" in part:
        return f"{len(part['rows'])} rows (see the JSON)"
    if name == "decode_overhead" and "seconds_per_step" in part:
        return ", ".join(f"{k} {v}" for k, v in part["seconds_per_step"].items())
    if name == "generation" and "decode" in part:
        return ", ".join(f"{k}: {v['tokens_per_second']} tok/s" for k, v in part["decode"].items()) + "; guidance " + \
            ", ".join(f"{g['candidate_tokens']}: {g['guidance_fraction']:.1%}" for g in part["guidance"])
    return ""


def summary_rows(report: dict) -> list[tuple[str, str, str]]:
    rows = []
    for name in (n for n in ALL_PARTS if n in report["parts"]):
        part = report["parts"][name]
        status = "skipped" if "skipped" in part else ("ok" if part.get("ok") else "FAILED")
        rows.append((name, status, _detail(name, part)))
    return rows


def _write(out: Path, report: dict) -> None:
    (out / "gpu-check.json").write_text(json.dumps(report, indent=1, default=str))


def run_parts(args, out: Path, wanted: list[str]) -> dict:
    """Every wanted part in order, each within what is left of ``args.budget`` less the time kept
    back for the parts after it (``RESERVE``, on a GPU); gpu-check.json rewritten after each."""
    started = time.perf_counter()
    report = {"mode": "smoke" if args.smoke else "full", "environment": environment(), "parts": {}}
    _write(out, report)
    order = [n for n in ALL_PARTS if n in wanted]
    for i, name in enumerate(order):
        left = args.budget - (time.perf_counter() - started)
        keep = 0 if args.smoke else sum(RESERVE.get(later, 0) for later in order[i + 1:])
        if left - keep < 20:
            report["parts"][name] = {"skipped": f"time budget ({args.budget:g} s) spent"}
            continue
        print(f"-- {name} ({left:.0f} s left, {keep} s kept for later parts)", flush=True)
        report["parts"][name] = run_part(name, argparse.Namespace(**{**vars(args), "budget": left - keep}), out)
        _write(out, report)
    report["seconds"] = round(time.perf_counter() - started, 1)
    _write(out, report)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="toy sizes on any device (CI): a few minutes")
    parser.add_argument("--world", type=Path, help="a tiny world with its store, for the tiny_run part")
    parser.add_argument("--out", type=Path, help="output folder (default: $OUT when set, else runs/gpu-check)")
    parser.add_argument("--parts", help=f"comma-separated, of {','.join(ALL_PARTS)} (default: {','.join(PARTS)}; "
                                        f"with --smoke: {','.join(SMOKE_PARTS)})")
    parser.add_argument("--budget", type=float, default=450, help="seconds for all parts; later parts are skipped")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = args.out or Path(os.environ.get("OUT") or ROOT / "runs" / "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        child(args.child, args, out)
        return
    wanted = [p.strip() for p in args.parts.split(",") if p.strip()] if args.parts else \
        list(SMOKE_PARTS if args.smoke else PARTS)
    unknown = sorted(set(wanted) - set(ALL_PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; known: {', '.join(ALL_PARTS)}")
    report = run_parts(args, out, wanted)
    width = max(len(name) for name in ALL_PARTS)
    print(f"\ngpu check ({report['mode']}, {report['environment']['device']}, {report['seconds']} s)")
    for name, status, detail in summary_rows(report):
        print(f"{name:<{width}}  {status:<7}  {detail}")
    print(f"wrote {out / 'gpu-check.json'}")
    failed = [n for n, part in report["parts"].items() if "skipped" not in part and not part.get("ok")]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
