"""Guidance on demand, the pure parts: which prompts get teacher traces and how many (trigger
rules), which cached traces are candidates, how they are ordered (ranking rules), and which
rollouts they replace.

Pure Python on small inputs (one prompt's G verdicts, a handful of cached traces); no model. Two
registries, each a table from a name (train.yaml's ``guidance.mode`` and ``guidance.rank``) to a
rule; adding a rule is one function and one name:

    rule = trigger_rule(settings.mode)                        # TRIGGERS[name]
    trigger = rule.decide(correct_of_one_prompt, settings, rng)   # Trigger(reason, k) or NOT_GUIDED
    cands = candidate_traces(index.lookup([pid])[pid], settings.max_candidates)
    picked = rank_candidates(scores, lengths, k, settings.rank, rng)   # RANKINGS[name].order
    slots = replacement_slots(correct_of_one_prompt, len(picked), rng, replace_correct)

A rule reads the *verifier's* verdicts (``correct``), never the shaped reward: a length penalty or
a format term must not decide that a solved prompt failed. Randomness comes from a
``random.Random`` the caller owns (hybrid draws, random ranking, replaced slots).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, TypeVar

from ampo_train.config import GuidanceSettings

# ----------------------------------------------------------------------------- trigger rules


@dataclass(frozen=True)
class Trigger:
    """One prompt's guidance decision."""

    reason: str | None  # why it is guided (a REASONS entry); None: not guided
    k: int = 0  # traces wanted (then capped by the candidates and, replacing wrong rollouts only, by those)

    @property
    def guided(self) -> bool:
        return self.reason is not None


NOT_GUIDED = Trigger(None)
# Why a prompt was guided: every step logs a count per reason (guidance/guided_by/<reason>).
REASONS = ("all_wrong", "below_threshold", "always", "hybrid")


@dataclass(frozen=True)
class TriggerRule:
    decide: Callable[[Sequence[bool], GuidanceSettings, random.Random], Trigger]
    wrong_only: bool  # its traces replace wrong rollouts only (by default, or always: see can_replace_correct)
    guides_solved: bool  # it may guide a group that holds correct rollouts
    check: Callable[[GuidanceSettings, int], None] | None = None  # (settings, G): a ValueError for what it cannot run


TRIGGERS: dict[str, TriggerRule] = {}


def register_trigger(name: str, wrong_only: bool, guides_solved: bool,
                     check: Callable[[GuidanceSettings, int], None] | None = None):
    """Decorator: ``decide`` becomes the trigger rule ``name`` (train.yaml's ``guidance.mode``)."""
    def add(decide):
        TRIGGERS[name] = TriggerRule(decide, wrong_only, guides_solved, check)
        return decide
    return add


def trigger_rule(name: str) -> TriggerRule:
    if name not in TRIGGERS:
        raise ValueError(f"unknown guidance mode {name!r} (known: {', '.join(TRIGGERS)})")
    return TRIGGERS[name]


def _failed(correct: Sequence[bool]) -> str:
    return "all_wrong" if not any(correct) else "below_threshold"


@register_trigger("adaptive", wrong_only=True, guides_solved=False)
def all_wrong(correct: Sequence[bool], settings: GuidanceSettings, rng: random.Random) -> Trigger:
    """The paper: a prompt whose G rollouts are all wrong (success rate < 1/G) gets k traces."""
    return NOT_GUIDED if any(correct) else Trigger("all_wrong", settings.k)


def _pass_num_within(settings: GuidanceSettings, group_size: int) -> None:
    if settings.pass_num > group_size:
        raise ValueError(f"guidance.pass_num ({settings.pass_num}) cannot exceed group_size ({group_size}): "
                         "every prompt would be guided")


@register_trigger("pass_threshold", wrong_only=True, guides_solved=True, check=_pass_num_within)
def below_pass_num(correct: Sequence[bool], settings: GuidanceSettings, rng: random.Random) -> Trigger:
    """The reference's ``pass_num``: fewer than ``pass_num`` of G correct (success rate below
    pass_num / G) gets k traces, in place of wrong rollouts only."""
    return Trigger(_failed(correct), settings.k) if sum(correct) < settings.pass_num else NOT_GUIDED


@register_trigger("adaptive_k", wrong_only=True, guides_solved=True)
def adaptive_k(correct: Sequence[bool], settings: GuidanceSettings, rng: random.Random) -> Trigger:
    """The reference's ``use_adaptive_k`` (2026-03): below a success rate of 0.5, inject
    ``int(G x 0.5 - correct)`` traces, so the mixed group is about half right and half wrong (G = 8:
    0 correct -> 4 traces, 3 correct -> 1). ``guidance.k`` is not used. With an odd G a group one
    short of half (G = 5, 2 correct) would get int(0.5) = 0 traces: it is not guided."""
    k = int(len(correct) * 0.5 - sum(correct))
    return Trigger(_failed(correct), k) if k >= 1 else NOT_GUIDED


@register_trigger("always", wrong_only=False, guides_solved=True)
def always(correct: Sequence[bool], settings: GuidanceSettings, rng: random.Random) -> Trigger:
    """Every prompt gets k traces (the reference's ``always`` strategy)."""
    return Trigger("all_wrong" if not any(correct) else "always", settings.k)


