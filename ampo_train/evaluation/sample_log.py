"""``--log-samples FILE.parquet``: every answer an evaluation sampled, one row each, for SQL.

Columns (``SCHEMA``): ``model`` (its label), ``benchmark`` (file stem), ``problem_idx`` (row of the
benchmark file, from 0), ``problem``, ``answers`` (the ground truth as read: the list of accepted
answers, usually one), ``greedy`` (true for the greedy decode of ``--greedy``, false for the n
samples), ``sample_idx`` (0..n-1; 0 for greedy), ``temperature``, ``response``, ``extracted_answer``
(what the verifier read, null when none), ``verify_status`` (correct / wrong / no_answer / timeout /
error), ``correct``, ``num_tokens`` and ``finish_reason`` (stop / length; null when the engine did
not say); then ``data_source`` (the row's, null when the file has none), ``prompt`` (the chat as
the model received it, template applied and any cut made), ``prompt_tokens``, ``prompt_cut``
(tokens cut from its left to fit the context, 0 when whole) and ``batch`` (which generate call of
the benchmark sampled it; its sampled and greedy decodes share one).

The file is written with pyarrow under a temporary name beside the target and renamed into place,
so a reader never sees half a log and a killed evaluation leaves the previous file intact.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from ampo_common.errors import InputError

if TYPE_CHECKING:
    from ampo_train.evaluation.runner import EvalSettings, ProblemRecord

SCHEMA = pa.schema([
    ("model", pa.string()), ("benchmark", pa.string()), ("problem_idx", pa.int64()), ("problem", pa.string()),
    ("answers", pa.list_(pa.string())), ("greedy", pa.bool_()), ("sample_idx", pa.int32()),
    ("temperature", pa.float64()), ("response", pa.string()), ("extracted_answer", pa.string()),
    ("verify_status", pa.string()), ("correct", pa.bool_()), ("num_tokens", pa.int32()), ("finish_reason", pa.string()),
    ("data_source", pa.string()), ("prompt", pa.string()), ("prompt_tokens", pa.int32()), ("prompt_cut", pa.int32()),
    ("batch", pa.int32()),
])


def check_log_path(path: str | Path) -> Path:
    """Fail before any sampling when the log could not be written there."""
    path = Path(path)
    if path.suffix.lower() != ".parquet":
        raise InputError(str(path), "the sample log is a Parquet file: give it a .parquet name")
    if path.is_dir():
        raise InputError(str(path), "is a directory; expected a file name for the sample log")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise InputError(str(path), f"{blocker} is a file, not a folder")
    return path


def sample_rows(label: str, per_file: dict[str, list["ProblemRecord"]], settings: "EvalSettings") -> list[dict]:
    """One dict per sampled answer (and per greedy decode), in benchmark and problem order."""
    rows = []
    for benchmark, records in per_file.items():
        for idx, record in enumerate(records):
            prompt = record.prompt
            base = dict(model=label, benchmark=benchmark, problem_idx=idx, problem=record.item.problem,
                        answers=list(record.item.answers), data_source=record.item.source,
                        prompt=None if prompt is None else prompt.text,
                        prompt_tokens=None if prompt is None else len(prompt.ids),
                        prompt_cut=None if prompt is None else prompt.cut, batch=record.batch)
            decodes = [(False, i, settings.temperature, a, v) for i, (a, v) in enumerate(zip(record.answers, record.verdicts))]
            if record.greedy is not None:
                decodes.append((True, 0, 0.0, record.greedy, record.greedy_verdict))
            for greedy, i, temperature, answer, verdict in decodes:
                rows.append(dict(base, greedy=greedy, sample_idx=i, temperature=temperature, response=answer.text,
                                 extracted_answer=verdict.extracted, verify_status=verdict.status,
                                 correct=verdict.correct, num_tokens=answer.num_tokens,
                                 finish_reason=answer.finish_reason))
    return rows


def write_sample_log(rows: list[dict], path: str | Path) -> Path:
    """Write ``rows`` as one Parquet file, atomically (temporary name in the same folder, then rename)."""
    path = check_log_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
