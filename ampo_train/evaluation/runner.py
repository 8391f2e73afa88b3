"""Sample a model on benchmark files and verify every answer: the data behind ``metrics.summarise``.

Two entry points share one sampling-and-verifying loop (``sample_benchmarks``):

- ``evaluate(specs, ...)``: the CLI's. A model is a local folder or hub id; a LoRA adapter
  (``--adapter``, or a folder holding an ``adapter_config.json``, such as a LoRA run's ``final/``)
  is loaded onto its base model and merged before sampling.
- ``evaluate_loaded(model, tokenizer, ...)``: the trainer's, every N steps, on the weights being
  trained. Nothing is loaded, merged or copied; a model in train mode (e.g. a peft ``PeftModel``)
  samples in eval mode and is put back in its own mode afterwards; torch's random state is left
  as it was, so evaluating does not change the training run. ``generate=`` plugs in another
  engine (vLLM) in place of transformers ``generate``.

Prompts are rendered with the tokenizer's chat template, as in training. A problem may have several
accepted answers (``BenchItem.answers``): a sample is correct when it verifies against ANY of them
(``verify_any``).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ampo_cache.errors import InputError
from ampo_cache.generation import conversation, resolve_backend
from ampo_cache.generation.hf import left_padded
from ampo_cache.model_folder import check_model_folder, model_location
from ampo_cache.teachers import Sampling, Teacher
from ampo_cache.verify import Verdict, Verifier
from ampo_train.evaluation.benchmarks import BenchItem
from ampo_train.evaluation.metrics import ProblemResult, summarise


@dataclass
class EvalSettings:
    """How each model is sampled and scored (the CLI's options)."""

    samples: int = 16  # n: sampled answers per problem (avg@n, and pass@k for k <= n)
    ks: list[int] = field(default_factory=lambda: [1, 4, 16])
    temperature: float = 0.6  # the paper's evaluation temperature
    top_p: float = 1.0
    max_tokens: int = 1024
    greedy: bool = False  # also decode greedily once per problem
    seed: int = 0
    system_prompt: str | None = None
    backend: str = "transformers"  # transformers | vllm | auto
    batch_sequences: int = 512  # sequences per generate call (prompts x samples)
    verify_timeout: float = 5.0
    # math-verify pool size (None = one per CPU), started only when an answer is not a plain number,
    # so a pathological LaTeX answer times out instead of hanging the evaluation; 0 = in-process.
    verify_workers: int | None = None


def check_settings(settings: EvalSettings) -> None:
    if any(k > settings.samples for k in settings.ks):
        raise InputError("--k", f"every k must be <= --samples ({settings.samples}); got {settings.ks}")


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


def load_tokenizer(location: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except OSError as exc:
        raise InputError(location, f"cannot load the tokenizer: {str(exc).strip().splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _has_tokenizer(folder: str) -> bool:
    return (Path(folder) / "tokenizer_config.json").is_file()


def _copy_tokenizer(source: str, target: str) -> None:
    load_tokenizer(source).save_pretrained(target)


# ---------------------------------------------------------------- generation


@dataclass(frozen=True)
class Answer:
    """One sampled response."""

    text: str
    num_tokens: int | None = None  # generated tokens, the EOS included (None when the engine does not say)
    finish_reason: str | None = None  # "stop" | "length" | None


# generate(prompt_token_ids, n, temperature, *, top_p, max_tokens, seed) -> n responses per prompt, each a
# str or an object with .text (and optionally .num_tokens, .finish_reason). temperature 0 = greedy.
GenerateFn = Callable[..., Sequence[Sequence[object]]]


def _as_answer(output) -> Answer:
    if isinstance(output, str):
        return Answer(output)
    return Answer(output.text, getattr(output, "num_tokens", None), getattr(output, "finish_reason", None))


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Eval mode (no dropout) for sampling; every submodule's own mode restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


class TransformersGenerate:
    """transformers ``generate`` on an already loaded model: the default ``GenerateFn``.

    Sampling uses a forked torch RNG seeded per call, so results depend only on the seed, and the
    caller's random state (the trainer's) is untouched.
    """

    def __init__(self, model: torch.nn.Module, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        from ampo_cache.generation.hf import eos_token_ids

        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos_token_ids(model, tokenizer))

    @torch.no_grad()
    def __call__(self, prompt_token_ids: Sequence[Sequence[int]], n: int, temperature: float, *, top_p: float = 1.0,
                 max_tokens: int, seed: int) -> list[list[Answer]]:
        device = next(self.model.parameters()).device
        input_ids, attention = left_padded(prompt_token_ids, self.pad_id)
        width = input_ids.shape[1]
        greedy = temperature == 0
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), eval_mode(self.model):
            torch.manual_seed(seed)
            output = self.model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device),
                do_sample=not greedy, temperature=None if greedy else temperature, top_p=None if greedy else top_p,
                # top_k 0: no cut (None would take the generation config's default of 50, which
                # vLLM and the training rollouts do not apply)
                top_k=0, max_new_tokens=max_tokens, num_return_sequences=n,
                pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids),
            )
        answers = [self._one(tokens) for tokens in output[:, width:].tolist()]
        return [answers[i * n:(i + 1) * n] for i in range(len(prompt_token_ids))]

    def _one(self, tokens: list[int]) -> Answer:
        stop = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
        kept = tokens if stop is None else tokens[: stop + 1]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Answer(text, len(kept), "length" if stop is None else "stop")


