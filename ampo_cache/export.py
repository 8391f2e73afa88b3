"""Write a store's traces in the layout other trainers read (``verl``) or one row per trace (``long``).

verl layout (the AMPO reference's and LUFFY's training files), one row per prompt:

    data_source   string   prompts.source (where the prompt came from)
    prompt        list<struct<role, content>>   [{"role": "user", "content": problem}]
    ability       string   "math"
    reward_model  struct<ground_truth, style>   {ground_truth: answer, style: "rule"}
    extra_info    struct<index, num_teacher_models>   row number in the file; distinct teachers in target_lst
    target_lst    list<struct<content, source, quality_score>>   the traces, best first

quality_score (per prompt, over the exported traces): a correct trace scores
``shortest correct length / its length`` (in characters), so the shortest correct trace scores 1.0
and one twice as long 0.5; a trace that is not correct scores 0.0. target_lst is sorted by it
(descending; ties by teacher, then sample), which is what the reference's "short" strategy wants.
``max_per_prompt`` keeps the first N of that order. Prompts with no trace left after the filters
are not written.

Both formats take the same filters: ``only_correct``, ``teachers`` and ``where``, a SQL condition
over the columns of the traces view plus the prompt's ``problem``, ``answer`` and ``prompt_source``.
``where`` is the user's own SQL run against their own files (DuckDB, in memory; nothing else).

Memory stays bounded whatever the store's size. ``long`` streams one DuckDB COPY. ``verl`` must
gather each prompt's traces, which the shards keep wherever they were written: one streaming pass
spreads the selected traces over hash buckets of about ``bucket_bytes`` of text each (temporary
Arrow files beside the output), then each bucket is grouped in memory and appended to the output.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from ampo_common.errors import InputError
from ampo_cache.store import TraceStore, query_arrow, query_batches

FORMATS = ("verl", "long")
_BATCH_ROWS = 4096  # rows per batch streamed out of DuckDB (smaller batches: a lower peak)
LONG_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".ndjson": "json", ".csv": "csv"}

VERL_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
        ("extra_info", pa.struct([("index", pa.int64()), ("num_teacher_models", pa.int64())])),
        ("target_lst", pa.list_(pa.struct([("content", pa.string()), ("source", pa.string()),
                                           ("quality_score", pa.float64())]))),
    ]
)

# quality_score and the order of a prompt's traces (see the module docstring).
_RANKED = """
    SELECT *,
        CASE WHEN correct THEN round((min(num_chars) FILTER (WHERE correct) OVER per_prompt)::DOUBLE
                                     / greatest(num_chars, 1), 4)
             ELSE 0.0 END AS quality_score,
        row_number() OVER (per_prompt ORDER BY correct IS TRUE DESC, num_chars, teacher, sample_idx) AS rank
    FROM {source}
    WINDOW per_prompt AS (PARTITION BY prompt_id)
"""


@dataclass
class ExportSummary:
    rows: int = 0  # rows written: prompts (verl) or traces (long)
    traces: int = 0
    prompts: int = 0


def configure(con: duckdb.DuckDBPyConnection, spill_dir: Path, memory_limit: str = "256MB") -> None:
    """Bounded DuckDB: a memory limit, spilling to ``spill_dir``, no ordering buffers, one thread."""
    con.execute(f"SET memory_limit = '{memory_limit}'")
    con.execute(f"SET temp_directory = '{str(spill_dir).replace(chr(39), chr(39) * 2)}'")
    con.execute("SET preserve_insertion_order = false")
    # One thread: each DuckDB thread keeps its own row-group and scan buffers, and the memory
    # bound matters more here than the second core (measured: no faster with two on 2 cores).
    con.execute("SET threads = 1")
    try:
        con.execute("SET enable_external_file_cache = false")  # DuckDB >= 1.3 caches Parquet bytes
    except duckdb.Error:
        pass


def _sql_list(values: list[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


def selection_sql(only_correct: bool, teachers: list[str] | None, where: str | None) -> str:
    """The selected traces with their prompt's fields, as one SELECT."""
    conditions = []
    if only_correct:
        conditions.append("correct")
    if teachers:
        conditions.append(f"teacher IN ({_sql_list(teachers)})")
    if where:
        conditions.append(f"({where})")
    return (
        "SELECT * FROM (SELECT t.*, p.problem, p.answer, p.source AS prompt_source "
        "FROM traces t JOIN prompts p USING (prompt_id))"
        + (" WHERE " + " AND ".join(conditions) if conditions else "")
    )


