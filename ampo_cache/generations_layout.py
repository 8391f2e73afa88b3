"""The ``generations`` layout: one row per problem holding one teacher's generations and the
publisher's own verdicts on them, as OpenR1-Math-220k ships its DeepSeek-R1 traces (and other sets
made with the open-r1 recipe).

Columns read (the others, e.g. OpenR1's ``solution``, ``uuid``, ``messages``, are left alone):

- the problem (``problem``, else ``question`` or a chat ``prompt``) and the ground truth
  (``answer``, else ``reward_model.ground_truth``), as in the nested and wide layouts;
- ``generations``: a list of texts; generation i becomes a trace with ``sample_idx`` i (when that
  index is free for the prompt and teacher in the store; otherwise the next free one);
- ``finish_reasons`` (optional): a list of ``stop``/``length``/..., one per generation, kept as the
  trace's ``finish_reason``; a null list or item leaves it null;
- label columns: lists of booleans, one per generation, the publisher's verdicts. By default
  ``correctness_math_verify`` and ``correctness_llama``, whichever the file has; ``--label-col
  a,b`` names others. Each is kept on the trace as a BOOLEAN column of the same name, and the
  importer counts how often our verifier agrees with it (``ampo_cache.agreement``). A null list or
  a null item means "not judged": counted, never compared;
- ``source`` (OpenR1: where the problem comes from, e.g. ``olympiads`` or ``cn_k12``) is kept as
  ``data_source`` when the row has no ``data_source`` of its own.

The whole file is one teacher's: ``--teacher NAME`` or ``NAME=PATH``, by default ``deepseek-r1``
(OpenR1-Math-220k's teacher, DeepSeek-R1). Our verifier decides ``correct`` as for every layout.

A list that is not a list, a generation that is not text, a label that is not a boolean, or lists
of unequal length fail with one line naming the file, the row and the column.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

from ampo_common.errors import InputError
from ampo_cache.layouts import EXTRA_COLUMNS, ParsedTrace, _Layout, answer_of, label_value, problem_of, row_extras
from ampo_cache.readers import Readable, column
from ampo_cache.schema import TRACES

GENERATIONS = "generations"
FINISH_REASONS = "finish_reasons"
PUBLISHER_LABELS = ("correctness_math_verify", "correctness_llama")  # OpenR1-Math-220k's, in its order
DEFAULT_TEACHER = "deepseek-r1"
EXPORT_COLUMNS = ("problem", "answer", "prompt_source")  # what `export --format long` adds to a trace's columns


def _reason(where: str, value, name: str) -> str:
    if not isinstance(value, str):
        raise InputError(where, f"{name} should be a finish reason (text such as 'stop' or 'length'), got {value!r}")
    return value


def _text(where: str, value, name: str) -> str:
    if not isinstance(value, str):  # stricter than an answer cell: a number is no generation
        raise InputError(where, f"{name} should be text, got {type(value).__name__}")
    return value


def per_generation(where: str, values, name: str, count: int, item: Callable) -> list:
    """A list column's entries, one per generation (``item`` reads each); null -> all None."""
    if values is None:
        return [None] * count
    if not isinstance(values, (list, tuple)):
        raise InputError(where, f"column {name!r} should be a list with one entry per generation, "
                                f"got {type(values).__name__}")
    if len(values) != count:
        raise InputError(where, f"column {name!r} has {len(values)} entries for {count} generations")
    return [None if v is None else item(where, v, f"{name}[{i}]") for i, v in enumerate(values)]


@dataclass
class GenerationsLayout(_Layout):
    """One row per problem; ``label_cols`` are the publisher's per-generation label columns."""

    teacher: str = DEFAULT_TEACHER
    teacher_given: bool = False  # False: the default name, said so in ``describe``
    label_cols: list[str] = field(default_factory=list)
    problem: str = "problem"
    answer: str = "answer"
    name = "generations"

    def describe(self) -> str:
        who = f"{self.teacher!r}" + ("" if self.teacher_given else " (default; --teacher NAME or NAME=PATH)")
        labels = ", ".join(self.label_cols) or "none"
        return f"generations (one row per problem, a list of generations; teacher: {who}; publisher labels: {labels})"

    def parse(self, where: str, record: dict) -> Iterator[ParsedTrace]:
        _, problem = problem_of(where, record, self.problem)
        _, answer = answer_of(where, record, self.answer)
        texts = column(where, record, GENERATIONS)
        if texts is None:
            return  # no generations for this problem
        if not isinstance(texts, (list, tuple)):
            raise InputError(where, f"column {GENERATIONS!r} should be a list of texts, got {type(texts).__name__}")
        count = len(texts)
        texts = per_generation(where, texts, GENERATIONS, count, _text)
        reasons = per_generation(where, record.get(FINISH_REASONS), FINISH_REASONS, count, _reason)
        labels = {name: per_generation(where, column(where, record, name), name, count, label_value)
                  for name in self.label_cols}
        extra = row_extras(where, record)
        if "data_source" not in extra and isinstance(record.get("source"), str) and record["source"]:
            extra["data_source"] = record["source"]
        for i, text in enumerate(texts):
            if text is None:
                raise InputError(where, f"{GENERATIONS}[{i}] is null; expected text")
            yield ParsedTrace(where=f"{where} {GENERATIONS}[{i}]", problem=problem, answer=answer,
                              teacher=self.teacher, text=text, label=None, extra=extra,
                              finish_reason=reasons[i], sample_idx=i,
                              labels={name: values[i] for name, values in labels.items()})


def generations_layout(path: Readable, columns: list[str], *, teacher: str | None, label_cols: str | None,
                       problem_col: str = "problem", answer_col: str = "answer") -> GenerationsLayout:
    """The layout for ``path`` (whose columns are ``columns``), or a one-line error saying why not."""
    listed = ", ".join(columns) or "none"
    if GENERATIONS not in columns:
        raise InputError(str(path), f"no {GENERATIONS!r} column (a list of one teacher's texts per problem) for the "
                                    f"generations layout (columns found: {listed})")
    if label_cols:
        names = [c.strip() for c in label_cols.split(",") if c.strip()]
        missing = [c for c in names if c not in columns]
        if missing:
            raise InputError("--label-col", f"no column {missing[0]!r} in {path} (columns found: {listed})")
    else:
        names = [c for c in PUBLISHER_LABELS if c in columns]
    taken = [c for c in names if c in TRACES.names or c in EXTRA_COLUMNS or c in EXPORT_COLUMNS]
    if taken:
        raise InputError("--label-col", f"{taken[0]!r} is a column of the store's traces table; "
                                        "a publisher's label column cannot share its name")
    return GenerationsLayout(teacher=(teacher or DEFAULT_TEACHER).strip(), teacher_given=bool(teacher),
                             label_cols=names, problem=problem_col, answer=answer_col)
