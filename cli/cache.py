"""`ampo-cache`: build, import, inspect and query the teacher-trace store. Thin: parsing and output."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ampo_cache.coverage import coverage_report
from ampo_cache.importer import LongLayout, import_long
from ampo_cache.store import TraceStore
from ampo_cache.verify import Verifier
from cli.common import console, make_table, user_errors, write_stdout

app = typer.Typer(help="Build, import, inspect and query the teacher-trace store.", no_args_is_help=True,
                  add_completion=False)

StoreOpt = typer.Option(..., "--store", help="Store directory.")


@app.command("import")
def import_cmd(
    traces: Path = typer.Argument(..., help="JSONL, Parquet or CSV file, one row per trace."),
    store: Path = StoreOpt,
    problem_col: str = typer.Option("problem", help="Column with the problem text (`question` also accepted)."),
    answer_col: str = typer.Option("answer", help="Column with the ground-truth answer."),
    teacher_col: str = typer.Option("teacher", help="Column naming the teacher model."),
    trace_col: str = typer.Option("trace", help="Column with the teacher's trace (assistant text)."),
    label_col: Optional[str] = typer.Option(None, help="Column with the source's own correctness label, kept as source_label."),
    trust_labels: bool = typer.Option(False, help="Use --label-col as `correct` instead of verifying."),
    source: Optional[str] = typer.Option(None, help="Value of prompts.source (default: the file name)."),
    timeout: float = typer.Option(5.0, help="Seconds allowed to verify one trace."),
    workers: Optional[int] = typer.Option(None, help="Verifier processes (default: CPU count; 0 = in-process)."),
    shard_rows: int = typer.Option(2000, help="Input rows per shard written (the most a kill can lose)."),
):
    """Import traces in the long layout, verifying each against its ground truth."""
    layout = LongLayout(problem=problem_col, answer=answer_col, teacher=teacher_col, trace=trace_col, label=label_col)
    with user_errors(), Verifier(timeout=timeout, workers=workers) as verifier:
        # The bar appears once the file has been checked, so a rejected file prints only its error.
        with Progress(TextColumn("[bold]importing {task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("rows"), TimeElapsedColumn(), TimeRemainingColumn(), console=console) as progress:
            task = None

            def start(total: int) -> None:
                nonlocal task
                task = progress.add_task(traces.name, total=total)

            summary = import_long(
                traces, store, layout, verifier, trust_labels=trust_labels, source=source, chunk_rows=shard_rows,
                on_start=start, on_rows=lambda n: progress.advance(task, n),
            )
    rows = [("rows read", summary.rows), ("prompts added", summary.prompts_added),
            ("traces added", summary.traces_added), ("duplicates skipped", summary.duplicates)]
    rows += [(f"  {status}", count) for status, count in sorted(summary.statuses.items())]
    console.print(make_table(f"import {traces.name} -> {store}", ["", "count"], rows))


def print_coverage(report: dict) -> None:
    console.print(make_table(
        "teachers", ["teacher", "traces", "correct", "pass rate", "prompts covered"],
        [(t["teacher"], t["traces"], t["correct"], f"{t['pass_rate']:.1%}", t["prompts_covered"]) for t in report["teachers"]],
    ))
    console.print(make_table(
        "prompts", ["prompts", "solved by >= 1 teacher", "solved by none"],
        [(report["prompts"], report["prompts_covered"], report["prompts_uncovered"])],
    ))
    console.print(make_table("prompts solved by exactly n teachers", ["n", "prompts"], report["solved_by"].items()))


@app.command()
def coverage(
    store: Path = StoreOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
):
    """Per-teacher and per-prompt coverage of the store."""
    with user_errors():
        report = coverage_report(TraceStore.open(store))
    if as_json:
        write_stdout(json.dumps(report) + "\n")
    else:
        print_coverage(report)


@app.command()
def sql(
    query: str = typer.Argument(..., help="A DuckDB query over the views prompts, traces, coverage, prompt_coverage."),
    store: Path = StoreOpt,
    fmt: str = typer.Option("table", "--format", help="table | csv | json"),
):
    """Run a DuckDB query over the store."""
    if fmt not in ("table", "csv", "json"):
        raise typer.BadParameter("expected table, csv or json", param_hint="--format")
    with user_errors():
        with TraceStore.open(store).connect() as con:
            result = con.execute(query)
            columns = [d[0] for d in result.description] if result.description else []
            rows = result.fetchall()
    if fmt == "table":
        console.print(make_table(None, columns, rows))
    elif fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(columns)
        writer.writerows(rows)
        write_stdout(buffer.getvalue())
    else:
        write_stdout(json.dumps([dict(zip(columns, row)) for row in rows], default=str) + "\n")


if __name__ == "__main__":
    app()
