"""`ampo-cache tiny-world`: build the embedded default world (problems, tokenizer, teachers, student)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cli.common import console, make_table, user_errors

app = typer.Typer(help="The embedded tiny world: a CPU-sized stand-in for real teachers and a student.",
                  no_args_is_help=True, add_completion=False)


def print_accuracy(summary: dict) -> None:
    levels = sorted(summary["terms_per_level"], key=int)
    columns = ["model"] + [f"L{lv} ({summary['terms_per_level'][lv]} terms) greedy / sampled" for lv in levels]
    rows = [[name] + [f"{s[lv]['greedy']:.0%} / {s[lv]['sampled']:.0%}" for lv in levels]
            for name, s in summary["accuracy"].items()]
    per_level = ", ".join(f"L{k}: {v}" for k, v in summary["test_prompts"].items())
    console.print(make_table(f"accuracy on held-out prompts ({per_level}; "
                             f"sampled: {summary['sizes']['teacher_samples']} samples per teacher, "
                             f"{summary['sizes']['student_samples']} for the student)", columns, rows))
    hard = str(summary["hard_level"])
    console.print(make_table(None, ["hard level", "value"], [
        ("teachers' union coverage (>= 1 correct sample of any teacher)", f"{summary['teachers_union_coverage_hard']:.0%}"),
        (f"student: groups of {summary['sizes']['student_samples']} samples all wrong",
         f"{summary['student_all_wrong_groups_hard']:.0%}"),
        ("student sampled accuracy", f"{summary['accuracy']['student'][hard]['sampled']:.0%}"),
        ("build time (training / total)", f"{summary['train_seconds']:.0f} s / {summary['total_seconds']:.0f} s"),
    ]))


@app.command()
def build(
    folder: Path = typer.Argument(..., help="Where to build the world (replaced if it exists)."),
    seed: int = typer.Option(0, help="Same seed, same problems."),
    size: str = typer.Option("full", help="full (the demo's world, ~3 min on 2 cores) | small (for tests, < 1 min)."),
):
    """Build problems, tokenizer, four teachers and a student; print their accuracy per level."""
    from tinyworld.determinism import pin_process

    pin_process()  # before torch loads: one float order, the same world on any x86-64 machine
    from ampo_common.errors import InputError
    from tinyworld.build import SIZES, build_world, total_units

    with user_errors():
        if size not in SIZES:
            raise InputError("--size", f"expected one of {', '.join(SIZES)}, got {size!r}")
        if folder.exists() and not folder.is_dir():
            raise InputError(str(folder), "is a file; expected a folder to build the tiny world in")
    with user_errors(), Progress(TextColumn("[bold]tiny world[/bold] {task.fields[stage]:<9}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console) as progress:
        task = progress.add_task("build", total=total_units(size), stage="")
        summary = build_world(folder, seed, size, on_progress=lambda stage, n: progress.update(task, advance=n, stage=stage))
    print_accuracy(summary)
    console.print(f"built {folder}/: teachers.yaml (for `ampo-cache build --teachers`), train.yaml, prompts/, "
                  "tokenizer/, teachers/, student/, world.json")


def _experiment(settings, title: str) -> None:
    from tinyworld.determinism import describe
    from tinyworld.experiment import SHORT_LEGEND, prepare_world, summarise, table_rows, train_and_evaluate, write_outputs
    from tinyworld.published import reproduction_line

    prepare_world(settings)
    console.print(reproduction_line(settings.world), highlight=False)  # its weights vs tinyworld/published_world.json
    train_and_evaluate(settings)
    summary = summarise(settings)
    paths = write_outputs(settings, summary)
    headings, rows = table_rows(summary, short=True)
    console.print(make_table(title, headings, rows, keep_whole=len(headings)))
    console.print(SHORT_LEGEND, style="dim")
    console.print(describe(), style="dim")
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))


def _settings(folder: Path, out: Optional[Path], arms: str, seeds: str, overrides: Optional[List[str]], samples: int,
              report: str = "results"):
    from ampo_common.errors import InputError
    from tinyworld.experiment import ARMS, ExperimentSettings

    names = [a.strip() for a in arms.split(",") if a.strip()]
    unknown = [a for a in names if a not in ARMS]
    if unknown or not names:
        raise InputError("--arms", f"unknown arm(s) {', '.join(unknown) or '(none)'}; expected some of {', '.join(ARMS)}")
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise InputError("--seeds", f"expected comma-separated integers like 0,1,2, got {seeds!r}") from None
    return ExperimentSettings(world=folder, out=out or folder / "experiment", arms=names, seeds=seed_list or [0],
                              train_overrides=list(overrides or []), samples=samples, report=report,
                              echo=lambda line: console.print(f"[bold cyan]{line}[/bold cyan]", highlight=False))


@app.command()
def demo(
    folder: Path = typer.Argument(Path("tiny"), help="The tiny world's folder (built there when missing)."),
    out: Optional[Path] = typer.Option(None, help="Where runs, evaluations and figures go (default FOLDER/demo)."),
):
    """The whole story in one command: build the world and its trace cache, train the student with
    GRPO and with AMPO from the same start, evaluate both and the untrained student, print the
    table and write the figures. Run it again to redo only what is missing."""
    with user_errors():
        settings = _settings(folder, out or folder / "demo", "grpo,ampo", "0", None, 16)
    _experiment(settings, "GRPO vs AMPO on the held-out tiny-world levels (16 samples per problem, T=0.6)")


@app.command()
def experiment(
    folder: Path = typer.Argument(Path("tiny"), help="The tiny world's folder (built there when missing)."),
    arms: str = typer.Option("grpo,ampo", help="Comma-separated arms: grpo, ampo, ampo-k2, ampo-k4, ampo-random, "
                                               "ampo-always, ampo-prefix, ampo-dynamic, grpo-dynamic, "
                                               "ampo-prefix-dynamic, ampo-pass4, ampo-adaptive-k, "
                                               "ampo-adaptive-k-dynamic (see tinyworld/experiment.py)."),
    seeds: str = typer.Option("0,1,2", help="Comma-separated training seeds; every arm runs every seed."),
    samples: int = typer.Option(16, min=1, help="Sampled answers per test problem."),
    out: Optional[Path] = typer.Option(None, help="Where runs, evaluations and figures go (default FOLDER/experiment)."),
    report: str = typer.Option("results", help="File stem of the summary (REPORT.json, .md, -*.png), so several "
                                               "summaries of one experiment folder sit side by side."),
    overrides: Optional[List[str]] = typer.Argument(None, help="train.yaml overrides for every arm, e.g. max_steps=100."),
):
    """Several seeds x several arms (the ablations), mean ± std over seeds; resumable."""
    with user_errors():
        settings = _settings(folder, out, arms, seeds, overrides, samples, report)
    _experiment(settings, f"tiny world, mean ± std over seeds {settings.seeds}")
