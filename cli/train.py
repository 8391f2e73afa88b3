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
    from ampo_cache.errors import InputError
    from ampo_train.checkpoint import find_checkpoint
    from ampo_train.config import load_train_config

    with user_errors():
        base = None
        if config is None:
            if resume is None:
                raise InputError("--config", "needed (or --resume DIR, which reuses the run's saved config)")
            base = json.loads((find_checkpoint(resume) / "trainer_state.json").read_text())["config"]
        cfg = load_train_config(config, overrides or [], base=base)
        from ampo_train.trainer import train

        result = train(cfg, resume=resume)
    if result.history:
        print_summary(result.history)


def _mean(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    return f"{sum(values) / len(values):.3f}" if values else "-"


def print_summary(history: list[dict]) -> None:
    """First and last few steps side by side: what moved during the run."""
    from cli.common import console, make_table

    span = max(1, min(5, len(history) // 2))
    first, last = history[:span], history[-span:]
    keys = ["reward/mean", "accuracy", "guidance/fraction", "groups/all_wrong", "comprehension/picked",
            "response_length/mean", "entropy", "grad_norm", "time/step"]
    rows = [(key, _mean(first, key), _mean(last, key)) for key in keys]
    teachers = sorted(k for k in history[-1] if k.startswith("guidance/teacher/"))
    rows += [(f"traces injected from {k.rsplit('/', 1)[1]} (all steps)", "", str(int(sum(r.get(k) or 0 for r in history))))
             for k in teachers]
    console.print(make_table(f"run summary: steps {history[0]['step']}-{history[-1]['step']} "
                             f"(means over the first and last {span})", ["metric", "first", "last"], rows))


if __name__ == "__main__":
    app()
