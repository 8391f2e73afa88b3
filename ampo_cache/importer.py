"""Import trace files into a store, verifying each trace.

The file's layout (long, nested, wide or generations: see ampo_cache.layouts) only decides how its
rows become per-trace records; everything after that is shared by the layouts and lives here.
Several inputs (per-teacher subsets of one problem set, ampo_cache.inputs) import as one: they are
checked together and joined on the problem through ``prompt_id``.

Two passes over the inputs. The first checks every row (columns present, answer not empty, label
readable, one answer per problem across all inputs and the store) and touches nothing, so bad input
leaves the store as it was (or not created at all).
The second writes shards of ``chunk_rows`` rows: prompts first, then their traces. A trace already
in the store (same prompt, teacher and text) is skipped, which makes a second import of the same
file add nothing and lets an interrupted import be completed by running it again.

Where the input carries the publisher's own correctness labels (the long layout's ``--label-col``,
the generations layout's label columns), the summary counts how often our verifier agrees, per
teacher and label column (ampo_cache.agreement), over the traces this import verified.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator, Union

import pyarrow as pa

from ampo_common.errors import InputError
from ampo_cache.agreement import Agreement, tally
from ampo_cache.generations_layout import GenerationsLayout
from ampo_cache.ids import prompt_id, text_hash
from ampo_cache.inputs import ImportSource
from ampo_cache.layouts import EXTRA_COLUMNS, LongLayout, NestedLayout, ParsedTrace, WideLayout, parse_row  # noqa: F401
from ampo_cache.readers import ShardedTable
from ampo_cache.schema import PROMPTS, TRACES
from ampo_cache.store import TraceStore, query_arrow
from ampo_cache.verify import Verifier


@dataclass
class ImportSummary:
    rows: int = 0  # trace records read (a nested, wide or generations row holds several)
    prompts_added: int = 0
    traces_added: int = 0
    duplicates: int = 0
    statuses: Counter = field(default_factory=Counter)
    traces_by_teacher: Counter = field(default_factory=Counter)  # traces added, per teacher
    agreement: Agreement = field(default_factory=dict)  # (teacher, label column) -> LabelAgreement
    problems: int = 0  # distinct problems across the inputs
    problems_in_every_input: int = 0  # of those, how many every input has (the join of per-teacher subsets)


CHECK_REPORT_EVERY = 1000  # traces checked between two progress reports of pass 1

Layout = Union[LongLayout, NestedLayout, WideLayout, GenerationsLayout]


def _stored_answers(store: TraceStore) -> dict[str, str]:
    with store.connect() as con:
        ids, answers = query_arrow(con, "SELECT prompt_id, answer FROM prompts").columns
    return dict(zip(ids.to_pylist(), answers.to_pylist()))


def check_sources(sources: list[ImportSource], stored_answers: dict[str, str],
                  on_checked: Callable[[int], None] | None = None) -> tuple[int, list[set[str]]]:
    """Pass 1: every row parses and each problem has one answer, across the inputs and the store.
    Returns the trace count and each input's prompt ids; ``on_checked(n)`` hears of every
    ``CHECK_REPORT_EVERY`` traces checked."""
    answers = dict(stored_answers)
    first_seen: dict[str, str] = {}  # prompt id -> where its answer was first given (in the inputs)
    rows, prompts = 0, []
    for source in sources:
        mine: set[str] = set()
        for row in source.traces():
            pid = prompt_id(row.problem)
            known = answers.setdefault(pid, row.answer)
            if known != row.answer:
                where = first_seen.get(pid, "in the store")
                raise InputError(row.where, f"answer {row.answer!r} differs from {known!r} given for the same problem "
                                            f"({where})")
            if pid not in stored_answers:
                first_seen.setdefault(pid, row.where)
            mine.add(pid)
            rows += 1
            if on_checked and rows % CHECK_REPORT_EVERY == 0:
                on_checked(CHECK_REPORT_EVERY)
        if not mine:
            raise InputError(str(source.data), "no traces in the file (empty); nothing to import")
        prompts.append(mine)
    return rows, prompts


def _batched(items: Iterator, size: int) -> Iterator[list]:
    while chunk := list(islice(items, size)):
        yield chunk


def _traces_table(rows: list[dict]) -> pa.Table:
    """The traces rows as a table: the store's columns, then the source fields and publisher label
    columns (BOOLEAN) some rows carry."""
    table = pa.Table.from_pylist(rows, schema=TRACES)
    labels = sorted({k for row in rows for k in row} - set(TRACES.names) - set(EXTRA_COLUMNS))
    for name, type_ in [*EXTRA_COLUMNS.items(), *((label, pa.bool_()) for label in labels)]:
        values = [row.get(name) for row in rows]
        if any(v is not None for v in values):
            table = table.append_column(pa.field(name, type_), pa.array(values, type_))
    return table


class _Keys:
    """What the store (and this import so far) holds: prompts, trace texts and sample indices taken."""

    def __init__(self, store: TraceStore, prompts: set[str]):
        self.prompts = prompts
        self.texts: dict[tuple[str, str], set[str]] = defaultdict(set)
        self.indices: dict[tuple[str, str], set[int]] = defaultdict(set)
        keys = store.trace_keys()
        for pid, teacher, idx, digest in zip(*(keys.column(i).to_pylist() for i in range(4))):
            self.texts[pid, teacher].add(digest)
            self.indices[pid, teacher].add(idx)

    def claim_index(self, pid: str, teacher: str, wanted: int | None) -> int:
        """The source's own position when it is free, else the next after the highest taken."""
        taken = self.indices[pid, teacher]
        idx = wanted if wanted is not None and wanted not in taken else max(taken, default=-1) + 1
        taken.add(idx)
        return idx


