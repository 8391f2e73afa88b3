"""Benchmark: export (verl, long) and merge of a large store, in bounded memory.

Uses the synthetic store of bench/lookup.py (default 50,000 prompts x 4 teachers x 5 samples =
1,000,000 traces of ~2 KB): an existing one with --dir (only read), or builds one. Then, each step
in a fresh child process that reports its own time and peak RSS (VmHWM) (so neither the build nor another
step counts):
  - export --format verl   (one row per prompt, target_lst)
  - export --format long   (one row per trace, Parquet)
  - merge of two halves of the store: two stores made of links to the shards (every prompt shard in
    both; the trace shards split in two with one shard in both, so its traces are duplicates)
and prints them next to the size of the store's text.

    python bench/interop.py --dir /tmp/bench-store     # reuse the store bench/lookup.py built there
    python bench/interop.py --prompts 2000             # a quick look (builds a small store)
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ampo_cache.store import TraceStore  # noqa: E402


def step(name: str, store: str, out: str, other: str | None) -> dict:
    """One measured step, in this (child) process."""
    t0 = time.perf_counter()
    if name.startswith("export"):
        from ampo_cache.export import export

        summary = export(store, out, name.split("-")[1]).__dict__
    else:
        from ampo_cache.merge import merge

        s = merge([store, other], out)
        summary = {"traces_read": s.traces_read, "traces_written": s.traces_written,
                   "trace_duplicates": s.trace_duplicates, "prompt_duplicates": s.prompt_duplicates}
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "summary": summary}


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not getrusage: Linux carries ru_maxrss over an exec, so a
    child of a big parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--step", *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"step {args[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def halves(root: Path, work: Path) -> tuple[Path, Path, int]:
    """Two stores of links to ``root``'s shards; returns them and the traces in the shared shard."""
    import pyarrow.parquet as pq

    shards = [p for p in TraceStore(root).shards("traces") if not p.name.endswith("-schema.parquet")]
    middle = len(shards) // 2
    parts = {"a": shards[: middle + 1], "b": shards[middle:]}
    made = []
    for name, mine in parts.items():
        half = work / f"half-{name}"
        for table in ("prompts", "traces"):
            (half / table).mkdir(parents=True)
            for path in TraceStore(root).shards(table) if table == "prompts" else mine:
                (half / table / path.name).symlink_to(path)
        shutil.copy(root / "store.json", half / "store.json")
        made.append(half)
    return made[0], made[1], pq.read_metadata(shards[middle]).num_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None, help="store to use (built there when missing; never modified)")
    ap.add_argument("--prompts", type=int, default=50_000)
    ap.add_argument("--teachers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--text-bytes", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="where outputs go (default: a temporary folder, removed)")
    ap.add_argument("--step", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        name, store, out, *other = args.step
        print(json.dumps(step(name, store, out, other[0] if other else None)))
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="ampo-interop-"))
    work.mkdir(parents=True, exist_ok=True)
    root = args.dir or work / "store"
    try:
        if not (root / "store.json").exists():
            from bench.lookup import build

            t0 = time.perf_counter()
            build(root, args.prompts, args.teachers, args.samples, args.text_bytes, args.seed)
            print(f"build: {time.perf_counter() - t0:.0f} s")
        with TraceStore.open(root).connect() as con:
            traces, prompts, chars = con.execute(
                "SELECT count(*), count(DISTINCT prompt_id), sum(num_chars) FROM traces").fetchall()[0]
        parquet = sum(p.stat().st_size for t in ("prompts", "traces") for p in TraceStore(root).shards(t))
        print(f"store {root}: {traces:,} traces, {prompts:,} prompts; text {chars / 1e9:.2f} GB "
              f"(sum of num_chars), Parquet {parquet / 1e9:.2f} GB on disk")

        results = {}
        for name, out in (("export-verl", work / "verl.parquet"), ("export-long", work / "long.parquet")):
            results[name] = run_child(name, str(root), str(out))
            results[name]["out_gb"] = out.stat().st_size / 1e9
            out.unlink()
        a, b, shared = halves(root, work)
        results["merge"] = run_child("merge", str(a), str(work / "merged"), str(b))
        results["merge"]["out_gb"] = sum(p.stat().st_size for p in (work / "merged").rglob("*.parquet")) / 1e9
        results["merge"]["summary"]["expected_duplicates"] = shared

        print(f"\n{'step':<14}{'seconds':>9}{'peak RSS MB':>13}{'RSS / text':>12}{'output GB':>11}  summary")
        for name, r in results.items():
            print(f"{name:<14}{r['seconds']:9.1f}{r['peak_rss_mb']:13.0f}{r['peak_rss_mb'] * 1e6 / chars:12.1%}"
                  f"{r['out_gb']:11.2f}  {json.dumps(r['summary'])}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
