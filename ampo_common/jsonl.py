"""Per-step JSONL logs (metrics.jsonl, samples.jsonl, misses.jsonl): appended one line per record,
read back on resume and by the commands that use them.

A process killed while it writes a line leaves half of it as the file's last line. That line is
an interrupted write, not a corrupt log: readers drop it (and say so); a line that does not parse
anywhere else is an error naming the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path

from ampo_common.errors import InputError


def _parsed_lines(path: Path) -> tuple[list[tuple[str, dict]], bool]:
    """(line, record) pairs of ``path``, and whether a torn last line was dropped."""
    if not path.exists():
        return [], False
    lines = path.read_text(encoding="utf-8").splitlines()
    pairs, torn = [], False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            pairs.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if number < len(lines):
                raise InputError(f"{path}:{number}", "not a JSON line (the log is damaged before its end)") from None
            torn = True
    return pairs, torn


def read_jsonl(path: Path) -> tuple[list[dict], bool]:
    """The records of ``path`` (none when it does not exist), and whether a torn last line was
    dropped."""
    pairs, torn = _parsed_lines(path)
    return [record for _, record in pairs], torn


def truncate_jsonl(path: Path, step: int) -> bool:
    """On resume: keep only the lines of steps up to ``step`` (the interrupted run's tail goes, a
    torn last line with it), so each step is logged once. Returns whether a torn line was dropped."""
    pairs, torn = _parsed_lines(path)
    if path.exists():
        path.write_text("".join(line + "\n" for line, record in pairs if record.get("step", 0) <= step), encoding="utf-8")
    return torn
