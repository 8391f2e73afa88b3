import math

import pytest
import torch
from torch.testing import assert_close

from ampo_train.loss import (
    aggregate,
    kl_k3,
    mixed_token_loss,
    off_policy_token_loss,
    ppo_clip_token_loss,
    shaping,
    token_entropy,
    token_logprobs,
    truncated_is_weight,
)


# ---------------------------------------------------------------- shaping

def test_shaping_value_and_gradient_by_hand():
    # gamma = 0.1
    # p = 0.4: f = 0.4 / 0.5 = 0.8;  f' = 0.1 / 0.5^2 = 0.4
    # p = 0.1: f = 0.1 / 0.2 = 0.5;  f' = 0.1 / 0.2^2 = 2.5   (low-probability token: 6x the push)
    # p = 0.9: f = 0.9 / 1.0 = 0.9;  f' = 0.1 / 1.0^2 = 0.1
    p = torch.tensor([0.4, 0.1, 0.9], dtype=torch.float64, requires_grad=True)
    f = shaping(p, gamma=0.1)
    assert_close(f.detach(), torch.tensor([0.8, 0.5, 0.9], dtype=torch.float64))
    f.sum().backward()
    assert_close(p.grad, torch.tensor([0.4, 2.5, 0.1], dtype=torch.float64))


def test_shaping_rejects_non_positive_gamma():
    with pytest.raises(ValueError):
        shaping(torch.tensor([0.5]), gamma=0.0)


# ---------------------------------------------------------------- PPO clip

def _logp_for_ratio(ratios):
    # old_logp = 0, so r = exp(logp) and logp = log(r)
    return torch.log(torch.tensor(ratios, dtype=torch.float64)).requires_grad_(True)


def test_ppo_clip_cases_by_hand():
    # eps_low = eps_high = 0.2 -> clip range [0.8, 1.2]; c = 10.
    # case  A     r     -A*r    -A*clip(r)   max     dual cap (-A*c)  loss   clipped dual  d loss/d logp
    #  0   +1    1.1    -1.1     -1.1        -1.1    -               -1.1   no      no    -A*r = -1.1
    #  1   +1    1.5    -1.5     -1.2        -1.2    -               -1.2   yes     no    0
    #  2   -1    0.5     0.5      0.8         0.8    10               0.8   yes     no    0
    #  3   -1   20.0    20.0      1.2        20.0    10              10.0   no      yes   0
    #  4   +2    0.5    -1.0     -1.6        -1.0    -               -1.0   no      no    -A*r = -1.0
    #  5  -0.5   1.5     0.75     0.6         0.75   5                0.75  no      no    -A*r = 0.75
    #  6   -1    8.0     8.0      1.2         8.0    10               8.0   no      no    -A*r = 8.0
    #  7    0    3.0     0        0           0      0                0     no      no    0
    ratios = [1.1, 1.5, 0.5, 20.0, 0.5, 1.5, 8.0, 3.0]
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0, -0.5, -1.0, 0.0], dtype=torch.float64)
    logp = _logp_for_ratio(ratios)
    out = ppo_clip_token_loss(logp, torch.zeros_like(logp), adv)
    assert_close(out.loss.detach(), torch.tensor([-1.1, -1.2, 0.8, 10.0, -1.0, 0.75, 8.0, 0.0], dtype=torch.float64))
    assert out.clipped.tolist() == [False, True, True, False, False, False, False, False]
    assert out.dual_clipped.tolist() == [False, False, False, True, False, False, False, False]
    out.loss.sum().backward()
    # d(-A r)/d logp = -A r (since dr/dlogp = r); clipped/capped tokens have zero gradient
    assert_close(logp.grad, torch.tensor([-1.1, 0.0, 0.0, 0.0, -1.0, 0.75, 8.0, 0.0], dtype=torch.float64))


def test_ppo_without_dual_clip_and_asymmetric_range():
    # No dual clip: A=-1, r=20 -> max(20, 1.2) = 20 (uncapped).
    # clip_high 0.28 (DAPO-style): A=+1, r=1.25 lies inside [0.8, 1.28] -> -1.25, not clipped;
    # with the symmetric 0.2 it would have been clipped to -1.2.
    logp = _logp_for_ratio([20.0, 1.25])
    adv = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    out = ppo_clip_token_loss(logp, torch.zeros_like(logp), adv, clip_high=0.28, dual_clip_c=None)
    assert_close(out.loss.detach(), torch.tensor([20.0, -1.25], dtype=torch.float64))
    assert out.clipped.tolist() == [False, False]
    assert out.dual_clipped.tolist() == [False, False]


