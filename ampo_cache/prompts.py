"""Read a prompts file (problem + ground-truth answer per row) into Prompt records.

Used by the cache build and by the trainer, so both see the same prompt ids. Extra scalar columns
(level, kind, ...) ride along into the store's prompts table.

Besides our own layout (a problem and an answer column), a verl-layout file (the AMPO reference's
and LUFFY's: ``prompt`` as a chat-message list, ground truth in ``reward_model.ground_truth``) is
read as it is: the problem is the content of the prompt's last user turn, so the same problem gets
the same prompt id whichever layout it came in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ampo_common.errors import InputError
from ampo_cache.ids import prompt_id
from ampo_cache.layouts import answer_of, problem_of
from ampo_cache.readers import read_records


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    problem: str
    answer: str
    extra: dict = field(default_factory=dict, compare=False)


def load_prompts(path: str | Path, problem_col: str = "problem", answer_col: str = "answer") -> list[Prompt]:
    """Prompts in file order, one per distinct problem.

    With the default column names, ``question`` or a verl ``prompt`` (chat list) stands in for
    ``problem`` and ``reward_model.ground_truth`` for ``answer``.
    """
    prompts: dict[str, Prompt] = {}
    for where, record in read_records(path):
        column, problem = problem_of(where, record, problem_col)
        used_answer, answer = answer_of(where, record, answer_col)
        pid = prompt_id(problem)
        if pid in prompts:
            if prompts[pid].answer != answer:
                raise InputError(where, f"answer {answer!r} differs from {prompts[pid].answer!r} given for the same problem")
            continue
        extra = {k: v for k, v in record.items()
                 if k not in (column, used_answer, "prompt_id", "created_at") and isinstance(v, (str, int, float, bool))}
        prompts[pid] = Prompt(pid, problem, answer, extra)
    if not prompts:
        raise InputError(str(path), "no prompts in the file")
    return list(prompts.values())
