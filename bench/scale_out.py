"""Memory per process and step time: DDP vs FSDP2, 2 processes, the same full fine-tuning run.

    python bench/scale_out.py [--hidden 768] [--layers 6] [--steps 4] [--json]

A random Llama student (hidden 768, 6 layers: 35M parameters, 134 MiB in float32) in the trainer's
miniature world (``tests/trainer_fixtures.make_world``: char tokenizer, addition prompts, a trace
store) trains with AMPO guidance on, through ``ampo-train run`` launched by
``accelerate launch --config_file examples/accelerate/{ddp,fsdp2}.yaml`` (2 gloo CPU processes,
one torch thread each), one arm after the other. Each process reports (the trainer's debug hook,
``distributed.local_memory``) the MiB it holds of the parameters and of AdamW's state (its shards
under FSDP2) and its peak RSS; the step time is the median ``time/step`` from metrics.jsonl, step
1 left out. Printed per arm: those figures (the larger of the two processes) and the FSDP2/DDP
ratios; ``--json``: the same as one JSON object on the last line.

Not a timed test: run it on a quiet machine, under ``flock /tmp/ampo-heavy.lock`` where machines
are shared.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ampo_train.trainer import DEBUG_DIR_ENV  # noqa: E402
from tests.trainer_fixtures import base_config, make_world, write_config  # noqa: E402

ARMS = {"ddp": "ddp.yaml", "fsdp2": "fsdp2.yaml"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_arm(name: str, world: dict, work: Path, steps: int) -> dict:
    out, debug = work / f"out-{name}", work / f"ranks-{name}"
    config = write_config(work / f"{name}.yaml", base_config(
        world, out, max_steps=steps, save_steps=10_000, lr=1e-4, lora=None, micro_batch_size=4,
        rollout={"max_new_tokens": 16}))
    env = {**os.environ, DEBUG_DIR_ENV: str(debug), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "examples" / "accelerate" / ARMS[name]), "--main_process_port", str(_free_port()),
           "-m", "cli.train", "run", "--config", str(config)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-6000:]}")
    ranks = [json.loads((debug / f"rank{r}.json").read_text()) for r in (0, 1)]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"parameters_mib": max(r["parameters_mib"] for r in ranks),
            "optimizer_mib": max(r["optimizer_mib"] for r in ranks),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks),
            "step_s": statistics.median(m["time/step"] for m in metrics[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        world = make_world(work / "world", num_prompts=8, covered=0.75, hidden=args.hidden, layers=args.layers)
        results = {name: run_arm(name, world, work, args.steps) for name in ARMS}
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    ddp, fsdp = results["ddp"], results["fsdp2"]
    state = {name: r["parameters_mib"] + r["optimizer_mib"] for name, r in results.items()}
    ratios = {"parameters+optimizer": state["fsdp2"] / state["ddp"], "peak_rss": fsdp["peak_rss_mib"] / ddp["peak_rss_mib"],
              "step_s": fsdp["step_s"] / ddp["step_s"]}
    print(f"\nstudent: hidden {args.hidden}, {args.layers} layers; 2 processes; per process (the larger of the two):")
    print("| arm | parameters | AdamW state | parameters + optimizer | peak RSS | step (median) |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['parameters_mib']:.0f} MiB | {r['optimizer_mib']:.0f} MiB | {state[name]:.0f} MiB | "
              f"{r['peak_rss_mib']:.0f} MiB | {r['step_s']:.2f} s |")
    print(f"| FSDP2/DDP | {fsdp['parameters_mib'] / ddp['parameters_mib']:.2f}x | "
          f"{fsdp['optimizer_mib'] / ddp['optimizer_mib']:.2f}x | {ratios['parameters+optimizer']:.2f}x | "
          f"{ratios['peak_rss']:.2f}x | {ratios['step_s']:.2f}x |")
    if args.json:
        print(json.dumps({"arms": results, "ratios": ratios}))


if __name__ == "__main__":
    main()
