"""Memory per process and step time: DDP vs FSDP2 vs DeepSpeed ZeRO-2 and ZeRO-3, 2 processes, the
same full fine-tuning run.

    python bench/scale_out.py [--hidden 768] [--layers 6] [--steps 4] [--json]

A random Llama student (hidden 768, 6 layers: 35M parameters, 134 MiB in float32) in the trainer's
miniature world (``tests/trainer_fixtures.make_world``: char tokenizer, addition prompts, a trace
store) trains with AMPO guidance on, through ``ampo-train run`` launched by
``accelerate launch --config_file examples/accelerate/{ddp,fsdp2,zero2,zero3}.yaml`` (2 gloo CPU
processes, one torch thread each), one arm after the other (the ZeRO arms only where deepspeed is
installed). Each process reports (the trainer's debug hook, ``distributed.local_memory``) the MiB
it holds of the parameters and of the optimizer state (its shards under FSDP2 and ZeRO; under ZeRO
the optimizer state includes its fp32 master partitions) and its peak RSS; the step time is the
median ``time/step`` from metrics.jsonl, step 1 left out. Printed per arm: those figures (the
larger of the two processes) and each arm's ratios to DDP; ``--json``: the same as one JSON object
on the last line.

Not a timed test: run it on a quiet machine, under ``flock /tmp/ampo-heavy.lock`` where machines
are shared.
"""

from __future__ import annotations

import argparse
import importlib.util
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

ARMS = {"ddp": "ddp.yaml", "fsdp2": "fsdp2.yaml", "zero2": "zero2.yaml", "zero3": "zero3.yaml"}


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
    arms = [name for name in ARMS if not name.startswith("zero") or importlib.util.find_spec("deepspeed")]
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        world = make_world(work / "world", num_prompts=8, covered=0.75, hidden=args.hidden, layers=args.layers)
        results = {name: run_arm(name, world, work, args.steps) for name in arms}
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    for r in results.values():
        r["state_mib"] = r["parameters_mib"] + r["optimizer_mib"]
    columns = ("parameters_mib", "optimizer_mib", "state_mib", "peak_rss_mib", "step_s")
    ddp = results["ddp"]
    ratios = {name: {key: r[key] / ddp[key] for key in columns} for name, r in results.items() if name != "ddp"}
    print(f"\nstudent: hidden {args.hidden}, {args.layers} layers; 2 processes; per process (the larger of the two):")
    print("| arm | parameters | optimizer state | parameters + optimizer | peak RSS | step (median) |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['parameters_mib']:.0f} MiB | {r['optimizer_mib']:.0f} MiB | {r['state_mib']:.0f} MiB | "
              f"{r['peak_rss_mib']:.0f} MiB | {r['step_s']:.2f} s |")
    for name, ratio in ratios.items():
        print(f"| {name}/DDP | " + " | ".join(f"{ratio[key]:.2f}x" for key in columns) + " |")
    if args.json:
        print(json.dumps({"arms": results, "ratios": ratios}))


if __name__ == "__main__":
    main()
