"""Sample a model on benchmark files and verify every answer: the data behind ``metrics.summarise``.

One sampling-and-verifying loop (``sample_benchmarks``) over a ``Sampler``, which generates through
the trainer's rollout engines (``ampo_train.rollout``: transformers ``generate`` or vLLM):

- ``evaluate(specs, ...)``: the CLI's. A model is a local folder or hub id; a LoRA adapter
  (``--adapter``, or a folder holding an ``adapter_config.json``, such as a LoRA run's ``final/``)
  is loaded onto its base model and merged before sampling.
- ``training_eval.evaluate_during_training``: the trainer's, every N steps, on the weights being
  trained (``Sampler(engine, tokenizer, settings)`` over the run's own weights or engine).

Prompts are rendered with the tokenizer's chat template (a verl row's chat prompt as given, system
turn included), checked against the model's context before anything is generated, and sampled in
calls packed by a token budget (``prompts``). A problem may have several accepted answers
(``BenchItem.answers``): a sample is correct when it verifies against ANY of them (``verify_any``).
Results come per benchmark file, per ``data_source`` (pooled over the files) and overall.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ampo_common.errors import InputError
from ampo_common.sequences import eos_token_ids
from ampo_cache.model_folder import check_model_folder, model_location
from ampo_cache.verify import Verdict, Verifier
from ampo_train.config import RolloutSettings
from ampo_train.evaluation.benchmarks import BenchItem
from ampo_train.evaluation.metrics import ProblemResult, summarise
from ampo_train.evaluation.prompts import TRUNCATIONS, Prompt, PromptRenderer, generation_batches, model_context
from ampo_train.loading import load_tokenizer
from ampo_train.rollout import EngineTarget, Rollout, check_engine, open_engine


@dataclass
class EvalSettings:
    """How each model is sampled and scored (the CLI's options)."""

    samples: int = 16  # n: sampled answers per problem (avg@n, and pass@k for k <= n)
    ks: list[int] = field(default_factory=lambda: [1, 4, 16])
    temperature: float = 0.6  # the paper's evaluation temperature (0: greedy)
    top_p: float = 1.0
    max_tokens: int = 1024
    greedy: bool = False  # also decode greedily once per problem
    seed: int = 0
    # None: a chat prompt's own system turn (a plain problem: none); text: replaces it; "": removes it
    system_prompt: str | None = None
    engine: str = "transformers"  # transformers | vllm | auto (ampo_train.rollout)
    # token budget per generate call: sequences x (longest prompt + max_tokens) (evaluation.prompts)
    batch_tokens: int = 65536
    truncate: str = "error"  # a prompt longer than the context: error | left (cut its first tokens)
    verify_timeout: float = 5.0
    # math-verify pool size (None = one per CPU), started only when an answer is not a plain number,
    # so a pathological LaTeX answer times out instead of hanging the evaluation; 0 = in-process.
    verify_workers: int | None = None

    def rollout_settings(self, base: RolloutSettings | None = None) -> RolloutSettings:
        """The engine's sampling settings (``base``: the trainer's, whose engine options are kept).
        No batch cut of the engine's own: ``batch_tokens`` packs the problems already."""
        update = {"temperature": self.temperature or 1.0, "top_p": self.top_p if self.temperature else 1.0,
                  "top_k": 0, "max_new_tokens": self.max_tokens, "batch_size": None}
        return (base or RolloutSettings()).model_copy(update=update)


def check_settings(settings: EvalSettings) -> None:
    if any(k > settings.samples for k in settings.ks):
        raise InputError("--k", f"every k must be <= --samples ({settings.samples}); got {settings.ks}")
    if settings.batch_tokens < 1:
        raise InputError("--batch-tokens", f"expected a positive token budget, got {settings.batch_tokens}")
    if settings.truncate not in TRUNCATIONS:
        raise InputError("--truncate-prompts", f"expected one of {', '.join(TRUNCATIONS)}, got {settings.truncate!r}")


# ---------------------------------------------------------------- which model


@dataclass(frozen=True)
class ModelSpec:
    label: str
    model: str  # what AutoModelForCausalLM loads (the base, for an adapter)
    adapter: str | None = None

    @classmethod
    def parse(cls, model: str, adapter: str | None = None, label: str | None = None) -> "ModelSpec":
        """Check everything before any weights load: folders exist and are not corrupt, an adapter
        names a base we can find; a hub id (``org/name``) is taken on trust."""
        folder = Path(model).expanduser()
        if adapter is None and (folder / "adapter_config.json").is_file():
            adapter, model = model, _adapter_base(folder)
        if adapter is not None:
            if not (Path(adapter) / "adapter_config.json").is_file():
                raise InputError(adapter, "not a LoRA adapter folder (no adapter_config.json)")
            check_model_folder(adapter, tokenizer=False)  # its config parses, its weights are whole
        try:
            model = model_location(model, tokenizer=adapter is None or not _has_tokenizer(adapter))
        except InputError as exc:
            if adapter is None:
                raise
            raise InputError(str(adapter), f"its base model {exc}") from None
        if label is None:
            named = Path(adapter or model)
            label = named.parent.name if named.name in ("final", "merged") else named.name
        return cls(label, model, adapter)


def _adapter_base(folder: Path) -> str:
    check_model_folder(folder, weights=False, tokenizer=False)  # adapter_config.json parses (weights: in parse)
    base = json.loads((folder / "adapter_config.json").read_text())
    if not isinstance(base.get("base_model_name_or_path"), str):
        raise InputError(str(folder / "adapter_config.json"), "no 'base_model_name_or_path': cannot tell the base model")
    return base["base_model_name_or_path"]


def load_model(spec: ModelSpec, device: str):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is on screen
    try:
        model = AutoModelForCausalLM.from_pretrained(spec.model, dtype=torch.float32)
    except OSError as exc:  # a hub id the hub (or an offline machine) cannot provide
        raise InputError(spec.model, f"cannot load the model: {str(exc).strip().splitlines()[0]}") from None
    if spec.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, spec.adapter).merge_and_unload()
    return model.to(device).eval()


