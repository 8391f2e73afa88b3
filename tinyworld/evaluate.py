"""Accuracy of the tiny world's models per level, through the same backend and verifier as the build."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ampo_cache.generation import conversation
from ampo_cache.generation.hf import TransformersBackend
from ampo_cache.teachers import Teacher
from ampo_cache.verify import verify_one
from tinyworld.problems import Problem


@dataclass
class LevelScores:
    greedy: float  # accuracy of the greedy answer
    sampled: float  # mean accuracy over `samples` sampled answers
    solved: list[bool]  # per problem: at least one sampled answer correct
    all_wrong: float  # fraction of problems whose `samples` sampled answers are all wrong


def correct_matrix(backend: TransformersBackend, problems: list[Problem], n: int, seed: int, batch: int = 64) -> list[list[bool]]:
    rows: list[list[bool]] = []
    for start in range(0, len(problems), batch):
        chunk = problems[start : start + batch]
        outputs = backend.generate([conversation(p.text, None) for p in chunk], n=n, seed=seed + start)
        rows += [[verify_one(g.text, p.answer).correct for g in samples] for p, samples in zip(chunk, outputs)]
    return rows


def score_model(folder: Path, tests: dict[int, list[Problem]], temperature: float, samples: int,
                max_tokens: int, seed: int = 0) -> dict[int, LevelScores]:
    make = lambda t: Teacher(name="eval", model=str(folder), backend="transformers",  # noqa: E731
                             sampling={"temperature": t, "top_p": 1.0, "max_tokens": max_tokens})
    greedy_backend = TransformersBackend(make(0.0), device="cpu")
    sampled_backend = TransformersBackend(make(temperature), device="cpu")
    scores = {}
    for level, problems in tests.items():
        greedy = correct_matrix(greedy_backend, problems, 1, seed)
        sampled = correct_matrix(sampled_backend, problems, samples, seed + 1)
        scores[level] = LevelScores(
            greedy=sum(r[0] for r in greedy) / len(problems),
            sampled=sum(sum(r) for r in sampled) / (len(problems) * samples),
            solved=[any(r) for r in sampled],
            all_wrong=sum(not any(r) for r in sampled) / len(problems),
        )
    return scores