def _teacher(location: str, settings: EvalSettings, temperature: float, backend: str) -> Teacher:
    return Teacher(name="eval", model=location, backend=backend, system_prompt=settings.system_prompt,
                   sampling=Sampling(temperature=temperature, top_p=settings.top_p if temperature else 1.0,
                                     max_tokens=settings.max_tokens))


class Sampler:
    """One model ready to answer problems: n sampled answers per problem, or one greedy.

    ``Sampler(spec, settings, stack)`` loads a model (the CLI); ``Sampler.from_loaded(model,
    tokenizer, settings, generate)`` wraps one that is already in memory (the trainer). Either way
    prompts are chat-rendered to token ids and handed to a ``GenerateFn``, except for the CLI's vLLM
    engine, which renders the same way inside ``VLLMBackend``.
    """

    engine: str
    tokenizer: object = None
    _generate: GenerateFn | None = None
    _backend = None  # VLLMBackend, for --backend vllm
    _greedy_sampling: Sampling | None = None

    def __init__(self, spec: ModelSpec, settings: EvalSettings, stack: contextlib.ExitStack):
        self.settings = settings
        self.engine = resolve_backend(_teacher(spec.model, settings, settings.temperature, settings.backend))
        tokenizer_home = spec.adapter if spec.adapter and _has_tokenizer(spec.adapter) else spec.model
        if self.engine == "vllm":
            from ampo_cache.generation.vllm_backend import VLLMBackend

            location = spec.model
            if spec.adapter is not None:  # vLLM gets the merged weights
                location = stack.enter_context(tempfile.TemporaryDirectory(prefix="ampo-eval-"))
                load_model(spec, "cpu").save_pretrained(location)
                _copy_tokenizer(tokenizer_home, location)
            self._backend = VLLMBackend(_teacher(location, settings, settings.temperature, "vllm"))
            self._greedy_sampling = _teacher(location, settings, 0.0, "vllm").sampling  # same engine, greedy params
        else:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            tokenizer = load_tokenizer(tokenizer_home)
            self._use(tokenizer, TransformersGenerate(load_model(spec, device), tokenizer))

    @classmethod
    def from_loaded(cls, model: torch.nn.Module, tokenizer, settings: EvalSettings,
                    generate: GenerateFn | None = None) -> "Sampler":
        """A sampler over a model already in memory (``generate`` given: that engine, model unused)."""
        sampler = cls.__new__(cls)
        sampler.settings = settings
        sampler.engine = "transformers" if generate is None else "custom"
        sampler._use(tokenizer, generate or TransformersGenerate(model, tokenizer))
        return sampler

    def _use(self, tokenizer, generate: GenerateFn) -> None:
        self.tokenizer, self._generate = tokenizer, generate

    def prompt_ids(self, problems: Sequence[str]) -> list[list[int]]:
        """Chat-rendered prompts as token ids (the template holds any BOS: no special tokens added)."""
        texts = [self.tokenizer.apply_chat_template(conversation(p, self.settings.system_prompt),
                                                    add_generation_prompt=True, tokenize=False) for p in problems]
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    def generate(self, problems: Sequence[str], n: int, greedy: bool, seed: int) -> list[list[Answer]]:
        temperature = 0.0 if greedy else self.settings.temperature
        if self._backend is not None:
            chats = [conversation(p, self.settings.system_prompt) for p in problems]
            outputs = self._backend.generate(chats, 1 if greedy else n, seed=seed,
                                             sampling=self._greedy_sampling if greedy else None)
        else:
            outputs = self._generate(self.prompt_ids(problems), 1 if greedy else n, temperature,
                                     top_p=self.settings.top_p if temperature else 1.0,
                                     max_tokens=self.settings.max_tokens, seed=seed)
        return [[_as_answer(o) for o in per_problem] for per_problem in outputs]

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
        self._generate = None  # drops the model this sampler loaded (a caller's model lives on)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


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

    def result(self) -> ProblemResult:
        return ProblemResult([a.text for a in self.answers], [v.correct for v in self.verdicts],
                             None if self.greedy_verdict is None else self.greedy_verdict.correct)


