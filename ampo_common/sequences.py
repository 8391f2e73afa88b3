"""Token ids in and out of ``generate``, the same for every engine: teachers writing traces
(``ampo_cache.generation``), the student's rollouts and evaluation (``ampo_train.rollout``).

    input_ids, attention = left_padded(prompts, pad_id)    # every prompt ends where generation starts
    eos = eos_token_ids(model_or_generation_config, tokenizer)
    kept, finish_reason = cut_at_eos(generated, eos)       # through the first EOS: "stop", else "length"
"""

from __future__ import annotations

from typing import Collection, Literal, Sequence

import torch

FinishReason = Literal["stop", "length"]


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id prompts as one ``generate`` batch: ``input_ids`` and ``attention_mask`` ``[N, longest]``,
    left-padded so that every prompt ends where generation starts."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, ids in enumerate(prompts):
        input_ids[i, width - len(ids):] = torch.as_tensor(list(ids), dtype=torch.long)
        attention[i, width - len(ids):] = 1
    return input_ids, attention


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a response: the generation config's EOS ids and the tokenizer's.

    ``model``: a model (its ``generation_config`` is read) or a ``GenerationConfig`` itself. Chat
    models often end a turn with a token (``<|im_end|>``, ``<|eot_id|>``) that only their
    generation config names, so both sources count.
    """
    config = getattr(model, "generation_config", model)
    ids = getattr(config, "eos_token_id", None)
    found = set(ids if isinstance(ids, list) else [ids]) if ids is not None else set()
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return sorted(found)


def cut_at_eos(tokens: Sequence[int], eos_ids: Collection[int]) -> tuple[list[int], FinishReason]:
    """A generated sequence through its first EOS ("stop"), or all of it when none came ("length").

    Whatever ``generate`` appended after the EOS (padding, or more tokens from an engine that
    finishes a batch together) is dropped."""
    stop = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
    if stop is None:
        return list(tokens), "length"
    return list(tokens[:stop + 1]), "stop"
