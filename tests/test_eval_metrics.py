"""The evaluation's arithmetic against numbers worked out by hand."""

import math

import pytest

from ampo_train.evaluation.metrics import ProblemResult, distinct_correct, pass_at_k, summarise


def test_pass_at_k_by_hand():
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    # n=10, c=3, k=4: 1 - C(7,4)/C(10,4) = 1 - 35/210
    assert pass_at_k(10, 3, 4) == pytest.approx(1 - 35 / 210)
    assert pass_at_k(4, 3, 2) == 1.0  # fewer than k wrong samples: any k drawn include a correct one
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)  # k=1 is the plain accuracy
    assert pass_at_k(16, 4, 16) == 1.0


def test_pass_at_k_agrees_with_binomials_for_large_n():
    n, c, k = 256, 7, 64
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-12)


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, 1, 5), (4, 1, 0), (4, -1, 1)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_distinct_correct_counts_different_correct_texts_only():
    texts = ["1+2=3 \\boxed{3}", "1+2=3  \\boxed{3}", "2+1=3 \\boxed{3}", "1+2=4 \\boxed{4}"]
    assert distinct_correct(texts, [True, True, True, False]) == 2  # whitespace collapsed: first two are one path
    assert distinct_correct(texts, [False] * 4) == 0


def test_summarise_by_hand():
    results = [
        ProblemResult(["a", "b", "x", "y"], [True, True, False, False], greedy_correct=True),   # c=2 of 4
        ProblemResult(["a", "a", "x", "y"], [True, True, False, False], greedy_correct=False),  # c=2, one path
        ProblemResult(["x", "y", "z", "w"], [False] * 4, greedy_correct=False),                 # c=0
    ]
    s = summarise(results, ks=[1, 2, 4, 8])
    assert s["problems"] == 3 and s["samples"] == 4
    assert s["avg@n"] == pytest.approx(4 / 12)
    # pass@2 per problem: 1 - C(2,2)/C(4,2) = 5/6, twice, and 0
    assert s["pass@k"]["2"] == pytest.approx((5 / 6 + 5 / 6 + 0) / 3)
    assert s["pass@k"]["4"] == pytest.approx(2 / 3)
    assert "8" not in s["pass@k"]  # k > n is not estimable
    assert s["greedy"] == pytest.approx(1 / 3)
    assert s["distinct_correct"] == pytest.approx((2 + 1) / 2)  # over the two solved problems


def test_summarise_without_greedy():
    s = summarise([ProblemResult(["a"], [True])], ks=[1])
    assert s["greedy"] is None and s["pass@k"] == {"1": 1.0}
