"""`ampo-cache tiny-world`: build the embedded default world (problems, tokenizer, teachers, student)."""

from __future__ import annotations

from pathlib import Path

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
    size: str = typer.Option("full", help="full (the demo, ~10 min on 2 cores) | small (for tests, < 1 min)."),
):
    """Build problems, tokenizer, four teachers and a student; print their accuracy per level."""
    from tinyworld.build import SIZES, build_world, total_units

    if size not in SIZES:
        raise typer.BadParameter(f"expected one of {', '.join(SIZES)}", param_hint="--size")
    with user_errors(), Progress(TextColumn("[bold]tiny world[/bold] {task.fields[stage]:<9}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console) as progress:
        task = progress.add_task("build", total=total_units(size), stage="")
        summary = build_world(folder, seed, size, on_progress=lambda stage, n: progress.update(task, advance=n, stage=stage))
    print_accuracy(summary)
    console.print(f"built {folder}/: teachers.yaml (for `ampo-cache build --teachers`), train.yaml, prompts/, "
                  "tokenizer/, teachers/, student/, world.json")
