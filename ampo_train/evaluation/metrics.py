"""The evaluation's arithmetic, as pure functions over per-sample verdicts.

- avg@n: mean accuracy over all n samples of all problems (= pass@1 estimated from n samples).
- pass@k: the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k) for a problem with
  c correct of n samples, averaged over problems; computed as a product so large n cannot overflow.
- diversity (our choice, documented in docs/evaluation.md): ``distinct_correct`` is the mean number of
  *different* correct solution texts per solved problem (whitespace collapsed). Two samples that
  reason the same way write the same text, so this counts the distinct reasoning paths that reach
  the truth; it is 1 for a model that knows one way and up to n for one that explores. (Word
  n-gram measures such as distinct-n say little about short, space-free traces like the tiny
  world's, and reward noise as much as different reasoning.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def _normalised(text: str) -> str:
    return " ".join(text.split())


def distinct_correct(texts: Sequence[str], correct: Sequence[bool]) -> int:
    """Different correct solution texts among one problem's samples."""
    return len({_normalised(t) for t, ok in zip(texts, correct) if ok})


@dataclass
class ProblemResult:
    """One problem's samples, verified."""

    texts: list[str]
    correct: list[bool]
    greedy_correct: bool | None = None  # None when greedy decoding was not asked for


def summarise(results: Sequence[ProblemResult], ks: Sequence[int]) -> dict:
    """Benchmark-level figures: avg@n, pass@k for each k <= n, greedy, diversity."""
    if not results:
        raise ValueError("no problems to summarise")
    n = len(results[0].correct)
    if any(len(r.correct) != n for r in results):
        raise ValueError("every problem needs the same number of samples")
    count = len(results)
    solved = [r for r in results if any(r.correct)]
    greedy = [r.greedy_correct for r in results if r.greedy_correct is not None]
    return {
        "problems": count,
        "samples": n,
        "avg@n": sum(sum(r.correct) for r in results) / (count * n),
        "pass@k": {str(k): sum(pass_at_k(n, sum(r.correct), k) for r in results) / count for k in ks if k <= n},
        "greedy": sum(greedy) / len(greedy) if greedy else None,
        "distinct_correct": sum(distinct_correct(r.texts, r.correct) for r in solved) / len(solved) if solved else 0.0,
    }
