"""`ampo-train plan`: check a training config before any weights load.

    plan = make_plan(PlanRequest(config=Path("train.yaml"), accelerate_config=Path("accelerate-4gpu.yaml")))
    plan.sections      # [Section("student", [(what, value), ...]), ...]: what the CLI prints as one table
    plan.verdict       # Verdict(fits=True | False | None, line="fits: ...")

What it reads, all small files: train.yaml (validated in planning mode: the prompts file, the store
and model weights need not be on this machine; missing ones become rows), the student's
``config.json`` (a local folder, or a hub id through the hub cache where a hub is reachable), the
launch layout (an Accelerate config file, the flags ``--processes N --layout ...``, or Accelerate's
default config file, as ``accelerate launch`` would), the prompts file and tokenizer when present
(the longest rendered prompt), teachers.yaml and the store when given (coverage of the training
prompts). The memory of one process comes from ``ampo_train.memory_model``; the verdict and the one
setting to change from ``ampo_train.plan_advice``.

Sizes are worst cases: every rollout and teacher trace at its full length (``rollout.max_new_tokens``,
``guidance.max_target_length``) and every prompt as long as the longest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ampo_common.errors import InputError
from ampo_train.config import TrainConfig, load_train_config
from ampo_train.memory_model import (GIB, LAYOUTS, Batch, Engine, Layout, Precision, Setup, Shape, kv_bytes_per_token,
                                     lora_count, shape_from_config)

DEFAULT_PROMPT_TOKENS = 1024   # the reference's max_prompt_length, when the prompts cannot be measured here
ASSUMED_GPU_GIB = 80.0         # when no --gpu-memory is given and no CUDA device is present


@dataclass(frozen=True)
class PlanRequest:
    config: Path
    overrides: tuple[str, ...] = ()
    teachers: Path | None = None
    store: Path | None = None
    accelerate_config: Path | None = None
    launch: tuple[int | None, str | None] = (None, None)   # --processes, --layout
    gpu_memory_gib: float | None = None
    prompt_tokens: int | None = None


@dataclass
class Section:
    title: str
    rows: list[tuple[str, str]] = field(default_factory=list)

    def add(self, what: str, value) -> None:
        self.rows.append((what, str(value)))


@dataclass(frozen=True)
class Verdict:
    fits: bool | None          # None: memory not checked (no shapes)
    line: str


@dataclass
class Plan:
    sections: list[Section]
    verdict: Verdict
    setup: Setup | None = None


# ----------------------------------------------------------------------------- inputs

def read_accelerate_config(path: Path) -> Layout:
    """The layout an Accelerate config file launches (``distributed_type``, ``num_processes``,
    FSDP version, ZeRO stage)."""
    if not path.is_file():
        raise InputError(str(path), "no such file (an Accelerate config, e.g. examples/accelerate/fsdp2.yaml)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise InputError(str(path), f"not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(str(path), "expected an Accelerate config (a mapping of keys)")
    kind = str(data.get("distributed_type", "NO")).upper()
    processes = int(data.get("num_processes", 1) or 1)
    if kind == "FSDP":
        version = int((data.get("fsdp_config") or {}).get("fsdp_version", 1))
        if version != 2:
            raise InputError(str(path), f"fsdp_config.fsdp_version: {version}: only FSDP2 is supported (fsdp_version: 2)")
        return Layout("fsdp2", processes)
    if kind == "DEEPSPEED":
        stage = int((data.get("deepspeed_config") or {}).get("zero_stage", 0))
        if stage not in (2, 3):
            raise InputError(str(path), f"deepspeed_config.zero_stage: {stage}: only ZeRO-2 and ZeRO-3 are supported")
        return Layout(f"zero{stage}", processes)
    if kind in ("MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU"):
        return Layout("ddp" if processes > 1 else "single", processes)
    return Layout("single", 1)


def launch_layout(request: PlanRequest) -> tuple[Layout, str]:
    """(layout, where it came from): flags, then the given Accelerate config, then Accelerate's
    default config file (what a bare ``accelerate launch`` uses), else one process."""
    processes, name = request.launch
    if request.accelerate_config is not None:
        layout = read_accelerate_config(request.accelerate_config)
        if processes or name:
            layout = Layout(name or layout.name, processes or layout.processes)
        return layout, str(request.accelerate_config)
    if processes or name:
        processes = processes or 1
        name = name or ("ddp" if processes > 1 else "single")
        if name not in LAYOUTS:
            raise InputError("--layout", f"expected one of {', '.join(LAYOUTS)}, got {name!r}")
        return Layout(name, processes), "--processes/--layout"
    from accelerate.commands.config.config_args import default_config_file

    if Path(default_config_file).is_file():
        return read_accelerate_config(Path(default_config_file)), f"Accelerate's default config, {default_config_file}"
    return Layout("single", 1), "no --accelerate-config and no Accelerate default config"


def model_shape(location: str) -> tuple[Shape | None, str]:
    """The shape in ``location``'s config.json: a local folder, or a hub id through the hub (or its
    local cache). (None, why) when neither has one."""
    from transformers import AutoConfig

    folder = Path(location)
    if folder.is_dir():
        source = folder / "config.json"
        if not source.is_file():
            return None, f"no config.json in {folder}"
    else:
        try:
            from huggingface_hub import hf_hub_download

            source = Path(hf_hub_download(location, "config.json"))
        except Exception as exc:  # noqa: BLE001 - offline, unknown repo, no network: one line either way
            first = str(exc).strip().split(". ")[0].splitlines()[0] if str(exc).strip() else ""
            reason = f"{type(exc).__name__}: {first}"[:200]
            return None, (f"no shapes for {location}: not a local folder, and no config.json from the hub or its cache "
                          f"({reason}); pass the folder that holds its config.json")
    try:
        return shape_from_config(AutoConfig.from_pretrained(str(source))), str(source)
    except Exception as exc:  # noqa: BLE001 - an unknown model_type, a broken file
        return None, f"{source}: cannot build the model's shape ({str(exc).strip().splitlines()[0][:160]})"


def longest_prompt(cfg: TrainConfig, given: int | None) -> tuple[int, str]:
    """Prompt tokens to plan for: ``--prompt-tokens``, else the longest training prompt rendered
    with the student's chat template (prompts file and tokenizer here), else 1,024."""
    if given:
        return given, "--prompt-tokens"
    tokenizer_dir = Path(cfg.tokenizer or cfg.student)
    has_tokenizer = tokenizer_dir.is_dir() and any((tokenizer_dir / f).is_file() for f in
                                                   ("tokenizer.json", "tokenizer.model", "vocab.json"))
    if not cfg.prompts.is_file() or not has_tokenizer:
        return DEFAULT_PROMPT_TOKENS, "assumed: the reference's max_prompt_length; prompts file or tokenizer not here"
    from ampo_cache.prompts import load_prompts
    from ampo_train.data import prepare_prompts
    from ampo_train.loading import load_tokenizer

    prompts = load_prompts(cfg.prompts, cfg.problem_col, cfg.answer_col)
    rendered = prepare_prompts(prompts, load_tokenizer(str(tokenizer_dir)), cfg.system_prompt)
    return max(len(p.token_ids) for p in rendered), f"longest of {len(rendered):,} rendered prompts"