def test_ppo_sequence_advantages_broadcast_and_extreme_log_ratio_is_finite():
    # [B=2] advantages over [B, T=2] tokens; ratio 1 everywhere -> loss = -A per token.
    logp = torch.zeros(2, 2)
    out = ppo_clip_token_loss(logp, torch.zeros(2, 2), torch.tensor([0.75, -0.25]))
    assert_close(out.loss, torch.tensor([[-0.75, -0.75], [0.25, 0.25]]))
    # log-ratio 1000 would overflow exp; it is clamped at 20, the clip then gives -1.2 * A.
    out = ppo_clip_token_loss(torch.tensor([[1000.0]]), torch.tensor([[0.0]]), torch.tensor([1.0]))
    assert_close(out.loss, torch.tensor([[-1.2]]))


def test_dual_clip_c_must_exceed_one():
    with pytest.raises(ValueError):
        ppo_clip_token_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1), dual_clip_c=1.0)


# ---------------------------------------------------------------- off-policy

def test_off_policy_loss_value_and_gradient():
    # A = 0.75; p = 0.4 -> -0.75 * 0.8 = -0.6;  p = 0.1 -> -0.75 * 0.5 = -0.375
    # d/dlogp [-A f(exp(logp))] = -A f'(p) p:
    #   p = 0.4: -0.75 * 0.4 * 0.4 = -0.12;   p = 0.1: -0.75 * 2.5 * 0.1 = -0.1875
    logp = torch.log(torch.tensor([[0.4, 0.1]], dtype=torch.float64)).requires_grad_(True)
    loss = off_policy_token_loss(logp, torch.tensor([0.75], dtype=torch.float64))
    assert_close(loss.detach(), torch.tensor([[-0.6, -0.375]], dtype=torch.float64))
    loss.sum().backward()
    assert_close(logp.grad, torch.tensor([[-0.12, -0.1875]], dtype=torch.float64))


def test_off_policy_without_shaping_is_minus_a_p():
    # gamma=None: -A * p = -0.75 * 0.4 = -0.3
    logp = torch.log(torch.tensor([[0.4]]))
    assert_close(off_policy_token_loss(logp, torch.tensor([0.75]), gamma=None), torch.tensor([[-0.3]]))


# ---------------------------------------------------------------- mixed rows

def test_mixed_token_loss_picks_formula_per_row_and_ignores_teacher_old_logp():
    # row 0: on-policy, A = +1, ratios [1.1, 1.5] -> [-1.1, -1.2 (clipped)]
    # row 1: teacher,   A = 0.75, p [0.4, 0.1] -> [-0.6, -0.375]; its old_logp is NaN (unknown)
    logp = torch.log(torch.tensor([[1.1, 1.5], [0.4, 0.1]], dtype=torch.float64)).requires_grad_(True)
    old = torch.tensor([[0.0, 0.0], [float("nan"), float("nan")]], dtype=torch.float64)
    out = mixed_token_loss(logp, old, torch.tensor([1.0, 0.75], dtype=torch.float64), torch.tensor([False, True]))
    assert_close(out.loss.detach(), torch.tensor([[-1.1, -1.2], [-0.6, -0.375]], dtype=torch.float64))
    assert out.clipped.tolist() == [[False, True], [False, False]]
    assert out.dual_clipped.tolist() == [[False, False], [False, False]]
    out.loss.sum().backward()
    # row 0: [-A r, 0] = [-1.1, 0]; row 1: -A f'(p) p = [-0.12, -0.1875]; no NaN from the old_logp
    assert_close(logp.grad, torch.tensor([[-1.1, 0.0], [-0.12, -0.1875]], dtype=torch.float64))


def test_mixed_token_loss_teacher_row_never_flagged_even_when_ratio_would_clip():
    # Teacher row with old_logp far from logp: an on-policy formula would clip, the teacher row
    # must not: loss = -A f(p) = -1 * 0.5 = -0.5 at p = 0.1.
    logp = torch.log(torch.tensor([[0.1]]))
    out = mixed_token_loss(logp, torch.tensor([[-10.0]]), torch.tensor([1.0]), torch.tensor([True]))
    assert_close(out.loss, torch.tensor([[-0.5]]))
    assert not out.clipped.any() and not out.dual_clipped.any()


