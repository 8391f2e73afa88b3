"""Lookup of verified traces by prompt id, for the trainer: milliseconds, from many processes.

The correct traces of the whole store are laid out once, sorted by prompt, in an uncompressed
Arrow IPC file under STORE/index/ (named by a fingerprint of the shard list, so a store that grew
gets a new one). Every process memory-maps that file: opening is quick, the text is shared through
the OS page cache instead of copied into each rank, and a lookup is a dictionary hit plus zero-copy
slices. Building it is guarded by a file lock, so N ranks starting together build it once.
A store directory that is not writable is indexed in memory instead.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from ampo_cache.store import query_arrow, query_batches

if TYPE_CHECKING:
    from ampo_cache.store import TraceStore

INDEX_COLUMNS = ["prompt_id", "teacher", "sample_idx", "text", "num_tokens", "num_chars"]
# Within a prompt: by teacher, then shortest first (what guidance selection wants to see first).
INDEX_QUERY = f"""
    SELECT {", ".join(INDEX_COLUMNS)} FROM traces WHERE correct
    ORDER BY prompt_id, teacher, num_chars, sample_idx
"""


@dataclass(frozen=True, slots=True)
class CachedTrace:
    teacher: str
    sample_idx: int
    text: str
    num_tokens: int | None
    num_chars: int


def _fingerprint(store: "TraceStore") -> str:
    digest = hashlib.sha256()
    for path in store.shards("traces"):
        digest.update(f"{path.name}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def _build_file(store: "TraceStore", path) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with store.connect() as con:
        reader = query_batches(con, INDEX_QUERY, 65_536)
        with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, reader.schema) as writer:
            for batch in reader:
                writer.write_batch(batch)
    os.replace(tmp, path)


def _load_table(store: "TraceStore") -> tuple[pa.Table, "os.PathLike | None"]:
    folder = store.root / "index"
    path = folder / f"correct-{_fingerprint(store)}.arrow"
    try:
        folder.mkdir(exist_ok=True)
        with open(folder / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():
                _build_file(store, path)
                for old in folder.glob("correct-*.arrow"):
                    if old != path:
                        old.unlink(missing_ok=True)
    except PermissionError:
        with store.connect() as con:
            return query_arrow(con, INDEX_QUERY), None
    return ipc.open_file(pa.memory_map(str(path), "r")).read_all(), path


class TraceIndex:
    """Correct traces per prompt. ``lookup(ids)`` -> {prompt_id: [CachedTrace, ...]}."""

    def __init__(self, table: pa.Table, prompt_ids: Iterable[str] | None = None, path=None):
        self.table = table
        self.path = path  # the memory-mapped index file (None when indexed in memory)
        ids = table.column("prompt_id").to_numpy(zero_copy_only=False)
        if len(ids):
            starts = np.flatnonzero(np.concatenate([[True], ids[1:] != ids[:-1]]))
            ends = np.append(starts[1:], len(ids))
        else:
            starts = ends = np.array([], dtype=np.int64)
        wanted = None if prompt_ids is None else set(prompt_ids)
        self._ranges: dict[str, tuple[int, int]] = {
            ids[s]: (int(s), int(e)) for s, e in zip(starts, ends) if wanted is None or ids[s] in wanted
        }

    @classmethod
    def load(cls, store: "TraceStore", prompt_ids: Iterable[str] | None = None) -> "TraceIndex":
        """Index the store's correct traces; ``prompt_ids`` limits which prompts are kept."""
        table, path = _load_table(store)
        return cls(table, prompt_ids, path)

    def prefetch(self, chunk_bytes: int = 1 << 24) -> None:
        """Read the index file once so that lookups never wait on the disk (first-touch faults)."""
        if self.path is not None:
            with open(self.path, "rb") as handle:
                while handle.read(chunk_bytes):
                    pass

    def __len__(self) -> int:
        return len(self._ranges)

    def __contains__(self, prompt_id: str) -> bool:
        return prompt_id in self._ranges

    def lookup(self, prompt_ids: Iterable[str]) -> dict[str, list[CachedTrace]]:
        prompt_ids = list(prompt_ids)
        found: dict[str, list[CachedTrace]] = {pid: [] for pid in prompt_ids}
        # Zero-copy slices, one per prompt: `take` on a multi-chunk table would first concatenate
        # the chunks, i.e. copy (and page in) the whole text column on every call.
        slices, owners = [], []
        for pid in prompt_ids:
            start, end = self._ranges.get(pid, (0, 0))
            if end > start:
                slices.append(self.table.slice(start, end - start))
                owners.extend([pid] * (end - start))
        if not slices:
            return found
        picked = pa.concat_tables(slices)
        columns = [picked.column(name).to_pylist() for name in INDEX_COLUMNS[1:]]
        for pid, teacher, sample_idx, text, num_tokens, num_chars in zip(owners, *columns):
            found[pid].append(CachedTrace(teacher, sample_idx, text, num_tokens, num_chars))
        return found
