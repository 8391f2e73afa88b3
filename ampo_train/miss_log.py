"""The run's cache misses (``ampo_cache.misses``): every prompt that needed guidance and had no
correct trace in the store, so ``ampo-cache build --prompts-from-misses OUTPUT_DIR`` can spend the
teachers' budget where the student fails.

    OUTPUT_DIR/misses.jsonl    one line per miss: step, prompt_id, problem, answer (a resume drops
                               the interrupted run's lines after its checkpoint, as metrics.jsonl's)
    OUTPUT_DIR/misses.parquet  one row per prompt: prompt_id, problem, answer, first_step, last_step,
                               times; rewritten (atomically) after every step that missed
"""

from __future__ import annotations

import json
from pathlib import Path

from ampo_cache.misses import MISSES_FILE, write_misses
from ampo_train.metrics import truncate_jsonl


class MissLog:
    """Main process only; ``record`` takes every process's misses of a step (gathered)."""

    def __init__(self, output_dir: Path, resumed_step: int | None = None):
        self.events = output_dir / "misses.jsonl"
        self.table = output_dir / MISSES_FILE
        if resumed_step is not None:
            truncate_jsonl(self.events, resumed_step)
        self.rows: dict[str, dict] = {}
        if self.events.exists():
            for line in self.events.read_text().splitlines():
                if line.strip():
                    self._add(json.loads(line))
        if resumed_step is not None and self.rows:
            self._write_table()

    def _add(self, miss: dict) -> None:
        row = self.rows.get(miss["prompt_id"])
        if row is None:
            self.rows[miss["prompt_id"]] = {"prompt_id": miss["prompt_id"], "problem": miss["problem"],
                                            "answer": miss["answer"], "first_step": miss["step"],
                                            "last_step": miss["step"], "times": 1}
        else:
            row["last_step"], row["times"] = miss["step"], row["times"] + 1

    def record(self, step: int, misses: list[dict]) -> None:
        """``misses``: ``{"prompt_id", "problem", "answer"}`` per missed prompt of the step."""
        if not misses:
            return
        with open(self.events, "a", encoding="utf-8") as out:
            for miss in misses:
                event = {"step": step, **miss}
                out.write(json.dumps(event) + "\n")
                self._add(event)
        self._write_table()

    def _write_table(self) -> None:
        write_misses(self.table, list(self.rows.values()))
