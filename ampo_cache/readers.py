"""Read records from JSONL, CSV or Parquet files, each with its place ("FILE:LINE" or "FILE: row N").

Records stream one at a time, so a file far larger than memory can be checked and imported. Any
defect (not UTF-8, malformed JSON, a line that is not an object, an unreadable Parquet file) raises
InputError naming the file and the line.

A ``ShardedTable`` (the Parquet shards of one split of a dataset repository, found by
``ampo_cache.inputs.dataset_shards``) reads as one table: its shards in order, each record placed
in its own shard ("SHARD: row N", counted within the shard).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import pyarrow.parquet as pq

from ampo_common.errors import InputError

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}

Record = tuple[str, dict]

# Rows decoded to Python at a time: public trace sets hold ~50 KB of text per row, so a larger
# batch costs memory and buys no speed.
_PARQUET_BATCH_ROWS = 512


@dataclass(frozen=True)
class ShardedTable:
    """The shards of one table, read in order as one; ``name`` says which (for messages and ``origin``)."""

    folder: Path
    files: tuple[Path, ...]
    name: str

    def __str__(self) -> str:
        return str(self.folder)


Readable = Union[str, Path, ShardedTable]


def file_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(str(path), f"unknown file type {path.suffix!r}; expected one of {sorted(FORMATS)}")
    if not path.is_file():
        raise InputError(str(path), "no such file")
    return fmt


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                yield line_no, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"{path}:{line_no}", f"not valid UTF-8 (byte {exc.start} of the line)") from None


def _jsonl(path: Path) -> Iterator[Record]:
    for line_no, line in _decoded_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{line_no}", f"malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}:{line_no}", f"expected a JSON object, got {type(record).__name__}")
        yield f"{path}:{line_no}", record


def _csv(path: Path) -> Iterator[Record]:
    lines = (line for _, line in _decoded_lines(path))
    reader = csv.reader(lines)
    try:
        header = next(reader)
    except StopIteration:
        return
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if len(row) != len(header):
            raise InputError(where, f"expected {len(header)} fields as in the header, found {len(row)}")
        yield where, dict(zip(header, row))


def _parquet(path: Path) -> Iterator[Record]:
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001
        raise InputError(str(path), f"not a readable Parquet file ({exc})") from None
    row = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
        for record in batch.to_pylist():
            yield f"{path}: row {row}", record
            row += 1


def column(where: str, record: dict, name: str):
    """The value of column ``name``, or an error listing the columns the row has."""
    if name not in record:
        raise InputError(where, f"missing column {name!r} (columns found: {', '.join(map(str, record))})")
    return record[name]


def text_field(where: str, value, name: str, allow_empty: bool = False) -> str:
    """A cell as text: numbers are accepted (answers are often numbers), null and nesting are not."""
    if value is None:
        raise InputError(where, f"column {name!r} is null; expected text")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InputError(where, f"column {name!r} should be text, got {type(value).__name__}")
    text = str(value)
    if not allow_empty and not text.strip():
        raise InputError(where, f"empty {name!r}")
    return text


def _shards(table: ShardedTable) -> Iterator[Record]:
    for path in table.files:
        yield from _parquet(path)


def read_records(path: Readable) -> Iterator[Record]:
    if isinstance(path, ShardedTable):
        return _shards(path)
    path = Path(path)
    return {"jsonl": _jsonl, "csv": _csv, "parquet": _parquet}[file_format(path)](path)
