"""The student being trained, and everything that runs it.

    policy = Policy(model, tokenizer, cfg.rollout, engine=engine, module=unwrapped)
    policy.sync()                                        # push changed weights to the engine (lazy)
    groups = policy.generate(prompt_ids, G, seed)        # [[Rollout x G] per prompt]
    policy.logprobs(rows, micro_batch_size, max_tokens=None)    # no-grad log-probs of rows' responses
    policy.comprehension(prompt_text, traces, answer, guidance, max_tokens)   # candidates' scores
    policy.response_logprobs(micro_batch, with_entropy)  # with grad: the update's forward
    policy.weights_changed()                             # after an optimizer step

One object holds the model twice over (``model``: what the optimizer's forward calls, wrapped by
Accelerate/DDP under several processes; ``module``: the unwrapped network for generation,
scoring, no-grad passes and saving), its tokenizer, the sampling settings and the rollout engine.
The engine is told about new weights lazily: ``weights_changed`` only marks them, and the next
``sync`` (the loop calls it before generating; ``generate`` does too) pushes them once, however
many optimizer updates the step made.

Every forward pass returns per-token log-probs, never logits: the LM head runs ``chunk_size``
positions at a time (``forward.response_logprobs``, ``lm_head.chunked_logprobs``).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import Tensor

from ampo_train.batching import micro_batch_groups
from ampo_train.comprehension import no_reasoning_trace, score_candidates
from ampo_train.config import GuidanceSettings, RolloutSettings
from ampo_train.data import Row, RowBatch, collate, row_lengths
from ampo_train.forward import device_of, eval_mode, response_logprobs
from ampo_train.lm_head import DEFAULT_CHUNK_SIZE
from ampo_train.rollout import Rollout, RolloutEngine, TransformersRollout


class Policy:
    def __init__(self, model: torch.nn.Module, tokenizer, settings: RolloutSettings, engine: RolloutEngine | None = None,
                 module: torch.nn.Module | None = None, ref_model: torch.nn.Module | None = None,
                 engine_stale: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE, head_in_forward: bool = False,
                 full_parameters: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        """``engine``: default transformers ``generate`` on ``module``. ``ref_model``: a frozen
        reference for KL (None: a LoRA module's base, adapter disabled). ``engine_stale``: the
        engine does not hold ``module``'s weights yet (e.g. a LoRA adapter not pushed).
        ``chunk_size``: positions per LM-head chunk (``TrainConfig.logit_chunk_size``).
        ``head_in_forward``: the update's pass with gradients runs the model's own head inside its
        forward (full response logits; FSDP2 needs it, see ``forward.response_logprobs``).
        ``full_parameters``: a context in which every parameter is on this process (sharded
        layouts gather them: ``distributed.full_parameters``); the loop runs the no-grad phases in it."""
        self.model = model
        self.module = module if module is not None else model
        self.tokenizer = tokenizer
        self.settings = settings
        self.pad_id = tokenizer.pad_token_id
        self.engine = engine if engine is not None else TransformersRollout(lambda: self.module, tokenizer, settings)
        self.ref_model = ref_model
        self._stale = engine_stale
        self.chunk_size = chunk_size
        self.head_in_forward = head_in_forward
        self.full_parameters = full_parameters

    @property
    def temperature(self) -> float:
        return self.settings.temperature

    @property
    def device(self) -> torch.device:
        return device_of(self.module)

    # -------------------------------------------------------------- the rollout engine

    def weights_changed(self) -> None:
        """The optimizer stepped: the engine's copy (if it has one) is stale until the next sync."""
        self._stale = True

    def sync(self) -> int:
        """Push the current weights to the engine if they changed since the last push; bytes moved."""
        if not self._stale:
            return 0
        moved = self.engine.sync(self.module)
        self._stale = False
        return moved

    def generate(self, prompts: Sequence[Sequence[int]], n: int, seed: int | None = None, greedy: bool = False,
                 settings: RolloutSettings | None = None) -> list[list[Rollout]]:
        """``settings``: other sampling settings for this call (evaluation), else the rollouts'."""
        self.sync()
        return self.engine.generate(prompts, n, seed=seed, greedy=greedy, settings=settings)

    # -------------------------------------------------------------- forward passes

    def response_logprobs(self, mb: RowBatch, with_entropy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``[N, R]`` log-probs of the response tokens (and entropies) through ``model`` (grad, DDP
        hooks), 0 on padding; the LM head in chunks, so no ``[N, R, V]`` logits."""
        return response_logprobs(self.model, mb, self.temperature, None if self.head_in_forward else self.chunk_size,
                                 with_entropy)

    def _reference(self):
        """The reference policy for KL, as a (model, context) pair."""
        if self.ref_model is not None:
            return self.ref_model, contextlib.nullcontext()
        return self.module, self.module.disable_adapter()

    @torch.no_grad()
    def logprobs(self, rows: Sequence[Row], micro_batch_size: int, reference: bool = False,
                 max_tokens: int | None = None) -> list[Tensor]:
        """Per-token log-probs ``[len(row.response_ids)]`` (CPU, float32) of each row's response,
        under the current weights or the reference's, micro-batch by micro-batch (``max_tokens``:
        by that token budget instead of ``micro_batch_size`` rows; ``batching.micro_batch_groups``)."""
        out: list[Tensor | None] = [None] * len(rows)
        model, context = self._reference() if reference else (self.module, contextlib.nullcontext())
        with context:
            for group in micro_batch_groups(row_lengths(rows), micro_batch_size, max_tokens):
                chunk = [rows[i] for i in group]
                mb = collate(chunk, self.pad_id).to(self.device)
                lp = response_logprobs(model, mb, self.temperature, self.chunk_size).cpu()
                for i, row, values in zip(group, chunk, lp):
                    out[i] = values[:len(row.response_ids)].clone()
        return out

    def comprehension(self, prompt_text: str, traces: Sequence[str], answer: str, guidance: GuidanceSettings,
                      max_response_tokens: int) -> tuple[list[float], float | None]:
        """Scores of candidate traces for one prompt (this step's weights, before the update), and
        the no-reasoning baseline "score A" when ``guidance.score_baseline`` is on (else None).

        One batched forward; the bare ``\\boxed{answer}`` rides in the same batch as the baseline.
        """
        with_baseline = guidance.score_baseline and guidance.rank == "comprehension"
        batch = list(traces) + ([no_reasoning_trace(answer)] if with_baseline else [])
        with eval_mode(self.module):
            scores = score_candidates(self.module, self.tokenizer, prompt_text, batch, answer,
                                      temperature=self.temperature, rank=guidance.rank, kind=guidance.score,
                                      max_response_tokens=max_response_tokens, chunk_size=self.chunk_size)
        if with_baseline:
            return scores[:-1], scores[-1]
        return scores, None

    def close(self) -> None:
        self.engine.close()
