"""Verifiable problems at graded difficulty: sums of single-digit numbers.

A level is the number of terms: each extra term is one more reasoning step, so a model that
makes a mistake with probability e per step solves a level-n problem with probability about
(1 - e)^(n - 1). That gives difficulty we can grade and measure, with traces short enough for a
tiny model. Everything is deterministic in the seed; test problems never appear in training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TERMS_PER_LEVEL = {1: 2, 2: 3, 3: 4, 4: 5}
HARD_LEVEL = max(TERMS_PER_LEVEL)


@dataclass(frozen=True)
class Problem:
    terms: tuple[int, ...]
    level: int

    @property
    def text(self) -> str:
        return "What is " + " + ".join(map(str, self.terms)) + "?"

    @property
    def answer(self) -> str:
        return str(sum(self.terms))

    def row(self) -> dict:
        return {"problem": self.text, "answer": self.answer, "level": self.level,
                "kind": "sum", "source": "tinyworld"}


def random_problem(rng: random.Random, level: int) -> Problem:
    return Problem(tuple(rng.randint(1, 9) for _ in range(TERMS_PER_LEVEL[level])), level)


def held_out_problems(seed: int, per_level: int) -> dict[int, list[Problem]]:
    """Held-out problems per level, distinct within a level."""
    rng = random.Random(f"tinyworld-test-{seed}")
    held_out: dict[int, list[Problem]] = {}
    for level in TERMS_PER_LEVEL:
        seen: dict[tuple, Problem] = {}
        # Level 1 has only 81 distinct problems: hold out at most a quarter of them.
        want = min(per_level, 9 ** TERMS_PER_LEVEL[level] // 4)
        while len(seen) < want:
            p = random_problem(rng, level)
            seen.setdefault(p.terms, p)
        held_out[level] = list(seen.values())
    return held_out


class ProblemSampler:
    """Draws training problems of given levels, never one of the held-out problems."""

    def __init__(self, seed: int, held_out: dict[int, list[Problem]], stream: str):
        self.rng = random.Random(f"tinyworld-{stream}-{seed}")
        self.excluded = {p.terms for problems in held_out.values() for p in problems}

    def sample(self, levels: list[int], weights: list[float] | None = None) -> Problem:
        while True:
            p = random_problem(self.rng, self.rng.choices(levels, weights)[0])
            if p.terms not in self.excluded:
                return p

    def distinct(self, count: int, levels: list[int], weights: list[float] | None = None) -> list[Problem]:
        found: dict[tuple, Problem] = {}
        while len(found) < count:
            p = self.sample(levels, weights)
            found.setdefault(p.terms, p)
        return list(found.values())
