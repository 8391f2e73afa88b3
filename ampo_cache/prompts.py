"""Read a prompts file (problem + ground-truth answer per row) into Prompt records.

Used by the cache build and by the trainer, so both see the same prompt ids. Extra scalar columns
(level, kind, ...) ride along into the store's prompts table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ampo_cache.errors import InputError
from ampo_cache.ids import prompt_id
from ampo_cache.readers import column as column_value
from ampo_cache.readers import read_records, text_field


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    problem: str
    answer: str
    extra: dict = field(default_factory=dict, compare=False)


def load_prompts(path: str | Path, problem_col: str = "problem", answer_col: str = "answer") -> list[Prompt]:
    """Prompts in file order, one per distinct problem (``question`` stands in for ``problem``)."""
    prompts: dict[str, Prompt] = {}
    for where, record in read_records(path):
        column = "question" if problem_col == "problem" and "problem" not in record and "question" in record else problem_col
        problem = text_field(where, column_value(where, record, column), "problem")
        answer = text_field(where, column_value(where, record, answer_col), "answer").strip()
        pid = prompt_id(problem)
        if pid in prompts:
            if prompts[pid].answer != answer:
                raise InputError(where, f"answer {answer!r} differs from {prompts[pid].answer!r} given for the same problem")
            continue
        extra = {k: v for k, v in record.items()
                 if k not in (column, answer_col, "prompt_id", "created_at") and isinstance(v, (str, int, float, bool))}
        prompts[pid] = Prompt(pid, problem, answer, extra)
    if not prompts:
        raise InputError(str(path), "no prompts in the file")
    return list(prompts.values())
