"""Memory of one update at a real vocabulary: ours vs TRL 1.16's GRPOTrainer, LoRA and full.

    pip install -c constraints/cpu.txt -e ".[dev,bench]"          # TRL only in the bench extra
    python bench/memory.py --vocab 151936 --rows 8 --response-tokens 1024 [--arms ours,trl] [--json]
    python bench/memory.py --vocab 151936 --rows 8 --response-tokens 4096 --repeats 2

A random 2-layer Llama (hidden 128) with that vocabulary makes one update (forward + backward of
the GRPO loss, no generation) of ``--rows`` rows of 25 prompt + ``--response-tokens`` response
tokens, all rows in one micro-batch (``--micro-batch`` to change), with LoRA (r=16, all-linear)
and with full parameters. Each (arm, mode) runs in its own process, so its memory is its own;
with ``--repeats`` the arms alternate (ours, TRL, TRL, ours, ...) and the medians are reported.
The update code is ``bench/update_probe.py``, shared with ``bench/vs_trl.py --update-only``.

Per arm and mode it prints the forward+backward seconds, the RSS growth (peak RSS during the update
minus the RSS just before it, after a small warm-up update; the peak mark is reset with
``/proc/self/clear_refs`` so model construction does not count) and that peak RSS; for scale, the
MiB of the full float32 logits ``rows x tokens x vocab`` that a plain update materialises (and
copies) at least once; and the ratios ours/logits, ours/TRL. ``--json`` prints one JSON object on
the last line: ``logits_mib``; per arm ``peak_growth_mib`` and ``seconds`` (the larger over the
modes run) and per mode the same plus ``peak_rss_mib``; the ratios per mode.

Not a timed test: run it on a quiet machine (it prints the load average before and after), under
``flock /tmp/ampo-heavy.lock`` on shared machines. TRL at 4096 tokens needs several GB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.update_probe import UpdateProbe  # noqa: E402

MODES = ("lora", "full")


def child(probe: UpdateProbe, arm: str, work: Path, threads: int) -> dict:
    """Runs in the arm's own process: build, warm up, measure one update."""
    import torch

    from bench.update_probe import make_update, measure

    torch.set_num_threads(threads)
    result = measure(make_update(arm, probe, work), probe, updates=1)
    result["seconds"] = result["seconds"][0]
    return result


def run_child(probe: UpdateProbe, arm: str, work: Path, threads: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", arm, "--probe", json.dumps(asdict(probe)),
           "--threads", str(threads), "--work", str(work)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(work))
    if done.returncode != 0:
        raise SystemExit(f"the {arm} arm failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    return {
        "runs": len(runs),
        "peak_growth_mib": round(statistics.median(r["peak_growth_mib"] for r in runs), 1),
        "peak_rss_mib": round(statistics.median(r["peak_rss_mib"] for r in runs), 1),
        "seconds": round(statistics.median(r["seconds"] for r in runs), 2),
        "growth_runs_mib": [round(r["peak_growth_mib"]) for r in runs],
        "seconds_runs": [round(r["seconds"], 2) for r in runs],
    }


def ratios(result: dict, arms: list[str], modes: list[str]) -> dict:
    out = {}
    for mode in modes:
        ours = result.get("ours", {}).get(mode)
        if ours is None:
            continue
        r = {"ours_growth_vs_logits": round(ours["peak_growth_mib"] / result["logits_mib"], 3)}
        trl = result.get("trl", {}).get(mode)
        if trl is not None:
            r["growth_ours_vs_trl"] = round(ours["peak_growth_mib"] / trl["peak_growth_mib"], 3)
            r["peak_rss_ours_vs_trl"] = round(ours["peak_rss_mib"] / trl["peak_rss_mib"], 3)
            r["seconds_ours_vs_trl"] = round(ours["seconds"] / trl["seconds"], 3)
            r["trl_growth_vs_logits"] = round(trl["peak_growth_mib"] / result["logits_mib"], 3)
        out[mode] = r
    return out


