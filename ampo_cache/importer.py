"""Import trace files into a store, verifying each trace.

The file's layout (long, nested or wide: see ampo_cache.layouts) only decides how its rows become
per-trace records; everything after that is shared by the layouts and lives here.

Two passes over the file. The first checks every row (columns present, answer not empty, label
readable, one answer per problem) and touches nothing, so bad input leaves the store as it was (or
not created at all).
The second writes shards of ``chunk_rows`` rows: prompts first, then their traces. A trace already
in the store (same prompt, teacher and text) is skipped, which makes a second import of the same
file add nothing and lets an interrupted import be completed by running it again.
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
from ampo_cache.ids import prompt_id, text_hash
from ampo_cache.layouts import EXTRA_COLUMNS, LongLayout, NestedLayout, ParsedTrace, WideLayout, parse_row  # noqa: F401
from ampo_cache.schema import PROMPTS, TRACES
from ampo_cache.store import TraceStore, query_arrow
from ampo_cache.verify import Verifier


@dataclass
class ImportSummary:
    rows: int = 0  # trace records read (a nested or wide row holds several)
    prompts_added: int = 0
    traces_added: int = 0
    duplicates: int = 0
    statuses: Counter = field(default_factory=Counter)


Layout = Union[LongLayout, NestedLayout, WideLayout]


def _parsed(path: Path, layout: Layout) -> Iterator[ParsedTrace]:
    return layout.traces(path)


def _stored_answers(store: TraceStore) -> dict[str, str]:
    with store.connect() as con:
        ids, answers = query_arrow(con, "SELECT prompt_id, answer FROM prompts").columns
    return dict(zip(ids.to_pylist(), answers.to_pylist()))


def check_file(path: Path, layout: Layout, stored_answers: dict[str, str]) -> int:
    """Pass 1: every row parses and each problem has one answer. Returns the row count."""
    answers = dict(stored_answers)
    rows = 0
    for row in _parsed(path, layout):
        pid = prompt_id(row.problem)
        known = answers.setdefault(pid, row.answer)
        if known != row.answer:
            raise InputError(row.where, f"answer {row.answer!r} differs from {known!r} given for the same problem")
        rows += 1
    return rows


def _batched(items: Iterator, size: int) -> Iterator[list]:
    while chunk := list(islice(items, size)):
        yield chunk


def _traces_table(rows: list[dict]) -> pa.Table:
    """The traces rows as a table: the store's columns, then the source fields some rows carry."""
    table = pa.Table.from_pylist(rows, schema=TRACES)
    for name, type_ in EXTRA_COLUMNS.items():
        values = [row.get(name) for row in rows]
        if any(v is not None for v in values):
            table = table.append_column(pa.field(name, type_), pa.array(values, type_))
    return table


def import_traces(
    path: str | Path,
    store_root: str | Path,
    layout: Layout,
    verifier: Verifier,
    trust_labels: bool = False,
    source: str | None = None,
    chunk_rows: int = 2000,
    on_start: Callable[[int], None] | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> ImportSummary:
    path = Path(path)
    if trust_labels and layout.label is None:
        raise InputError("--trust-labels", "needs --label-col naming the column that holds the labels")
    TraceStore.check_location(store_root)  # before reading the file: a wrong --store fails at once
    existing = TraceStore.open(store_root) if TraceStore.exists(store_root) else None
    stored_answers = _stored_answers(existing) if existing else {}
    total = check_file(path, layout, stored_answers)
    if total == 0:
        raise InputError(str(path), "no traces in the file (empty); nothing to import")
    if on_start:
        on_start(total)
    store = TraceStore.create_or_open(store_root)

    known_prompts = set(stored_answers)
    keys = store.trace_keys()
    seen: dict[tuple[str, str], set[str]] = defaultdict(set)
    next_idx: Counter = Counter()
    for pid, teacher, idx, digest in zip(*(keys.column(i).to_pylist() for i in range(4))):
        seen[pid, teacher].add(digest)
        next_idx[pid, teacher] = max(next_idx[pid, teacher], idx + 1)

    summary = ImportSummary(rows=total)
    origin, source = f"import:{path.name}", source or path.name
    for chunk in _batched(_parsed(path, layout), chunk_rows):
        now = datetime.now(timezone.utc)
        prompt_rows, trace_rows, todo = [], [], []
        for row in chunk:
            pid = prompt_id(row.problem)
            if pid not in known_prompts:
                known_prompts.add(pid)
                prompt_rows.append(dict(prompt_id=pid, problem=row.problem, answer=row.answer, source=source, created_at=now))
            digest = text_hash(row.text)
            if digest in seen[pid, row.teacher]:
                summary.duplicates += 1
                continue
            seen[pid, row.teacher].add(digest)
            trace_rows.append(
                dict(
                    prompt_id=pid, teacher=row.teacher, sample_idx=next_idx[pid, row.teacher], text=row.text,
                    text_hash=digest, source_label=row.label, num_chars=len(row.text), origin=origin, created_at=now,
                    **row.extra,
                )
            )
            next_idx[pid, row.teacher] += 1
            todo.append(row)
        if trust_labels:
            for trace, row in zip(trace_rows, todo):
                trace.update(correct=row.label, verify_status="trusted", extracted_answer=None)
        else:
            verdicts = verifier.verify([r.text for r in todo], [r.answer for r in todo])
            for trace, verdict in zip(trace_rows, verdicts):
                trace.update(correct=verdict.correct, verify_status=verdict.status, extracted_answer=verdict.extracted)
        summary.statuses.update(t["verify_status"] for t in trace_rows)
        store.append("prompts", pa.Table.from_pylist(prompt_rows, schema=PROMPTS))
        store.append("traces", _traces_table(trace_rows))
        summary.prompts_added += len(prompt_rows)
        summary.traces_added += len(trace_rows)
        if on_rows:
            on_rows(len(chunk))
    return summary


import_long = import_traces  # the name from before the nested and wide layouts