def _atomic_target(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")


def export(
    store_root: str | Path,
    out: str | Path,
    fmt: str = "verl",
    *,
    only_correct: bool = False,
    max_per_prompt: int | None = None,
    teachers: list[str] | None = None,
    where: str | None = None,
    bucket_bytes: int = 32 << 20,
    memory_limit: str = "256MB",
) -> ExportSummary:
    if fmt not in FORMATS:
        raise InputError("--format", f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if max_per_prompt is not None and max_per_prompt < 1:
        raise InputError("--max-per-prompt", f"should be at least 1, got {max_per_prompt}")
    out = Path(out)
    if fmt == "verl" and out.suffix.lower() not in (".parquet", ".pq"):
        raise InputError(str(out), "the verl layout is written as Parquet; name the file *.parquet")
    if fmt == "long" and out.suffix.lower() not in LONG_SUFFIXES:
        raise InputError(str(out), f"unknown file type {out.suffix!r}; expected one of {sorted(LONG_SUFFIXES)}")
    store = TraceStore.open(store_root)
    tmp = _atomic_target(out)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        with store.connect() as con:
            configure(con, work / "spill", memory_limit)
            selected = selection_sql(only_correct, teachers, where)
            try:
                con.execute(f"CREATE VIEW selected AS {selected}")
                con.execute("SELECT * FROM selected LIMIT 0")  # a bad --where fails here, before any work
            except duckdb.Error as exc:
                raise InputError("--where" if where else str(store_root),
                                 str(exc).strip().splitlines()[0]) from None
            if fmt == "long":
                summary = _export_long(con, tmp, LONG_SUFFIXES[out.suffix.lower()], max_per_prompt)
            else:
                summary = _export_verl(con, tmp, work, max_per_prompt, bucket_bytes)
        os.replace(tmp, out)
        return summary
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


def _export_long(con, tmp: Path, kind: str, max_per_prompt: int | None) -> ExportSummary:
    source = "selected"
    if max_per_prompt is not None:
        # The ranking reads only the key columns; the text joins in afterwards, streaming.
        keys = "SELECT prompt_id, teacher, sample_idx, correct, num_chars FROM selected"
        con.execute(f"""CREATE TEMP TABLE keep AS SELECT prompt_id, teacher, sample_idx
                        FROM ({_RANKED.format(source=f'({keys})')}) WHERE rank <= {max_per_prompt}""")
        source = "(SELECT s.* FROM selected s SEMI JOIN keep k USING (prompt_id, teacher, sample_idx))"
    options = {"parquet": "FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 16384", "json": "FORMAT json", "csv": "FORMAT csv, HEADER true"}[kind]
    path = str(tmp).replace("'", "''")
    traces, = con.execute(f"COPY (SELECT * FROM {source}) TO '{path}' ({options})").fetchall()[0]
    prompts, = con.execute(f"SELECT count(DISTINCT prompt_id) FROM (SELECT prompt_id FROM {source})").fetchall()[0]
    return ExportSummary(rows=traces, traces=traces, prompts=prompts)


def _export_verl(con, tmp: Path, work: Path, max_per_prompt: int | None, bucket_bytes: int) -> ExportSummary:
    text_bytes, = con.execute("SELECT coalesce(sum(num_chars), 0) FROM (SELECT num_chars FROM selected)").fetchall()[0]
    buckets = max(1, math.ceil(text_bytes / bucket_bytes))
    columns = "prompt_id, teacher, sample_idx, text, correct, num_chars, problem, answer, prompt_source"

    # Pass 1: spread the selected traces over hash buckets (streaming; one small batch at a time).
    reader = query_batches(
        con, f"SELECT (hash(prompt_id) % {buckets})::INTEGER AS bucket, {columns} FROM selected", _BATCH_ROWS)
    paths = [work / f"bucket-{k}.arrows" for k in range(buckets)]
    sinks = [pa.OSFile(str(p), "wb") for p in paths]
    options = ipc.IpcWriteOptions(compression="lz4")
    writers = [ipc.new_stream(sink, reader.schema, options=options) for sink in sinks]
    try:
        for batch in reader:
            if buckets == 1:
                writers[0].write_batch(batch)
                continue
            batch = batch.take(pc.sort_indices(batch.column(0)))
            bounds = np.searchsorted(batch.column(0).to_numpy(), np.arange(buckets + 1))
            for k in np.flatnonzero(np.diff(bounds)):
                writers[k].write_batch(batch.slice(bounds[k], bounds[k + 1] - bounds[k]))
    finally:
        for writer, sink in zip(writers, sinks):
            writer.close()
            sink.close()

    # Pass 2: one bucket at a time, rank each prompt's traces and write one row per prompt.
    limit = f"WHERE rank <= {max_per_prompt}" if max_per_prompt is not None else ""
    summary = ExportSummary()
    with pq.ParquetWriter(str(tmp), VERL_SCHEMA, compression="zstd") as out:
        for path in paths:
            with pa.memory_map(str(path)) as source:
                bucket = ipc.open_stream(source).read_all()
            con.register("bucket", bucket)
            try:
                table = query_arrow(con, f"""
                    SELECT any_value(prompt_source) AS data_source,
                           [{{'role': 'user', 'content': any_value(problem)}}] AS prompt,
                           'math' AS ability,
                           {{'ground_truth': any_value(answer), 'style': 'rule'}} AS reward_model,
                           {{'index': (row_number() OVER (ORDER BY prompt_id) - 1 + {summary.rows})::BIGINT,
                             'num_teacher_models': count(DISTINCT teacher)::BIGINT}} AS extra_info,
                           list({{'content': text, 'source': teacher, 'quality_score': quality_score}} ORDER BY rank)
                               AS target_lst,
                           count(*) AS n_traces
                    FROM ({_RANKED.format(source='bucket')}) {limit}
                    GROUP BY prompt_id ORDER BY prompt_id""")
            finally:
                con.unregister("bucket")
                del bucket
            summary.traces += pc.sum(table.column("n_traces")).as_py() or 0
            summary.rows += table.num_rows
            out.write_table(table.select(VERL_SCHEMA.names).cast(VERL_SCHEMA))
            del table
            path.unlink()
    summary.prompts = summary.rows
    return summary