def _has_tokenizer(folder: str) -> bool:
    return (Path(folder) / "tokenizer_config.json").is_file()


# ---------------------------------------------------------------- generation


@dataclass(frozen=True)
class Answer:
    """One sampled response."""

    text: str
    num_tokens: int | None = None  # generated tokens, the EOS included (None when the engine does not say)
    finish_reason: str | None = None  # "stop" | "length" | None


class Generates(Protocol):
    """What a Sampler samples with: a rollout engine, or the trainer's ``Policy`` (which pushes its
    current weights to its engine first)."""

    def generate(self, prompts: Sequence[Sequence[int]], n: int, seed: int | None = None, greedy: bool = False,
                 settings: RolloutSettings | None = None) -> list[list[Rollout]]: ...


def _engine_target(spec: ModelSpec, settings: EvalSettings, tokenizer, stack: contextlib.ExitStack) -> EngineTarget:
    """What a vLLM engine loads for ``spec``: its folder, or with an adapter the merged weights
    (written to a temporary folder that ``stack`` removes)."""
    location = spec.model
    if spec.adapter is not None:
        location = stack.enter_context(tempfile.TemporaryDirectory(prefix="ampo-eval-"))
        load_model(spec, "cpu").save_pretrained(location)
        tokenizer.save_pretrained(location)
    return EngineTarget(model=location, tokenizer=location if spec.adapter else spec.model,
                        eos_ids=tuple(_eos_ids(location, tokenizer)), max_model_len=None, seed=settings.seed,
                        dtype="auto")


