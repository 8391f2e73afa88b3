"""Where a tiny-world model's wrong answers come from: is the boxed answer the result its own
reasoning reached?

    python -m tinyworld.diagnose tiny/student tiny/experiment/runs/grpo/seed0/final ...

For each level, over 16 samples per held-out problem at temperature 0.6: the fraction of answers
whose ``\\boxed{}`` differs from the last ``=N`` of their own reduction chain ("guessed": the
box no longer follows the arithmetic), and the accuracy of the chain's own last result. Outcome
rewards pay a guessed box that happens to be right as much as a derived one; this shows whether
training taught that.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from pathlib import Path

from ampo_cache.verify import extract_answer
from ampo_train.evaluation.benchmarks import load_benchmark
from ampo_train.evaluation.runner import EvalSettings, ModelSpec, Sampler

_RESULT = re.compile(r"=(\d+)")


def guessed_fraction(texts: list[str]) -> tuple[int, int]:
    """(answers whose box differs from the chain's last result, answers with both)."""
    guessed = total = 0
    for text in texts:
        chain = _RESULT.findall(text.split("\\boxed")[0])
        boxed = extract_answer(text)
        if chain and boxed is not None:
            total += 1
            guessed += chain[-1] != boxed
    return guessed, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--world", type=Path, default=Path("tiny"))
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()
    settings = EvalSettings(samples=args.samples, temperature=0.6, max_tokens=96)
    levels = sorted(int(p.stem.removeprefix("test_level")) for p in (args.world / "prompts").glob("test_level*.parquet"))
    print("model | " + " | ".join(f"L{lv} guessed" for lv in levels))
    for model in args.models:
        with contextlib.ExitStack() as stack:
            sampler = Sampler(ModelSpec.parse(model), settings, stack)
            cells = []
            for level in levels:
                items = load_benchmark(args.world / "prompts" / f"test_level{level}.parquet")
                outputs = sampler.generate([i.problem for i in items], args.samples, greedy=False, seed=0)
                guessed, total = guessed_fraction([g.text for samples in outputs for g in samples])
                cells.append(f"{guessed / total:.2f}" if total else "-")
            sampler.close()
        print(f"{model} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