def _chunk_rows(chunk: list[ParsedTrace], keys: _Keys, summary: ImportSummary, origin: str, prompt_source: str):
    """The new prompt rows, new trace rows and their parsed records of one chunk (duplicates counted)."""
    now = datetime.now(timezone.utc)
    prompt_rows, trace_rows, todo = [], [], []
    for row in chunk:
        pid = prompt_id(row.problem)
        if pid not in keys.prompts:
            keys.prompts.add(pid)
            prompt_rows.append(dict(prompt_id=pid, problem=row.problem, answer=row.answer, source=prompt_source,
                                    created_at=now))
        digest = text_hash(row.text)
        if digest in keys.texts[pid, row.teacher]:
            summary.duplicates += 1
            continue
        keys.texts[pid, row.teacher].add(digest)
        trace_rows.append(dict(
            prompt_id=pid, teacher=row.teacher, sample_idx=keys.claim_index(pid, row.teacher, row.sample_idx),
            text=row.text, text_hash=digest, source_label=row.label, num_chars=len(row.text),
            finish_reason=row.finish_reason, origin=origin, created_at=now, **row.extra, **row.labels,
        ))
        todo.append(row)
    return prompt_rows, trace_rows, todo


def _judge(trace_rows: list[dict], todo: list[ParsedTrace], verifier: Verifier, trust_labels: bool,
           label_col: str | None, summary: ImportSummary) -> None:
    """Fill in each trace's verdict (or the trusted label), and count agreement with the publisher's labels."""
    if trust_labels:
        for trace, row in zip(trace_rows, todo):
            trace.update(correct=row.label, verify_status="trusted", extracted_answer=None)
        return
    verdicts = verifier.verify([r.text for r in todo], [r.answer for r in todo])
    for trace, row, verdict in zip(trace_rows, todo, verdicts):
        trace.update(correct=verdict.correct, verify_status=verdict.status, extracted_answer=verdict.extracted)
        labels = {**row.labels, label_col: row.label} if label_col else row.labels
        tally(summary.agreement, row.teacher, labels, verdict.correct)


def _import_source(source: ImportSource, store: TraceStore, keys: _Keys, verifier: Verifier, summary: ImportSummary,
                   *, trust_labels: bool, prompt_source: str | None, chunk_rows: int, on_rows) -> None:
    origin = f"import:{source.name}"
    for chunk in _batched(source.traces(), chunk_rows):
        prompt_rows, trace_rows, todo = _chunk_rows(chunk, keys, summary, origin, prompt_source or source.name)
        _judge(trace_rows, todo, verifier, trust_labels, source.layout.label, summary)
        summary.statuses.update(t["verify_status"] for t in trace_rows)
        summary.traces_by_teacher.update(t["teacher"] for t in trace_rows)
        store.append("prompts", pa.Table.from_pylist(prompt_rows, schema=PROMPTS))
        store.append("traces", _traces_table(trace_rows))
        summary.prompts_added += len(prompt_rows)
        summary.traces_added += len(trace_rows)
        if on_rows:
            on_rows(len(chunk))


def import_sources(
    sources: list[ImportSource],
    store_root: str | Path,
    verifier: Verifier,
    trust_labels: bool = False,
    source: str | None = None,
    chunk_rows: int = 2000,
    on_start: Callable[[int], None] | None = None,
    on_rows: Callable[[int], None] | None = None,
    on_checked: Callable[[int], None] | None = None,
) -> ImportSummary:
    """Check every input, then verify and store their traces. ``source``: prompts.source (default:
    each input's name). Progress: ``on_checked(n)`` during the check, then ``on_start(total)``, then
    ``on_rows(n)`` per chunk stored."""
    for item in sources:
        if trust_labels and item.layout.label is None:
            raise InputError("--trust-labels", "needs --label-col naming the column that holds the labels "
                                               f"(long layout; {item.name} is read in the {item.layout.name} layout)")
    TraceStore.check_location(store_root)  # before reading the inputs: a wrong --store fails at once
    existing = TraceStore.open(store_root) if TraceStore.exists(store_root) else None
    stored_answers = _stored_answers(existing) if existing else {}
    total, prompts = check_sources(sources, stored_answers, on_checked)
    if on_start:
        on_start(total)
    store = TraceStore.create_or_open(store_root)
    keys = _Keys(store, set(stored_answers))
    summary = ImportSummary(rows=total, problems=len(set().union(*prompts)),
                            problems_in_every_input=len(set.intersection(*prompts)))
    for item in sources:
        _import_source(item, store, keys, verifier, summary, trust_labels=trust_labels, prompt_source=source,
                       chunk_rows=chunk_rows, on_rows=on_rows)
    return summary


def import_traces(path: str | Path | ShardedTable, store_root: str | Path, layout: Layout, verifier: Verifier,
                  **options) -> ImportSummary:
    """Import one file (or dataset folder's split) read in ``layout``; ``options`` as ``import_sources``'."""
    data = path if isinstance(path, ShardedTable) else Path(path)
    return import_sources([ImportSource(data, layout)], store_root, verifier, **options)


import_long = import_traces  # the name from before the nested and wide layouts