# ---------------------------------------------------------------- aggregation

def _three_rows():
    # row 0: 2 tokens [1, 2]; row 1 (teacher): 4 tokens [3, 4, 5, 6]; row 2: 1 token [7].
    # Padding holds junk (100, NaN) that must not count.
    nan = float("nan")
    loss = torch.tensor([[1.0, 2, 100, nan], [3, 4, 5, 6], [7, 100, 100, 100]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    return loss, mask


def test_aggregate_modes_by_hand():
    loss, mask = _three_rows()
    # S = 1+2+3+4+5+6+7 = 28 over 7 tokens, 3 sequences, padded width T = 4
    # seq_mean_token_sum_norm: 28 / (4 * 3) = 2.3333;  with max_response_length 8: 28 / 24
    assert aggregate(loss, mask, "seq_mean_token_sum_norm").item() == pytest.approx(28 / 12)
    assert aggregate(loss, mask, "seq_mean_token_sum_norm", max_response_length=8).item() == pytest.approx(28 / 24)
    # token_mean: 28 / 7 = 4
    assert aggregate(loss, mask, "token_mean").item() == pytest.approx(4.0)
    # seq_mean_token_mean: (1.5 + 4.5 + 7) / 3 = 13 / 3
    assert aggregate(loss, mask, "seq_mean_token_mean").item() == pytest.approx(13 / 3)


def test_aggregate_micro_batches_sum_to_the_mini_batch_with_totals():
    loss, mask = _three_rows()
    a, b = (loss[:2], mask[:2]), (loss[2:], mask[2:])
    # seq_mean_token_sum_norm, N = 3: (1+2+3+4+5+6)/12 + 7/12 = 21/12 + 7/12 = 28/12
    total = aggregate(*a, "seq_mean_token_sum_norm", num_sequences=3) + aggregate(*b, "seq_mean_token_sum_norm", num_sequences=3)
    assert total.item() == pytest.approx(28 / 12)
    # token_mean with 7 tokens overall: 21/7 + 7/7 = 3 + 1 = 4
    total = aggregate(*a, "token_mean", num_tokens=7) + aggregate(*b, "token_mean", num_tokens=7)
    assert total.item() == pytest.approx(4.0)
    # seq_mean_token_mean, N = 3: (1.5 + 4.5)/3 + 7/3 = 13/3
    total = aggregate(*a, "seq_mean_token_mean", num_sequences=3) + aggregate(*b, "seq_mean_token_mean", num_sequences=3)
    assert total.item() == pytest.approx(13 / 3)


def test_aggregate_empty_row_and_unknown_mode():
    # One row with no tokens: counts as a sequence with mean 0.
    loss = torch.tensor([[2.0, 4.0], [9.0, 9.0]])
    mask = torch.tensor([[1, 1], [0, 0]], dtype=torch.bool)
    # seq_mean_token_mean: (3 + 0) / 2 = 1.5; token_mean: 6 / 2 = 3; sum_norm: 6 / (2 * 2) = 1.5
    assert aggregate(loss, mask, "seq_mean_token_mean").item() == pytest.approx(1.5)
    assert aggregate(loss, mask, "token_mean").item() == pytest.approx(3.0)
    assert aggregate(loss, mask, "seq_mean_token_sum_norm").item() == pytest.approx(1.5)
    assert aggregate(loss, torch.zeros_like(mask), "token_mean").item() == 0.0
    with pytest.raises(ValueError):
        aggregate(loss, mask, "sum")


def test_mixed_group_end_to_end_each_mode():
    # A guided group of 3: row 0 wrong rollout (2 tokens), row 1 teacher trace (3 tokens),
    # row 2 wrong rollout (1 token). Rewards [0, 1, 0]: mean 1/3 -> A = [-1/3, 2/3, -1/3].
    # On-policy ratio 1 -> loss = -A = +1/3 per token.
    # Teacher p = [0.4, 0.1, 0.9] -> f = [0.8, 0.5, 0.9] -> loss = -(2/3) f.
    # S = 3 * (1/3) - (2/3)(0.8 + 0.5 + 0.9) = 1 - 4.4/3 = -7/15 over 6 tokens, T = 4, N = 3.
    #   seq_mean_token_sum_norm = (-7/15) / 12 = -7/180
    #   token_mean              = (-7/15) / 6  = -7/90
    #   seq_mean_token_mean     = (1/3 + (-(2/3)(2.2)/3) + 1/3) / 3 = (2/3 - 22/45) / 3 = (8/45)/3 = 8/135
    # (the per-sequence mode even flips the sign: the long teacher row weighs like one short row)
    probs = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.4, 0.1, 0.9, 1.0], [0.5, 1.0, 1.0, 1.0]], dtype=torch.float64)
    logp = torch.log(probs)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([-1 / 3, 2 / 3, -1 / 3], dtype=torch.float64)
    out = mixed_token_loss(logp, logp.clone(), adv, torch.tensor([False, True, False]))
    assert aggregate(out.loss, mask, "seq_mean_token_sum_norm").item() == pytest.approx(-7 / 180)
    assert aggregate(out.loss, mask, "token_mean").item() == pytest.approx(-7 / 90)
    assert aggregate(out.loss, mask, "seq_mean_token_mean").item() == pytest.approx(8 / 135)


