"""Peak memory of log-probs (+ entropy) through the LM head: chunked vs full logits.

    python bench/lm_head_memory.py [--positions 4096] [--vocab 151936] [--hidden 64]
        [--arms plain,chunked] [--entropy/--no-entropy] [--chunk-size N] [--temperature T] [--json]

Measured on the 2-core CPU machine (2026-11-30), vocab 151,936, hidden 64, entropy on:
4096 positions (full float32 logits 2,374 MiB): plain 14,249 MiB (6.0x), chunked 441 MiB (0.19x);
8192 positions (4,748 MiB): chunked 447 MiB (0.09x): bounded by the chunk, not the positions.
Run it under `flock /tmp/ampo-heavy.lock` on shared machines: the plain arm needs ~14 GB.

Each arm runs forward + backward of ``sum(g * logp + g' * entropy)`` w.r.t. the hidden states and
the head's weight in a fresh subprocess, and reports its peak RSS growth: ``ru_maxrss`` at the
end minus the RSS once the inputs exist, after a tiny warm-up call of the same arm. Torch's CPU
allocations are plain malloc/mmap, so RSS sees them; a fresh process per arm keeps one arm's
high-water mark out of the other's. Printed beside it for scale: the size of the full float32
logits, positions x vocab x 4 bytes. (On CPU the chunk is at least 2**24 logits, see
``lm_head.CPU_MIN_CHUNK_ELEMENTS``, so at small vocabularies the chunk may be every position.)

Arms: ``plain`` = ``head(hidden)`` then ``loss.token_logprobs`` / ``loss.token_entropy`` on the
full logits (the trainer's path before issue 14); ``chunked`` = ``lm_head.chunked_logprobs``.
Not a timed test: seconds are printed for information only.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIB = 1024 * 1024


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_arm(arm: str, positions: int, vocab: int, hidden: int, entropy: bool, chunk_size: int,
            temperature: float) -> dict:
    """Runs in the child process: build inputs, measure one forward + backward."""
    import torch

    from ampo_train.lm_head import chunked_logprobs
    from ampo_train.loss import token_entropy, token_logprobs

    def forward_backward(h, head, targets, g_lp, g_ent):
        if arm == "plain":
            logits = head(h)
            lp = token_logprobs(logits, targets, temperature)
            ent = token_entropy(logits, temperature) if entropy else None
        elif arm == "chunked":
            out = chunked_logprobs(h, head, targets, temperature, chunk_size=chunk_size, with_entropy=entropy)
            lp, ent = out if entropy else (out, None)
        else:
            raise ValueError(arm)
        loss = (lp * g_lp).sum() + ((ent * g_ent).sum() if ent is not None else 0.0)
        loss.backward()

    def inputs(rows: int, vocab: int):
        head = torch.nn.Linear(hidden, vocab, bias=False)
        h = torch.randn(1, rows, hidden, requires_grad=True)
        return h, head, torch.randint(0, vocab, (1, rows)), torch.randn(1, rows), torch.randn(1, rows)

    torch.manual_seed(0)
    # Warm-up at a tiny size: the first call pages in kernels' code and starts thread pools (tens
    # of MiB of RSS that do not grow with the size); the baseline is taken after it.
    forward_backward(*inputs(8, 64))
    args = inputs(positions, vocab)
    head = args[1]
    base = _rss_bytes()
    start = time.perf_counter()
    forward_backward(*args)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"arm": arm, "peak_growth_mib": round((peak - base) / MIB, 1), "seconds": round(seconds, 2),
            "grad_norm": float(head.weight.grad.norm())}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--arms", default="plain,chunked")
    ap.add_argument("--entropy", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--chunk-size", type=int, default=None,
                    help="positions per chunk (default lm_head.DEFAULT_CHUNK_SIZE; raised on CPU to the floor)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.chunk_size is None:
        from ampo_train.lm_head import DEFAULT_CHUNK_SIZE
        args.chunk_size = DEFAULT_CHUNK_SIZE
    from ampo_train.lm_head import effective_chunk_size
    effective = effective_chunk_size(args.chunk_size, args.vocab, __import__("torch").device("cpu"))
    common = (args.positions, args.vocab, args.hidden, args.entropy, args.chunk_size, args.temperature)
    if args.child:
        print(json.dumps(run_arm(args.child, *common)))
        return {}

    logits_mib = args.positions * args.vocab * 4 / MIB
    result = {"positions": args.positions, "vocab": args.vocab, "hidden": args.hidden, "entropy": args.entropy,
              "chunk_size": effective, "logits_mib": round(logits_mib, 1), "arms": {}}
    for arm in args.arms.split(","):
        cmd = [sys.executable, __file__, "--child", arm, "--positions", str(args.positions), "--vocab",
               str(args.vocab), "--hidden", str(args.hidden), "--chunk-size", str(args.chunk_size),
               "--temperature", str(args.temperature), "--entropy" if args.entropy else "--no-entropy"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"arm {arm} failed:\n{proc.stderr}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        out["vs_logits"] = round(out["peak_growth_mib"] / logits_mib, 3)
        result["arms"][arm] = out
        if not args.json:
            print(f"{arm:>8}: positions {args.positions}, vocab {args.vocab}, entropy {args.entropy}: "
                  f"peak growth {out['peak_growth_mib']:.0f} MiB = {out['vs_logits']:.2f}x the full float32 "
                  f"logits ({logits_mib:.0f} MiB); {out['seconds']:.1f} s"
                  + (f" (chunks of {effective} positions)" if arm == "chunked" else ""))
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
