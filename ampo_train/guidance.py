"""Guidance on demand: which prompts get teacher traces, which traces, and which rollouts they replace.

Pure Python on small inputs (one prompt's G rewards, a handful of cached traces); no model.
The trainer composes, per prompt (``cfg`` is ``ampo_train.config.GuidanceSettings``, where each
setting and its reference default is documented):

    needs = needs_guidance(rewards[B, G], cfg.mode, rng, cfg.hybrid_fraction)
    for each prompt b with needs[b]:
        cands = candidate_traces(index.lookup([pid])[pid], cfg.max_candidates)
        scores = comprehension.score_candidates(...)          # or None for rank="random"
        picked = [cands[i] for i in rank_candidates(scores, lengths, cfg.k, cfg.rank, rng)]
        positions, rewards[b] = replace_rollouts(rewards[b], picked, rng, mode=cfg.mode)

Randomness comes from a ``random.Random`` the caller owns: a few draws per step, identical on
every device, and its state is a plain object to checkpoint (``getstate`` / ``setstate``).
"""

from __future__ import annotations

import math
import random
from typing import Protocol, Sequence, TypeVar

import torch
from torch import Tensor

from ampo_train.config import GuidanceMode, RankKind

# A response counts as correct when its reward exceeds this. 0.5 separates correct from wrong
# for plain 0/1 rewards and for the optional 0.9 x correct + 0.1 x format mix alike (the
# reference uses 0.6 = format coefficient + 0.5 for that mix).
DEFAULT_CORRECT_THRESHOLD = 0.5


def correct_flags(rewards: Tensor, correct_threshold: float = DEFAULT_CORRECT_THRESHOLD) -> Tensor:
    """Bool tensor of the same shape: a bool input is taken as is, numbers as reward > threshold."""
    if rewards.dtype == torch.bool:
        return rewards
    return rewards > correct_threshold


