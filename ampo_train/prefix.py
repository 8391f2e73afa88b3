"""Prefix guidance, the pure parts: how long a prefix of a teacher trace the student is given at a
step, and where a trace may be cut.

    fraction = prefix_fraction(settings, step, max_steps)     # the schedule, 1-based steps
    n = prefix_length(offsets, answer_start(trace, answer), fraction)   # tokens of the trace to give

QuestA, UFT, Prefix-RFT and BREAD all hand a failing student the start of a solution and let it
write the rest, shrinking the hint over training so that at the end it solves alone. The cut is at
a token boundary and before the first place the trace states an answer in any form the verifier
reads (``answer_start``): the student must still produce the answer.
"""

from __future__ import annotations

import math
from typing import Sequence

from ampo_cache.verify import first_answer_form
from ampo_train.config import PrefixSettings


def prefix_fraction(settings: PrefixSettings, step: int, max_steps: int) -> float:
    """The fraction of a trace given at ``step`` (1 .. max_steps): ``settings.fraction`` at step 1,
    ``settings.final`` at the last, in between as ``settings.schedule`` says (linear, or a cosine
    half-wave that moves slowly at both ends)."""
    start, end = settings.fraction, settings.final
    if settings.schedule == "constant":
        return start
    progress = min(max(step - 1, 0) / max(max_steps - 1, 1), 1.0)
    if settings.schedule == "linear":
        return start + (end - start) * progress
    if settings.schedule == "cosine":
        return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2
    raise ValueError(f"unknown prefix schedule {settings.schedule!r}")


def answer_start(trace: str, answer: str | None = None) -> int | None:
    """Where a trace first states an answer, in any form the verifier reads: a box, "the answer
    is", ``####``, ``A:``, an ``<answer>`` tag, or the ground truth ``answer`` as a number (the
    verifier's last-number rule). An R1-style trace boxes its answer inside its thinking and again
    at the end; prose states it before any box ("... gives 42. So the answer: \\boxed{42}"): a
    prefix cut only before the last box would hand the student the answer. None: no form."""
    return first_answer_form(trace, answer)


def prefix_length(offsets: Sequence[tuple[int, int]], box_start: int | None, fraction: float) -> int:
    """How many of a trace's tokens to give: ``floor(fraction x tokens)``, but only tokens that end
    before ``box_start`` (``answer_start``: the first character of an answer; None: the trace
    states none, and any token may be given).

    ``offsets``: each token's (start, end) characters in the trace (a fast tokenizer's offset
    mapping, the trace tokenised alone).
    """
    wanted = math.floor(fraction * len(offsets) + 1e-9)
    if box_start is None:
        return wanted
    allowed = 0
    while allowed < len(offsets) and offsets[allowed][1] <= box_start:
        allowed += 1
    return min(wanted, allowed)
