"""Benchmark files in the layouts they are published in, read as (problem, accepted answers) pairs.

A row's problem is the first of ``problem``, ``question``, ``prompt`` (text, or a chat-message list:
the content of its last user turn, as in verl files; the whole list is kept too, and the model is
prompted with it as given, system turn included: ``BenchItem.messages``). Its ground truth is the first of ``answer``,
``final_answer``, ``gt``, ``ground_truth``, ``reward_model.ground_truth``, else a ``solution`` from
which the final answer is read: after ``####`` (GSM8K) or in the last ``\\boxed{}`` (MATH).
``--problem-col``/``--answer-col`` name other columns. The layout is decided on the first row; a
file it does not fit fails with one line listing the columns found. A ``data_source`` column (verl's,
one source per row) is kept per row (``BenchItem.source``), so results can be split by it.

The ground truth is read the way each publication writes it, so a downloaded file needs no
rewriting:

- a worked solution ending in ``#### x`` (GSM8K's ``answer`` column) yields ``x``;
- a list (OlympiadBench's ``final_answer: ["$2$"]``) yields its elements: a problem may have
  several accepted answers, and a response is correct when it matches ANY of them;
- a number (AMC's ``answer: 27.0``) becomes text without a spurious ``.0`` (``"27"``); the
  verifier compares plain numbers as decimals anyway, so ``27.0`` would also match ``\\boxed{27}``;
- ``$...$`` around an answer (``"$2$"``) is stripped: it is markup, not part of the value.

Every other text (``\\frac{14}{3}``, ``(1, 2]``) is kept as written and judged by the verifier.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ampo_common.errors import InputError
from ampo_cache.layouts import chat_user_content
from ampo_cache.readers import read_records, text_field
from ampo_cache.verify import extract_answer

PROBLEM_COLUMNS = ("problem", "question", "prompt")
ANSWER_COLUMNS = ("answer", "final_answer", "gt", "ground_truth")
EXPECTED = (f"a problem column ({' | '.join(PROBLEM_COLUMNS)}) and an answer column "
            f"({' | '.join(ANSWER_COLUMNS)} | reward_model.ground_truth | a solution with '#### x' or \\boxed{{x}})")
_DOLLARS = re.compile(r"^\$+(.*?)\$+$", re.DOTALL)


Message = tuple[str, str]  # (role, content) of one chat turn


@dataclass(frozen=True)
class BenchItem:
    """One problem and the answers accepted for it (usually one; any of them counts as correct).

    A problem is its text and answers (equality and hashing look at nothing else); how the file
    presents it rides along: ``messages``, the row's chat prompt as given (None for a plain-text
    problem, which the evaluation wraps in the model's chat template itself), ``source``, the
    row's ``data_source``, and ``where``, the row's place in its file for error messages.
    """

    problem: str
    answers: tuple[str, ...]
    messages: tuple[Message, ...] | None = field(default=None, compare=False)
    source: str | None = field(default=None, compare=False)
    where: str = field(default="", compare=False)

    def __post_init__(self):
        if isinstance(self.answers, str):  # BenchItem("1+1?", "2"): a single answer
            object.__setattr__(self, "answers", (self.answers,))
        else:
            object.__setattr__(self, "answers", tuple(self.answers))
        if not self.answers:
            raise ValueError("a benchmark problem needs at least one accepted answer")


def _problem(where: str, record: dict, name: str) -> tuple[str, tuple[Message, ...] | None]:
    """The problem text, and the chat messages when the cell is a message list (verl's ``prompt``)."""
    value = record[name]
    if not isinstance(value, (list, tuple)):
        return text_field(where, value, name), None
    messages = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
            raise InputError(where, f"column {name!r}: turn {i} is not a {{role, content}} message")
        content = text_field(where, turn.get("content"), f"{name}[{i}].content", allow_empty=True)
        messages.append((turn["role"], content))
    return chat_user_content(where, value, name), tuple(messages)


def _source(where: str, record: dict) -> str | None:
    value = record.get("data_source")
    return None if value is None else text_field(where, value, "data_source")


def number_text(value: int | float) -> str:
    """A number as an answer: ``27.0`` -> ``"27"`` (integral floats lose the ``.0``), ``0.5`` -> ``"0.5"``."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} is not a finite number")
        if value.is_integer():
            return str(int(value))
        return repr(value)
    return str(value)


def answer_text(where: str, value, name: str) -> str:
    """One published answer as the text the verifier compares: GSM8K's ``#### x`` and ``$x$`` unwrapped."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return number_text(value)
        except ValueError as exc:
            raise InputError(where, f"column {name!r}: {exc}") from None
    text = text_field(where, value, name).strip()
    if "####" in text:  # a worked solution ending in '#### x' (GSM8K): x is the answer
        tail = text.rsplit("####", 1)[1].strip()
        text = tail.splitlines()[0].strip() if tail else ""
    if (match := _DOLLARS.match(text)) is not None:
        text = match.group(1).strip()
    if not text:
        raise InputError(where, f"empty {name!r} (nothing after '####' or inside '$...$')")
    return text


def _answers(where: str, record: dict, name: str) -> tuple[str, ...]:
    """The accepted answers of a row: one, or each element of a list-valued answer."""
    if name == "reward_model.ground_truth":
        value = (record.get("reward_model") or {}).get("ground_truth")
    elif name == "solution":
        solution = text_field(where, record[name], name)
        answer = extract_answer(solution) if ("####" in solution or "\\boxed" in solution) else None
        if answer is None:
            raise InputError(where, "column 'solution' has no final answer ('#### x' or \\boxed{x})")
        return (answer,)
    else:
        value = record[name]
    if isinstance(value, (list, tuple)):
        if not value:
            raise InputError(where, f"column {name!r} is an empty list; expected at least one answer")
        answers = tuple(answer_text(where, v, f"{name}[{i}]") for i, v in enumerate(value))
        return tuple(dict.fromkeys(answers))  # the same answer twice is one accepted answer
    return (answer_text(where, value, name),)


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


def load_benchmark(path: str | Path, problem_col: str | None = None, answer_col: str | None = None,
                   limit: float | None = None) -> list[BenchItem]:
    """Every row of the file, in order (duplicates kept: a benchmark's rows are its problems).

    ``limit`` (lm-eval's ``--limit``): a whole number N keeps the first N rows (the rest of the file
    is not read); a fraction below 1 keeps that share of the rows, rounded up.
    """
    count = row_limit(limit)
    items: list[BenchItem] = []
    columns: tuple[str, str] | None = None
    for where, record in read_records(path):
        if count is not None and len(items) >= count:
            break
        if columns is None:
            columns = _layout(where, record, problem_col, answer_col)
        if columns[0] not in record or (columns[1] not in record and "." not in columns[1]):
            raise InputError(where, f"missing column {columns[0] if columns[0] not in record else columns[1]!r} "
                                    f"(columns found: {', '.join(map(str, record))})")
        problem, messages = _problem(where, record, columns[0])
        items.append(BenchItem(problem, _answers(where, record, columns[1]), messages, _source(where, record), where))
    if not items:
        raise InputError(str(path), "no problems in the file")
    if limit is not None and count is None:
        return items[:math.ceil(len(items) * limit)]
    return items


def row_limit(limit: float | None) -> int | None:
    """The row count a ``--limit`` asks for when it is a whole number (None: a fraction, or no limit)."""
    if limit is None:
        return None
    if not limit > 0 or (limit >= 1 and not float(limit).is_integer()):
        raise InputError("--limit", f"expected a whole number of rows (>= 1) or a fraction of each file (0 < x < 1), "
                                    f"got {limit}")
    return int(limit) if limit >= 1 else None


def _layout(where: str, record: dict, problem_col: str | None, answer_col: str | None) -> tuple[str, str]:
    problem, answer = _pick(record, problem_col, answer_col)
    if problem is None or answer is None:
        wanted = EXPECTED if problem_col is None and answer_col is None else \
            f"columns {problem_col or 'problem'!r} and {answer_col or 'answer'!r}"
        raise InputError(where, f"unknown benchmark layout: columns found: {', '.join(map(str, record))}; "
                                f"expected {wanted}")
    return problem, answer
