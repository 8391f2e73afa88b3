"""Cache misses: prompts the trainer needed guidance for and found no correct trace of.

The trainer appends every miss to ``OUTPUT_DIR/misses.jsonl`` (step, prompt_id, problem, answer)
and keeps ``OUTPUT_DIR/misses.parquet`` (``ampo_train.miss_log``), one row per prompt:

    prompt_id, problem, answer    the prompt (its id as the store computes it)
    first_step, last_step         the steps it missed at first and last
    times                         how many times it missed (once per process and step it was drawn)

and the cache reads them back, so a teacher budget goes where the student fails. A run's folder is
read from its JSONL (every completed step's misses, also when a kill came between the two
writes; a torn last line is dropped), a lone Parquet file as it is:

    ampo-cache build --teachers teachers.yaml --prompts-from-misses RUN_DIR   # traces for exactly those prompts
    ampo-cache coverage --store STORE --misses RUN_DIR                      # how many the store now covers
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from ampo_common.errors import InputError
from ampo_common.files import fsync_dir
from ampo_common.jsonl import read_jsonl
from ampo_cache.prompts import Prompt

MISSES_FILE = "misses.parquet"
EVENTS_FILE = "misses.jsonl"
SCHEMA = pa.schema([("prompt_id", pa.string()), ("problem", pa.string()), ("answer", pa.string()),
                    ("first_step", pa.int64()), ("last_step", pa.int64()), ("times", pa.int64())])


def misses_file(path: str | Path) -> Path:
    """A run's folder (its misses.parquet, or before the first table its misses.jsonl) or the file itself."""
    path = Path(path)
    if path.is_dir() and not (path / MISSES_FILE).is_file() and (path / EVENTS_FILE).is_file():
        return path / EVENTS_FILE
    found = path / MISSES_FILE if path.is_dir() else path
    if not found.is_file():
        raise InputError(str(found), "no misses file (a run writes OUTPUT_DIR/misses.parquet when a prompt that needed "
                                     "guidance had no correct trace in the store)")
    return found


def aggregate_misses(events: Iterable[dict]) -> list[dict]:
    """Miss events (step, prompt_id, problem, answer) -> one row per prompt (SCHEMA), in order of
    first miss."""
    rows: dict[str, dict] = {}
    for event in events:
        row = rows.get(event["prompt_id"])
        if row is None:
            rows[event["prompt_id"]] = {"prompt_id": event["prompt_id"], "problem": event["problem"],
                                        "answer": event["answer"], "first_step": event["step"],
                                        "last_step": event["step"], "times": 1}
        else:
            row["last_step"], row["times"] = event["step"], row["times"] + 1
    return list(rows.values())


def write_misses(path: Path, rows: list[dict]) -> None:
    """``rows`` (SCHEMA's columns) to ``path``, atomically: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_misses(path: str | Path) -> pa.Table:
    """A run folder's misses (from its JSONL when it has one) or a misses Parquet file's."""
    events = Path(path) / EVENTS_FILE
    if Path(path).is_dir() and events.is_file():
        return pa.Table.from_pylist(aggregate_misses(read_jsonl(events)[0]), schema=SCHEMA)
    found = misses_file(path)
    table = pq.read_table(found)
    missing = [name for name in SCHEMA.names if name not in table.column_names]
    if missing:
        raise InputError(str(found), f"not a misses file: no column {missing[0]!r} (expected {', '.join(SCHEMA.names)})")
    return table


def miss_prompts(path: str | Path) -> list[Prompt]:
    """The missed prompts, for the build: problem and answer only (the miss counts stay out of the
    store's prompts table), their source ``misses:<file>``."""
    table = read_misses(path)  # the layout is checked before anything is generated
    source = f"misses:{misses_file(path)}"
    return [Prompt(pid, problem, answer, {"source": source}) for pid, problem, answer in
            zip(*(table.column(name).to_pylist() for name in ("prompt_id", "problem", "answer")))]