class Sampler:
    """One model ready to answer problems: n sampled answers per problem, or one greedy.

    ``Sampler(engine, tokenizer, settings)`` samples through an engine that is already open (the
    trainer's); ``Sampler.load(spec, settings, stack)`` loads a model and opens its engine (the
    CLI). Prompts are rendered by ``renderer`` (``evaluation.prompts``: the chat template, as in
    training; ``context``, the model's positions, enables the context check) and handed to the
    engine as token ids; answers are decoded with the same tokenizer.
    """

    def __init__(self, engine: Generates, tokenizer, settings: EvalSettings, rollout: RolloutSettings | None = None,
                 name: str = "transformers", context: int | None = None):
        """``rollout``: the engine's sampling settings to start from (the trainer's), else the defaults."""
        self.engine, self.tokenizer, self.settings, self.name = engine, tokenizer, settings, name
        self.rollout = settings.rollout_settings(rollout)
        self.renderer = renderer_for(tokenizer, settings, context)

    @classmethod
    def load(cls, spec: ModelSpec, settings: EvalSettings, stack: contextlib.ExitStack, tokenizer=None) -> "Sampler":
        """Load ``spec`` for ``settings.engine``; ``stack`` closes what was opened."""
        rollout = settings.rollout_settings()
        name = check_engine(rollout.model_copy(update={"engine": settings.engine}), key="--engine")
        tokenizer = spec_tokenizer(spec) if tokenizer is None else tokenizer
        engine = open_engine(name, rollout, lambda: load_model(spec, "cuda" if torch.cuda.is_available() else "cpu"),
                             tokenizer, lambda: _engine_target(spec, settings, tokenizer, stack), private_rng=True)
        stack.callback(engine.close)
        return cls(engine, tokenizer, settings, name=name, context=spec_context(spec))

    def prompt_ids(self, problems: Sequence[BenchItem | str]) -> list[list[int]]:
        """Chat-rendered prompts as token ids (unchecked against the context: see ``renderer.prepare``)."""
        return self.renderer.ids(problems)

    def generate(self, problems: Sequence[BenchItem | str], n: int, greedy: bool, seed: int) -> list[list[Answer]]:
        """n answers per problem (temperature 0: the greedy answer n times), or one greedy."""
        return self.generate_ids(self.prompt_ids(problems), n, greedy, seed)

    def generate_ids(self, prompts: Sequence[Sequence[int]], n: int, greedy: bool, seed: int) -> list[list[Answer]]:
        """``generate`` on prompts already rendered (``Prompt.ids``): one engine call."""
        greedy_only = greedy or not self.settings.temperature
        groups = self.engine.generate([list(p) for p in prompts], 1 if greedy_only else n, seed=seed,
                                      greedy=greedy_only, settings=self.rollout)
        if greedy_only and not greedy:
            groups = [group * n for group in groups]
        return [[Answer(self.tokenizer.decode(r.token_ids, skip_special_tokens=True), len(r.token_ids),
                        r.finish_reason) for r in group] for group in groups]


def renderer_for(tokenizer, settings: EvalSettings, context: int | None, model: str = "the model") -> PromptRenderer:
    return PromptRenderer(tokenizer, settings.system_prompt, settings.max_tokens, context, settings.truncate, model)


def spec_tokenizer(spec: ModelSpec):
    """The tokenizer a model is evaluated with: an adapter's own when it saved one, else the model's."""
    return load_tokenizer(spec.adapter if spec.adapter and _has_tokenizer(spec.adapter) else spec.model)


def spec_context(spec: ModelSpec) -> int | None:
    """The model's positions, read from its config without loading its weights."""
    from transformers import AutoConfig

    try:
        return model_context(AutoConfig.from_pretrained(spec.model))
    except (OSError, ValueError) as exc:
        raise InputError(spec.model, f"cannot load the model's config: {str(exc).strip().splitlines()[0]}") from None


def _eos_ids(location: str, tokenizer) -> list[int]:
    """The EOS ids of a model folder without loading its weights (its generation config, else its config)."""
    from transformers import AutoConfig, GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(location)
    except OSError:
        config = GenerationConfig.from_model_config(AutoConfig.from_pretrained(location))
    return eos_token_ids(config, tokenizer)


# ---------------------------------------------------------------- verifying


def verify_any(verifier: Verifier, texts: Sequence[str], accepted: Sequence[Sequence[str]]) -> list[Verdict]:
    """One verdict per text: correct when it matches ANY of its accepted answers (the matching
    answer's verdict), else the verdict against the first (wrong / no_answer / timeout / error)."""
    pairs = [(t, a) for t, answers in zip(texts, accepted, strict=True) for a in answers]
    flat = iter(verifier.verify([t for t, _ in pairs], [a for _, a in pairs]))
    verdicts = []
    for answers in accepted:
        mine = [next(flat) for _ in answers]
        verdicts.append(next((v for v in mine if v.correct), mine[0]))
    return verdicts


