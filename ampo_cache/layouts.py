"""The layouts trace files come in, each read as the per-trace records the importer verifies.

- ``long``:   one row per trace: problem, answer, teacher, trace (what ``ampo-cache export --format
              long`` writes, where the trace column is called ``text``; ``generation`` is accepted
              too). A file of one teacher's traces may leave out the teacher column and name the
              teacher with ``--teacher NAME`` (or ``NAME=PATH``).
- ``nested``: one row per prompt holding a list of traces, as the AMPO reference's dataset
              (``target_lst``: list of ``{content, source, quality_score, role}``) and LUFFY's
              (``target``: list of ``{content}`` or ``{role, content}``; it names no teacher, so the
              teacher comes from ``--teacher``). A trace item may also be a plain string.
- ``wide``:   one row per prompt with one column per teacher (``--teacher-cols a,b,c`` or a glob;
              by default ``trace_*``); a cell holds the trace text, a struct with it (``content``,
              ``text`` or ``trace``, and optionally ``quality_score``), or null (no trace).
- ``generations``: one row per problem with a list of one teacher's generations and the publisher's
              per-generation labels, as OpenR1-Math-220k ships them: ``ampo_cache.generations_layout``.

In nested and wide files the problem is a plain text column (``problem``, ``question``) or a chat
message list (``prompt``: the content of its last user turn, as in verl files); the ground truth
is an ``answer`` column or ``reward_model.ground_truth``. ``--problem-col``/``--answer-col`` name
other columns.

The source's own fields ``quality_score`` (per trace), ``data_source`` and ``index`` (per row, or
``extra_info.index``) ride along as extra columns of the traces table with fixed types
(``EXTRA_COLUMNS``), so every shard agrees and SQL can filter on them.

``resolve_layout`` picks a layout from the columns of the file's first row (or the Parquet
schema) when asked for ``auto``; a file it cannot place fails with one line listing the columns
found and the layouts expected.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from ampo_common.errors import InputError
from ampo_cache.readers import Readable, ShardedTable, column, file_format, read_records, text_field

LAYOUTS = ("auto", "long", "nested", "wide", "generations")
NESTED_LISTS = ("target_lst", "target")  # the AMPO reference's, then LUFFY's
DEFAULT_WIDE_PATTERN = "trace_*"
TRACE_KEYS = ("content", "text", "trace")  # where a struct cell or list item keeps the trace text
LONG_TRACE_FALLBACKS = ("text", "generation")  # our long export's name; one teacher's file's

# Source fields kept on the traces rows, with the type every shard stores them as.
EXTRA_COLUMNS = {"quality_score": pa.float64(), "data_source": pa.string(), "index": pa.int64()}

EXPECTED = (
    "long (problem, answer, teacher, trace), "
    "nested (prompt or problem, reward_model.ground_truth or answer, target_lst or target), "
    f"wide (problem, answer, one column per teacher: --teacher-cols a,b,c or {DEFAULT_WIDE_PATTERN}), "
    "generations (problem, answer, generations: a list of one teacher's texts)"
)


@dataclass
class ParsedTrace:
    where: str
    problem: str
    answer: str
    teacher: str
    text: str
    label: bool | None
    extra: dict = field(default_factory=dict)  # EXTRA_COLUMNS values the source gave
    finish_reason: str | None = None  # the source's own (generations layout: ``finish_reasons``)
    sample_idx: int | None = None  # the position the source gave the trace, kept when free
    labels: dict = field(default_factory=dict)  # publisher label column -> True/False/None (not judged)


# ------------------------------------------------------------------ cells shared by the layouts


def chat_user_content(where: str, messages, name: str) -> str:
    """The problem in a chat-message list: the content of its last user turn."""
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise InputError(where, f"column {name!r} is a message list without a user turn")
    return text_field(where, users[-1].get("content"), f"{name}.content")


def problem_of(where: str, record: dict, problem_col: str = "problem") -> tuple[str, str]:
    """(column used, problem text). By default ``problem``, else ``question``, else ``prompt``."""
    name = problem_col
    if problem_col == "problem":
        name = next((c for c in ("problem", "question", "prompt") if c in record), "problem")
    value = column(where, record, name)
    if isinstance(value, (list, tuple)):
        return name, chat_user_content(where, value, name)
    return name, text_field(where, value, "problem")


def answer_of(where: str, record: dict, answer_col: str = "answer") -> tuple[str, str]:
    """(column used, ground truth). By default ``answer``, else ``reward_model.ground_truth``."""
    if answer_col == "answer" and "answer" not in record and isinstance(record.get("reward_model"), dict):
        truth = record["reward_model"].get("ground_truth")
        return "reward_model", text_field(where, truth, "reward_model.ground_truth").strip()
    return answer_col, text_field(where, column(where, record, answer_col), "answer").strip()


def _float(where: str, value, name: str) -> float | None:
    if value is None or value == "":  # "": a null cell of a CSV file
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InputError(where, f"{name!r} should be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise InputError(where, f"{name!r} should be a number, got {value!r}") from None
    return None if math.isnan(number) else number


def _int(where: str, value, name: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise InputError(where, f"{name!r} should be an integer (the source's row index; it is kept as a BIGINT "
                            f"column), got {value!r}")


def row_extras(where: str, record: dict) -> dict:
    """``data_source`` and ``index`` of a row (``index`` may sit in ``extra_info``)."""
    extra = {}
    if record.get("data_source") not in (None, ""):
        extra["data_source"] = str(record["data_source"])
    index = record.get("index")
    if index is None and isinstance(record.get("extra_info"), dict):
        index = record["extra_info"].get("index")
    if (value := _int(where, index, "index")) is not None:
        extra["index"] = value
    return extra


def _with_quality(where: str, extra: dict, value) -> dict:
    score = _float(where, value, "quality_score")
    return extra if score is None else {**extra, "quality_score": score}


def _trace_text(where: str, item, name: str) -> tuple[str, dict]:
    """The text of a list item or cell (a string, or a struct holding it) and the struct itself."""
    if isinstance(item, str):
        return item, {}
    if isinstance(item, dict):
        key = next((k for k in TRACE_KEYS if item.get(k) is not None), None)
        if key is None:
            raise InputError(where, f"{name} has no trace text (expected one of {', '.join(TRACE_KEYS)}; "
                                    f"keys found: {', '.join(map(str, item))})")
        return text_field(where, item[key], f"{name}.{key}", allow_empty=True), item
    raise InputError(where, f"{name} should be a trace text or a struct holding one, got {type(item).__name__}")


# ------------------------------------------------------------------ the layouts


class _Layout:
    name = ""
    label: str | None = None  # only the long layout carries a correctness-label column

    def parse(self, where: str, record: dict) -> Iterator[ParsedTrace]:
        raise NotImplementedError

    def traces(self, path: Readable) -> Iterator[ParsedTrace]:
        for where, record in read_records(path):
            yield from self.parse(where, record)


_TRUE = {"true", "1", "yes", "correct", "t", "y"}
_FALSE = {"false", "0", "no", "wrong", "incorrect", "f", "n"}


def label_value(where: str, value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise InputError(where, f"column {name!r} should be a correctness label (true/false/1/0), got {value!r}")


@dataclass
class LongLayout(_Layout):
    """Which input column holds what. ``problem`` falls back to ``question`` and ``trace`` to
    ``text`` (the name in our long export) or ``generation`` when left at their defaults.
    ``default_teacher`` names the teacher of rows without a teacher column (a file of one
    teacher's traces: ``--teacher NAME`` or ``NAME=PATH``)."""

    problem: str = "problem"
    answer: str = "answer"
    teacher: str = "teacher"
    trace: str = "trace"
    label: str | None = None
    default_teacher: str | None = None
    name = "long"

    def describe(self) -> str:
        if self.default_teacher:
            return (f"long (one row per trace: {self.problem}, {self.answer}, {self.trace}; "
                    f"teacher: {self.default_teacher!r} where no {self.teacher!r} column)")
        return f"long (one row per trace: {self.problem}, {self.answer}, {self.teacher}, {self.trace})"

    def parse(self, where: str, record: dict) -> Iterator[ParsedTrace]:
        yield parse_row(where, record, self)


def parse_row(where: str, record: dict, layout: LongLayout) -> ParsedTrace:
    problem_col = layout.problem
    if problem_col == "problem" and "problem" not in record and "question" in record:
        problem_col = "question"
    trace_col = layout.trace
    if trace_col == "trace" and "trace" not in record:
        trace_col = next((c for c in LONG_TRACE_FALLBACKS if c in record), "trace")
    problem = text_field(where, column(where, record, problem_col), "problem")
    answer = text_field(where, column(where, record, layout.answer), "answer").strip()
    teacher = layout.default_teacher
    if layout.teacher in record or not teacher:
        teacher = text_field(where, column(where, record, layout.teacher), "teacher")
    extra = _with_quality(where, row_extras(where, record), record.get("quality_score"))
    return ParsedTrace(
        where=where,
        problem=problem,
        answer=answer,
        teacher=teacher.strip(),
        text=text_field(where, column(where, record, trace_col), "trace", allow_empty=True),
        label=None if layout.label is None else label_value(where, column(where, record, layout.label), layout.label),
        extra=extra,
    )


@dataclass
class NestedLayout(_Layout):
    """One row per prompt; ``traces`` names the list column (``target_lst`` or ``target``)."""

    traces_col: str = "target_lst"
    teacher: str | None = None  # for items that name no teacher (``source``)
    problem: str = "problem"
    answer: str = "answer"
    name = "nested"

    def describe(self) -> str:
        who = "each trace's source" + (f", else {self.teacher!r}" if self.teacher else "")
        if self.traces_col == "target" and self.teacher:
            who = f"{self.teacher!r} (--teacher)"
        return f"nested (one row per prompt, traces in {self.traces_col!r}; teacher: {who})"

    def parse(self, where: str, record: dict) -> Iterator[ParsedTrace]:
        _, problem = problem_of(where, record, self.problem)
        _, answer = answer_of(where, record, self.answer)
        extra = row_extras(where, record)
        items = column(where, record, self.traces_col)
        if items is None:
            return
        if not isinstance(items, (list, tuple)):
            raise InputError(where, f"column {self.traces_col!r} should be a list of traces, got {type(items).__name__}")
        for i, item in enumerate(items):
            name = f"{self.traces_col}[{i}]"
            text, struct = _trace_text(where, item, name)
            teacher = struct.get("source") or self.teacher
            if not teacher:
                raise InputError(where, f"{name} names no teacher (no 'source'); pass --teacher NAME")
            yield ParsedTrace(where=f"{where} {name}", problem=problem, answer=answer,
                              teacher=text_field(where, teacher, f"{name}.source").strip(), text=text, label=None,
                              extra=_with_quality(where, extra, struct.get("quality_score")))


@dataclass
class WideLayout(_Layout):
    """One row per prompt; ``columns`` maps each teacher column to its teacher's name."""

    columns: dict[str, str] = field(default_factory=dict)
    problem: str = "problem"
    answer: str = "answer"
    name = "wide"

    def describe(self) -> str:
        pairs = ", ".join(c if c == t else f"{c} -> {t}" for c, t in self.columns.items())
        return f"wide (one row per prompt, teacher columns: {pairs})"

    def parse(self, where: str, record: dict) -> Iterator[ParsedTrace]:
        _, problem = problem_of(where, record, self.problem)
        _, answer = answer_of(where, record, self.answer)
        extra = row_extras(where, record)
        for col, teacher in self.columns.items():
            cell = record.get(col)
            if cell is None:
                continue  # this teacher has no trace for this prompt
            text, struct = _trace_text(where, cell, f"column {col!r}")
            yield ParsedTrace(where=f"{where} {col}", problem=problem, answer=answer, teacher=teacher, text=text,
                              label=None, extra=_with_quality(where, extra, struct.get("quality_score")))


# ------------------------------------------------------------------ detection


def file_columns(path: Readable) -> list[str]:
    """Column names: the Parquet schema (a sharded table's first shard's), or the first row of a
    JSONL/CSV file (empty if none)."""
    if isinstance(path, ShardedTable):
        path = path.files[0]
    path = Path(path)
    if file_format(path) == "parquet":
        try:
            return list(pq.read_schema(path).names)
        except Exception as exc:  # noqa: BLE001
            raise InputError(str(path), f"not a readable Parquet file ({exc})") from None
    for _, record in read_records(path):
        return list(record)
    return []


def teacher_columns(columns: list[str], spec: str) -> dict[str, str]:
    """``a,b,c`` or glob patterns -> {column: teacher}. A pattern with one ``*`` names the teacher
    by what the ``*`` matched (``trace_*`` on ``trace_alpha`` -> ``alpha``); otherwise the column
    name is the teacher's name."""
    found: dict[str, str] = {}
    for pattern in (p.strip() for p in spec.split(",") if p.strip()):
        if not any(ch in pattern for ch in "*?["):
            if pattern not in columns:
                raise InputError("--teacher-cols", f"no column {pattern!r} (columns found: {', '.join(columns)})")
            found[pattern] = pattern
            continue
        for col in columns:
            if fnmatch.fnmatchcase(col, pattern) and col not in found:
                teacher = col
                if pattern.count("*") == 1 and not any(ch in pattern for ch in "?["):
                    head, tail = pattern.split("*")
                    teacher = col[len(head) : len(col) - len(tail)] or col
                found[col] = teacher
    return found


def resolve_layout(
    path: Readable,
    layout: str = "auto",
    *,
    problem_col: str = "problem",
    answer_col: str = "answer",
    teacher_col: str = "teacher",
    trace_col: str = "trace",
    label_col: str | None = None,
    teacher: str | None = None,
    teacher_cols: str | None = None,
):
    """The layout to read ``path`` with: the one asked for, or (``auto``) the one its columns show.

    ``path`` is a file or a ``ShardedTable`` (a dataset folder's split). ``teacher`` names the
    teacher of traces that name none (LUFFY's ``target``, a long file without a teacher column, the
    generations layout)."""
    # Imported here: the generations layout builds on this module's cells and base class.
    from ampo_cache.generations_layout import GENERATIONS, generations_layout

    if layout not in LAYOUTS:
        raise InputError("--layout", f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    columns = file_columns(path)
    listed = ", ".join(columns) or "none"
    long = LongLayout(problem=problem_col, answer=answer_col, teacher=teacher_col, trace=trace_col, label=label_col,
                      default_teacher=teacher)
    if layout == "long" or (layout == "auto" and not columns):
        return long
    nested_col = next((c for c in NESTED_LISTS if c in columns), None)
    wide_spec = teacher_cols or DEFAULT_WIDE_PATTERN
    wide = teacher_columns(columns, wide_spec)

    def nested_layout():
        if nested_col is None:
            raise InputError(str(path), f"no list of traces ({' or '.join(NESTED_LISTS)}) for the nested layout "
                                        f"(columns found: {listed})")
        if nested_col == "target" and not teacher:
            raise InputError(str(path), "the traces in 'target' name no teacher (LUFFY layout); pass --teacher NAME")
        return NestedLayout(traces_col=nested_col, teacher=teacher, problem=problem_col, answer=answer_col)

    def wide_layout():
        if not wide:
            raise InputError(str(path), f"no teacher columns match {wide_spec!r} for the wide layout "
                                        f"(columns found: {listed})")
        return WideLayout(columns=wide, problem=problem_col, answer=answer_col)

    def one_teacher_lists():
        return generations_layout(path, columns, teacher=teacher, label_cols=label_col, problem_col=problem_col,
                                  answer_col=answer_col)

    if layout == "nested":
        return nested_layout()
    if layout == "wide":
        return wide_layout()
    if layout == "generations":
        return one_teacher_lists()
    # auto: what the columns show, the most specific sign first
    if teacher_cols:
        return wide_layout()
    has_trace = trace_col in columns or (trace_col == "trace" and any(c in columns for c in LONG_TRACE_FALLBACKS))
    if has_trace and (teacher_col in columns or teacher):
        return long  # before nested: a long file may well have a column called `target`
    if GENERATIONS in columns:
        return one_teacher_lists()
    if nested_col is not None:
        return nested_layout()
    if wide:
        return wide_layout()
    raise InputError(str(path), f"cannot recognise the layout (columns found: {listed}); expected {EXPECTED}")