def sample_benchmark(sampler: Sampler, items: Sequence[BenchItem], settings: EvalSettings, verifier: Verifier,
                     advance: Callable[[int], None] | None = None) -> list[ProblemRecord]:
    """Sample n answers per problem (and one greedy when asked), in chunks of ~batch_sequences, and verify them."""
    per_call = max(1, settings.batch_sequences // settings.samples)
    records: list[ProblemRecord] = []
    for start in range(0, len(items), per_call):
        chunk = items[start:start + per_call]
        problems = [i.problem for i in chunk]
        sampled = sampler.generate(problems, settings.samples, greedy=False, seed=settings.seed + start)
        verdicts = verify_any(verifier, [a.text for answers in sampled for a in answers],
                              [i.answers for i in chunk for _ in range(settings.samples)])
        greedy: list[Answer | None] = [None] * len(chunk)
        greedy_verdicts: list[Verdict | None] = [None] * len(chunk)
        if settings.greedy:
            greedy = [s[0] for s in sampler.generate(problems, 1, greedy=True, seed=settings.seed + start)]
            greedy_verdicts = verify_any(verifier, [g.text for g in greedy], [i.answers for i in chunk])
        for i, item in enumerate(chunk):
            mine = verdicts[i * settings.samples:(i + 1) * settings.samples]
            records.append(ProblemRecord(item, list(sampled[i]), mine, greedy[i], greedy_verdicts[i]))
        if advance is not None:
            advance(len(chunk))
    return records


def sample_benchmarks(sampler: Sampler, benchmarks: dict[str, list[BenchItem]], settings: EvalSettings,
                      verifier: Verifier, advance: Callable[[int], None] | None = None) -> dict[str, list[ProblemRecord]]:
    """The one loop both entry points run: every benchmark, sampled and verified."""
    return {name: sample_benchmark(sampler, items, settings, verifier, advance) for name, items in benchmarks.items()}


def summaries(per_file: dict[str, list[ProblemRecord]], settings: EvalSettings) -> dict:
    """``{"benchmarks": {name: summary}, "overall": summary}`` (see ``metrics.summarise``)."""
    return {
        "benchmarks": {name: summarise([r.result() for r in records], settings.ks) for name, records in per_file.items()},
        "overall": summarise([r.result() for records in per_file.values() for r in records], settings.ks),
    }


# ---------------------------------------------------------------- entry points


def evaluate(specs: Sequence[ModelSpec], benchmarks: dict[str, list[BenchItem]], settings: EvalSettings,
             console=None, log_samples: str | Path | None = None) -> list[dict]:
    """One result per model: its settings, per-benchmark summaries and the pooled ``overall``.

    ``log_samples``: also write every sampled answer of every model to this Parquet file
    (``sample_log.write_sample_log``).
    """
    from ampo_train.evaluation.sample_log import sample_rows, write_sample_log

    check_settings(settings)
    total = sum(len(items) for items in benchmarks.values())
    reports, rows = [], []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress, \
            Verifier(timeout=settings.verify_timeout, workers=settings.verify_workers) as verifier:
        for spec in specs:
            task = progress.add_task(f"eval {spec.label}", total=total)
            with contextlib.ExitStack() as stack:
                sampler = Sampler(spec, settings, stack)
                try:
                    per_file = sample_benchmarks(sampler, benchmarks, settings, verifier,
                                                 lambda n, t=task: progress.advance(t, n))
                finally:
                    sampler.close()
            reports.append({"model": spec.label, "path": spec.model, "adapter": spec.adapter, "engine": sampler.engine,
                            "settings": asdict(settings), **summaries(per_file, settings)})
            if log_samples is not None:
                rows.extend(sample_rows(spec.label, per_file, settings))
    if log_samples is not None:
        write_sample_log(rows, log_samples)
    return reports


def evaluate_loaded(model: torch.nn.Module, tokenizer, benchmarks: dict[str, list[BenchItem]], settings: EvalSettings,
                    verifier: Verifier, generate: GenerateFn | None = None, label: str = "model",
                    log_samples: str | Path | None = None) -> dict:
    """Evaluate a model already in memory (the trainer's, every N steps): same loop, same numbers as
    ``evaluate`` on the saved model with the same settings and seed.

    ``model`` is sampled as it is (a ``PeftModel`` in train mode is fine: eval mode while sampling,
    its modes restored after; torch's RNG state is restored too). ``generate(prompt_token_ids, n,
    temperature, *, top_p, max_tokens, seed)`` replaces transformers ``generate`` (e.g. a vLLM
    engine holding the current weights); it returns n texts per prompt. ``settings.backend`` is not
    used here. Returns ``{"benchmarks": {name: summary}, "overall": summary}``; ``metric_values``
    flattens it for a metrics logger. ``log_samples``: a Parquet file of every answer (as the CLI's).
    """
    from ampo_train.evaluation.sample_log import sample_rows, write_sample_log

    check_settings(settings)
    sampler = Sampler.from_loaded(model, tokenizer, settings, generate)
    try:
        per_file = sample_benchmarks(sampler, benchmarks, settings, verifier)
    finally:
        sampler.close()
    if log_samples is not None:
        write_sample_log(sample_rows(label, per_file, settings), log_samples)
    return summaries(per_file, settings)


def metric_values(report: dict, prefix: str = "eval") -> dict[str, float]:
    """Flat metrics: ``eval/<benchmark>/avg@16``, ``eval/<benchmark>/pass@4``, ``eval/<benchmark>/greedy``
    for every benchmark, and ``eval/overall/...`` when there are several."""
    parts = dict(report["benchmarks"])
    if len(parts) > 1:
        parts["overall"] = report["overall"]
    values: dict[str, float] = {}
    for name, summary in parts.items():
        values[f"{prefix}/{name}/avg@{summary['samples']}"] = summary["avg@n"]
        values.update({f"{prefix}/{name}/pass@{k}": v for k, v in summary["pass@k"].items()})
        if summary["greedy"] is not None:
            values[f"{prefix}/{name}/greedy"] = summary["greedy"]
    return values
