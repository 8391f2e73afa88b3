"""The sections of `ampo-train plan`'s table: the student, the files, a step, the teachers, the
store's coverage of the training prompts, and one process's memory. Each returns a ``Section`` of
(what, value) rows; nothing here loads weights."""

from __future__ import annotations

from pathlib import Path

from ampo_train.config import TrainConfig
from ampo_train.memory_model import (GIB, Layout, Setup, Shape, activations, autocast_cache, gathered, phase_bytes,
                                     phase_total, regime, states)
from ampo_train.plan import Section, StepShape


def _gib(value: float) -> str:
    return f"{value / GIB:,.1f} GiB" if value >= 0.1 * GIB else f"{value / 2 ** 20:,.1f} MiB"


def shown(path) -> str:
    """A path as the user would type it here: relative to the current folder when inside it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def model_section(cfg: TrainConfig, shape: Shape | None, source: str) -> Section:
    section = Section("student")
    section.add("student", shown(cfg.student) if Path(cfg.student).exists() else cfg.student)
    if shape is None:
        section.add("shapes", source)
        return section
    section.add("shapes from", shown(source))
    section.add("architecture", f"{shape.model_type}: {shape.layers} layers, hidden {shape.hidden:,}, MLP "
                f"{shape.intermediate:,}, {shape.heads} heads ({shape.kv_heads} key/value, dim {shape.head_dim}), "
                f"vocabulary {shape.vocab:,} ({'tied' if shape.tied else 'untied'} head)")
    section.add("parameters", _count(shape.params))
    if cfg.lora is not None:
        from ampo_train.memory_model import lora_count

        lora = lora_count(shape, cfg.lora.r, cfg.lora.target_modules)
        names = ", ".join(name for name, _, _ in lora.adapted) or "none (no module matches target_modules)"
        section.add("trainable", f"{_count(lora.trainable)} (LoRA r={cfg.lora.r} on {names})")
    else:
        section.add("trainable", f"{_count(shape.params)} (full fine-tuning)")
    if not cfg.loss.kl_coef:
        section.add("KL reference", "none (loss.kl_coef 0)")
    elif cfg.lora is not None:
        section.add("KL reference", "the base with the adapter disabled: the student's shapes, no extra memory")
    else:
        section.add("KL reference", "a whole copy of the student (the same shapes) on every process")
    return section


def _weights_here(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def _model_status(location: str) -> str:
    folder = Path(location)
    if not folder.is_dir():
        return "hub id (downloaded by the run)" if not location.startswith(("/", ".", "~")) else "missing"
    return "here" if _weights_here(folder) else "config.json only: download the weights into this folder before the run"


def files_section(cfg: TrainConfig, shape: Shape | None, teachers, store) -> Section:
    """What `ampo-train run` (and `ampo-cache build`) will need that is or is not on this machine."""
    section = Section("files")
    section.add("student weights", _model_status(cfg.student))
    section.add("prompts", f"{shown(cfg.prompts)}: {'here' if cfg.prompts.is_file() else 'missing'}")
    if store is not None:
        here = (Path(store) / "store.json").is_file()
        section.add("trace store", f"{shown(store)}: {'here' if here else 'missing (ampo-cache import / build)'}")
    elif cfg.guidance.mode != "off":
        section.add("trace store", "none: every prompt that needs guidance counts as a miss")
    for path in (cfg.eval.files if cfg.eval else []):
        section.add("eval file", f"{shown(path)}: {'here' if Path(path).is_file() else 'missing'}")
    if teachers is not None:
        section.add("teachers' prompts", f"{shown(teachers.prompts)}: {'here' if teachers.prompts.is_file() else 'missing'}")
    return section


def step_section(cfg: TrainConfig, layout: Layout, layout_source: str, steps: StepShape,
                 prompt: tuple[int, str]) -> Section:
    section = Section("one step")
    n = layout.processes
    section.add("launch", f"{layout.name}, {n} process{'es' if n > 1 else ''} ({layout_source})")
    rows = cfg.prompts_per_step * cfg.group_size
    section.add("rollouts", f"{cfg.prompts_per_step} prompts x G={cfg.group_size} = {rows:,} per step"
                + (f", {steps.rows_per_process:,} per process" if n > 1 else ""))
    section.add("updates", f"{cfg.updates_per_step} per step (mini-batch {cfg.prompts_per_update} prompts = "
                f"{steps.rows_per_update:,} rows per process)")
    response = max(cfg.rollout.max_new_tokens, cfg.target_length)
    section.add("tokens per row", f"{prompt[0]:,} prompt ({prompt[1]}) + {response:,} response = {steps.row_tokens:,}")
    section.add("tokens per step", f"up to {rows * steps.row_tokens:,} ({rows:,} rows, every one full length)")
    micro = -(-steps.rows_per_update // steps.rows_per_micro)
    budget = f"micro_batch_tokens {cfg.micro_batch_tokens:,}" if cfg.micro_batch_tokens else \
        f"micro_batch_size {cfg.micro_batch_size}"
    section.add("micro-batches", f"{micro} per update per process: {steps.rows_per_micro} row"
                f"{'s' if steps.rows_per_micro > 1 else ''} = {steps.batch.tokens:,} tokens each ({budget})")
    return section


def teachers_section(cfg: TrainConfig, teachers) -> Section:
    section = Section("teachers")
    for t in teachers.teachers:
        s = t.sampling
        section.add(t.name, f"{t.model}, {t.backend}, TP {t.tensor_parallel_size}: temperature {s.temperature}, top_p "
                    f"{s.top_p}, top_k {s.top_k}, max_tokens {s.max_tokens:,}")
    longest = max(t.sampling.max_tokens for t in teachers.teachers)
    if longest > cfg.target_length:
        section.add("note", f"traces are cut to {cfg.target_length:,} student tokens in training "
                    f"(guidance.max_target_length); teachers may write {longest:,}")
    return section


def coverage_section(cfg: TrainConfig, store: Path, teachers) -> Section:
    """How many training prompts have a verified (correct) trace, per teacher and from any."""
    section = Section("coverage of the training prompts")
    if not (store / "store.json").is_file():
        section.add("store", f"{shown(store)}: missing")
        return section
    if not cfg.prompts.is_file():
        section.add("prompts", f"{shown(cfg.prompts)}: missing, coverage not computed")
        return section
    from ampo_cache.prompts import load_prompts

    ids = [p.prompt_id for p in load_prompts(cfg.prompts, cfg.problem_col, cfg.answer_col)]
    counts, covered, at_least_k = _coverage(store, ids, cfg.guidance.k)
    total = len(ids)
    section.add("training prompts", f"{total:,}")
    section.add("with a verified trace", f"{covered:,} ({covered / total:.0%}); {total - covered:,} without")
    section.add(f"with >= {cfg.guidance.k} teachers (guidance.k)", f"{at_least_k:,} ({at_least_k / total:.0%})")
    names = sorted(set(counts) | {t.name for t in (teachers.teachers if teachers is not None else [])})
    for name in names:
        n = counts.get(name, 0)
        section.add(f"teacher {name}", f"{n:,} prompts ({n / total:.0%})" + ("" if name in counts else ": no traces"))
    return section


def _coverage(store: Path, prompt_ids: list[str], k: int) -> tuple[dict[str, int], int, int]:
    import pyarrow as pa

    from ampo_cache.store import TraceStore

    with TraceStore.open(store).connect() as con:
        con.register("training", pa.table({"prompt_id": prompt_ids}))
        per_prompt = """SELECT prompt_id, count(DISTINCT teacher) AS teachers FROM traces
                        WHERE correct AND prompt_id IN (SELECT prompt_id FROM training) GROUP BY 1"""
        counts = dict(con.execute(f"""SELECT teacher, count(DISTINCT prompt_id) FROM traces WHERE correct AND
                                      prompt_id IN (SELECT prompt_id FROM training) GROUP BY 1""").fetchall())
        covered, at_least_k = con.execute(
            f"SELECT count(*), count(*) FILTER (WHERE teachers >= {int(k)}) FROM ({per_prompt})").fetchone()
    return {str(t): int(n) for t, n in counts.items()}, int(covered), int(at_least_k)


def memory_section(cfg: TrainConfig, setup: Setup, gpu: tuple[float, str], row_tokens: int) -> Section:
    """One process's memory by component (at the phase where each is largest) and per phase."""
    section = Section("memory per process")
    from ampo_train.plan_advice import CUDA_RESERVED_GIB, vllm_room

    section.add("GPU", f"{_gib(gpu[0])}, {gpu[1]}; {CUDA_RESERVED_GIB:.0f} GiB kept for the CUDA context")
    st, acts = states(setup), activations(setup)
    name = regime(setup.lora is not None, setup.precision, setup.layout.name not in ("single", "ddp"))
    section.add("weights", f"{_gib(st['weights'])} (dtype {cfg.dtype}, mixed_precision {cfg.mixed_precision})")
    section.add("gradients", f"{_gib(st['gradients'])} (update)")
    section.add("optimizer state", f"{_gib(st['optimizer'])} (AdamW)")
    if st["reference"]:
        section.add("KL reference", _gib(st["reference"]))
    if gathered(setup, "generate"):
        section.add("gathered weights", f"{_gib(gathered(setup, 'generate'))} (generation and scoring), "
                    f"{_gib(gathered(setup, 'update'))} (update)")
    if autocast_cache(setup):
        section.add("autocast copies", f"{_gib(autocast_cache(setup))} (bf16 copies of the trainable weights)")
    ckpt = "checkpointed" if setup.checkpointing else "no checkpointing"
    section.add("activations", f"{_gib(acts['inputs'] + acts['layers'] + acts['hidden'])} ({setup.batch.tokens:,} "
                f"tokens per micro-batch, {ckpt}, {name})")
    head = (f"full logits of {setup.batch.response_tokens:,} tokens: {setup.layout.name} runs the model's own head"
            if setup.layout.shards_parameters else f"chunks of {setup.chunk} positions")
    section.add("LM head", f"{_gib(acts['head'])} ({head})")
    section.add("rollout engine", _engine_row(cfg, setup))
    if setup.engine.kind == "vllm" and not cfg.cpu:
        room = vllm_room(cfg, setup, row_tokens)
        section.add("vLLM share", f"weights {_gib(room['weights'])}, KV cache for {room['kv_tokens']:,} tokens = "
                    f"{room['sequences']:,} sequences of {room['max_model_len']:,} at once")
    totals = {phase: phase_total(parts, setup.engine.kind == "vllm") for phase, parts in phase_bytes(setup).items()}
    section.add("per phase", ", ".join(f"{phase} {_gib(v)}" for phase, v in totals.items())
                + " (with 10% for the allocator)")
    return section


def _engine_row(cfg: TrainConfig, setup: Setup) -> str:
    engine = setup.engine
    if engine.kind == "vllm" and cfg.cpu:
        return f"vLLM on the CPU: {_gib(engine.awake_bytes)} (weights + cpu_kv_cache_gib)"
    if engine.kind == "vllm":
        asleep = "asleep during the update (sleep mode)" if engine.sleep else "kept during the update (sleep_mode false)"
        return f"vLLM, {engine.fraction:.2f} of the GPU = {_gib(engine.awake_bytes)} while generating, {asleep}"
    return f"transformers generate: {_gib(engine.kv_bytes)} of KV cache and logits while generating"
