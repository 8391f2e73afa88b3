"""Benchmark files in the layouts they are usually published in, read as (problem, answer) pairs.

A row's problem is the first of ``problem``, ``question``, ``prompt`` (text, or a chat-message list:
the content of its last user turn, as in verl files). Its ground truth is the first of ``answer``,
``final_answer``, ``gt``, ``ground_truth``, ``reward_model.ground_truth``, else a ``solution`` from
which the final answer is read: after ``####`` (GSM8K) or in the last ``\\boxed{}`` (MATH).
``--problem-col``/``--answer-col`` name other columns. The layout is decided on the first row; a
file it does not fit fails with one line listing the columns found.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ampo_cache.errors import InputError
from ampo_cache.layouts import chat_user_content
from ampo_cache.readers import read_records, text_field
from ampo_cache.verify import extract_answer

PROBLEM_COLUMNS = ("problem", "question", "prompt")
ANSWER_COLUMNS = ("answer", "final_answer", "gt", "ground_truth")
EXPECTED = (f"a problem column ({' | '.join(PROBLEM_COLUMNS)}) and an answer column "
            f"({' | '.join(ANSWER_COLUMNS)} | reward_model.ground_truth | a solution with '#### x' or \\boxed{{x}})")


@dataclass(frozen=True)
class BenchItem:
    problem: str
    answer: str


def _problem(where: str, record: dict, name: str) -> str:
    value = record[name]
    if isinstance(value, list):
        return chat_user_content(where, value, name)
    return text_field(where, value, name)


def _answer(where: str, record: dict, name: str) -> str:
    if name == "reward_model.ground_truth":
        return text_field(where, (record.get("reward_model") or {}).get("ground_truth"), name).strip()
    if name == "solution":
        solution = text_field(where, record[name], name)
        answer = extract_answer(solution) if ("####" in solution or "\\boxed" in solution) else None
        if answer is None:
            raise InputError(where, "column 'solution' has no final answer ('#### x' or \\boxed{x})")
        return answer
    return text_field(where, record[name], name).strip()


def _pick(record: dict, problem_col: str | None, answer_col: str | None) -> tuple[str | None, str | None]:
    problem = problem_col if problem_col in record else next((c for c in PROBLEM_COLUMNS if c in record), None)
    if answer_col is not None:
        answer = answer_col if answer_col in record else None
    elif (found := next((c for c in ANSWER_COLUMNS if c in record), None)) is not None:
        answer = found
    elif isinstance(record.get("reward_model"), dict) and "ground_truth" in record["reward_model"]:
        answer = "reward_model.ground_truth"
    else:
        answer = "solution" if "solution" in record else None
    return problem, answer


def load_benchmark(path: str | Path, problem_col: str | None = None, answer_col: str | None = None) -> list[BenchItem]:
    """Every row of the file, in order (duplicates kept: a benchmark's rows are its problems)."""
    items: list[BenchItem] = []
    columns: tuple[str, str] | None = None
    for where, record in read_records(path):
        if columns is None:
            problem, answer = _pick(record, problem_col, answer_col)
            if problem is None or answer is None:
                wanted = EXPECTED if problem_col is None and answer_col is None else \
                    f"columns {problem_col or 'problem'!r} and {answer_col or 'answer'!r}"
                raise InputError(where, f"unknown benchmark layout: columns found: {', '.join(map(str, record))}; "
                                        f"expected {wanted}")
            columns = (problem, answer)
        if columns[0] not in record or (columns[1] not in record and "." not in columns[1]):
            raise InputError(where, f"missing column {columns[0] if columns[0] not in record else columns[1]!r} "
                                    f"(columns found: {', '.join(map(str, record))})")
        items.append(BenchItem(_problem(where, record, columns[0]), _answer(where, record, columns[1])))
    if not items:
        raise InputError(str(path), "no problems in the file")
    return items
