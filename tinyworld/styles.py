"""The four teachers' reasoning styles: the same sum, reduced in different orders.

A trace rewrites the expression one reduction at a time (copying the rest, which a tiny model
learns easily); its **last reduction is written straight into the box**. For 3 + 5 + 7 + 2:
  forward   3+5+7+2=8+7+2=15+2=\\boxed{17}             the leftmost pair first
  backward  3+5+7+2=3+5+9=3+14=\\boxed{17}             the rightmost pair first
  pairs     3+5+7+2=8+9=\\boxed{17}                    every adjacent pair at once
  largest   3+5+7+2=7+5+3+2=12+3+2=15+2=\\boxed{17}    sort (largest first), then leftmost

Why the box holds a reduction and not a copy: in an earlier version every trace ended
``=17 \\boxed{17}``, so the boxed answer was a copy of the number before it, whatever the
reasoning. Comprehension scoring (the student's probability of the ground-truth answer after a
teacher's trace) then measured nothing but copying, and every trace scored alike. Now the student
can only put high probability on the answer if it can carry out the trace's last step, ``15+2``
(forward) or ``3+14`` (backward) or ``8+9`` (pairs), from where that style's reasoning has left
it: comprehension measures whether the student can follow the trace to its end. A trace whose
chain went wrong but whose box is right (a lucky guess) scores low, as it should.

The orders put each teacher's mistakes on different problems (and make some styles harder:
sorting, or two-digit numbers early), so four teachers together cover more than any one; they
differ in ways a student that has seen a little of each can follow (``tinyworld.build``).
"""

from __future__ import annotations

import re


def _reduce(terms: list[int], pick) -> list[list[int]]:
    """Expressions from `terms` down to one number; `pick(expr)` -> index i to merge i and i+1."""
    lines = [terms]
    while len(terms) > 1:
        i = pick(terms)
        terms = terms[:i] + [terms[i] + terms[i + 1]] + terms[i + 2:]
        lines.append(terms)
    return lines


def _pairs(terms: list[int]) -> list[list[int]]:
    lines = [terms]
    while len(terms) > 1:
        terms = [sum(terms[i:i + 2]) for i in range(0, len(terms), 2)]
        lines.append(terms)
    return lines


STYLES = {
    "forward": lambda t: _reduce(t, lambda e: 0),
    "backward": lambda t: _reduce(t, lambda e: len(e) - 2),
    "pairs": _pairs,
    "largest": lambda t: [t] + _reduce(sorted(t, reverse=True), lambda e: 0),
}


def render(style: str, terms: tuple[int, ...]) -> str:
    """The trace: every expression but the final number, joined by ``=``, then ``=\\boxed{sum}``."""
    lines = STYLES[style](list(terms))
    return "=".join("+".join(map(str, line)) for line in lines[:-1]) + "=\\boxed{" + str(sum(terms)) + "}"


_LAST_EXPRESSION = re.compile(r"([\d+]+)=\\boxed")


def last_expression_value(text: str) -> int | None:
    """The value of the expression written just before ``=\\boxed{`` (the trace's last reduction),
    or None when the text has no such expression: what a box *derived* from the chain holds."""
    found = _LAST_EXPRESSION.findall(text)
    if not found:
        return None
    parts = [p for p in found[-1].split("+") if p]
    return sum(int(p) for p in parts) if parts else None