@dataclass
class ProblemRecord:
    """Everything about one problem's evaluation: the data of a sample log and of its summary."""

    item: BenchItem
    answers: list[Answer]
    verdicts: list[Verdict]
    greedy: Answer | None = None
    greedy_verdict: Verdict | None = None
    prompt: Prompt | None = None  # what the model was given (None: not recorded)
    batch: int = 0  # which generate call of its benchmark sampled it (0, 1, ...: longest prompts first)

    def result(self) -> ProblemResult:
        return ProblemResult([a.text for a in self.answers], [v.correct for v in self.verdicts],
                             None if self.greedy_verdict is None else self.greedy_verdict.correct)


def _sample_call(sampler: Sampler, items: Sequence[BenchItem], prompts: Sequence[Prompt], settings: EvalSettings,
                 verifier: Verifier, seed: int) -> list[ProblemRecord]:
    """One generate call's problems: n samples each (and one greedy decode when asked), verified."""
    n = settings.samples
    ids = [p.ids for p in prompts]
    sampled = sampler.generate_ids(ids, n, greedy=False, seed=seed)
    verdicts = verify_any(verifier, [a.text for answers in sampled for a in answers],
                          [i.answers for i in items for _ in range(n)])
    greedy: list[Answer | None] = [None] * len(items)
    greedy_verdicts: list[Verdict | None] = [None] * len(items)
    if settings.greedy:
        greedy = [s[0] for s in sampler.generate_ids(ids, 1, greedy=True, seed=seed)]
        greedy_verdicts = verify_any(verifier, [g.text for g in greedy], [i.answers for i in items])
    return [ProblemRecord(item, list(sampled[k]), verdicts[k * n:(k + 1) * n], greedy[k], greedy_verdicts[k],
                          prompts[k]) for k, item in enumerate(items)]


def sample_benchmark(sampler: Sampler, items: Sequence[BenchItem], settings: EvalSettings, verifier: Verifier,
                     advance: Callable[[int], None] | None = None,
                     prompts: Sequence[Prompt] | None = None) -> list[ProblemRecord]:
    """Sample n answers per problem (and one greedy when asked) and verify them; records in file order.

    ``prompts``: the items' prompts, prepared already (``evaluate`` prepares every file before
    any model loads); else prepared here (``renderer.prepare``: the context check). Problems go
    to the engine in calls packed by ``settings.batch_tokens`` (``prompts.generation_batches``);
    a call's seed is ``settings.seed`` plus its first problem's index.
    """
    prompts = sampler.renderer.prepare(items) if prompts is None else prompts
    batches = generation_batches([len(p.ids) for p in prompts], settings.samples, settings.max_tokens,
                                 settings.batch_tokens)
    records: list[ProblemRecord | None] = [None] * len(items)
    for number, batch in enumerate(batches):
        done = _sample_call(sampler, [items[i] for i in batch], [prompts[i] for i in batch], settings, verifier,
                            seed=settings.seed + batch[0])
        for i, record in zip(batch, done):
            record.batch = number
            records[i] = record
        if advance is not None:
            advance(len(batch))
    return records  # type: ignore[return-value]  # every index is in exactly one batch


def sample_benchmarks(sampler: Sampler, benchmarks: dict[str, list[BenchItem]], settings: EvalSettings,
                      verifier: Verifier, advance: Callable[[int], None] | None = None,
                      prompts: dict[str, list[Prompt]] | None = None) -> dict[str, list[ProblemRecord]]:
    """The one loop both entry points run: every benchmark, sampled and verified (``prompts``:
    prepared per benchmark, see ``sample_benchmark``)."""
    return {name: sample_benchmark(sampler, items, settings, verifier, advance, (prompts or {}).get(name))
            for name, items in benchmarks.items()}


def _summary(records: Sequence[ProblemRecord], settings: EvalSettings) -> dict:
    cut = sum(1 for r in records if r.prompt is not None and r.prompt.cut)
    return {**summarise([r.result() for r in records], settings.ks), "prompts_cut": cut}


