"""The student being trained, and the engine that samples it.

    policy = Policy(model, engine, pad_id, ForwardSettings(temperature, chunk_size), module=unwrapped)
    policy.sync()                                        # push changed weights to the engine (lazy)
    groups = policy.generate(prompt_ids, G, seed)        # [[Rollout x G] per prompt]
    policy.logprobs(rows, micro_batch_size)              # no-grad log-probs of rows' responses
    policy.response_logprobs(micro_batch, with_entropy)  # with grad: the update's forward
    policy.weights_changed()                             # after an optimizer step

One object holds the model twice over (``model``: what the optimizer's forward calls, wrapped by
Accelerate/DDP under several processes; ``module``: the unwrapped network for generation,
scoring, no-grad passes and saving) and its rollout engine (built by ``rollout.open_engine``).
The engine is told about new weights lazily: ``weights_changed`` only marks them, and the next
``sync`` (the loop calls it before generating; ``generate`` does too) pushes them once, however
many optimizer updates the step made.

Every forward pass returns per-token log-probs, never logits: the LM head runs ``chunk_size``
positions at a time (``forward.response_logprobs``, ``lm_head.chunked_logprobs``), or on CUDA
through the fused kernel (``ForwardSettings.logprob_kernel``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from ampo_train.batching import micro_batch_groups
from ampo_train.config import RolloutSettings
from ampo_train.data import Row, RowBatch, collate, row_lengths
from ampo_train.forward import device_of, response_logprobs
from ampo_train.lm_head import DEFAULT_CHUNK_SIZE, LogprobKernel
from ampo_train.rollout import Rollout, RolloutEngine


@dataclass(frozen=True)
class ForwardSettings:
    """How the student's forward passes turn hidden states into log-probs."""

    temperature: float = 1.0  # the rollouts' sampling temperature: log-probs of logits / temperature
    chunk_size: int = DEFAULT_CHUNK_SIZE  # positions per LM-head chunk (TrainConfig.logit_chunk_size)
    # The update's pass with gradients runs the model's own head inside its forward (full response
    # logits): FSDP2 and ZeRO-3 gather the head's parameters only there (forward.response_logprobs).
    head_in_forward: bool = False
    # auto / chunked / fused (TrainConfig.logprob_kernel): every pass through the head, the update's
    # and the no-grad old and reference log-probs alike (lm_head.select_logprob_kernel)
    logprob_kernel: LogprobKernel = "auto"


class Policy:
    def __init__(self, model: torch.nn.Module, engine: RolloutEngine | None, pad_id: int,
                 forward: ForwardSettings = ForwardSettings(), module: torch.nn.Module | None = None,
                 ref_model: torch.nn.Module | None = None,
                 full_parameters: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        """``engine``: the rollout engine (``rollout.open_engine``); None for a policy that is only
        updated and scored (benchmarks, tests), whose ``generate`` then fails. ``module``: the
        unwrapped ``model`` (default: ``model`` itself). ``ref_model``: a frozen reference for KL
        (None: a LoRA module's base, adapter disabled). ``full_parameters``: a context in which
        every parameter is on this process (sharded layouts gather them:
        ``distributed.full_parameters``); the loop runs the no-grad phases in it."""
        self.model = model
        self.module = module if module is not None else model
        self.engine = engine
        self.pad_id = pad_id
        self.forward = forward
        self.ref_model = ref_model
        self.full_parameters = full_parameters
        self._stale = bool(getattr(engine, "starts_stale", False))

    @property
    def device(self) -> torch.device:
        return device_of(self.module)

    # -------------------------------------------------------------- the rollout engine

    def weights_changed(self) -> None:
        """The weights moved (an optimizer step; or an engine that loaded only the base, before its
        first LoRA adapter): the engine's copy is stale until the next sync."""
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
        if self.engine is None:
            raise RuntimeError("this policy has no rollout engine")
        self.sync()
        return self.engine.generate(prompts, n, seed=seed, greedy=greedy, settings=settings)

    # -------------------------------------------------------------- forward passes

    def response_logprobs(self, mb: RowBatch, with_entropy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``[N, R]`` log-probs of the response tokens (and entropies) through ``model`` (grad, DDP
        hooks), 0 on padding; the LM head in chunks, so no ``[N, R, V]`` logits."""
        f = self.forward
        return response_logprobs(self.model, mb, f.temperature, None if f.head_in_forward else f.chunk_size,
                                 with_entropy, f.logprob_kernel)

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
                lp = response_logprobs(model, mb, self.forward.temperature, self.forward.chunk_size,
                                       kernel=self.forward.logprob_kernel).cpu()
                for i, row, values in zip(group, chunk, lp):
                    out[i] = values[:len(row.response_ids)].clone()
        return out

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
