"""Coverage of the prompts by the teachers: the numbers that say what guidance can offer."""

from __future__ import annotations

from pathlib import Path

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


def miss_coverage(store: TraceStore, misses: str | Path) -> dict:
    """How many of a run's missed prompts (``ampo_cache.misses``) have a correct trace now:
    prompts, times missed in all, covered, uncovered, and covered prompts per teacher."""
    from ampo_cache.misses import misses_file, read_misses

    table = read_misses(misses)
    missed = table.column("prompt_id").to_pylist()
    with store.connect() as con:
        con.register("missed", table.select(["prompt_id"]))
        covered = {pid for (pid,) in con.execute(
            "SELECT DISTINCT prompt_id FROM traces WHERE correct AND prompt_id IN (SELECT prompt_id FROM missed)").fetchall()}
        by_teacher = dict(con.execute(
            "SELECT teacher, count(DISTINCT prompt_id) FROM traces WHERE correct "
            "AND prompt_id IN (SELECT prompt_id FROM missed) GROUP BY 1 ORDER BY 1").fetchall())
    return dict(misses_file=str(misses_file(misses)), prompts=len(missed), times=int(sum(table.column("times").to_pylist())),
                covered=len(covered), uncovered=len(missed) - len(covered),
                covered_by_teacher={str(k): int(v) for k, v in by_teacher.items()})
