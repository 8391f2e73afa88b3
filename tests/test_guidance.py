import random

import pytest
import torch

from ampo_cache.lookup import CachedTrace
from ampo_train.config import GuidanceSettings
from ampo_train.guidance import (
    candidate_traces,
    needs_guidance,
    rank_candidates,
    replace_rollouts,
)


class ScriptedRng:
    """Stands in for random.Random where the draws must be known by hand."""

    def __init__(self, values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


def _t(teacher, idx, chars):
    return CachedTrace(teacher=teacher, sample_idx=idx, text=f"{teacher}-{idx}", num_tokens=None, num_chars=chars)


# ---------------------------------------------------------------- config

def test_config_defaults_match_the_reference_run():
    cfg = GuidanceSettings()
    assert (cfg.mode, cfg.k, cfg.max_candidates, cfg.rank, cfg.hybrid_fraction) == (
        "adaptive", 2, 4, "comprehension", 0.3)
    for bad in ({"mode": "sometimes"}, {"rank": "best"}, {"k": 0}, {"hybrid_fraction": 1.5}):
        with pytest.raises(ValueError):
            GuidanceSettings(**bad)


# ---------------------------------------------------------------- which prompts

REWARDS = torch.tensor([
    [0.0, 0, 0, 0],  # all wrong
    [1.0, 0, 0, 0],  # one right
    [0.0, 0, 0, 0],  # all wrong
    [1.0, 1, 1, 1],  # all right
])


def test_needs_guidance_adaptive_always_off():
    # adaptive: success rate < 1/G  <=>  no correct rollout -> prompts 0 and 2
    assert needs_guidance(REWARDS, "adaptive").tolist() == [True, False, True, False]
    assert needs_guidance(REWARDS, "always").tolist() == [True, True, True, True]
    assert needs_guidance(REWARDS, "off").tolist() == [False, False, False, False]


def test_needs_guidance_hybrid_draws_once_per_non_failed_prompt():
    # prompts 1 and 3 have correct rollouts; draws 0.1 (< 0.3: guided) and 0.5 (>= 0.3: not).
    rng = ScriptedRng([0.1, 0.5])
    assert needs_guidance(REWARDS, "hybrid", rng, hybrid_fraction=0.3).tolist() == [True, True, True, False]
    assert rng.values == []  # exactly two draws: failed prompts consume none
    # fraction 0 -> only the failed ones; fraction 1 -> all
    assert needs_guidance(REWARDS, "hybrid", random.Random(0), 0.0).tolist() == [True, False, True, False]
    assert needs_guidance(REWARDS, "hybrid", random.Random(0), 1.0).tolist() == [True, True, True, True]


def test_needs_guidance_threshold_and_bool_flags():
    # 0.9 x correct + 0.1 x format: 0.1 is a formatted wrong answer, 0.9 a correct one (> 0.5).
    mixed = torch.tensor([[0.1, 0.1], [0.9, 0.1], [1.0, 0.0]])
    assert needs_guidance(mixed, "adaptive").tolist() == [True, False, False]
    flags = torch.tensor([[False, False], [True, False]])
    assert needs_guidance(flags, "adaptive").tolist() == [True, False]


# ---------------------------------------------------------------- candidates

def test_candidates_one_per_teacher_first_shortest_then_name():
    traces = [
        _t("dave", 0, 1000),
        _t("carol", 1, 900),
        _t("alice", 0, 500),
        _t("bob", 0, 300),
        _t("carol", 0, 800),
        _t("alice", 1, 300),
    ]
    # shortest per teacher: alice 300 (#1), bob 300, carol 800 (#0), dave 1000;
    # alice and bob tie at 300 -> by name: alice, bob, carol, dave
    picked = candidate_traces(traces, 4)
    assert [(t.teacher, t.sample_idx) for t in picked] == [("alice", 1), ("bob", 0), ("carol", 0), ("dave", 0)]
    # 3 slots: the teacher with the longest best trace drops out
    assert [(t.teacher, t.sample_idx) for t in candidate_traces(traces, 3)] == [("alice", 1), ("bob", 0), ("carol", 0)]
    # 6 slots: after one per teacher, the rest shortest first: alice#0 (500), carol#1 (900)
    assert [(t.teacher, t.sample_idx) for t in candidate_traces(traces, 6)] == [
        ("alice", 1), ("bob", 0), ("carol", 0), ("dave", 0), ("alice", 0), ("carol", 1)]


def test_candidates_fill_remaining_slots_from_the_same_teacher():
    # two teachers, four slots: alice 300, bob 400, then alice's others shortest first 500, 700
    traces = [_t("alice", 2, 700), _t("bob", 0, 400), _t("alice", 0, 500), _t("alice", 1, 300)]
    assert [t.num_chars for t in candidate_traces(traces, 4)] == [300, 400, 500, 700]
    # input order does not matter
    assert candidate_traces(list(reversed(traces)), 4) == candidate_traces(traces, 4)
    assert candidate_traces([], 4) == []


# ---------------------------------------------------------------- ranking

def test_rank_by_score_ties_go_to_the_shorter_trace():
    scores = [0.5, 0.9, 0.5, 0.2]
    lengths = [100, 300, 50, 10]
    # best 0.9 (#1); 0.5 tie between #0 (100 chars) and #2 (50 chars) -> #2 first
    assert rank_candidates(scores, lengths, k=2) == [1, 2]
    # effective k = min(k, n): all four
    assert rank_candidates(scores, lengths, k=10) == [1, 2, 0, 3]
    # equal score and length -> lower index
    assert rank_candidates([0.3, 0.3], [5, 5], k=2, rank="trace_likelihood") == [0, 1]


def test_rank_puts_minus_inf_then_nan_last():
    # trace_likelihood scores are log-probs: -2.0 > -5.0 > -inf (no tokens) > nan
    assert rank_candidates([float("nan"), float("-inf"), -5.0, -2.0], [1, 1, 1, 1], k=4,
                           rank="trace_likelihood") == [3, 2, 1, 0]


def test_rank_random_ignores_scores():
    # random.Random(7).sample(range(4), 2) == [2, 0]
    assert rank_candidates(None, [10, 20, 30, 40], k=2, rank="random", rng=random.Random(7)) == [2, 0]
    assert rank_candidates(None, [10], k=2, rank="random", rng=random.Random(7)) == [0]
    with pytest.raises(ValueError):
        rank_candidates([0.1], [10, 20], k=1)


# ---------------------------------------------------------------- replacement

def test_replace_in_an_all_wrong_group():
    # G=8 all wrong, two traces; random.Random(0).sample(range(8), 2) == [6, 7]
    rewards = torch.zeros(8)
    positions, new = replace_rollouts(rewards, ["t0", "t1"], random.Random(0))
    assert positions == [6, 7]
    assert new.tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    assert rewards.tolist() == [0] * 8  # input untouched
    # advantages of that group would be +0.75 / -0.25 (see test_advantages)


def test_replace_only_wrong_rollouts():
    # wrong positions {1, 2, 4}; random.Random(3).sample([1, 2, 4], 2) == [1, 4]
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 1])
    positions, new = replace_rollouts(rewards, ["a", "b"], random.Random(3), mode="always")
    assert positions == [1, 4]
    assert new.tolist() == [1, 1, 0, 1, 1, 1, 1, 1]


