"""The four teachers' reasoning styles: the same sum, reduced in different orders.

A trace rewrites the expression one reduction at a time (copying the rest, which a tiny model
learns easily) and ends with \\boxed{answer}. For 3 + 5 + 7 + 2:
  forward   3+5+7+2=8+7+2=15+2=17 \\boxed{17}        the leftmost pair first
  backward  3+5+7+2=3+5+9=3+14=17 \\boxed{17}        the rightmost pair first
  pairs     3+5+7+2=8+9=17 \\boxed{17}               every adjacent pair at once
  largest   3+5+7+2=7+5+3+2=12+3+2=15+2=17 \\boxed{17}   sort (largest first), then leftmost
The orders put each teacher's mistakes on different problems (and make some styles harder:
sorting, or two-digit numbers early), so four teachers together cover more than any one.
"""

from __future__ import annotations


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
    lines = STYLES[style](list(terms))
    return "=".join("+".join(map(str, line)) for line in lines) + " \\boxed{" + str(sum(terms)) + "}"