def print_table(result: dict, arms: list[str], modes: list[str]) -> None:
    p = result["probe"]
    print(f"one update: random 2-layer Llama, vocab {p['vocab']:,}, {p['rows']} rows x {p['response_tokens']} response "
          f"tokens (+{p['prompt_tokens']} prompt), micro-batch {p['micro_batch'] or p['rows']} rows; full float32 "
          f"logits rows x tokens x vocab = {result['logits_mib']:,.0f} MiB")
    print(f"{'mode':<6} {'arm':<5} {'fwd+bwd (s)':>12} {'RSS growth (MiB)':>17} {'peak RSS (MiB)':>15} "
          f"{'growth/logits':>14}   runs (growth MiB; s)")
    for mode in modes:
        for arm in arms:
            s = result[arm][mode]
            vs_logits = s["peak_growth_mib"] / result["logits_mib"]
            print(f"{mode:<6} {arm:<5} {s['seconds']:>12.2f} {s['peak_growth_mib']:>17,.0f} "
                  f"{s['peak_rss_mib']:>15,.0f} {vs_logits:>13.2f}x   {s['growth_runs_mib']}; {s['seconds_runs']}")
        r = result["ratios"].get(mode, {})
        if "growth_ours_vs_trl" in r:
            print(f"{mode:<6} ours/TRL {r['seconds_ours_vs_trl']:>9.2f}x {r['growth_ours_vs_trl']:>16.2f}x "
                  f"{r['peak_rss_ours_vs_trl']:>14.2f}x")
    load = result["load"]
    print(f"machine: {load['cpus']} CPUs, torch threads {result['threads']}, load average {load['before']:.2f} before, "
          f"{load['after']:.2f} after")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--response-tokens", type=int, default=1024)
    ap.add_argument("--prompt-tokens", type=int, default=25)
    ap.add_argument("--micro-batch", type=int, default=0, help="rows per forward/backward, both arms (0 = all)")
    ap.add_argument("--arms", default="ours,trl")
    ap.add_argument("--modes", default="lora,full", help="lora, full or both")
    ap.add_argument("--repeats", type=int, default=1, help="processes per arm and mode, alternating arms")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every child")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "ampo-bench-memory")
    ap.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print(json.dumps(child(UpdateProbe(**json.loads(args.probe)), args.child, args.work, args.threads)))
        return {}

    arms = [a for a in args.arms.split(",") if a]
    modes = [m for m in args.modes.split(",") if m]
    if not set(arms) <= {"ours", "trl"} or not set(modes) <= set(MODES):
        ap.error("--arms takes ours,trl and --modes lora,full")
    if "trl" in arms:
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit('TRL is not installed: pip install -c constraints/cpu.txt -e ".[bench]"')
    base = UpdateProbe(vocab=args.vocab, rows=args.rows, response_tokens=args.response_tokens,
                       prompt_tokens=args.prompt_tokens, micro_batch=args.micro_batch, seed=args.seed)
    load_before = os.getloadavg()[0]
    runs: dict[str, dict[str, list]] = {arm: {mode: [] for mode in modes} for arm in arms}
    for mode in modes:
        probe = replace(base, lora=mode == "lora")
        for i in range(args.repeats):  # ABBA: ours, TRL, TRL, ours, ...
            for arm in arms if i % 2 == 0 else arms[::-1]:
                r = run_child(probe, arm, args.work / f"{mode}-{arm}-{i}", args.threads)
                runs[arm][mode].append(r)
                print(f"{mode} {arm} run {i + 1}/{args.repeats}: {r['seconds']:.2f} s, RSS growth "
                      f"{r['peak_growth_mib']:.0f} MiB", file=sys.stderr)
    result: dict = {"probe": asdict(base), "logits_mib": round(base.logits_mib, 1), "threads": args.threads,
                    "load": {"cpus": os.cpu_count(), "before": load_before, "after": os.getloadavg()[0]}}
    for arm in arms:
        per_mode = {mode: summarise(runs[arm][mode]) for mode in modes}
        result[arm] = {"peak_growth_mib": max(s["peak_growth_mib"] for s in per_mode.values()),
                       "seconds": max(s["seconds"] for s in per_mode.values()), **per_mode}
    result["ratios"] = ratios(result, arms, modes)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result, arms, modes)
    return result


if __name__ == "__main__":
    main()