# ----------------------------------------------------------------------------- the setup

@dataclass(frozen=True)
class StepShape:
    """How a step's rows fall into micro-batches on one process (worst case: every row full length)."""

    rows_per_process: int
    rows_per_update: int        # one process's rows in one optimizer update
    row_tokens: int             # prompt + the longest response or trace
    rows_per_micro: int
    batch: Batch


def step_shape(cfg: TrainConfig, layout: Layout, prompt_tokens: int) -> StepShape:
    response = max(cfg.rollout.max_new_tokens, cfg.target_length)
    row = prompt_tokens + response
    per_update = max(1, cfg.prompts_per_update * cfg.group_size // layout.processes)
    if cfg.micro_batch_tokens:
        rows = max(1, cfg.micro_batch_tokens // row)
    else:
        rows = cfg.micro_batch_size
    rows = min(rows, per_update)
    return StepShape(rows_per_process=cfg.prompts_per_step * cfg.group_size // layout.processes,
                     rows_per_update=per_update, row_tokens=row, rows_per_micro=rows,
                     batch=Batch(tokens=rows * row, response_tokens=rows * response))


def engine_bytes_per_param(cfg: TrainConfig, on_gpu: bool) -> int:
    """What the vLLM engine loads its weights as (``rollout.vllm.dtype``; auto: bf16 under mixed
    precision on a GPU, else train.yaml's dtype)."""
    dtype = cfg.rollout.vllm.dtype
    if dtype == "auto":
        dtype = "bfloat16" if on_gpu and cfg.mixed_precision == "bf16" else cfg.dtype
    return 4 if dtype == "float32" else 2


def rollout_engine(cfg: TrainConfig, shape: Shape, gpu_bytes: float, steps: StepShape) -> Engine:
    """The engine the run samples with (``auto`` is vLLM on a GPU machine) and what it takes."""
    kind = "vllm" if cfg.rollout.engine in ("vllm", "auto") else "transformers"
    if kind == "vllm":
        sleep = cfg.rollout.vllm.sleep_mode if cfg.rollout.vllm.sleep_mode is not None else not cfg.cpu
        if cfg.cpu:
            share = cfg.rollout.vllm.cpu_kv_cache_gib * GIB + shape.params * engine_bytes_per_param(cfg, False)
            return Engine("vllm", fraction=1.0, gpu_bytes=share, sleep=False)
        return Engine("vllm", fraction=cfg.rollout.vllm.gpu_memory_utilization, gpu_bytes=gpu_bytes, sleep=sleep)
    prompts = cfg.rollout.batch_size or max(1, steps.rows_per_process // cfg.group_size)
    sequences = prompts * cfg.group_size
    weight_bytes = Precision(cfg.dtype, cfg.mixed_precision).weight_bytes
    kv = sequences * steps.row_tokens * kv_bytes_per_token(shape, weight_bytes)
    logits = 3 * sequences * shape.vocab * 4
    return Engine("transformers", kv_bytes=kv + logits)


def training_setup(cfg: TrainConfig, shape: Shape, layout: Layout, steps: StepShape, gpu_bytes: float) -> Setup:
    lora = lora_count(shape, cfg.lora.r, cfg.lora.target_modules) if cfg.lora is not None else None
    return Setup(shape=shape, batch=steps.batch, precision=Precision(cfg.dtype, cfg.mixed_precision), layout=layout,
                 lora=lora, checkpointing=cfg.gradient_checkpointing, offload=cfg.activation_offload,
                 chunk=cfg.logit_chunk_size, kl_reference=bool(cfg.loss.kl_coef) and cfg.lora is None,
                 engine=rollout_engine(cfg, shape, gpu_bytes, steps))


def gpu_memory(given: float | None) -> tuple[float, str]:
    if given:
        return given * GIB, "--gpu-memory"
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return float(props.total_memory), f"this machine's {props.name}"
    except Exception:  # noqa: BLE001 - no usable CUDA: fall through to the assumption
        pass
    return ASSUMED_GPU_GIB * GIB, "assumed: no GPU here; --gpu-memory GIB sets it"


# ----------------------------------------------------------------------------- the plan

def make_plan(request: PlanRequest) -> Plan:
    """Every section and the verdict; raises InputError only for inputs that cannot be read at all."""
    from ampo_train import plan_advice, plan_rows

    cfg = load_train_config(request.config, list(request.overrides), planning=True)
    layout, layout_source = launch_layout(request)
    gpu_bytes, gpu_source = gpu_memory(request.gpu_memory_gib)
    shape, shape_source = model_shape(cfg.student)
    prompt_tokens, prompt_source = longest_prompt(cfg, request.prompt_tokens)
    steps = step_shape(cfg, layout, prompt_tokens)
    teachers = _teachers(request.teachers)
    store = request.store or cfg.store or (teachers.store if teachers is not None else None)

    sections = [plan_rows.model_section(cfg, shape, shape_source),
                plan_rows.files_section(cfg, shape, teachers, store),
                plan_rows.step_section(cfg, layout, layout_source, steps, (prompt_tokens, prompt_source))]
    if teachers is not None:
        sections.append(plan_rows.teachers_section(cfg, teachers))
    if store is not None:
        sections.append(plan_rows.coverage_section(cfg, Path(store), teachers))
    if shape is None:
        return Plan(sections, Verdict(None, f"memory not checked: {shape_source}"))
    setup = training_setup(cfg, shape, layout, steps, gpu_bytes)
    sections.append(plan_rows.memory_section(cfg, setup, (gpu_bytes, gpu_source), steps.row_tokens))
    return Plan(sections, plan_advice.verdict(cfg, setup, gpu_bytes, steps), setup)


def _teachers(path: Path | None):
    if path is None:
        return None
    from ampo_cache.teachers import load_build_config

    return load_build_config(path)
