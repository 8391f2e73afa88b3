"""`ampo-train`: the online AMPO trainer's command line (the work is in ampo_train.trainer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from cli.common import user_errors

app = typer.Typer(help="Train a student with AMPO (GRPO + guidance on demand from the trace store).",
                  add_completion=False)


@app.callback()
def main():
    """The trainer's commands."""


@app.command()
def run(
    overrides: Optional[List[str]] = typer.Argument(
        None, help="Config keys to override, KEY=VALUE with dotted keys: guidance.k=4 lr=1e-5 lora=null"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="train.yaml (see ampo_train/config.py)."),
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="Continue from a checkpoint folder, or the newest checkpoint of a run's output folder."),
):
    """Train: rollouts, verifier rewards, guidance from the store, mixed-policy updates; metrics to
    OUTPUT_DIR/metrics.jsonl, checkpoints to OUTPUT_DIR/checkpoints/, the result to OUTPUT_DIR/final/.

    Multi-process: `accelerate launch --num_processes N -m cli.train run --config train.yaml`
    (on CPUs add --multi_gpu: accelerate then starts N gloo processes).
    """
    from ampo_common.errors import InputError
    from ampo_train.checkpoint import find_checkpoint, read_trainer_state
    from ampo_train.config import load_train_config

    with user_errors():
        base = None
        if config is None:
            if resume is None:
                raise InputError("--config", "needed (or --resume DIR, which reuses the run's saved config)")
            found = find_checkpoint(resume)
            base = read_trainer_state(found).get("config")
            if base is None:
                raise InputError(str(found / "trainer_state.json"), "holds no saved config: pass --config")
        cfg = load_train_config(config, overrides or [], base=base)
        from ampo_train.distributed import shutdown
        from ampo_train.trainer import train

        result = train(cfg, resume=resume)
        shutdown()
    if result.history:
        print_summary(result.history)


