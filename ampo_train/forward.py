"""The student's forward passes, with the LM head run only where logits are needed.

A causal LM's logits are ``[rows, positions, vocabulary]``; the trainer never needs the prompt's,
and comprehension scoring needs a handful of answer positions. ``logits_to_keep`` (transformers'
argument: an int keeps the last K positions, a 1-D tensor keeps those positions) skips the rest.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ampo_train.data import RowBatch


def logits_at(model, input_ids: Tensor, attention_mask: Tensor, keep: int | Tensor,
              position_ids: Tensor | None = None) -> Tensor:
    """Logits ``[N, K, V]`` at the last ``keep`` positions (int) or at the positions ``keep``
    (``[K]`` long, sorted). A model without ``logits_to_keep`` computes all and is sliced."""
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    width = keep if isinstance(keep, int) else keep.numel()
    try:
        logits = model(**kwargs, logits_to_keep=keep).logits
    except TypeError:  # no logits_to_keep in this model's forward
        logits = model(**kwargs).logits
    if logits.shape[1] == width:
        return logits
    return logits[:, -keep:] if isinstance(keep, int) else logits[:, keep]


def response_logits(model, mb: RowBatch) -> Tensor:
    """Logits ``[N, R, V]`` at the positions that predict the response tokens (the last R + 1
    positions but the final one: response token j is predicted at column P + j - 1)."""
    r = mb.response_width
    return logits_at(model, mb.input_ids, mb.attention_mask, r + 1, mb.position_ids)[:, :-1, :]


@contextlib.contextmanager
def eval_mode(model):
    """``model.eval()`` for a no-grad pass (no dropout noise in scores or samples), then the
    previous mode again."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def device_of(model) -> torch.device:
    return next(model.parameters()).device
