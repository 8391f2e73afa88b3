"""Merge stores built apart (other machines, shards of one build without a shared disk) into one.

Identity is the store's key: a prompt is its ``prompt_id``; a trace is (prompt_id, teacher,
sample_idx). For each key:
  - rows that agree (a prompt's answer; a trace's text, ``correct`` and ``verify_status``) are one:
    the first (in the order the stores were listed) is kept, the others counted as duplicates;
  - rows that disagree are a conflict: the merge fails with one line naming the key and the stores,
    unless ``prefer="newest"``, which keeps the row with the latest ``created_at`` (ties: the first
    listed) and counts the conflict.

Memory stays bounded whatever the stores' size: the decisions are taken in DuckDB over the key
columns only (no text), giving the winning rows as (shard, row number); then each input shard is
read one row group at a time, its winning rows taken, and written out in shards of about
``shard_bytes``. The merged store is assembled in a hidden directory beside ``into`` and renamed
into place when complete, so a killed merge leaves no half store behind.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ampo_common.errors import InputError
from ampo_cache.export import configure
from ampo_cache.store import TraceStore, query_arrow, query_batches

PREFER = ("newest",)
_VIRTUAL = ("filename", "file_row_number", "store_no", "file_no")


@dataclass
class MergeSummary:
    stores: list[str] = field(default_factory=list)
    prompts_read: int = 0
    prompts_written: int = 0
    prompt_conflicts: int = 0  # prompts whose answers differed (resolved by prefer=newest)
    traces_read: int = 0
    traces_written: int = 0
    trace_conflicts: int = 0  # trace keys whose rows differed (resolved by prefer=newest)

    @property
    def prompt_duplicates(self) -> int:
        return self.prompts_read - self.prompts_written

    @property
    def trace_duplicates(self) -> int:
        return self.traces_read - self.traces_written


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _plain(type_: pa.DataType) -> pa.DataType:
    return pa.string() if pa.types.is_large_string(type_) or str(type_) == "string_view" else type_


def merge(
    stores: list[str | Path],
    into: str | Path,
    prefer: str | None = None,
    shard_bytes: int = 32 << 20,
    memory_limit: str = "256MB",
) -> MergeSummary:
    if not stores:
        raise InputError("merge", "name at least one store to merge")
    if prefer is not None and prefer not in PREFER:
        raise InputError("--prefer", f"unknown choice {prefer!r}; expected one of {', '.join(PREFER)}")
    opened = [TraceStore.open(s) for s in stores]
    into = Path(into)
    if into.exists() and (not into.is_dir() or any(into.iterdir())):
        raise InputError(str(into), "exists and is not empty; merge into a new directory "
                                    "(list an existing store among the inputs to include it)")
    names = [str(s) for s in stores]
    summary = MergeSummary(stores=names)
    work = into.parent / f".{into.name}.merge-{uuid.uuid4().hex[:8]}"
    try:
        out = TraceStore.create_or_open(work / "store")
        with duckdb.connect(":memory:") as con:
            configure(con, work / "spill", memory_limit)
            files = {table: _register_files(con, table, opened) for table in ("prompts", "traces")}
            order = ("created_at DESC NULLS LAST, " if prefer else "") + "store_no, file_no, file_row_number"
            _merge_prompts(con, out, names, prefer, order, summary)
            file_no, row_no, schema = _trace_winners(con, names, prefer, order, summary)
        # DuckDB is closed (its buffers freed) before the text is copied.
        _copy_traces(out, files["traces"], file_no, row_no, schema, shard_bytes, summary)
        os.rename(work / "store", into)  # onto a missing or empty directory
        TraceStore.create_or_open(into)  # rewrites the catalog's absolute paths
        return summary
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _register_files(con, table: str, stores: list[TraceStore]) -> list[Path]:
    """A view ``all_<table>``: every row of every store, with its store, shard and row number."""
    paths, rows = [], []
    for store_no, store in enumerate(stores):
        for path in store.shards(table):
            rows.append({"filename": str(path), "store_no": store_no, "file_no": len(paths)})
            paths.append(path)
    con.register(f"files_{table}", pa.Table.from_pylist(rows, schema=pa.schema(
        [("filename", pa.string()), ("store_no", pa.int32()), ("file_no", pa.int32())])))
    listing = ", ".join(_sql_str(str(p)) for p in paths)
    con.execute(f"""CREATE VIEW all_{table} AS
        SELECT r.*, f.store_no, f.file_no FROM read_parquet([{listing}], union_by_name = true,
            filename = true, file_row_number = true) r JOIN files_{table} f USING (filename)""")
    return paths


def _merge_prompts(con, out: TraceStore, names: list[str], prefer, order: str, summary: MergeSummary) -> None:
    summary.prompts_read, = con.execute("SELECT count(*) FROM (SELECT prompt_id FROM all_prompts)").fetchall()[0]
    conflicts = con.execute("""
        SELECT prompt_id, list(DISTINCT {'store': store_no, 'answer': answer}), count(*) OVER ()
        FROM (SELECT prompt_id, store_no, answer FROM all_prompts)
        GROUP BY prompt_id HAVING count(DISTINCT answer) > 1 ORDER BY prompt_id LIMIT 1""").fetchall()
    if conflicts:
        pid, variants, count = conflicts[0]
        summary.prompt_conflicts = count
        if not prefer:
            found = "; ".join(f"{names[v['store']]}: {v['answer']!r}"
                              for v in sorted(variants, key=lambda v: (v["store"], v["answer"])))
            raise InputError(f"prompt {pid}", f"answers differ between stores ({found}); "
                                              f"{count} prompt(s) conflict; pass --prefer newest to keep the newest")
    reader = query_batches(con, f"""
        SELECT * EXCLUDE ({", ".join(_VIRTUAL)}, rn) FROM (
            SELECT *, row_number() OVER (PARTITION BY prompt_id ORDER BY {order}) AS rn FROM all_prompts)
        WHERE rn = 1""", 65_536)
    for batch in reader:
        out.append("prompts", pa.Table.from_batches([batch]))
        summary.prompts_written += batch.num_rows


def _describe_trace(variant: dict) -> str:
    return f"{variant['status']}, text {variant['text_hash']}"


def _trace_winners(con, names: list[str], prefer, order: str, summary: MergeSummary):
    """The row kept for each trace key, as sorted (shard number, row number) arrays; the schema."""
    keys = ("SELECT prompt_id, teacher, sample_idx, text_hash, correct, verify_status, created_at, "
            "store_no, file_no, file_row_number FROM all_traces")
    summary.traces_read, = con.execute(f"SELECT count(*) FROM ({keys})").fetchall()[0]
    conflicts = con.execute(f"""
        SELECT prompt_id, teacher, sample_idx,
               list(DISTINCT {{'store': store_no, 'status': verify_status, 'text_hash': text_hash}}),
               count(*) OVER ()
        FROM ({keys}) GROUP BY prompt_id, teacher, sample_idx
        HAVING count(DISTINCT (text_hash, correct, verify_status)) > 1
        ORDER BY prompt_id, teacher, sample_idx LIMIT 1""").fetchall()
    if conflicts:
        pid, teacher, idx, variants, count = conflicts[0]
        summary.trace_conflicts = count
        if not prefer:
            found = "; ".join(f"{names[v['store']]}: {_describe_trace(v)}"
                              for v in sorted(variants, key=lambda v: (v["store"], v["status"], v["text_hash"])))
            raise InputError(f"trace (prompt {pid}, teacher {teacher}, sample {idx})",
                             f"differs between stores ({found}); {count} trace key(s) conflict; "
                             f"pass --prefer newest to keep the newest")
    winners = query_arrow(con, f"""
        SELECT file_no, file_row_number FROM (
            SELECT file_no, file_row_number,
                   row_number() OVER (PARTITION BY prompt_id, teacher, sample_idx ORDER BY {order}) AS rn
            FROM ({keys}))
        WHERE rn = 1 ORDER BY file_no, file_row_number""")
    file_no = winners.column("file_no").to_numpy()
    row_no = winners.column("file_row_number").to_numpy().astype(np.int64)
    del winners
    # The union of the stores' columns (DuckDB's types where shards disagree): every shard written
    # has all of them, so the merged store reads the same through any engine.
    schema = pa.schema([pa.field(f.name, _plain(f.type)) for f in
                        query_arrow(con, "SELECT * FROM all_traces LIMIT 0").schema if f.name not in _VIRTUAL])
    return file_no, row_no, schema


def _copy_traces(out: TraceStore, paths: list[Path], file_no: np.ndarray, row_no: np.ndarray, schema: pa.Schema,
                 shard_bytes: int, summary: MergeSummary) -> None:
    """Each input shard, one row group at a time: its winning rows, written in shards of ~shard_bytes."""
    bounds = np.searchsorted(file_no, np.arange(len(paths) + 1))
    pending: list[pa.Table] = []
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            table = pa.concat_tables(pending)
            out.append("traces", table)
            summary.traces_written += table.num_rows
        pending, pending_bytes = [], 0

    for i, path in enumerate(paths):
        rows = row_no[bounds[i] : bounds[i + 1]]
        if not len(rows):
            continue
        parquet = pq.ParquetFile(path)
        start = 0
        for group in range(parquet.num_row_groups):
            size = parquet.metadata.row_group(group).num_rows
            lo, hi = np.searchsorted(rows, [start, start + size])
            if hi > lo:
                part = parquet.read_row_group(group).take(pa.array(rows[lo:hi] - start))
                pending.append(_conform(part, schema))
                pending_bytes += pending[-1].nbytes
                if pending_bytes >= shard_bytes:
                    flush()
            start += size
    flush()


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns and types (missing ones as nulls)."""
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names
               else pa.nulls(table.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)
