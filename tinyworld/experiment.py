"""The GRPO-vs-AMPO experiment on the tiny world, and the one-command demo (one seed, two arms).

Every stage is the command a user would type, run as a subprocess and printed first, so the
demo doubles as a tour of the CLI:

    ampo-cache tiny-world build DIR            (skipped when DIR/world.json exists)
    ampo-cache build --teachers DIR/teachers.yaml    (resumable: adds only what is missing)
    ampo-cache coverage --store DIR/store
    ampo-train run --config DIR/train.yaml output_dir=OUT/runs/ARM/seedS seed=S ...ARM's overrides
    ampo-train eval --model ... --data DIR/prompts/test_level{1..4}.parquet --out OUT/eval/...json

A stage whose output exists is skipped, so an interrupted experiment continues where it stopped.
The arms differ from the tiny world's train.yaml only by their overrides (ARMS); every arm of a
seed starts from the same student with the same seed. ``summarise`` then reads the eval JSON and
metrics.jsonl files back: mean and spread over seeds, a table, results.json, results.md and two
PNGs (learning curves, pass@k curves).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from tinyworld.determinism import pinned_environment

# name -> (overrides of train.yaml, what the arm tests)
ARMS: dict[str, tuple[list[str], str]] = {
    "grpo": (["guidance.mode=off"], "plain GRPO: guidance off, same code path"),
    "ampo": ([], "AMPO: adaptive guidance, k=1, comprehension ranking"),
    "ampo-k2": (["guidance.k=2"], "AMPO with k=2 teacher traces per failed prompt (the reference's k)"),
    "ampo-k4": (["guidance.k=4"], "AMPO with k=4"),
    "ampo-random": (["guidance.rank=random"], "AMPO ranking candidates at random instead of by comprehension"),
    "ampo-always": (["guidance.mode=always"], "guidance for every prompt, not only all-wrong ones"),
    # Beyond AMPO (docs/results.md, "Beyond AMPO"): prefix guidance and DAPO's dynamic sampling.
    "ampo-prefix": (["guidance.prefix={fraction: 0.5, schedule: cosine, final: 0.0}"],
                    "prefix guidance: half of the picked trace (cosine to none), the student writes the rest"),
    "ampo-dynamic": (["dynamic_sampling.enabled=true"], "AMPO + dynamic sampling: groups without a reward spread "
                     "dropped, more prompts drawn (up to 2 more rounds)"),
    "grpo-dynamic": (["guidance.mode=off", "dynamic_sampling.enabled=true"], "GRPO + dynamic sampling (DAPO's)"),
    "ampo-prefix-dynamic": (["guidance.prefix={fraction: 0.5, schedule: cosine, final: 0.0}",
                             "dynamic_sampling.enabled=true"], "prefix guidance + dynamic sampling"),
    # The reference's newer rules (docs/results.md, "The reference's newest rule").
    "ampo-pass4": (["guidance.mode=pass_threshold", "guidance.pass_num=4"],
                   "AMPO guiding below 4 of 8 correct (the reference's pass_num), k=1 in place of wrong rollouts"),
    "ampo-adaptive-k": (["guidance.mode=adaptive_k"], "AMPO with adaptive k (the reference's 2026-03 rule): below 4 "
                        "of 8 correct, int(4 - correct) traces in place of wrong rollouts"),
    "ampo-adaptive-k-dynamic": (["guidance.mode=adaptive_k", "dynamic_sampling.enabled=true"],
                                "adaptive k + dynamic sampling (the reference's trainer is DAPO's)"),
}
DEMO_ARMS = ("grpo", "ampo")
LEVELS = (1, 2, 3, 4)
UNTRAINED = "student"  # the label of the untrained student in tables and plots


@dataclass
class ExperimentSettings:
    world: Path
    out: Path
    arms: Sequence[str] = DEMO_ARMS
    seeds: Sequence[int] = (0,)
    train_overrides: Sequence[str] = ()  # applied to every arm (e.g. max_steps=100)
    samples: int = 16
    ks: Sequence[int] = (1, 2, 4, 8, 16)
    temperature: float = 0.6
    world_seed: int = 0
    report: str = "results"  # file stem of the summary: REPORT.json, REPORT.md, REPORT-*.png
    echo: Callable[[str], None] = print

    def run_dir(self, arm: str, seed: int) -> Path:
        return self.out / "runs" / arm / f"seed{seed}"

    def eval_file(self, label: str, seed: int | None) -> Path:
        return self.out / "eval" / (f"{label}.json" if seed is None else f"{label}-seed{seed}.json")


_MODULES = {"ampo-cache": "cli.cache", "ampo-train": "cli.train"}
# When set, each stage takes an exclusive lock on this file while it runs (and only then), so
# heavy jobs of several people on one small machine take turns stage by stage instead of
# oversubscribing its cores: AMPO_STAGE_LOCK=/tmp/ampo-heavy.lock ampo-cache tiny-world experiment ...
STAGE_LOCK_ENV = "AMPO_STAGE_LOCK"


@contextlib.contextmanager
def stage_lock():
    path = os.environ.get(STAGE_LOCK_ENV)
    if not path:
        yield
        return
    with open(path, "a") as handle:
        asked = time.perf_counter()
        fcntl.flock(handle, fcntl.LOCK_EX)
        waited = time.perf_counter() - asked
        if waited > 1:  # so a timed run can subtract the time other people's jobs held the machine
            print(f"(waited {waited:.0f} s for {path})", flush=True)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(cmd: Sequence, settings: ExperimentSettings) -> None:
    """Print the command as a user would type it (``ampo-train run ...``), then run it with the
    interpreter running us (so it works without the venv's scripts on PATH)."""
    args = [str(c) for c in cmd]
    settings.echo("$ " + shlex.join(args))
    with stage_lock():  # every stage in one float order (tinyworld.determinism): the same numbers on any x86-64
        done = subprocess.run([sys.executable, "-m", _MODULES[args[0]], *args[1:]], env=pinned_environment())
    if done.returncode:
        raise SystemExit(f"error: `{shlex.join(args)}` failed with exit code {done.returncode}")


def prepare_world(settings: ExperimentSettings) -> None:
    world = settings.world
    if not (world / "world.json").is_file():
        _run(["ampo-cache", "tiny-world", "build", world, "--seed", settings.world_seed], settings)
    _run(["ampo-cache", "build", "--teachers", world / "teachers.yaml"], settings)
    _run(["ampo-cache", "coverage", "--store", world / "store"], settings)


def _eval_cmd(settings: ExperimentSettings, model: Path, label: str, out: Path) -> list:
    data = [arg for level in LEVELS for arg in ("--data", settings.world / "prompts" / f"test_level{level}.parquet")]
    return [
        "ampo-train", "eval", "--model", model, "--label", label, *data,
        "--k", ",".join(str(k) for k in settings.ks if k <= settings.samples) or "1",
        "--samples", settings.samples, "--temperature", settings.temperature, "--max-tokens", _max_tokens(settings),
        "--greedy", "--out", out]


def _max_tokens(settings: ExperimentSettings) -> int:
    import yaml

    train = yaml.safe_load((settings.world / "train.yaml").read_text())
    return int(train.get("rollout", {}).get("max_new_tokens", 96))


def train_and_evaluate(settings: ExperimentSettings) -> None:
    """Every (seed, arm) run and its evaluation, plus the untrained student's, skipping what exists."""
    untrained = settings.eval_file(UNTRAINED, None)
    if not untrained.is_file():
        _run(_eval_cmd(settings, settings.world / "student", UNTRAINED, untrained), settings)
    for seed in settings.seeds:
        for arm in settings.arms:
            run_dir = settings.run_dir(arm, seed)
            if not (run_dir / "final").is_dir():
                overrides = [f"output_dir={run_dir}", f"seed={seed}", *settings.train_overrides, *ARMS[arm][0]]
                _run(["ampo-train", "run", "--config", settings.world / "train.yaml", *overrides], settings)
            result = settings.eval_file(arm, seed)
            if not result.is_file():
                _run(_eval_cmd(settings, run_dir / "final", arm, result), settings)


# ----------------------------------------------------------------------------- summary


def _stats(values: Sequence[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def _figures(summary: dict) -> dict[str, float]:
    """The numbers we compare, flat: avg@n, pass@k..., greedy, distinct_correct."""
    out = {"avg@n": summary["avg@n"], **{f"pass@{k}": v for k, v in summary["pass@k"].items()}}
    if summary.get("greedy") is not None:
        out["greedy"] = summary["greedy"]
    out["distinct_correct"] = summary["distinct_correct"]
    return out


def training_figures(history: Sequence[dict]) -> dict[str, float]:
    """What a run's metrics say about its training, for the tables. Over the first and the last
    fifth of the steps: the guided fraction of prompts, and the fraction of groups whose own
    rollouts were all wrong (what guidance answers; GRPO has it too, so it tells whether guidance
    fails to fade or the student fails to learn the hard prompts). Over all steps: the fraction of
    tokens the PPO clip acted on, the mean comprehension score of the traces guidance picked and of
    those it left (left out where nothing was scored, as in GRPO), the mean traces injected per
    guided prompt, and the median wall time of a step (the tables give it as a ratio to GRPO's; the
    median, so that a few steps slowed by other work on the machine do not move it)."""
    fifth = max(1, len(history) // 5)

    def mean(rows, key, average=statistics.fmean):
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
        return average(values) if values else math.nan

    figures = {"guided_first_fifth": mean(history[:fifth], "guidance/fraction"),
               "guided_last_fifth": mean(history[-fifth:], "guidance/fraction"),
               "all_wrong_first_fifth": mean(history[:fifth], "groups/all_wrong"),
               "all_wrong_last_fifth": mean(history[-fifth:], "groups/all_wrong"),
               "clip_fraction": mean(history, "clip/fraction"),
               "comprehension_picked": mean(history, "comprehension/picked"),
               "comprehension_unpicked": mean(history, "comprehension/unpicked"),
               "k_mean": mean(history, "guidance/k_mean"),
               "step_time": mean(history, "time/step", statistics.median)}
    return {name: value for name, value in figures.items() if not math.isnan(value)}


def read_history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summarise(settings: ExperimentSettings) -> dict:
    """Mean and spread over seeds of every figure, per arm and benchmark (``overall`` included)."""
    reports: dict[str, list[dict]] = {UNTRAINED: [json.loads(settings.eval_file(UNTRAINED, None).read_text())[0]]}
    phases: dict[str, list[dict]] = {}
    for arm in settings.arms:
        reports[arm] = [json.loads(settings.eval_file(arm, s).read_text())[0] for s in settings.seeds]
        phases[arm] = [training_figures(read_history(settings.run_dir(arm, s))) for s in settings.seeds]
    table: dict[str, dict] = {}
    for label, runs in reports.items():
        benches = list(runs[0]["benchmarks"]) + ["overall"]
        table[label] = {}
        for bench in benches:
            per_seed = [_figures(r["overall"] if bench == "overall" else r["benchmarks"][bench]) for r in runs]
            table[label][bench] = {name: _stats([f[name] for f in per_seed]) for name in per_seed[0]}
        if label in phases:
            names = [name for name in phases[label][0] if all(name in p for p in phases[label])]
            table[label]["training"] = {name: _stats([p[name] for p in phases[label]]) for name in names}
    return {"seeds": list(settings.seeds), "arms": {a: ARMS[a][1] for a in settings.arms},
            "train_overrides": list(settings.train_overrides), "samples": settings.samples,
            "temperature": settings.temperature, "results": table}


# ----------------------------------------------------------------------------- presentation

TABLE_COLUMNS = (  # (heading, benchmark, figure)
    ("L1 avg@n", "test_level1", "avg@n"), ("L2 avg@n", "test_level2", "avg@n"),
    ("L3 avg@n", "test_level3", "avg@n"), ("L4 (hard) avg@n", "test_level4", "avg@n"),
    ("L4 pass@16", "test_level4", "pass@16"), ("all pass@1", "overall", "pass@1"),
    ("all pass@16", "overall", "pass@16"), ("distinct correct", "overall", "distinct_correct"),
)


def _cell(stats: dict | None, seeds: int) -> str:
    if stats is None:
        return "-"
    return f"{stats['mean']:.3f}" + (f" ± {stats['std']:.3f}" if seeds > 1 and stats["n"] > 1 else "")


SHORT_HEADINGS = ["L1", "L2", "L3", "L4", "L4 p@16", "all p@1", "all p@16", "dist.", "guided"]
SHORT_LEGEND = ("L1-L4: avg@n per level; p@k: pass@k; dist.: distinct correct solutions per solved "
                "problem; guided: guided fraction of prompts, first → last fifth of the steps")


def table_rows(summary: dict, short: bool = False) -> tuple[list[str], list[list[str]]]:
    """Headings and rows of the results table (mean ± std over seeds); ``short`` headings fit a
    terminal (see SHORT_LEGEND)."""
    seeds = len(summary["seeds"])
    headings = ["model"] + (SHORT_HEADINGS if short else [h for h, _, _ in TABLE_COLUMNS] + [
        "guided: first → last fifth", "all-wrong groups: first → last fifth", "step time / GRPO's"])
    grpo_step = (summary["results"].get("grpo", {}).get("training") or {}).get("step_time")
    spec = ".0%" if short else ".2f"  # percentages keep the short table within 80 columns
    rows = []
    for label, result in summary["results"].items():
        cells = [_cell(result.get(bench, {}).get(fig), seeds) for _, bench, fig in TABLE_COLUMNS]
        training = result.get("training") or {}
        phases = ["guided"] if short else ["guided", "all_wrong"]
        rows.append([label] + cells + [_first_to_last(training, name, spec) for name in phases]
                    + ([] if short else [_step_time_ratio(training.get("step_time"), grpo_step)]))
    return headings, rows


def _step_time_ratio(step_time: dict | None, grpo_step: dict | None) -> str:
    """An arm's mean step time over GRPO's in the same experiment (wall time: a ratio, as machines differ)."""
    if not step_time or not grpo_step:
        return "-"
    return f"{step_time['mean'] / grpo_step['mean']:.2f}x"


def _first_to_last(training: dict, name: str, spec: str) -> str:
    """``first→last`` fifth of a training figure (``training_figures``), or - where the run has none."""
    if f"{name}_first_fifth" not in training:
        return "-"
    return f"{training[f'{name}_first_fifth']['mean']:{spec}}→{training[f'{name}_last_fifth']['mean']:{spec}}"


def markdown_table(summary: dict) -> str:
    headings, rows = table_rows(summary)
    lines = ["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _mean_history(histories: Sequence[Sequence[dict]]) -> list[dict]:
    """Per step, the mean over seeds of every numeric metric."""
    steps = min(len(h) for h in histories)
    mean_rows = []
    for i in range(steps):
        rows = [h[i] for h in histories]
        merged = {"step": rows[0]["step"]}
        for key in rows[0]:
            values = [r.get(key) for r in rows if isinstance(r.get(key), (int, float))]
            if values and key != "step":
                merged[key] = statistics.fmean(values)
        mean_rows.append(merged)
    return mean_rows


def _mean_report(label: str, result: dict) -> dict:
    """A report shaped like `ampo-train eval`'s, holding the mean over seeds (for the pass@k plot)."""
    def passk(bench):
        return {k.split("@")[1]: v["mean"] for k, v in result[bench].items() if k.startswith("pass@")}
    benches = [b for b in result if b not in ("overall", "training")]
    return {"model": label, "benchmarks": {b: {"pass@k": passk(b)} for b in benches},
            "overall": {"pass@k": passk("overall")}}


def write_outputs(settings: ExperimentSettings, summary: dict) -> dict[str, Path]:
    from ampo_train.evaluation.plots import palette, plot_learning_curves, plot_pass_at_k

    out = settings.out
    stem = settings.report
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md",
             "learning_curves": out / f"{stem}-learning_curves.png", "pass_at_k": out / f"{stem}-pass_at_k.png"}
    paths["json"].write_text(json.dumps(summary, indent=1) + "\n")
    paths["markdown"].write_text(markdown_table(summary))
    histories = {arm: _mean_history([read_history(settings.run_dir(arm, s)) for s in settings.seeds])
                 for arm in settings.arms}
    results = summary["results"]
    colors = palette(list(results))  # the untrained student first: each arm keeps its colour in both figures
    plot_learning_curves(histories, paths["learning_curves"], colors=colors)
    reports = [_mean_report(label, result) for label, result in results.items()]
    spread = {label: {bench: {k.split("@")[1]: (v["min"], v["max"]) for k, v in figs.items() if k.startswith("pass@")}
                      for bench, figs in result.items() if bench != "training"}
              for label, result in results.items() if len(settings.seeds) > 1}
    plot_pass_at_k(reports, paths["pass_at_k"], spread=spread, colors=colors)
    return paths