# ---------------------------------------------------------------- helpers

def test_token_logprobs_on_a_three_token_vocabulary():
    # logits [1, 2, 3]: logsumexp = 3 + ln(1 + e^-1 + e^-2) = 3 + ln(1.5032147) = 3.4076060
    #   log p(0) = 1 - 3.4076060 = -2.4076060;  log p(2) = 3 - 3.4076060 = -0.4076060
    # temperature 2 -> [0.5, 1, 1.5]: logsumexp = 1.5 + ln(1 + e^-0.5 + e^-1) = 1.5 + ln(1.9744101)
    #   = 2.1802697;  log p(1) = 1 - 2.1802697 = -1.1802697
    logits = torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]])
    ids = torch.tensor([[0, 2]])
    assert_close(token_logprobs(logits, ids), torch.tensor([[-2.4076060, -0.4076060]]))
    assert token_logprobs(logits[:, :1], torch.tensor([[1]]), temperature=2.0).item() == pytest.approx(-1.1802697, abs=1e-6)
    # half-precision logits are scored in float32
    assert token_logprobs(logits.bfloat16(), ids).dtype == torch.float32


def test_entropy_by_hand():
    # uniform over 3: H = ln 3 = 1.0986123
    # probs [0.25, 0.25, 0.5] (logits [0, 0, ln 2]): H = 2 * 0.25 ln 4 + 0.5 ln 2 = 1.5 ln 2 = 1.0397208
    # masked token mean of those two (third position masked out): (ln 3 + 1.5 ln 2) / 2 = 1.0691665
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, math.log(2)], [50.0, 0.0, 0.0]]])
    # a near one-hot row ([50, 0, 0]) has entropy ~ 0
    assert_close(token_entropy(logits), torch.tensor([[math.log(3), 1.5 * math.log(2), 0.0]]))
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    assert token_entropy(logits)[mask].mean().item() == pytest.approx(1.0691665, abs=1e-6)
    # temperature 2 on [0, 0, ln 4] gives [0, 0, ln 2] -> 1.5 ln 2
    t = torch.tensor([[[0.0, 0.0, math.log(4)]]])
    assert token_entropy(t, temperature=2.0).item() == pytest.approx(1.5 * math.log(2), abs=1e-6)


def test_kl_k3_by_hand():
    # p = 0.5, p_ref = 0.25: d = ln(0.25/0.5) = -ln 2; k3 = e^d - d - 1 = 0.5 + 0.6931472 - 1 = 0.1931472
    # identical policies: 0; a huge drift is capped at 10
    logp = torch.log(torch.tensor([0.5, 0.3, 1e-30]))
    ref = torch.log(torch.tensor([0.25, 0.3, 1.0]))
    assert_close(kl_k3(logp, ref), torch.tensor([0.1931472, 0.0, 10.0]))


def test_truncated_is_weight_by_hand():
    # old - engine = ln 0.5, 0, ln 3, ln 100  ->  0.5, 1, min(3, 2) = 2, min(100, 2) = 2
    old = torch.zeros(4)
    engine = -torch.log(torch.tensor([0.5, 1.0, 3.0, 100.0]))
    assert_close(truncated_is_weight(old, engine, cap=2.0), torch.tensor([0.5, 1.0, 2.0, 2.0]))
    assert not truncated_is_weight(old.requires_grad_(), engine).requires_grad  # a constant weight