def test_replace_shortfall_fills_from_correct_in_always_and_hybrid_only():
    # one wrong rollout (#1) for two traces: #1 first, then a correct one.
    # random.Random(5): sample([1], 1) == [1], then sample([0, 2, 3, 4, 5, 6, 7], 1) == [6]
    rewards = torch.tensor([1.0, 0, 1, 1, 1, 1, 1, 1])
    positions, new = replace_rollouts(rewards, ["a", "b"], random.Random(5), mode="hybrid")
    assert positions == [1, 6]
    assert new.tolist() == [1.0] * 8
    with pytest.raises(ValueError):
        replace_rollouts(rewards, ["a", "b"], random.Random(5), mode="adaptive")
    with pytest.raises(ValueError):
        replace_rollouts(torch.zeros(2), ["a", "b", "c"], random.Random(0))


def test_replace_nothing_and_bool_flags():
    positions, new = replace_rollouts(torch.tensor([0.0, 1.0]), [], random.Random(0))
    assert positions == [] and new.tolist() == [0.0, 1.0]
    # bool correctness flags in, float rewards out; only slot 0 is wrong
    positions, new = replace_rollouts(torch.tensor([False, True]), ["a"], random.Random(0))
    assert positions == [0] and new.tolist() == [1.0, 1.0]
