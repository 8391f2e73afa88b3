"""Our GRPO loss equals TRL's GRPOTrainer loss on one fixed batch: value and every gradient.

Needs TRL (``pip install -e ".[bench]"``); skipped otherwise. See bench/trl_parity.py for how the
batch is built and which settings are matched.
"""

import pytest

pytest.importorskip("trl")

pytestmark = pytest.mark.trl


@pytest.fixture(scope="module")
def parity(tiny_world):
    from bench.trl_parity import CASES, check_parity

    return {r.case: r for r in check_parity(tiny_world.student, tiny_world.tokenizer, CASES)}


@pytest.mark.parametrize("case", ["grpo", "bnpo", "dr_grpo", "dapo", "dr_grpo_lockstep", "dr_grpo_entropy"])
def test_loss_and_gradients_match_trl(parity, case):
    r = parity[case]
    assert r.advantage_max_abs_diff == 0.0
    assert r.loss_diff <= 1e-6, (r.loss_trl, r.loss_ours)
    # every parameter's gradient, to float32 summation-order noise
    assert r.grad_max_abs > 1e-4  # the gradient is not trivially zero
    assert r.grad_max_abs_diff <= 1e-6 + 1e-5 * r.grad_max_abs, r.grad_max_abs_diff
    if case != "dr_grpo_lockstep":
        assert r.clipped_fraction > 0.05  # injected old log-probs: the clip is active on many tokens
    else:
        assert r.clipped_fraction == 0.0  # ratio exactly 1


def test_aggregations_differ_so_the_check_means_something(parity):
    losses = {parity[c].loss_trl for c in ("grpo", "bnpo", "dr_grpo")}
    assert len(losses) == 3
    assert parity["dapo"].loss_trl == pytest.approx(parity["bnpo"].loss_trl)  # one micro-batch: same normaliser


def test_group_std_difference_is_only_the_epsilon(parity):
    r = parity["group_std"]
    assert r.advantage_max_abs_diff > 1e-5  # TRL: std + 1e-4; our trainer: std + 1e-6
    assert r.extra["advantage_diff_with_eps_1e-4"] <= 1e-7  # group_advantages(eps=1e-4) is TRL's formula