def needs_guidance(
    rewards: Tensor,
    mode: GuidanceMode,
    rng: random.Random | None = None,
    hybrid_fraction: float = 0.3,
    correct_threshold: float = DEFAULT_CORRECT_THRESHOLD,
) -> Tensor:
    """Which prompts receive teacher traces this step.

    Args:
        rewards: ``[B, G]`` rewards of the on-policy rollouts, or bool correctness flags.
        mode: see ``GuidanceSettings.mode`` (``ampo_train.config``).
        rng: needed only for ``hybrid``; one ``rng.random()`` draw per prompt that has a
            correct rollout, in prompt order.
        hybrid_fraction: probability of guiding a prompt that has a correct rollout (hybrid).
        correct_threshold: reward above which a rollout is correct (ignored for bool input).

    Returns:
        ``[B]`` bool.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, G], got shape {tuple(rewards.shape)}")
    all_wrong = ~correct_flags(rewards, correct_threshold).any(dim=1)
    if mode == "adaptive":
        return all_wrong
    if mode == "always":
        return torch.ones_like(all_wrong)
    if mode == "off":
        return torch.zeros_like(all_wrong)
    if mode == "hybrid":
        if rng is None:
            raise ValueError("mode 'hybrid' needs an rng")
        picks = [bool(w) or rng.random() < hybrid_fraction for w in all_wrong.tolist()]
        return torch.tensor(picks, dtype=torch.bool, device=rewards.device)
    raise ValueError(f"unknown guidance mode {mode!r}")


class TraceLike(Protocol):
    """What candidate selection reads from a trace (``ampo_cache.lookup.CachedTrace`` fits)."""

    @property
    def teacher(self) -> str: ...

    @property
    def num_chars(self) -> int: ...


T = TypeVar("T", bound=TraceLike)


def _trace_order(trace: TraceLike) -> tuple:
    # Shortest first; ties by teacher then sample index, so the result never depends on the
    # order the store happened to return.
    return (trace.num_chars, trace.teacher, getattr(trace, "sample_idx", 0))


def candidate_traces(traces: Sequence[T], max_candidates: int = 4) -> list[T]:
    """The cached traces a guided prompt considers, at most ``max_candidates``.

    Diversity first: the shortest trace of each teacher, teachers ordered by that shortest
    length (then name); then, if slots remain, the remaining traces shortest first. Length is
    ``num_chars`` (always known, independent of any tokenizer). The input is assumed verified
    correct (it comes from the store's lookup of correct traces).

    Returns:
        The chosen traces, in that order (the order matters only for display and as the
        deterministic base order that ranking reorders).
    """
    if max_candidates < 1:
        return []
    ordered = sorted(traces, key=_trace_order)
    firsts: list[T] = []
    rest: list[T] = []
    seen: set[str] = set()
    for trace in ordered:
        if trace.teacher in seen:
            rest.append(trace)
        else:
            seen.add(trace.teacher)
            firsts.append(trace)
    # ``ordered`` is shortest-first, so ``firsts`` is already in (shortest length, name) order.
    return (firsts + rest)[:max_candidates]


def rank_candidates(
    scores: Sequence[float] | None,
    lengths: Sequence[int],
    k: int,
    rank: RankKind = "comprehension",
    rng: random.Random | None = None,
) -> list[int]:
    """Indices of the k candidates to inject, best first.

    Args:
        scores: one per candidate, higher is better (comprehension or trace likelihood); NaN
            ranks last, -inf (no locatable answer) just above NaN. Ignored (may be None) for
            ``random``.
        lengths: one per candidate (e.g. ``num_chars``); ties in score go to the shorter trace,
            then to the lower index.
        k: requested count; the effective k is min(k, number of candidates).
        rank: ``comprehension`` and ``trace_likelihood`` sort by score; ``random`` draws k
            distinct candidates with ``rng.sample``.

    Returns:
        ``min(k, n)`` distinct indices into the candidate list.
    """
    n = len(lengths)
    take = max(0, min(k, n))
    if rank == "random":
        if rng is None:
            raise ValueError("rank 'random' needs an rng")
        return rng.sample(range(n), take)
    if rank not in ("comprehension", "trace_likelihood"):
        raise ValueError(f"unknown rank {rank!r}")
    if scores is None or len(scores) != n:
        raise ValueError("scores must have one entry per candidate")

    def key(i: int) -> tuple:
        s = float(scores[i])
        return (math.isnan(s), -s if not math.isnan(s) else 0.0, lengths[i], i)

    return sorted(range(n), key=key)[:take]


def replace_rollouts(
    rewards: Tensor,
    chosen_traces: Sequence[object],
    rng: random.Random,
    mode: GuidanceMode = "adaptive",
    correct_threshold: float = DEFAULT_CORRECT_THRESHOLD,
    teacher_reward: float = 1.0,
) -> tuple[list[int], Tensor]:
    """Pick which of a prompt's G rollouts the chosen teacher traces replace.

    ``len(chosen_traces)`` rollouts are replaced, chosen uniformly at random among the WRONG
    ones (``rng.sample``), and their reward becomes ``teacher_reward`` (the traces are verified
    correct). ``positions[i]`` is the slot that receives ``chosen_traces[i]``.

    In ``always`` / ``hybrid`` mode a prompt may have fewer wrong rollouts than traces: then
    every wrong rollout is replaced and the remainder is drawn at random from the correct
    ones, so each chosen trace is still injected (the reference instead injects only
    min(k, wrong) traces). In ``adaptive`` mode guidance only fires when all G are wrong, so a
    shortfall signals a caller bug and raises.

    Args:
        rewards: ``[G]`` rewards of one prompt's on-policy rollouts (bool flags also accepted;
            the returned tensor then has float dtype).
        chosen_traces: the traces to inject, best first (only their count is used here).
        rng: the caller's generator.
    Returns:
        (positions, new_rewards): positions as a list of ints in ``[0, G)``; ``new_rewards`` a
        new ``[G]`` tensor (the input is not modified).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [G], got shape {tuple(rewards.shape)}")
    g, n = rewards.shape[0], len(chosen_traces)
    if n > g:
        raise ValueError(f"cannot inject {n} traces into a group of {g}")
    correct = correct_flags(rewards, correct_threshold).tolist()
    wrong = [i for i, c in enumerate(correct) if not c]
    if len(wrong) >= n:
        positions = rng.sample(wrong, n)
    elif mode in ("always", "hybrid"):
        right = [i for i, c in enumerate(correct) if c]
        positions = rng.sample(wrong, len(wrong)) + rng.sample(right, n - len(wrong))
    else:
        raise ValueError(
            f"mode {mode!r}: only {len(wrong)} wrong rollouts for {n} traces; "
            "adaptive guidance expects an all-wrong group"
        )
    new_rewards = rewards.to(torch.float32) if rewards.dtype == torch.bool else rewards.clone()
    if positions:
        new_rewards[positions] = teacher_reward
    return positions, new_rewards
