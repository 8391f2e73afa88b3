"""Cache misses: prompts the trainer needed guidance for and found no correct trace of.

The trainer writes ``OUTPUT_DIR/misses.parquet`` (``ampo_train.miss_log``), one row per prompt:

    prompt_id, problem, answer    the prompt (its id as the store computes it)
    first_step, last_step         the steps it missed at first and last
    times                         how many times it missed (once per process and step it was drawn)

and the cache reads it back, so a teacher budget goes where the student fails:

    ampo-cache build --teachers teachers.yaml --prompts-from-misses RUN_DIR   # traces for exactly those prompts
    ampo-cache coverage --store STORE --misses RUN_DIR                      # how many the store now covers
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ampo_common.errors import InputError
from ampo_common.files import fsync_dir
from ampo_cache.prompts import Prompt, load_prompts

MISSES_FILE = "misses.parquet"
SCHEMA = pa.schema([("prompt_id", pa.string()), ("problem", pa.string()), ("answer", pa.string()),
                    ("first_step", pa.int64()), ("last_step", pa.int64()), ("times", pa.int64())])


def misses_file(path: str | Path) -> Path:
    """A run's folder (its misses.parquet) or the file itself."""
    path = Path(path)
    found = path / MISSES_FILE if path.is_dir() else path
    if not found.is_file():
        raise InputError(str(found), "no misses file (a run writes OUTPUT_DIR/misses.parquet when a prompt that needed "
                                     "guidance had no correct trace in the store)")
    return found


def write_misses(path: Path, rows: list[dict]) -> None:
    """``rows`` (SCHEMA's columns) to ``path``, atomically: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_misses(path: str | Path) -> pa.Table:
    found = misses_file(path)
    table = pq.read_table(found)
    missing = [name for name in SCHEMA.names if name not in table.column_names]
    if missing:
        raise InputError(str(found), f"not a misses file: no column {missing[0]!r} (expected {', '.join(SCHEMA.names)})")
    return table


def miss_prompts(path: str | Path) -> list[Prompt]:
    """The missed prompts, for the build: problem and answer only (the miss counts stay out of the
    store's prompts table), their source ``misses:<file>``."""
    found = misses_file(path)
    read_misses(found)  # the layout is checked before anything is generated
    source = f"misses:{found}"
    return [Prompt(p.prompt_id, p.problem, p.answer, {"source": source}) for p in load_prompts(found)]