def summaries(per_file: dict[str, list[ProblemRecord]], settings: EvalSettings) -> dict:
    """``{"benchmarks": {name: summary}, "sources": {data_source: summary}, "overall": summary}``
    (see ``metrics.summarise``; plus ``prompts_cut``, prompts cut to fit the context).

    ``sources`` splits the problems by their row's ``data_source`` (verl files), pooled over every
    file that has one, in order of first appearance (as verl reports ``val-core/<data_source>/...``);
    empty when no file has the column.
    """
    by_source: dict[str, list[ProblemRecord]] = {}
    for records in per_file.values():
        for record in records:
            if record.item.source is not None:
                by_source.setdefault(record.item.source, []).append(record)
    return {
        "benchmarks": {name: _summary(records, settings) for name, records in per_file.items()},
        "sources": {source: _summary(records, settings) for source, records in by_source.items()},
        "overall": _summary([r for records in per_file.values() for r in records], settings),
    }


# ---------------------------------------------------------------- entry points


@dataclass
class PreparedModel:
    """A model's tokenizer and every benchmark's prompts, ready before its weights load."""

    tokenizer: object
    prompts: dict[str, list[Prompt]]


def prepare_models(specs: Sequence[ModelSpec], benchmarks: dict[str, list[BenchItem]],
                   settings: EvalSettings) -> list[PreparedModel]:
    """Render and fit every prompt for every model (tokenizers and configs only): a prompt too
    long for a model's context fails here, in one line, before any model loads or generates."""
    prepared = []
    for spec in specs:
        tokenizer = spec_tokenizer(spec)
        renderer = renderer_for(tokenizer, settings, spec_context(spec), model=spec.label)
        prepared.append(PreparedModel(tokenizer, {name: renderer.prepare(items) for name, items in benchmarks.items()}))
    return prepared


def evaluate(specs: Sequence[ModelSpec], benchmarks: dict[str, list[BenchItem]], settings: EvalSettings,
             console=None, log_samples: str | Path | None = None) -> list[dict]:
    """One result per model: its settings, per-benchmark and per-``data_source`` summaries and the
    pooled ``overall``. Every prompt is checked against every model's context first.

    ``log_samples``: also write every sampled answer of every model to this Parquet file
    (``sample_log.write_sample_log``).
    """
    from ampo_train.evaluation.sample_log import sample_rows, write_sample_log

    check_settings(settings)
    check_engine(settings.rollout_settings().model_copy(update={"engine": settings.engine}), key="--engine")
    prepared = prepare_models(specs, benchmarks, settings)
    total = sum(len(items) for items in benchmarks.values())
    reports, rows = [], []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress, \
            Verifier(timeout=settings.verify_timeout, workers=settings.verify_workers) as verifier:
        for spec, ready in zip(specs, prepared):
            task = progress.add_task(f"eval {spec.label}", total=total)
            with contextlib.ExitStack() as stack:
                sampler = Sampler.load(spec, settings, stack, tokenizer=ready.tokenizer)
                per_file = sample_benchmarks(sampler, benchmarks, settings, verifier,
                                             lambda n, t=task: progress.advance(t, n), ready.prompts)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the model this sampler loaded is gone
            reports.append({"model": spec.label, "path": spec.model, "adapter": spec.adapter, "engine": sampler.name,
                            "settings": asdict(settings), **summaries(per_file, settings)})
            if log_samples is not None:
                rows.extend(sample_rows(spec.label, per_file, settings))
    if log_samples is not None:
        write_sample_log(rows, log_samples)
    return reports


def metric_values(report: dict, prefix: str = "eval") -> dict[str, float]:
    """Flat metrics: ``eval/<benchmark>/avg@16``, ``eval/<benchmark>/pass@4``, ``eval/<benchmark>/greedy``
    for every benchmark, ``eval/overall/...`` when there are several, and
    ``eval/source/<data_source>/...`` per data source (verl files)."""
    parts = dict(report["benchmarks"])
    if len(parts) > 1:
        parts["overall"] = report["overall"]
    parts.update({f"source/{name}": summary for name, summary in report.get("sources", {}).items()})
    values: dict[str, float] = {}
    for name, summary in parts.items():
        values[f"{prefix}/{name}/avg@{summary['samples']}"] = summary["avg@n"]
        values.update({f"{prefix}/{name}/pass@{k}": v for k, v in summary["pass@k"].items()})
        if summary["greedy"] is not None:
            values[f"{prefix}/{name}/greedy"] = summary["greedy"]
    return values
