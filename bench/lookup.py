"""Benchmark: looking up the correct traces of a batch of prompts, ours vs a naive DuckDB query.

Builds a synthetic store (default 50,000 prompts x 4 teachers x 5 samples = 1,000,000 traces of
~2 KB each, about half correct) through the store's own writer, then, in one run and interleaved:
  - ours:  TraceStore.open(dir).index() once, then index.lookup(64 random prompt ids);
  - naive: one DuckDB query over the Parquet shards per batch (WHERE correct AND prompt_id IN ...).
Prints p50/p99 of both, their ratio, and the time and memory (RSS) to open the store.

    python bench/lookup.py                       # the issue's sizes (~3 GB on disk, a few minutes)
    python bench/lookup.py --prompts 2000        # a quick look
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import random
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa

from ampo_cache.ids import prompt_id, text_hash
from ampo_cache.schema import PROMPTS, TRACES
from ampo_cache.store import TraceStore

WORDS = "the of and to a in is we so let then thus since sum product term value step check".split()


def build(root: Path, prompts: int, teachers: int, samples: int, text_bytes: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    # One long random corpus; each trace is a slice at a random offset, so no two traces share
    # a page of text and compression sees realistic (not repeated) data.
    corpus = " ".join(rng.choice(WORDS + [str(i) for i in range(1000)], size=4_000_000))
    store = TraceStore.create_or_open(root)
    now = datetime.now(timezone.utc)
    ids = [prompt_id(f"Synthetic problem number {i}: compute something.") for i in range(prompts)]
    per_shard = max(1, 50_000 // (teachers * samples))
    for lo in range(0, prompts, per_shard):
        chunk = ids[lo : lo + per_shard]
        store.append("prompts", pa.Table.from_pylist(
            [dict(prompt_id=p, problem=f"Synthetic problem number {lo + j}: compute something.", answer="42",
                  source="bench", created_at=now) for j, p in enumerate(chunk)], schema=PROMPTS))
        n = len(chunk) * teachers * samples
        offsets = rng.integers(0, len(corpus) - text_bytes, size=n)
        correct = rng.random(n) < 0.5
        rows, i = [], 0
        for p in chunk:
            for t in range(teachers):
                for s in range(samples):
                    text = corpus[offsets[i] : offsets[i] + text_bytes] + (" \\boxed{42}" if correct[i] else " \\boxed{7}")
                    rows.append(dict(prompt_id=p, teacher=f"teacher-{t}", sample_idx=s, text=text,
                                     text_hash=text_hash(text), extracted_answer="42" if correct[i] else "7",
                                     correct=bool(correct[i]), verify_status="correct" if correct[i] else "wrong",
                                     num_chars=len(text), num_tokens=len(text) // 4, origin="bench", created_at=now))
                    i += 1
        store.append("traces", pa.Table.from_pylist(rows, schema=TRACES))
        print(f"\r  built {min(lo + per_shard, prompts):,}/{prompts:,} prompts", end="", flush=True)
    print()
    return ids


def measure_open(root: Path) -> tuple[float, float]:
    """Seconds and RSS growth (MB) to open the store and load its lookup index."""
    process = psutil.Process()
    gc.collect()
    rss0 = process.memory_info().rss
    t0 = time.perf_counter()
    TraceStore.open(root).index()
    return time.perf_counter() - t0, (process.memory_info().rss - rss0) / 1e6


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = sorted(s * 1000 for s in seconds)
    return statistics.median(ms), ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=50_000)
    ap.add_argument("--teachers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--text-bytes", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lookups", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=None, help="store directory (default: a temporary one, removed)")
    args = ap.parse_args()

    root = args.dir or Path(tempfile.mkdtemp(prefix="ampo-bench-")) / "store"
    try:
        if not (root / "store.json").exists():
            t0 = time.perf_counter()
            ids = build(root, args.prompts, args.teachers, args.samples, args.text_bytes, args.seed)
            print(f"build: {args.prompts * args.teachers * args.samples:,} traces in {time.perf_counter() - t0:.0f} s, "
                  f"{sum(p.stat().st_size for p in root.rglob('*.parquet')) / 1e9:.2f} GB of Parquet")
        else:
            ids = list(TraceStore.open(root).prompt_ids())

        # Opening is measured in fresh processes: this one's memory is full of the build's garbage.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            opens = {label: pool.submit(measure_open, root).result()
                     for label in ("open (first: builds the index file)", "open (later: index file exists)")}
        index = TraceStore.open(root).index()
        t0 = time.perf_counter()
        index.prefetch()  # the timed lookups measure the lookup, not the disk's first-touch faults
        prefetch_seconds = time.perf_counter() - t0

        store = TraceStore.open(root)
        con = store.connect()
        naive_sql = ("SELECT prompt_id, teacher, sample_idx, text FROM traces "
                     "WHERE correct AND prompt_id IN (SELECT unnest($ids))")
        rng = random.Random(args.seed)
        ours, naive = [], []
        for n in range(args.lookups):
            batch = rng.sample(ids, args.batch)
            t0 = time.perf_counter()
            found = index.lookup(batch)
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            rows = con.execute(naive_sql, {"ids": batch}).fetchall()
            naive.append(time.perf_counter() - t0)
            assert sum(len(v) for v in found.values()) == len(rows), "ours and naive disagree"
            print(f"\r  lookups {n + 1}/{args.lookups}", end="", flush=True)
        print()

        (o50, o99), (n50, n99) = percentiles(ours), percentiles(naive)
        traces = args.prompts * args.teachers * args.samples
        print(f"\nstore: {traces:,} traces ({args.prompts:,} prompts x {args.teachers} teachers x {args.samples} samples, "
              f"~{args.text_bytes} B each); batches of {args.batch} prompt ids; {args.lookups} lookups each")
        for label, (seconds, mb) in opens.items():
            print(f"  {label:<40} {seconds * 1000:8.0f} ms   RSS +{mb:7.1f} MB")
        print(f"  {'prefetch (read the index file once)':<40} {prefetch_seconds * 1000:8.0f} ms")
        print(f"  {'':<22}{'p50 ms':>10}{'p99 ms':>10}")
        print(f"  {'ours (TraceIndex)':<22}{o50:10.2f}{o99:10.2f}")
        print(f"  {'naive DuckDB query':<22}{n50:10.2f}{n99:10.2f}")
        print(f"  naive / ours: p50 {n50 / o50:.0f}x, p99 {n99 / o99:.0f}x   (target: ours p99 < 5 ms, >= 10x)")
    finally:
        if args.dir is None:
            shutil.rmtree(root.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
