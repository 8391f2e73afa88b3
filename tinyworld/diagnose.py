"""Where a tiny-world model's wrong answers come from: is the boxed answer the result its own
reasoning reached?

    python -m tinyworld.diagnose tiny/student tiny/experiment/runs/grpo/seed0/final ...

For each level, over 16 samples per held-out problem at temperature 0.6, two fractions of the
answers that have both a chain and a box: "off chain", whose ``\\boxed{}`` differs from the value
of the expression their own chain wrote just before ``=\\boxed{`` (the box does not follow from the
model's last reduction: a slip in that last addition, or a guess), and "lucky", whose box is the
right answer although their last reduction is not (a chain that went wrong, a box right by
chance). Outcome rewards pay a lucky box as much as a derived one; this shows whether training
taught that.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from ampo_cache.verify import extract_answer
from ampo_train.evaluation.benchmarks import load_benchmark
from ampo_train.evaluation.runner import EvalSettings, ModelSpec, Sampler
from tinyworld.styles import last_expression_value


def box_vs_chain(texts: list[str], answers: list[str]) -> tuple[int, int, int]:
    """(off chain, lucky, answers with both a last reduction and a box); see the module docstring."""
    off = lucky = total = 0
    for text, answer in zip(texts, answers, strict=True):
        derived = last_expression_value(text)
        boxed = extract_answer(text)
        if derived is not None and boxed is not None:
            total += 1
            off += str(derived) != boxed
            lucky += boxed == answer and str(derived) != answer
    return off, lucky, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--world", type=Path, default=Path("tiny"))
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()
    settings = EvalSettings(samples=args.samples, temperature=0.6, max_tokens=64)
    levels = sorted(int(p.stem.removeprefix("test_level")) for p in (args.world / "prompts").glob("test_level*.parquet"))
    print("model | " + " | ".join(f"L{lv} off chain / lucky" for lv in levels))
    for model in args.models:
        with contextlib.ExitStack() as stack:
            sampler = Sampler.load(ModelSpec.parse(model), settings, stack)
            cells = []
            for level in levels:
                items = load_benchmark(args.world / "prompts" / f"test_level{level}.parquet")
                outputs = sampler.generate([i.problem for i in items], args.samples, greedy=False, seed=0)
                texts = [g.text for samples in outputs for g in samples]
                answers = [i.answers[0] for i, samples in zip(items, outputs) for _ in samples]
                off, lucky, total = box_vs_chain(texts, answers)
                cells.append(f"{off / total:.2f} / {lucky / total:.2f}" if total else "-")
        print(f"{model} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
