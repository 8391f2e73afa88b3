import random

import pytest
import torch

from ampo_cache.lookup import CachedTrace
from ampo_train.config import GuidanceSettings
from ampo_train.guidance import (
    NOT_GUIDED,
    TRIGGERS,
    Trigger,
    can_replace_correct,
    candidate_traces,
    rank_candidates,
    register_trigger,
    replacement_slots,
    trigger_rule,
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


# ---------------------------------------------------------------- which prompts, how many

CORRECT = [
    [False] * 4,  # all wrong
    [True, False, False, False],  # one right
    [False] * 4,  # all wrong
    [True] * 4,  # all right
]


def decide(mode, correct=CORRECT, rng=None, **settings):
    cfg = GuidanceSettings(mode=mode, **settings)
    return [trigger_rule(mode).decide(c, cfg, rng or random.Random(0)) for c in correct]


def test_adaptive_always_off():
    # adaptive: success rate < 1/G  <=>  no correct rollout -> prompts 0 and 2, k traces each
    assert decide("adaptive", k=2) == [Trigger("all_wrong", 2), NOT_GUIDED, Trigger("all_wrong", 2), NOT_GUIDED]
    assert decide("all_wrong", k=2) == decide("adaptive", k=2)  # the rule's own name
    assert [t.reason for t in decide("always")] == ["all_wrong", "always", "all_wrong", "always"]
    assert decide("off") == [NOT_GUIDED] * 4


def test_hybrid_draws_once_per_non_failed_prompt():
    # prompts 1 and 3 have correct rollouts; draws 0.1 (< 0.3: guided) and 0.5 (>= 0.3: not).
    rng = ScriptedRng([0.1, 0.5])
    assert [t.reason for t in decide("hybrid", rng=rng, hybrid_fraction=0.3)] == ["all_wrong", "hybrid", "all_wrong",
                                                                                   None]
    assert rng.values == []  # exactly two draws: failed prompts consume none
    # fraction 0 -> only the failed ones; fraction 1 -> all
    assert [t.guided for t in decide("hybrid", hybrid_fraction=0.0)] == [True, False, True, False]
    assert [t.guided for t in decide("hybrid", hybrid_fraction=1.0)] == [True, True, True, True]


GROUPS_OF_8 = [[True] * c + [False] * (8 - c) for c in range(9)]  # 0..8 correct of 8


def test_pass_threshold_guides_below_pass_num_of_g_with_k_traces():
    # pass_num 4 of 8 (the reference's run script): 0..3 correct are guided, 4..8 are not; k stays k
    got = decide("pass_threshold", GROUPS_OF_8, k=2, pass_num=4)
    assert [t.k for t in got] == [2, 2, 2, 2, 0, 0, 0, 0, 0]
    assert [t.reason for t in got[:4]] == ["all_wrong", "below_threshold", "below_threshold", "below_threshold"]
    # pass_num 1 is the paper's rule: only the all-wrong group
    assert [t.guided for t in decide("pass_threshold", GROUPS_OF_8, pass_num=1)] == [True] + [False] * 8


def test_adaptive_k_aims_at_half_right_half_wrong():
    # G = 8: below a success rate of 0.5, int(8 x 0.5 - correct) traces: 0 -> 4, 1 -> 3, 2 -> 2, 3 -> 1
    got = decide("adaptive_k", GROUPS_OF_8, k=2)  # guidance.k is not read
    assert [t.k for t in got] == [4, 3, 2, 1, 0, 0, 0, 0, 0]
    assert [t.guided for t in got] == [True, True, True, True, False, False, False, False, False]
    assert got[0].reason == "all_wrong" and got[3].reason == "below_threshold"
    # odd G = 5: 2 correct is below half, but int(2.5 - 2) = 0 traces: not guided
    five = [[True] * c + [False] * (5 - c) for c in range(6)]
    assert [t.k for t in decide("adaptive_k", five)] == [2, 1, 0, 0, 0, 0]


def test_replacing_correct_rollouts_is_the_rule_s_default_or_the_setting():
    assert not can_replace_correct(GuidanceSettings(mode="adaptive"))
    assert not can_replace_correct(GuidanceSettings(mode="adaptive_k"))
    assert can_replace_correct(GuidanceSettings(mode="always"))
    assert not can_replace_correct(GuidanceSettings(mode="always", replace="wrong_only"))


def test_a_new_rule_is_one_function_and_one_name():
    @register_trigger("first_half", wrong_only=True, guides_solved=True)
    def first_half(correct, settings, rng):
        return Trigger("below_threshold", 1) if sum(correct) * 2 < len(correct) else NOT_GUIDED

    try:
        assert GuidanceSettings(mode="first_half").mode == "first_half"  # the config accepts it by name
        assert [t.guided for t in decide("first_half", GROUPS_OF_8[:6])] == [True] * 4 + [False] * 2
    finally:
        del TRIGGERS["first_half"]
    with pytest.raises(ValueError, match="unknown guidance mode 'first_half'"):
        GuidanceSettings(mode="first_half")


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
    assert replacement_slots([False] * 8, 2, random.Random(0)) == [6, 7]


def test_replace_only_wrong_rollouts():
    # wrong positions {1, 2, 4}; random.Random(3).sample([1, 2, 4], 2) == [1, 4]
    correct = [True, False, False, True, False, True, True, True]
    assert replacement_slots(correct, 2, random.Random(3)) == [1, 4]


def test_replace_shortfall_fills_from_correct_only_when_allowed():
    # one wrong rollout (#1) for two traces: #1 first, then a correct one.
    # random.Random(5): sample([1], 1) == [1], then sample([0, 2, 3, 4, 5, 6, 7], 1) == [6]
    correct = [True, False, True, True, True, True, True, True]
    assert replacement_slots(correct, 2, random.Random(5), replace_correct=True) == [1, 6]
    with pytest.raises(ValueError):
        replacement_slots(correct, 2, random.Random(5))
    with pytest.raises(ValueError):
        replacement_slots([False] * 2, 3, random.Random(0), replace_correct=True)
    assert replacement_slots([False, True], 0, random.Random(0)) == []


def test_impossible_rule_settings_are_one_line():
    from ampo_common.errors import InputError
    from ampo_train.config import load_train_config
    from tests.trainer_fixtures import base_config, write_config

    with pytest.raises(ValueError, match="unknown guidance rank 'best'"):
        GuidanceSettings(rank="best")
    import tempfile
    from pathlib import Path

    from tests.trainer_fixtures import make_world

    root = Path(tempfile.mkdtemp())
    world = make_world(root / "world", num_prompts=2, covered=0.5)
    path = write_config(root / "train.yaml", base_config(world, root / "out"))  # group_size 4
    with pytest.raises(InputError, match=r"guidance.pass_num \(5\) cannot exceed group_size \(4\)"):
        load_train_config(path, ["guidance.mode=pass_threshold", "guidance.pass_num=5"])
    with pytest.raises(InputError, match="replaces wrong rollouts only .* remove guidance.replace"):
        load_train_config(path, ["guidance.mode=adaptive_k", "guidance.replace=wrong_first"])
    cfg = load_train_config(path, ["guidance.mode=adaptive_k", "guidance.replace=wrong_only"])
    assert cfg.guidance.mode == "adaptive_k"
    assert load_train_config(path, ["guidance.mode=adaptive", "guidance.replace=wrong_first"]).guidance.replace \
        == "wrong_first"  # harmless there: an all-wrong group has no correct rollout to replace
