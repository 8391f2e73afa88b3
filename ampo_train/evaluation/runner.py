"""Sample a model on benchmark files and verify every answer: the data behind ``metrics.summarise``.

A model is a local folder or hub id. A LoRA adapter (``--adapter``, or a folder holding an
``adapter_config.json``, such as a LoRA run's ``final/``) is loaded onto its base model and merged
before sampling. Prompts are rendered with the model's chat template, as in training.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ampo_cache.errors import InputError
from ampo_cache.generation import conversation, resolve_backend
from ampo_cache.teachers import Sampling, Teacher
from ampo_cache.verify import Verifier
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


@dataclass(frozen=True)
class ModelSpec:
    label: str
    model: str  # what AutoModelForCausalLM loads (the base, for an adapter)
    adapter: str | None = None

    @classmethod
    def parse(cls, model: str, adapter: str | None = None, label: str | None = None) -> "ModelSpec":
        folder = Path(model)
        if adapter is None and (folder / "adapter_config.json").is_file():
            adapter, model = model, json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
            raise InputError(adapter, "not a LoRA adapter folder (no adapter_config.json)")
        if label is None:
            named = Path(adapter or model)
            label = named.parent.name if named.name in ("final", "merged") else named.name
        return cls(label, model, adapter)


def load_model(spec: ModelSpec, device: str):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is on screen
    model = AutoModelForCausalLM.from_pretrained(spec.model, dtype=torch.float32)
    if spec.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, spec.adapter).merge_and_unload()
    return model.to(device).eval()


def _teacher(location: str, settings: EvalSettings, temperature: float, backend: str) -> Teacher:
    return Teacher(name="eval", model=location, backend=backend, system_prompt=settings.system_prompt,
                   sampling=Sampling(temperature=temperature, top_p=settings.top_p if temperature else 1.0,
                                     max_tokens=settings.max_tokens))


class Sampler:
    """One model behind the generation backends, sampled and greedy."""

    def __init__(self, spec: ModelSpec, settings: EvalSettings, stack):
        probe = _teacher(spec.model, settings, settings.temperature, settings.backend)
        self.engine = resolve_backend(probe)
        self.settings = settings
        tokenizer_home = spec.adapter if spec.adapter and _has_tokenizer(spec.adapter) else spec.model
        if self.engine == "vllm":
            from ampo_cache.generation.vllm_backend import VLLMBackend

            location = spec.model
            if spec.adapter is not None:  # vLLM gets the merged weights
                location = stack.enter_context(tempfile.TemporaryDirectory(prefix="ampo-eval-"))
                load_model(spec, "cpu").save_pretrained(location)
                _copy_tokenizer(tokenizer_home, location)
            self.sampled = VLLMBackend(_teacher(location, settings, settings.temperature, "vllm"))
            self.greedy = self.sampled  # greedy requests reuse the engine (sampling params differ per call)
            self._greedy_sampling = _teacher(location, settings, 0.0, "vllm").sampling
        else:
            from ampo_cache.generation.hf import TransformersBackend

            device = "cuda" if torch.cuda.is_available() else "cpu"
            model = load_model(spec, device)
            self.sampled = TransformersBackend(_teacher(tokenizer_home, settings, settings.temperature, "transformers"),
                                               device, model=model)
            self.greedy = TransformersBackend(_teacher(tokenizer_home, settings, 0.0, "transformers"), device, model=model)
            self._greedy_sampling = None

    def generate(self, problems: Sequence[str], n: int, greedy: bool, seed: int):
        chats = [conversation(p, self.settings.system_prompt) for p in problems]
        if greedy and self._greedy_sampling is not None:  # vLLM: same engine, greedy sampling params
            return self.greedy.generate(chats, 1, seed=seed, sampling=self._greedy_sampling)
        return (self.greedy if greedy else self.sampled).generate(chats, 1 if greedy else n, seed=seed)

    def close(self) -> None:
        self.sampled.close()
        if self.greedy is not self.sampled:
            self.greedy.close()


def _has_tokenizer(folder: str) -> bool:
    return (Path(folder) / "tokenizer_config.json").is_file()


def _copy_tokenizer(source: str, target: str) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(source).save_pretrained(target)


def sample_benchmark(sampler: Sampler, items: Sequence[BenchItem], settings: EvalSettings, verifier: Verifier,
                     advance) -> list[ProblemResult]:
    per_call = max(1, settings.batch_sequences // settings.samples)
    results: list[ProblemResult] = []
    for start in range(0, len(items), per_call):
        chunk = items[start:start + per_call]
        problems, answers = [i.problem for i in chunk], [i.answer for i in chunk]
        outputs = sampler.generate(problems, settings.samples, greedy=False, seed=settings.seed + start)
        texts = [[g.text for g in samples] for samples in outputs]
        flat = verifier.verify([t for ts in texts for t in ts], [a for a in answers for _ in range(settings.samples)])
        greedy = [None] * len(chunk)
        if settings.greedy:
            firsts = [s[0].text for s in sampler.generate(problems, 1, greedy=True, seed=settings.seed + start)]
            greedy = [v.correct for v in verifier.verify(firsts, answers)]
        for i, sample_texts in enumerate(texts):
            verdicts = flat[i * settings.samples:(i + 1) * settings.samples]
            results.append(ProblemResult(sample_texts, [v.correct for v in verdicts], greedy[i]))
        advance(len(chunk))
    return results


def evaluate(specs: Sequence[ModelSpec], benchmarks: dict[str, list[BenchItem]], settings: EvalSettings,
             console=None) -> list[dict]:
    """One result per model: its settings, per-benchmark summaries and the pooled ``overall``."""
    if any(k > settings.samples for k in settings.ks):
        raise InputError("--k", f"every k must be <= --samples ({settings.samples}); got {settings.ks}")
    total = sum(len(items) for items in benchmarks.values())
    reports = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress, \
            Verifier(timeout=settings.verify_timeout, workers=settings.verify_workers) as verifier:
        for spec in specs:
            task = progress.add_task(f"eval {spec.label}", total=total)
            with contextlib.ExitStack() as stack:
                sampler = Sampler(spec, settings, stack)
                try:
                    per_file = {name: sample_benchmark(sampler, items, settings, verifier,
                                                       lambda n, t=task: progress.advance(t, n))
                                for name, items in benchmarks.items()}
                finally:
                    sampler.close()
            reports.append({
                "model": spec.label, "path": spec.model, "adapter": spec.adapter, "engine": sampler.engine,
                "settings": asdict(settings),
                "benchmarks": {name: summarise(rs, settings.ks) for name, rs in per_file.items()},
                "overall": summarise([r for rs in per_file.values() for r in rs], settings.ks),
            })
    return reports
