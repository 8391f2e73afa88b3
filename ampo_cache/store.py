"""The trace store: append-only Parquet shards in two folders, and DuckDB views over them.

Layout of a store directory (any Parquet reader can use it without our code):

    STORE/store.json              marker: format name and version
    STORE/prompts/part-*.parquet  table `prompts` (schema.PROMPTS, plus any extra columns)
    STORE/traces/part-*.parquet   table `traces`  (schema.TRACES)
    STORE/catalog.duckdb          views prompts, traces, coverage, prompt_coverage (absolute paths)
    STORE/index/                  lookup caches built by the trainer side (safe to delete)

Why shards: a writer never modifies a file another process may be reading. Each shard is written
under a hidden temporary name, fsynced, then renamed into place, so readers (which only glob
``part-*.parquet``) see either the whole shard or nothing, a killed writer loses at most the shard
in flight, and two writers never collide (shard names carry a random suffix). Readers use
``union_by_name`` so shards with different extra columns read as one table.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from ampo_common.errors import InputError
from ampo_common.files import fsync_dir
from ampo_cache.schema import TABLES

FORMAT = {"format": "ampo-trace-store", "version": 1}
SHARD_GLOB = "part-*.parquet"
_STALE_TMP_SECONDS = 3600


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def view_sql(root: Path) -> list[str]:
    """The statements that define the store's views over the shards under ``root``."""
    statements = [
        f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM read_parquet("
        f"{_sql_str(str(root / table / SHARD_GLOB))}, union_by_name = true)"
        for table in TABLES
    ]
    statements.append(
        """CREATE OR REPLACE VIEW coverage AS
        SELECT teacher,
               count(*) AS traces,
               count(*) FILTER (WHERE correct) AS correct,
               round(avg(correct::INTEGER), 4) AS pass_rate,
               count(DISTINCT prompt_id) FILTER (WHERE correct) AS prompts_covered
        FROM traces GROUP BY teacher ORDER BY teacher"""
    )
    statements.append(
        """CREATE OR REPLACE VIEW prompt_coverage AS
        SELECT p.prompt_id,
               count(t.teacher) AS traces,
               count(t.teacher) FILTER (WHERE t.correct) AS correct,
               count(DISTINCT t.teacher) FILTER (WHERE t.correct) AS teachers_solved
        FROM prompts p LEFT JOIN traces t USING (prompt_id) GROUP BY p.prompt_id"""
    )
    return statements


def query_arrow(con: duckdb.DuckDBPyConnection, query: str) -> pa.Table:
    """A query's result as one Arrow table (DuckDB 2 renamed the 1.x method)."""
    relation = con.sql(query)
    return (getattr(relation, "to_arrow_table", None) or relation.arrow)()


def query_batches(con: duckdb.DuckDBPyConnection, query: str, batch_size: int) -> pa.RecordBatchReader:
    """A query's result as a stream of Arrow record batches (bounded memory)."""
    relation = con.sql(query)
    return (getattr(relation, "to_arrow_reader", None) or relation.fetch_arrow_reader)(batch_size)


class TraceStore:
    """A store directory. ``create_or_open`` for writers, ``open`` for readers (read-only)."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    # ------------------------------------------------------------------ opening

    @staticmethod
    def exists(root: str | Path) -> bool:
        return (Path(root) / "store.json").is_file()

    @classmethod
    def open(cls, root: str | Path) -> "TraceStore":
        store = cls(Path(root))
        if not (store.root / "store.json").is_file():
            raise InputError(str(root), "not a trace store (no store.json); create one with `ampo-cache import`")
        store.check_shards()
        return store

    @staticmethod
    def check_location(root: str | Path) -> None:
        """Fail in one line, before any work, when no store can be opened or created at ``root``."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise InputError(str(root), "is a file; expected a store directory")
        blocker = next((p for p in root.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise InputError(str(root), f"{blocker} is a file, not a folder")
        if root.is_dir() and not (root / "store.json").is_file() and any(root.iterdir()):
            raise InputError(str(root), "exists, is not empty and is not a trace store")

    @classmethod
    def create_or_open(cls, root: str | Path) -> "TraceStore":
        cls.check_location(root)
        store = cls(Path(root))
        if not (store.root / "store.json").is_file():
            store._create()
        store.check_shards()
        store._remove_stale_temporaries()
        store.write_catalog()
        return store

    def _create(self) -> None:
        """Lay the store out in a hidden sibling folder and rename it into place, so that builders
        starting together never see a half-made store: one rename wins, the others open its store."""
        self.root.parent.mkdir(parents=True, exist_ok=True)
        draft = TraceStore(self.root.parent / f".{self.root.name}.creating-{uuid.uuid4().hex[:8]}")
        for table, schema in TABLES.items():
            (draft.root / table).mkdir(parents=True)
            # An empty shard per table gives the views their columns before any data arrives.
            draft._write_shard(table, schema.empty_table(), name="part-00000000000000-schema.parquet")
        (draft.root / "store.json").write_bytes(json.dumps(FORMAT, indent=1).encode())
        try:
            os.rename(draft.root, self.root)  # replaces an empty folder; fails on a non-empty one
        except OSError:
            shutil.rmtree(draft.root, ignore_errors=True)
            if not (self.root / "store.json").is_file():
                raise
        fsync_dir(self.root.parent)

    def check_shards(self) -> None:
        """Read every shard's footer: a corrupt or truncated shard is reported, never skipped."""
        for table in TABLES:
            for path in self.shards(table):
                try:
                    pq.read_metadata(path)
                except Exception as exc:  # noqa: BLE001 - pyarrow raises several types here
                    raise InputError(str(path), f"corrupt or truncated Parquet shard ({exc})") from exc

    def shards(self, table: str) -> list[Path]:
        return sorted((self.root / table).glob(SHARD_GLOB))

    # ------------------------------------------------------------------ reading

    def connect(self) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection with the store's views (nothing is locked or written)."""
        con = duckdb.connect(":memory:")
        for statement in view_sql(self.root):
            con.execute(statement)
        return con

    def prompt_ids(self) -> set[str]:
        with self.connect() as con:
            return set(query_arrow(con, "SELECT prompt_id FROM prompts").column(0).to_pylist())

    def trace_keys(self) -> pa.Table:
        """prompt_id, teacher, sample_idx, text_hash of every stored trace (for dedup and resume)."""
        with self.connect() as con:
            return query_arrow(con, "SELECT prompt_id, teacher, sample_idx, text_hash FROM traces")

    def index(self, prompt_ids=None):
        """A fast read-only lookup of correct traces (see ampo_cache.lookup.TraceIndex)."""
        from ampo_cache.lookup import TraceIndex

        return TraceIndex.load(self, prompt_ids=prompt_ids)

    # ------------------------------------------------------------------ writing

    def append(self, table: str, rows: pa.Table) -> Path | None:
        """Write ``rows`` as one new shard of ``table`` (atomically). Returns its path."""
        if rows.num_rows == 0:
            return None
        schema = TABLES[table]
        missing = [name for name in schema.names if name not in rows.column_names]
        if missing:
            raise ValueError(f"rows for {table} lack columns {missing}")
        # Our columns first, in schema order and types; extra columns follow as they are.
        base = rows.select(schema.names).cast(schema)
        for name in rows.column_names:
            if name not in schema.names:
                base = base.append_column(name, rows.column(name))
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")
        return self._write_shard(table, base, name=f"part-{stamp}-{uuid.uuid4().hex[:12]}.parquet")

    def write_catalog(self) -> None:
        """(Re)write catalog.duckdb so any DuckDB client can `ATTACH` or open it and query views."""
        target = self.root / "catalog.duckdb"
        tmp = self.root / f".catalog-{uuid.uuid4().hex[:8]}.duckdb.tmp"
        con = duckdb.connect(str(tmp))
        try:
            for statement in view_sql(self.root):
                con.execute(statement)
        finally:
            con.close()
        os.replace(tmp, target)

    def _write_shard(self, table: str, rows: pa.Table, name: str) -> Path:
        folder = self.root / table
        final = folder / name
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        pq.write_table(rows, tmp, compression="zstd", row_group_size=16_384)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        fsync_dir(folder)
        return final

    def _remove_stale_temporaries(self) -> None:
        """Temporaries of killed writers. Fresh ones may belong to a live writer: left alone."""
        now = time.time()
        for table in TABLES:
            for tmp in (self.root / table).glob(".*.tmp"):
                if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                    tmp.unlink(missing_ok=True)
