"""`ampo-cache`: build, import, inspect and query the teacher-trace store. Thin: parsing and output."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Optional

import duckdb
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ampo_cache.build import TeacherPlan, load_build_prompts, parse_shard, plan_build, run_build, select_shard
from ampo_cache.coverage import coverage_report
from ampo_common.errors import InputError
from ampo_cache.export import FORMATS as EXPORT_FORMATS
from ampo_cache.export import export as export_store
from ampo_cache.agreement import agreement_rows
from ampo_cache.importer import ImportSummary, import_sources
from ampo_cache.inputs import DEFAULT_SPLIT, ImportSource, open_sources
from ampo_cache.layouts import LAYOUTS
from ampo_cache.readers import ShardedTable
from ampo_cache.merge import PREFER, merge as merge_stores
from ampo_cache.schema import TABLES
from ampo_cache.store import TraceStore
from ampo_cache.teachers import load_build_config
from ampo_cache.verify import Verifier
from cli.tinyworld import app as tiny_world_app
from cli.common import console, make_table, user_errors, write_stdout

app = typer.Typer(help="Build, import, inspect and query the teacher-trace store.", no_args_is_help=True,
                  add_completion=False)

StoreOpt = typer.Option(..., "--store", help="Store directory.")


def check_output_file(path: Optional[Path], option: str) -> None:
    """An output file must be writable where asked: checked before the work, so it fails in one line."""
    if path is None:
        return
    if path.is_dir():
        raise InputError(f"{option} {path}", "is a directory; expected a file name")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise InputError(f"{option} {path}", f"{blocker} is a file, not a folder")


def _names(value: Optional[str]) -> Optional[list[str]]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@app.command("import")
def import_cmd(
    traces: list[str] = typer.Argument(..., metavar="INPUT", help="JSONL, Parquet or CSV file of traces (long, "
                                       "nested, wide or generations layout), or a dataset folder of Parquet shards "
                                       "(data/train-00000-of-0000N.parquet); TEACHER=INPUT makes every trace of "
                                       "INPUT that teacher's (several: per-teacher subsets joined on the problem)."),
    store: Path = StoreOpt,
    layout: str = typer.Option("auto", help=f"{' | '.join(LAYOUTS)}: one row per trace (long), per prompt with a "
                                            "list of traces (nested), with a column per teacher (wide) or with a "
                                            "list of one teacher's generations and their labels (generations)."),
    teacher: Optional[str] = typer.Option(None, help="Teacher name for traces that name none: LUFFY's `target`, a "
                                                     "long file without a teacher column, the generations layout "
                                                     "(default there: deepseek-r1, OpenR1-Math-220k's teacher)."),
    teacher_cols: Optional[str] = typer.Option(None, help="Wide layout: the teacher columns, `a,b,c` or a glob "
                                                          "(default `trace_*`: the `*` part names the teacher)."),
    problem_col: str = typer.Option("problem", help="Column with the problem text (`question`, or a verl chat-list "
                                                    "`prompt`, also accepted)."),
    answer_col: str = typer.Option("answer", help="Column with the ground-truth answer (`reward_model.ground_truth` "
                                                  "also accepted)."),
    teacher_col: str = typer.Option("teacher", help="Long layout: column naming the teacher model."),
    trace_col: str = typer.Option("trace", help="Long layout: column with the teacher's trace (`text` or "
                                                "`generation` also accepted)."),
    label_col: Optional[str] = typer.Option(None, help="Column with the source's own correctness label, kept as "
                                                       "source_label (long layout); generations layout: its label "
                                                       "columns `a,b` (default: correctness_math_verify, "
                                                       "correctness_llama). Agreement with our verifier is reported."),
    trust_labels: bool = typer.Option(False, help="Use --label-col as `correct` instead of verifying (long layout)."),
    split: str = typer.Option(DEFAULT_SPLIT, help="Dataset folder: the split whose shards to read "
                                                  "(SPLIT-0000K-of-0000N.parquet)."),
    subset: Optional[str] = typer.Option(None, help="Dataset folder: the subset folder to read (default: data/ if "
                                                    "there is one, else the folder itself; e.g. extended)."),
    source: Optional[str] = typer.Option(None, help="Value of prompts.source (default: the file name)."),
    timeout: float = typer.Option(5.0, help="Seconds allowed to verify one trace."),
    workers: Optional[int] = typer.Option(None, help="Verifier processes (default: CPU count; 0 = in-process)."),
    shard_rows: int = typer.Option(2000, help="Traces per shard written (the most a kill can lose)."),
):
    """Import traces (long, nested, wide or generations layout; files or dataset folders), verifying each."""
    with user_errors(), Verifier(timeout=timeout, workers=workers) as verifier:
        sources = open_sources(traces, layout=layout, split=split, subset=subset, problem_col=problem_col,
                               answer_col=answer_col, teacher_col=teacher_col, trace_col=trace_col,
                               label_col=label_col, teacher=teacher, teacher_cols=teacher_cols)
        names = ", ".join(s.name for s in sources)
        # The layout line and the bar appear once the inputs have been checked, so a rejected input
        # prints only its error (the checking counter is taken away before the error is printed).
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("traces"), TimeElapsedColumn(), TimeRemainingColumn(), console=console) as progress:
            task, checking = progress.add_task(f"checking {names}", total=None), True

            def start(total: int) -> None:
                nonlocal task, checking
                progress.remove_task(task)
                for item in sources:
                    console.print(_layout_line(item, len(sources) > 1, layout == "auto"), highlight=False,
                                  soft_wrap=True)
                task, checking = progress.add_task(f"importing {names}", total=total), False

            try:
                summary = import_sources(
                    sources, store, verifier, trust_labels=trust_labels, source=source, chunk_rows=shard_rows,
                    on_checked=lambda n: progress.advance(task, n), on_start=start,
                    on_rows=lambda n: progress.advance(task, n),
                )
            except InputError:
                if checking:
                    progress.remove_task(task)
                raise
    print_import_summary(summary, f"import {names} -> {store}", several=len(sources) > 1)


def _layout_line(item: ImportSource, several: bool, detected: bool) -> str:
    """``[TEACHER=]NAME: layout: ... (detected) (N shards)``; the name only where it tells something."""
    named = several or item.teacher
    who = f"{item.teacher}={item.name}" if item.teacher else item.name
    shards = len(item.data.files) if isinstance(item.data, ShardedTable) else 0
    return ((f"{who}: " if named else "") + f"layout: {item.describe()}" + (" (detected)" if detected else "")
            + (f" ({shards} shard{'s' if shards > 1 else ''})" if shards else ""))


# The rows of the agreement table: "they" is the publisher's label, "we" our verifier.
AGREEMENT_MEASURES = [
    ("labelled traces", lambda a: a.compared), ("they: correct", lambda a: a.publisher_correct),
    ("we: correct", lambda a: a.verifier_correct),
    ("agree", lambda a: "-" if a.rate is None else f"{a.agreed} ({a.rate:.1%})"),
    ("they yes, we no", lambda a: a.publisher_only), ("they no, we yes", lambda a: a.verifier_only),
    ("not labelled", lambda a: a.unlabelled),
]


def print_import_summary(summary: ImportSummary, title: str, several: bool) -> None:
    rows = [("rows read", summary.rows), ("prompts added", summary.prompts_added),
            ("traces added", summary.traces_added), ("duplicates skipped", summary.duplicates)]
    rows += [(f"  {status}", count) for status, count in sorted(summary.statuses.items())]
    if several:
        rows += [("problems in the inputs", summary.problems), ("  in every input", summary.problems_in_every_input)]
        rows += [(f"traces added: {teacher}", n) for teacher, n in sorted(summary.traces_by_teacher.items())]
    console.print(make_table(title, ["", "count"], rows))
    teachers: dict[str, list] = {}
    for counts in agreement_rows(summary.agreement):
        teachers.setdefault(counts.teacher, []).append(counts)
    for teacher, labels in teachers.items():  # one short table per teacher: a column per label column
        rows = [(name, *(value(a) for a in labels)) for name, value in AGREEMENT_MEASURES]
        console.print(make_table(f"{teacher}: our verifier vs the publisher's labels",
                                 ["", *(a.label for a in labels)], rows))


@app.command()
def export(
    store: Path = StoreOpt,
    out: Path = typer.Option(..., "--out", help="File to write (verl: .parquet; long: .parquet, .jsonl or .csv)."),
    fmt: str = typer.Option("verl", "--format", help=f"{' | '.join(EXPORT_FORMATS)}: one row per prompt with "
                                                     "target_lst (verl), or one row per trace with every column (long)."),
    only_correct: bool = typer.Option(False, "--only-correct", help="Only traces the verifier judged correct."),
    max_per_prompt: Optional[int] = typer.Option(None, help="Keep the N best traces of each prompt "
                                                            "(correct and shortest first)."),
    teachers: Optional[str] = typer.Option(None, help="Only these teachers: a,b,c."),
    where: Optional[str] = typer.Option(None, help="Your own SQL condition over the traces columns "
                                                   "(plus problem, answer, prompt_source), e.g. \"num_chars < 4000\"."),
):
    """Write the store's traces for other trainers (verl layout) or as one row per trace (long)."""
    with user_errors():
        check_output_file(out, "--out")
        summary = export_store(store, out, fmt, only_correct=only_correct, max_per_prompt=max_per_prompt,
                               teachers=_names(teachers), where=where)
    console.print(make_table(f"export {store} -> {out} ({fmt})", ["", "count"],
                             [("rows written", summary.rows), ("prompts", summary.prompts),
                              ("traces", summary.traces)]))