@register_trigger("hybrid", wrong_only=False, guides_solved=True)
def hybrid(correct: Sequence[bool], settings: GuidanceSettings, rng: random.Random) -> Trigger:
    """All-wrong prompts, plus each other prompt with probability ``hybrid_fraction`` (one
    ``rng.random()`` draw per prompt that has a correct rollout)."""
    if not any(correct):
        return Trigger("all_wrong", settings.k)
    return Trigger("hybrid", settings.k) if rng.random() < settings.hybrid_fraction else NOT_GUIDED


@register_trigger("off", wrong_only=True, guides_solved=False)
def off(correct: Sequence[bool], settings: GuidanceSettings, rng: random.Random) -> Trigger:
    """Plain GRPO: nobody is guided (the same code path)."""
    return NOT_GUIDED


TRIGGERS["all_wrong"] = TRIGGERS["adaptive"]  # the rule's own name, beside the paper's mode name


def can_replace_correct(settings: GuidanceSettings) -> bool:
    """Whether a guided group's correct rollouts may make room for traces when its wrong ones run
    out: ``guidance.replace``, or the rule's default (wrong_first for always/hybrid)."""
    if settings.replace is not None:
        return settings.replace == "wrong_first"
    return not trigger_rule(settings.mode).wrong_only


def check_guidance(settings: GuidanceSettings, group_size: int) -> None:
    """The combinations no rule can run, as one ``ValueError`` line each (config validation)."""
    rule = trigger_rule(settings.mode)
    check_ranking(settings.rank)
    if rule.check is not None:
        rule.check(settings, group_size)
    if rule.wrong_only and rule.guides_solved and settings.replace == "wrong_first":
        raise ValueError(f"guidance.mode {settings.mode} replaces wrong rollouts only (as the reference does); "
                         "replace: wrong_first would replace correct ones: remove guidance.replace")


# ----------------------------------------------------------------------------- candidates


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


# ----------------------------------------------------------------------------- ranking rules

Order = Callable[[Sequence[float] | None, Sequence[int], int, random.Random | None], list[int]]


@dataclass(frozen=True)
class Ranking:
    scored: str | None  # what the student scores per candidate: "answer" (comprehension), "trace", None (nothing)
    order: Order  # (scores, lengths, k, rng) -> the indices to inject, best first


def best_scores(scores: Sequence[float] | None, lengths: Sequence[int], k: int, rng: random.Random | None) -> list[int]:
    """Highest score first; NaN last, -inf (no locatable answer) just above NaN; ties to the
    shorter trace, then the lower index."""
    if scores is None or len(scores) != len(lengths):
        raise ValueError("scores must have one entry per candidate")

    def key(i: int) -> tuple:
        s = float(scores[i])
        return (math.isnan(s), -s if not math.isnan(s) else 0.0, lengths[i], i)

    return sorted(range(len(lengths)), key=key)[:k]


def at_random(scores: Sequence[float] | None, lengths: Sequence[int], k: int, rng: random.Random | None) -> list[int]:
    """k distinct candidates drawn with ``rng.sample`` (scores are not read)."""
    if rng is None:
        raise ValueError("rank 'random' needs an rng")
    return rng.sample(range(len(lengths)), k)


RANKINGS: dict[str, Ranking] = {
    "comprehension": Ranking("answer", best_scores),  # the student's probability of the ground truth after the trace
    "trace_likelihood": Ranking("trace", best_scores),  # the student's mean log-prob of the whole trace
    "random": Ranking(None, at_random),
}


def check_ranking(name: str) -> Ranking:
    if name not in RANKINGS:
        raise ValueError(f"unknown guidance rank {name!r} (known: {', '.join(RANKINGS)})")
    return RANKINGS[name]


def rank_candidates(scores: Sequence[float] | None, lengths: Sequence[int], k: int, rank: str = "comprehension",
                    rng: random.Random | None = None) -> list[int]:
    """Indices of the ``min(k, n)`` candidates to inject, best first, by the ranking rule ``rank``
    (``lengths``: one per candidate, e.g. ``num_chars``; ``scores``: one per candidate, higher is
    better; ignored, may be None, by rules that score nothing)."""
    return check_ranking(rank).order(scores, lengths, max(0, min(k, len(lengths))), rng)


# ----------------------------------------------------------------------------- replacement


def replacement_slots(correct: Sequence[bool], n: int, rng: random.Random, replace_correct: bool = False) -> list[int]:
    """Which of a prompt's G rollouts ``n`` traces replace: wrong ones, drawn uniformly
    (``rng.sample``). With ``replace_correct``, when fewer than ``n`` are wrong, every wrong
    rollout and then correct ones drawn at random (so every trace goes in); without it a shortfall
    is the caller's bug (it caps ``n`` at the wrong rollouts) and raises. ``slots[i]`` receives
    the i-th trace."""
    if n > len(correct):
        raise ValueError(f"cannot inject {n} traces into a group of {len(correct)}")
    wrong = [i for i, c in enumerate(correct) if not c]
    if len(wrong) >= n:
        return rng.sample(wrong, n)
    if not replace_correct:
        raise ValueError(f"only {len(wrong)} wrong rollouts for {n} traces, and correct ones may not be replaced")
    right = [i for i, c in enumerate(correct) if c]
    return rng.sample(wrong, len(wrong)) + rng.sample(right, n - len(wrong))
