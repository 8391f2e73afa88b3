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


def row_count_batches(count: int, rows_per_batch: int) -> list[list[int]]:
    """Consecutive micro-batches of ``rows_per_batch`` rows (the last may be shorter): the plain
    gradient-accumulation split, in the rows' own order."""
    if rows_per_batch < 1:
        raise ValueError(f"rows_per_batch must be >= 1, got {rows_per_batch}")
    return [list(range(i, min(i + rows_per_batch, count))) for i in range(0, count, rows_per_batch)]


def micro_batch_groups(lengths: Lengths, rows_per_batch: int, max_tokens: int | None) -> list[list[int]]:
    """The trainer's micro-batches: by a token budget when ``max_tokens`` is set
    (``token_budget_batches``), else by row count (``row_count_batches``)."""
    if max_tokens is None:
        return row_count_batches(len(lengths), rows_per_batch)
    return token_budget_batches(lengths, max_tokens)


def split_to_count(lengths: Lengths, batches: Sequence[Sequence[int]], count: int) -> list[list[int]]:
    """``batches`` split further until there are ``count`` of them, where rows allow.

    Under several processes every rank must run the same number of forward/backward calls
    (DDP's final all-reduce, FSDP's and ZeRO-3's per-forward gathers), but token-budget packing
    gives each rank its own count. The ranks agree on the largest count; a rank with fewer
    micro-batches splits its largest ones (by padded size; halves in longest-first order) rather
    than running empty zero-weight ones: the same rows, the same gradient, no wasted forward, and
    smaller micro-batches, so each stays within the budget it was packed under. Returns fewer than
    ``count`` only when there are fewer rows than that (the trainer's ranks hold equal row counts).
    """
    out = [list(b) for b in batches if b]
    while len(out) < count:
        splittable = [k for k, b in enumerate(out) if len(b) > 1]
        if not splittable:
            break
        k = max(splittable, key=lambda k: (padded_tokens(lengths, out[k]), -k))
        rows = sorted(out[k], key=lambda i: (-(lengths[i][0] + lengths[i][1]), i))
        half = (len(rows) + 1) // 2
        out[k:k + 1] = [sorted(rows[:half]), sorted(rows[half:])]
    return out