@app.command()
def merge(
    stores: list[Path] = typer.Argument(..., help="Stores to merge, in order of precedence."),
    into: Path = typer.Option(..., "--into", help="New store directory to create (missing or empty)."),
    prefer: Optional[str] = typer.Option(None, help=f"On conflicting rows for one key: {' | '.join(PREFER)} "
                                                    "keeps the latest created_at (default: fail)."),
):
    """Merge stores built apart into a new one; identical rows are kept once, conflicts fail."""
    with user_errors():
        summary = merge_stores(stores, into, prefer=prefer)
    rows = [("stores", len(summary.stores)),
            ("prompts read", summary.prompts_read), ("prompts written", summary.prompts_written),
            ("prompt duplicates dropped", summary.prompt_duplicates),
            ("traces read", summary.traces_read), ("traces written", summary.traces_written),
            ("trace duplicates dropped", summary.trace_duplicates)]
    if prefer:
        rows += [("prompt conflicts (newest kept)", summary.prompt_conflicts),
                 ("trace conflicts (newest kept)", summary.trace_conflicts)]
    console.print(make_table(f"merge -> {into}", ["", "count"], rows))


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
def build(
    teachers: Path = typer.Option(..., "--teachers", help="teachers.yaml: prompts, store and the teachers."),
    shard: Optional[str] = typer.Option(None, help="Build only slice i of N (i/N), by prompt-id hash."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be generated; load no model."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N prompts of the file."),
    store: Optional[Path] = typer.Option(None, help="Override the store of the YAML."),
    prompts_file: Optional[Path] = typer.Option(
        None, "--prompts", help="Override the prompts file of the YAML (e.g. a run's OUTPUT_DIR/misses.parquet)."),
    from_misses: Optional[Path] = typer.Option(
        None, "--prompts-from-misses", help="Build for exactly the prompts a training run missed: its OUTPUT_DIR "
        "(misses.parquet: prompts that needed guidance and had no correct trace)."),
):
    """Generate, verify and store teacher traces (resumable; run again to continue)."""
    from ampo_cache.misses import miss_prompts

    with user_errors():
        if prompts_file is not None and from_misses is not None:
            raise InputError("--prompts", "give --prompts or --prompts-from-misses, not both")
        config = load_build_config(teachers)
        if store is not None:
            config.store = store
        if prompts_file is not None:
            config.prompts = prompts_file
        TraceStore.check_location(config.store)
        if from_misses is not None:
            missed = miss_prompts(from_misses)
            prompts = select_shard(missed[:limit] if limit else missed, parse_shard(shard))
        else:
            prompts = load_build_prompts(config, parse_shard(shard), limit)
        plans = plan_build(config, prompts)
    console.print(make_table(
        f"plan: {len(prompts)} prompts" + (f" (shard {shard})" if shard else "") + f" -> {config.store}",
        ["teacher", "backend", "model", "stored", "to generate"],
        [(p.teacher.name, p.backend, p.teacher.model, p.stored, p.traces) for p in plans]))
    if dry_run:
        return
    with user_errors(), Progress(
        TextColumn("[bold]{task.description:<14}"), BarColumn(), MofNCompleteColumn(), TextColumn("prompts"),
        TextColumn("{task.fields[rate]:>7.1f} traces/s  pass {task.fields[pass_rate]:>6.1%}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    ) as progress:
        state = {}

        def start(plan: TeacherPlan) -> None:
            state.update(task=progress.add_task(plan.teacher.name, total=len(plan.todo), rate=0.0, pass_rate=0.0),
                         traces=0, correct=0, t0=time.perf_counter())

        def advance(n_prompts: int, n_traces: int, n_correct: int) -> None:
            state["traces"] += n_traces
            state["correct"] += n_correct
            progress.update(state["task"], advance=n_prompts,
                            rate=state["traces"] / max(time.perf_counter() - state["t0"], 1e-9),
                            pass_rate=state["correct"] / max(state["traces"], 1))

        results = run_build(config, plans, prompts, teachers, on_teacher_start=start, on_batch=advance)
    console.print(make_table(
        "generated this run", ["teacher", "traces", "correct", "truncated", "tokens", "seconds", "traces/s"],
        [(r.teacher, r.traces, r.correct, r.truncated, r.tokens, f"{r.seconds:.1f}",
          f"{r.traces / r.seconds:.1f}" if r.seconds else "-") for r in results]))
    print_coverage(coverage_report(TraceStore.open(config.store)))


@app.command()
def coverage(
    store: Path = StoreOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    misses: Optional[Path] = typer.Option(
        None, "--misses", help="A training run's OUTPUT_DIR (or its misses.parquet): how many of the prompts it "
        "missed the store covers now."),
):
    """Per-teacher and per-prompt coverage of the store (with --misses: of a run's cache misses)."""
    from ampo_cache.coverage import miss_coverage

    with user_errors():
        opened = TraceStore.open(store)
        report = coverage_report(opened) if misses is None else miss_coverage(opened, misses)
    if as_json:
        write_stdout(json.dumps(report) + "\n")
    elif misses is None:
        print_coverage(report)
    else:
        console.print(make_table(
            f"cache misses of {report['misses_file']}", ["missed prompts", "times missed", "covered now",
                                                         "still uncovered", "covered by teacher"],
            [(report["prompts"], report["times"], report["covered"], report["uncovered"],
              ", ".join(f"{t}: {n}" for t, n in report["covered_by_teacher"].items()) or "-")]))


def read_only_connection(store: TraceStore) -> duckdb.DuckDBPyConnection:
    """The store's views in an in-memory DuckDB that can read the store's shard folders and nothing else.

    ``enable_external_access = false`` with ``allowed_directories`` = the shard folders stops every
    file access outside them (COPY TO elsewhere, ATTACH, EXPORT, INSTALL, reading other files);
    ``lock_configuration`` stops a query from switching that back. DuckDB would still let COPY TO
    write *into* an allowed folder, and an in-memory database accepts CREATE, so ``check_read_only``
    also admits only SELECT statements. The store's own catalog.duckdb is never opened for writing:
    the views are rebuilt in memory from the store's current path (so a moved store still works).
    """
    con = store.connect()
    folders = ", ".join("'" + str(store.root / table).replace("'", "''") + "/'" for table in TABLES)
    con.execute(f"SET allowed_directories = [{folders}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def check_read_only(con: duckdb.DuckDBPyConnection, query: str) -> None:
    """Only queries (SELECT, FROM ..., WITH, DESCRIBE, SUMMARIZE, SHOW: DuckDB parses them all as SELECT)."""
    for statement in con.extract_statements(query):
        if statement.type != duckdb.StatementType.SELECT:
            raise InputError("sql", f"{statement.type.name} statements are not run: `ampo-cache sql` only reads the store "
                                    "(--allow-writes runs COPY ... TO and the like)")


@app.command()
def sql(
    query: str = typer.Argument(..., help="A DuckDB query over the views prompts, traces, coverage, prompt_coverage."),
    store: Path = StoreOpt,
    fmt: str = typer.Option("table", "--format", help="table | csv | json"),
    allow_writes: bool = typer.Option(False, "--allow-writes", help="Also run statements that write files "
                                      "(COPY ... TO, EXPORT DATABASE) or read files outside the store."),
):
    """Run a read-only DuckDB query over the store (SELECT only; --allow-writes for COPY ... TO)."""
    with user_errors():
        if fmt not in ("table", "csv", "json"):
            raise InputError("--format", f"expected table, csv or json, got {fmt!r}")
        opened = TraceStore.open(store)
        with (opened.connect() if allow_writes else read_only_connection(opened)) as con:
            if not allow_writes:
                check_read_only(con, query)
            try:
                result = con.execute(query)
            except duckdb.PermissionException as exc:
                raise InputError("sql", f"{str(exc).splitlines()[0]} (`ampo-cache sql` reads only the store's "
                                        "files; --allow-writes lifts this)") from None
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


app.add_typer(tiny_world_app, name="tiny-world")

if __name__ == "__main__":
    app()
