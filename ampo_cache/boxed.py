"""The one ``\\boxed{...}`` parser of the project.

The verifier reads a trace's final answer from its last box, the format reward counts boxes, and
comprehension scoring swaps the ground truth into the box the verifier read. All three use this
module, so they always agree on which box that is and where its content starts and ends.

Rules:
- a box opens with ``\\boxed{`` or ``\\fbox{`` (whitespace allowed before the brace);
- its content runs to the matching ``}``; a backslash escapes the next character, so ``\\{`` and
  ``\\}`` (literal braces in LaTeX, e.g. a set ``\\{1,2\\}``) do not count and ``\\\\`` (a line
  break) does not escape the brace after it;
- a box whose braces never balance (a truncated trace) is not a box;
- boxes are ordered by where they open, so in ``\\boxed{\\boxed{3}}`` the inner box is the last.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")


@dataclass(frozen=True)
class Box:
    start: int  # index of the backslash of ``\boxed``
    content_start: int  # first character inside the braces
    content_end: int  # index of the closing brace (exclusive end of the content)

    def content(self, text: str) -> str:
        return text[self.content_start:self.content_end]


def closing_brace(text: str, open_idx: int) -> int | None:
    """Index of the ``}`` matching the ``{`` at ``open_idx``, or None when it never closes."""
    depth, i = 0, open_idx
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def boxes(text: str) -> list[Box]:
    """Every balanced box in ``text``, in order of opening."""
    found = []
    for match in _OPEN.finditer(text):
        open_idx = match.end() - 1
        close_idx = closing_brace(text, open_idx)
        if close_idx is not None:
            found.append(Box(match.start(), open_idx + 1, close_idx))
    return found


def last_box(text: str) -> Box | None:
    """The box a final answer is read from: the last balanced one."""
    found = boxes(text)
    return found[-1] if found else None


def last_boxed_content(text: str) -> str | None:
    box = last_box(text)
    return None if box is None else box.content(text)
