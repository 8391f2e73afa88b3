"""Coverage of the prompts by the teachers: the numbers that say what guidance can offer."""

from __future__ import annotations

from ampo_cache.store import TraceStore


def coverage_report(store: TraceStore) -> dict:
    """Per teacher: traces, correct, pass_rate, prompts_covered (>= 1 correct trace). Overall:
    prompts, prompts_covered (by any teacher), prompts_uncovered, and solved_by: number of teachers
    with a correct trace -> number of prompts, from 0 to the number of teachers."""
    with store.connect() as con:
        teachers = [
            dict(teacher=t, traces=n, correct=c, pass_rate=float(r or 0.0), prompts_covered=p)
            for t, n, c, r, p in con.execute(
                "SELECT teacher, traces, correct, pass_rate, prompts_covered FROM coverage"
            ).fetchall()
        ]
        counts = dict(con.execute("SELECT teachers_solved, count(*) FROM prompt_coverage GROUP BY 1").fetchall())
    solved_by = {str(k): int(counts.get(k, 0)) for k in range(len(teachers) + 1)}
    prompts = sum(solved_by.values())
    return dict(
        teachers=teachers,
        prompts=prompts,
        prompts_covered=prompts - solved_by["0"],
        prompts_uncovered=solved_by["0"],
        solved_by=solved_by,
    )
