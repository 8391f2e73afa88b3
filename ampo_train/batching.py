"""Micro-batches by a token budget instead of a row count (verl's "dynamic batch size").

A micro-batch of rows is laid out by ``data.collate`` as ``[n, P + R]``: prompts left-padded to
the longest prompt P, responses right-padded to the longest response R (at least 1). What the
forward pass costs, in memory and time, is that padded size ``n * (P + R)``, not the real tokens.
With a fixed row count, a micro-batch holding one 8k-token teacher trace costs as much as eight
of them; with a token budget, short rows share a micro-batch and long ones get fewer companions.

Everything here is pure arithmetic on ``(prompt_len, response_len)`` pairs: no tensors, no model.
"""

from __future__ import annotations

from typing import Sequence

Lengths = Sequence[tuple[int, int]]


def padded_tokens(lengths: Lengths, batch: Sequence[int]) -> int:
    """Size of ``batch``'s padded ``[n, P + R]`` input as ``data.collate`` lays it out.

    ``lengths[i] = (prompt_len, response_len)`` of row i; R is at least 1 (collate keeps one
    response column even when every response is empty).
    """
    if not batch:
        return 0
    prompt = max(lengths[i][0] for i in batch)
    response = max(max(lengths[i][1] for i in batch), 1)
    return len(batch) * (prompt + response)


def token_budget_batches(lengths: Lengths, max_tokens: int) -> list[list[int]]:
    """Group rows into micro-batches whose padded size stays within ``max_tokens``.

    Rows are sorted by total length, longest first (ties by index), and packed greedily in that
    order: a row joins the current micro-batch if the padded size with it is still within the
    budget, else it starts the next one. Neighbours in that order have similar lengths, so
    padding is small; the longest micro-batch comes first, so a budget that is too large fails
    at the first micro-batch rather than at the last.

    A single row whose own padded size exceeds ``max_tokens`` cannot be split: it gets a
    micro-batch of its own (the only case where a micro-batch exceeds the budget; check with
    ``padded_tokens`` to warn about it).

    Args:
        lengths: ``(prompt_len, response_len)`` per row.
        max_tokens: the budget for ``rows x (longest prompt + longest response)``; >= 1.

    Returns:
        Row indices per micro-batch, each list ascending (rows keep their original relative
        order); every index appears exactly once. Deterministic.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    for i, (p, r) in enumerate(lengths):
        if p < 0 or r < 0:
            raise ValueError(f"row {i} has negative length ({p}, {r})")
    order = sorted(range(len(lengths)), key=lambda i: (-(lengths[i][0] + lengths[i][1]), i))
    batches: list[list[int]] = []
    current: list[int] = []
    prompt = response = 0  # the current micro-batch's widths
    for i in order:
        p, r = lengths[i]
        wider_p, wider_r = max(prompt, p), max(response, r, 1)
        if current and (len(current) + 1) * (wider_p + wider_r) > max_tokens:
            batches.append(sorted(current))
            current, wider_p, wider_r = [], p, max(r, 1)
        current.append(i)
        prompt, response = wider_p, wider_r
    if current:
        batches.append(sorted(current))
    return batches
