"""The run's cache misses (``ampo_cache.misses``): every prompt that needed guidance and had no
correct trace in the store, so ``ampo-cache build --prompts-from-misses OUTPUT_DIR`` can spend the
teachers' budget where the student fails.

    OUTPUT_DIR/misses.jsonl    one line per miss: step, prompt_id, problem, answer (a resume drops
                               the interrupted run's lines after its checkpoint, as metrics.jsonl's,
                               and a torn last line); the record the build reads
    OUTPUT_DIR/misses.parquet  one row per prompt: prompt_id, problem, answer, first_step, last_step,
                               times; rewritten (atomically) after every step that missed
"""

from __future__ import annotations

import json
from pathlib import Path

from ampo_cache.misses import EVENTS_FILE, MISSES_FILE, aggregate_misses, write_misses
from ampo_common.jsonl import read_jsonl, truncate_jsonl


class MissLog:
    """Main process only; ``record`` takes every process's misses of a step (gathered)."""

    def __init__(self, output_dir: Path, resumed_step: int | None = None):
        self.events = output_dir / EVENTS_FILE
        self.table = output_dir / MISSES_FILE
        if resumed_step is not None:
            truncate_jsonl(self.events, resumed_step)
        self.history = read_jsonl(self.events)[0]
        if resumed_step is not None and self.history:
            self._write_table()

    def record(self, step: int, misses: list[dict]) -> None:
        """``misses``: ``{"prompt_id", "problem", "answer"}`` per missed prompt of the step."""
        if not misses:
            return
        events = [{"step": step, **miss} for miss in misses]
        with open(self.events, "a", encoding="utf-8") as out:
            out.write("".join(json.dumps(event) + "\n" for event in events))
        self.history.extend(events)
        self._write_table()

    def _write_table(self) -> None:
        write_misses(self.table, aggregate_misses(self.history))