@app.command("eval")
def eval_(
    model: List[str] = typer.Option(..., "--model", "-m", help="Model folder or hub id; repeat to compare models. A "
                                    "LoRA adapter folder (e.g. a LoRA run's final/) is loaded onto its base."),
    data: List[Path] = typer.Option(..., "--data", "-d", help="Benchmark file (JSONL/Parquet/CSV); repeat for several."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="LoRA adapter for a single --model."),
    label: Optional[List[str]] = typer.Option(None, "--label", help="Display name per --model (default: folder name)."),
    k: str = typer.Option("1,4,16", "--k", help="Comma-separated k for pass@k (each <= --samples)."),
    samples: int = typer.Option(16, "--samples", "-n", min=1, help="Sampled answers per problem (avg@n, pass@k)."),
    temperature: float = typer.Option(0.6, "--temperature", min=0.0, help="Sampling temperature (the paper: 0.6)."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    max_tokens: int = typer.Option(1024, "--max-tokens", min=1, help="Most tokens generated per answer."),
    greedy: bool = typer.Option(False, "--greedy", help="Also report greedy accuracy (one more decode per problem)."),
    system_prompt: Optional[str] = typer.Option(
        None, "--system-prompt", help="System turn of the chat. A file's chat prompts (verl's `prompt` list) are used "
        "as given, system turn included, unless this is set: TEXT replaces their system turn, \"\" removes it."),
    limit: Optional[float] = typer.Option(
        None, "--limit", help="Evaluate only the first N rows of each --data file (lm-eval's --limit); a fraction "
        "below 1 takes that share of each file's rows, rounded up."),
    batch_tokens: int = typer.Option(
        65536, "--batch-tokens", min=1, help="Token budget per generate call: sequences x (longest prompt + "
        "--max-tokens); the samples of a problem stay in one call. Lower it when memory runs out."),
    truncate_prompts: str = typer.Option(
        "error", "--truncate-prompts", help="A prompt longer than the model's context minus --max-tokens: error "
        "(one line naming the row, before any generation) | left (cut its first tokens; counted in the results)."),
    engine: str = typer.Option("transformers", "--engine", "--backend",
                               help="transformers | vllm | auto: the trainer's rollout engines (--backend: old name)."),
    problem_col: Optional[str] = typer.Option(None, "--problem-col", help="Problem column when not a usual name."),
    answer_col: Optional[str] = typer.Option(None, "--answer-col", help="Answer column when not a usual name."),
    seed: int = typer.Option(0, "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the results as JSON here."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of pass@k curves (one line per model)."),
    log_samples: Optional[Path] = typer.Option(
        None, "--log-samples", help="Write every sampled answer (response, extracted answer, verdict) to this "
        "Parquet file, one row each, for SQL."),
):
    """avg@n, unbiased pass@k (Chen et al.), optional greedy accuracy and solution diversity, per
    benchmark file, per data_source (verl files) and overall; a table on the console, JSON with
    --out, a PNG with --plot, every answer with --log-samples."""
    from ampo_common.errors import InputError
    from ampo_train.evaluation.benchmarks import load_benchmark
    from ampo_train.evaluation.runner import EvalSettings, ModelSpec, check_settings, evaluate
    from ampo_train.evaluation.sample_log import check_log_path
    from cli.cache import check_output_file

    with user_errors():
        ks = _parse_ks(k)
        if engine not in ("transformers", "vllm", "auto"):
            raise InputError("--engine", f"expected transformers, vllm or auto, got {engine!r}")
        if adapter is not None and len(model) != 1:
            raise InputError("--adapter", "goes with a single --model (pass adapter folders as --model to compare several)")
        if label and len(label) != len(model):
            raise InputError("--label", f"{len(label)} labels for {len(model)} models")
        specs = [ModelSpec.parse(m, str(adapter) if adapter else None, label[i] if label else None)
                 for i, m in enumerate(model)]
        benchmarks = {path.stem: load_benchmark(path, problem_col, answer_col, limit) for path in data}
        if len(benchmarks) != len(data):
            raise InputError("--data", "two benchmark files share a file name; their results would collide")
        settings = EvalSettings(samples=samples, ks=ks, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                greedy=greedy, seed=seed, system_prompt=system_prompt, engine=engine,
                                batch_tokens=batch_tokens, truncate=truncate_prompts)
        check_settings(settings)
        for target, name in ((out, "--out"), (plot, "--plot"), (log_samples, "--log-samples")):
            check_output_file(target, name)
        if log_samples is not None:
            check_log_path(log_samples)
        reports = evaluate(specs, benchmarks, settings, log_samples=log_samples)
    print_eval_table(reports)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(reports, indent=1) + "\n")
    if plot is not None:
        from ampo_train.evaluation.plots import plot_pass_at_k

        plot_pass_at_k(reports, plot)


def _parse_ks(text: str) -> list[int]:
    from ampo_common.errors import InputError

    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise InputError("--k", f"expected comma-separated integers like 1,4,16, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise InputError("--k", f"expected positive integers, got {text!r}")
    return ks


def print_eval_table(reports: list[dict]) -> None:
    from cli.common import console, make_table

    ks = list(reports[0]["overall"]["pass@k"])
    greedy = reports[0]["overall"]["greedy"] is not None
    n = reports[0]["overall"]["samples"]
    ks = [k for k in ks if k != "1"]  # pass@1 is avg@n exactly (the estimator at k = 1 is c / n)
    columns = ["model", "benchmark", "n", f"avg@{n}"] + [f"pass@{k}" for k in ks] + \
        (["greedy"] if greedy else []) + ["distinct"]
    rows, notes = [], []
    for report in reports:
        parts = list(report["benchmarks"].items()) + \
            [(f"source: {name}", s) for name, s in report.get("sources", {}).items()] + \
            ([("overall", report["overall"])] if len(report["benchmarks"]) > 1 else [])
        for name, s in parts:
            rows.append([report["model"], name, s["problems"], f"{s['avg@n']:.3f}"] +
                        [f"{s['pass@k'][k]:.3f}" for k in ks] + ([f"{s['greedy']:.3f}"] if greedy else []) +
                        [f"{s['distinct_correct']:.2f}"])
        notes += [f"{report['model']}: {s['prompts_cut']} of {s['problems']} prompts of {name} cut from the left to "
                  f"fit the context" for name, s in report["benchmarks"].items() if s.get("prompts_cut")]
    console.print(make_table(f"evaluation: {n} samples per problem at temperature "
                             f"{reports[0]['settings']['temperature']} (pass@1 = avg@{n}; distinct: distinct correct solutions per "
                             f"solved problem)", columns, rows, keep_whole=len(columns)))
    for note in notes:
        console.print(note, highlight=False)


def _mean(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    return f"{sum(values) / len(values):.3f}" if values else "-"


def print_summary(history: list[dict]) -> None:
    """First and last few steps side by side: what moved during the run."""
    from cli.common import console, make_table

    span = max(1, min(5, len(history) // 2))
    first, last = history[:span], history[-span:]
    keys = ["reward", "accuracy", "guidance/fraction", "groups/all_wrong", "comprehension/picked",
            "response_length/mean", "entropy", "grad_norm", "time/step"]
    rows = [(key, _mean(first, key), _mean(last, key)) for key in keys]
    teachers = sorted(k for k in history[-1] if k.startswith("guidance/teacher/"))
    rows += [(f"traces injected from {k.rsplit('/', 1)[1]} (all steps)", "", str(int(sum(r.get(k) or 0 for r in history))))
             for k in teachers]
    console.print(make_table(f"run summary: steps {history[0]['step']}-{history[-1]['step']} "
                             f"(means over the first and last {span})", ["metric", "first", "last"], rows))


@app.command()
def plan(
    overrides: Optional[List[str]] = typer.Argument(
        None, help="Config keys to override, KEY=VALUE with dotted keys, as for `run`: lora.r=16 micro_batch_tokens=8192"),
    config: Path = typer.Option(..., "--config", "-c", help="train.yaml (see ampo_train/config.py)."),
    teachers: Optional[Path] = typer.Option(
        None, "--teachers", help="teachers.yaml: its teachers in the coverage rows (and its store when neither --store "
        "nor train.yaml names one)."),
    store: Optional[Path] = typer.Option(None, "--store", help="Trace store to report coverage from (default: train.yaml's)."),
    accelerate_config: Optional[Path] = typer.Option(
        None, "--accelerate-config", help="The Accelerate config file the run will be launched with (its "
        "distributed_type, num_processes, fsdp_version, zero_stage). Default: --processes/--layout, else Accelerate's "
        "default config file, else one process."),
    processes: Optional[int] = typer.Option(None, "--processes", min=1, help="Processes (GPUs) of the launch."),
    layout: Optional[str] = typer.Option(None, "--layout", help="ddp | fsdp2 | zero2 | zero3 (single: one process)."),
    gpu_memory: Optional[float] = typer.Option(
        None, "--gpu-memory", min=1, help="GiB of memory of one GPU (default: this machine's GPU, else 80)."),
    prompt_tokens: Optional[int] = typer.Option(
        None, "--prompt-tokens", min=1, help="Longest prompt in tokens (default: measured from the prompts file with "
        "the student's tokenizer when both are here, else 1024)."),
):
    """Check a config before any weights load: the student's shapes (from config.json), parameters,
    one process's memory by component and phase under the launch layout, a step's rollouts and
    tokens, the store's coverage of the training prompts, and a verdict with the one setting to
    change. Exit 0 when it fits (or memory could not be checked), 1 when it does not (one line on
    stderr), 2 for unreadable input."""
    from ampo_train.plan import PlanRequest, make_plan

    with user_errors():
        result = make_plan(PlanRequest(
            config=config, overrides=tuple(overrides or ()), teachers=teachers, store=store,
            accelerate_config=accelerate_config, launch=(processes, layout), gpu_memory_gib=gpu_memory,
            prompt_tokens=prompt_tokens))
    print_plan(result)
    if result.verdict.fits is False:
        from cli.common import err_console

        err_console.print(f"[red]error:[/red] {_markup_safe(result.verdict.line)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def print_plan(result) -> None:
    """The plan as one two-column table, a bold row per section, then the verdict."""
    from rich import box
    from rich.table import Table

    from cli.common import console

    table = Table(title="ampo-train plan", title_justify="left", box=box.SIMPLE_HEAD, show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for section in result.sections:
        table.add_row(f"[bold]{_markup_safe(section.title)}[/bold]", "")
        for what, value in section.rows:
            table.add_row(f"  {_markup_safe(what)}", _markup_safe(value))
    console.print(table)
    if result.verdict.fits is not False:
        style = "green" if result.verdict.fits else "yellow"
        console.print(f"[{style}]{_markup_safe(result.verdict.line)}[/{style}]", highlight=False, soft_wrap=True)


def _markup_safe(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(str(text))


if __name__ == "__main__":
    app()
