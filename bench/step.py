"""Benchmark: one training step's wall time split into generate / reward / guidance / update, for
guidance mode `off` (plain GRPO) and `adaptive` in the same run, and the overhead of guidance.

By default it builds a miniature world (random Llama student, hidden 128 x 4 layers, character
vocabulary; addition problems; a store with traces for `--covered` of the prompts). A random
student fails every prompt, so exactly the covered share is guided: `--covered 0.25` is the
"a quarter of prompts guided" case the issue asks about. Point `--config` at a train.yaml (e.g.
the tiny world's) to measure a real setup instead; its guided share is then whatever it is.

    python bench/step.py                          # 16 prompts x G=8, 48 new tokens, 4 timed steps per mode
    python bench/step.py --covered 1.0            # every prompt guided
    python bench/step.py --config data/tiny/train.yaml

Reported per mode: median seconds per phase over the timed steps (the first step of each mode is
a warm-up and not counted). Guidance overhead = guidance time / step time in adaptive mode (the
lookup and the scoring forwards); the step-time difference adaptive - off is shown too (it also
contains the update's cost of the longer teacher rows).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES = ("generate", "reward", "guidance", "update", "step")


def run_mode(config_path: Path, mode: str, steps: int, output_dir: Path, extra: list[str]) -> list[dict]:
    from ampo_train.config import load_train_config
    from ampo_train.trainer import train

    overrides = [f"guidance.mode={mode}", f"max_steps={steps + 2}", f"save_steps={10 ** 6}",
                 f"output_dir={output_dir}", "tensorboard=false", *extra]
    cfg = load_train_config(config_path, overrides)
    result = train(cfg, until_step=steps + 1)  # stops before max_steps: no checkpoint, no final save
    return result.history[1:]


def median(history: list[dict], key: str) -> float:
    values = [m[key] for m in history if m.get(key) is not None]
    return statistics.median(values) if values else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="a train.yaml to measure (default: a built miniature world)")
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--covered", type=float, default=0.25, help="share of prompts with cached traces (built world)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per mode (after one warm-up step)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ampo-bench-") as tmp:
        tmp = Path(tmp)
        if args.config is None:
            from tests.trainer_fixtures import base_config, make_world, write_config

            # 4 x prompts per step, so with --covered 0.25 a quarter of every step's prompts are covered on average
            world = make_world(tmp / "world", num_prompts=4 * args.prompts_per_step, covered=args.covered,
                               hidden=128, layers=4)
            config_path = write_config(tmp / "train.yaml", base_config(world, tmp / "out", lr=1e-5))
        else:
            config_path = args.config
        extra = [f"prompts_per_step={args.prompts_per_step}", f"group_size={args.group_size}",
                 f"rollout.max_new_tokens={args.max_new_tokens}", f"micro_batch_size={args.prompts_per_step * args.group_size}"]
        results = {mode: run_mode(config_path, mode, args.steps, tmp / mode, extra) for mode in ("off", "adaptive")}

    print()
    print(f"one step: {args.prompts_per_step} prompts x G={args.group_size}, up to {args.max_new_tokens} new tokens; "
          f"median of {args.steps} steps (seconds)")
    print(f"{'mode':<10}" + "".join(f"{p:>10}" for p in PHASES) + f"{'guided':>10}{'tok/s':>10}")
    for mode, history in results.items():
        cells = "".join(f"{median(history, 'time/' + p):>10.3f}" for p in PHASES)
        print(f"{mode:<10}{cells}{median(history, 'guidance/fraction'):>10.2f}{median(history, 'tokens_per_second'):>10.0f}")
    adaptive, off = results["adaptive"], results["off"]
    shares = [m["time/guidance"] / m["time/step"] for m in adaptive]
    step_off, step_adaptive = median(off, "time/step"), median(adaptive, "time/step")
    print(f"guidance overhead (lookup + scoring) in adaptive mode: {100 * statistics.median(shares):.1f}% of the step "
          f"(target < 15% with a quarter of prompts guided)")
    print(f"step time adaptive vs off: {step_adaptive:.3f}s vs {step_off:.3f}s "
          f"({100 * (step_adaptive - step_off) / step_off:+.1f}%, includes updating on the longer teacher rows)")


if __name__ == "__main__":
    main()
