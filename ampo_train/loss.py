"""AMPO's per-token policy loss over a mixed batch, and the reductions the trainer needs.

Shapes: B rows (responses; on-policy rollouts and injected teacher traces together), T response
positions (right-padded), V vocabulary. ``mask[B, T]`` is True on the tokens that count: a
rollout's generated tokens, a teacher row's trace tokens plus one EOS.

The pieces, composed by the trainer:

* ``token_logprobs`` turns logits into per-token log-probs at the sampled / teacher tokens;
* ``mixed_token_loss`` gives the ``[B, T]`` loss matrix: PPO clipped surrogate (with dual clip)
  on on-policy rows, shaped off-policy objective on teacher rows;
* ``aggregate`` reduces it to the scalar to backpropagate (three normalisations, see there);
* ``token_entropy`` (bonus and metric), ``kl_k3`` (optional KL penalty), ``truncated_is_weight``
  (optional correction for a rollout engine whose numbers differ from the trainer's).

Every function is pure; nothing here knows about models or optimisers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ampo_train.config import AggregationMode, LossSettings


# exp() of a log-ratio beyond this is numerically meaningless for a policy ratio and would
# overflow in half precision; verl clamps at the same bound.
_MAX_LOG_RATIO = 20.0


class TokenLoss(NamedTuple):
    """A per-token loss matrix with the flags the trainer logs as clip fractions.

    loss: ``[B, T]`` float, to be reduced with ``aggregate`` (padding positions hold values
        too; only ``aggregate``'s mask decides what counts).
    clipped: ``[B, T]`` bool, True where the PPO clip was active (the clipped term was the
        larger loss, so the token contributes no gradient). Always False on teacher tokens.
    dual_clipped: ``[B, T]`` bool, True where A < 0 and the loss was capped at ``c * |A|``.
        Always False on teacher tokens.
    """

    loss: Tensor
    clipped: Tensor
    dual_clipped: Tensor


def _per_token(advantages: Tensor, like: Tensor) -> Tensor:
    """Broadcast ``[B]`` sequence advantages to ``like``'s ``[B, T]``; advantages are constants."""
    adv = advantages.detach()
    if adv.dim() == like.dim() - 1:
        adv = adv.unsqueeze(-1)
    return adv.to(like.dtype) if like.is_floating_point() else adv


def shaping(p: Tensor, gamma: float = 0.1) -> Tensor:
    """Policy shaping f(p) = p / (p + gamma), applied to teacher-token probabilities.

    f'(p) = gamma / (p + gamma)^2, large for small p: tokens the student finds unlikely get a
    stronger push than under plain p (f' = 1), which is how AMPO (after LUFFY) learns from
    unfamiliar teacher tokens without collapsing entropy. Reference: ``p_div_p_0.1``.
    Shape: any; elementwise.
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    return p / (p + gamma)


def ppo_clip_token_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip_c: float | None = 10.0,
) -> TokenLoss:
    """PPO clipped surrogate per token, with dual clip for negative advantages.

    With r = exp(logp - old_logp):
        loss = max(-A * r, -A * clip(r, 1 - clip_low, 1 + clip_high))
    and, where A < 0, additionally ``min(loss, -A * dual_clip_c)``: without it a token whose
    ratio exploded (r >> 1 with A < 0) would contribute an unbounded loss and gradient.

    Args:
        logp: ``[B, T]`` log-probs under the current policy (carries the gradient).
        old_logp: ``[B, T]`` log-probs under the policy that sampled the rollouts (no grad).
        advantages: ``[B]`` (one per response, broadcast over tokens) or ``[B, T]``.
        clip_low, clip_high: the asymmetric clip range (AMPO: 0.2 and 0.2).
        dual_clip_c: the dual-clip constant c > 1 (AMPO: 10); None disables dual clipping.

    Returns:
        ``TokenLoss`` with ``[B, T]`` loss, clipped and dual_clipped flags.
    """
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    adv = _per_token(advantages, logp)
    ratio = torch.exp((logp - old_logp.detach()).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    unclipped = -adv * ratio
    clipped_term = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped_term)
    clipped = clipped_term > unclipped
    if dual_clip_c is None:
        dual = torch.zeros_like(clipped)
    else:
        cap = -adv * dual_clip_c
        dual = (adv < 0) & (loss > cap)
        loss = torch.where(dual, cap.expand_as(loss), loss)
    return TokenLoss(loss, clipped, dual)


def off_policy_token_loss(logp: Tensor, advantages: Tensor, gamma: float | None = 0.1) -> Tensor:
    """Loss on teacher tokens: -A * f(pi_theta(token)), no ratio and no clipping.

    The teacher's own probabilities are never used (they are not even known for cached
    traces), so there is no importance ratio to clip. ``gamma=None`` disables the shaping
    (f(p) = p, LUFFY's ``no_reshape``).

    Args:
        logp: ``[B, T]`` current log-probs of the teacher tokens.
        advantages: ``[B]`` or ``[B, T]``.
    Returns:
        ``[B, T]`` loss.
    """
    p = torch.exp(logp)
    f = p if gamma is None else shaping(p, gamma)
    return -_per_token(advantages, logp) * f


def mixed_token_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, is_teacher: Tensor,
                     settings: LossSettings = LossSettings()) -> TokenLoss:
    """One ``[B, T]`` loss matrix over a mixed batch: on-policy rows by PPO, teacher rows off-policy.

    Args:
        logp: ``[B, T]`` current log-probs.
        old_logp: ``[B, T]`` sampling-time log-probs. Ignored on teacher rows (any finite or
            non-finite value there is fine: it is replaced before use, so a NaN placeholder
            cannot leak into the gradient through ``torch.where``).
        advantages: ``[B]`` or ``[B, T]``.
        is_teacher: ``[B]`` bool, True for injected teacher rows; a ``[B, T]`` per-token mask is
            also accepted (a partially injected row, as in LUFFY's prefix mode).
        settings: ``clip_low``, ``clip_high``, ``dual_clip`` (``ppo_clip_token_loss``) and
            ``shaping_gamma`` (``off_policy_token_loss``); the reference's by default.

    Returns:
        ``TokenLoss``; the flags are False on teacher tokens.
    """
    teacher = is_teacher.to(torch.bool)
    if teacher.dim() == logp.dim() - 1:
        teacher = teacher.unsqueeze(-1)
    teacher = teacher.expand_as(logp)
    safe_old = torch.where(teacher, logp.detach(), old_logp)
    on = ppo_clip_token_loss(logp, safe_old, advantages, settings.clip_low, settings.clip_high, settings.dual_clip)
    off = off_policy_token_loss(logp, advantages, settings.shaping_gamma)
    return TokenLoss(
        torch.where(teacher, off, on.loss),
        on.clipped & ~teacher,
        on.dual_clipped & ~teacher,
    )


def aggregate(
    loss: Tensor,
    mask: Tensor,
    mode: AggregationMode = "seq_mean_token_sum_norm",
    max_response_length: int | None = None,
    num_sequences: int | None = None,
    num_tokens: int | float | Tensor | None = None,
) -> Tensor:
    """Reduce a ``[B, T]`` per-token loss to the scalar to backpropagate.

    Modes (S = sum of loss over masked tokens):
        ``seq_mean_token_sum_norm`` (AMPO default, Dr. GRPO-like): S / (L * N) with L =
            ``max_response_length`` (default: T, the padded width) and N sequences. A constant
            normaliser: every token weighs the same whatever its row's length, so a long teacher
            trace weighs more than a short rollout, as in the reference run.
        ``token_mean`` (verl's default; TRL's ``bnpo``): S / number of masked tokens.
        ``seq_mean_token_mean`` (the GRPO paper; TRL's ``grpo``): mean over the N sequences of
            each sequence's token mean (a row with no tokens contributes 0 but still counts).

    Gradient accumulation: when a mini-batch is split into micro-batches whose losses are
    summed, pass the *mini-batch* totals as ``num_sequences`` (N) and, for ``token_mean``,
    ``num_tokens``; the micro-batch results then add up exactly to the mini-batch loss.
    By default N = B and the token count is the micro-batch's own.

    Args:
        loss: ``[B, T]``. mask: ``[B, T]`` bool or 0/1. Non-finite loss values at masked-out
            positions are ignored (selected away, not multiplied by 0).
    Returns:
        0-dim tensor.
    """
    keep = mask.to(torch.bool)
    masked = torch.where(keep, loss, torch.zeros_like(loss))
    n_seq = loss.shape[0] if num_sequences is None else num_sequences
    if mode == "seq_mean_token_sum_norm":
        length = loss.shape[-1] if max_response_length is None else max_response_length
        return masked.sum() / (length * max(n_seq, 1))
    if mode == "token_mean":
        count = keep.sum() if num_tokens is None else torch.as_tensor(num_tokens)
        return masked.sum() / count.clamp(min=1).to(masked.dtype)
    if mode == "seq_mean_token_mean":
        per_seq = masked.sum(dim=-1) / keep.sum(dim=-1).clamp(min=1).to(masked.dtype)
        return per_seq.sum() / max(n_seq, 1)
    raise ValueError(f"unknown aggregation mode {mode!r}")


def token_logprobs(logits: Tensor, token_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """log_softmax(logits / temperature) at ``token_ids``.

    The temperature must be the one the rollouts were sampled with, so that the ratio compares
    the same distribution that generated the tokens. Computed in float32 as
    ``z[id] - logsumexp(z)``, which never materialises the full log-softmax.

    Args:
        logits: ``[..., V]`` (e.g. ``[B, T, V]``, already aligned so that position t predicts
            ``token_ids[..., t]``).
        token_ids: ``[...]`` long.
    Returns:
        ``[...]`` float32 log-probs.
    """
    z = logits.float()
    if temperature != 1.0:  # at 1 no [..., V] copy (the largest tensor of the loss)
        z = z / temperature
    picked = z.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)


def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / temperature) per position: ``[..., V]`` -> ``[...]`` (float32).

    H = sum softmax(z) * (logsumexp(z) - z): no log(0) on zero-probability entries, and a sum of
    non-negative terms (``lse - sum p * z`` would subtract two numbers of the logits' size; see
    ``lm_head._logit_stats``).
    """
    z = logits.float() / temperature
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    return (torch.softmax(z, dim=-1) * (lse - z)).sum(dim=-1)


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 ("low_var_kl") estimate of KL(pi_theta || pi_ref) from sampled tokens.

    k3 = exp(d) - d - 1 with d = ref_logp - logp: unbiased, always >= 0, and lower variance than
    -d. The log-ratio is clamped to +-20 and the result to at most 10 (as verl does), so a
    single token that drifted far cannot dominate the penalty. Off by default in AMPO.
    Shape: elementwise, e.g. ``[B, T]``.
    """
    d = (ref_logp - logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return (torch.exp(d) - d - 1.0).clamp(max=10.0)


def truncated_is_weight(old_logp: Tensor, engine_logp: Tensor, cap: float = 2.0) -> Tensor:
    """Truncated importance weight min(pi_old / pi_engine, cap) per rollout token (no gradient).

    The rollout engine (vLLM, often in bf16 with other kernels) samples from a distribution that
    differs slightly from the trainer's ``pi_old`` at the same weights; weighting each rollout
    token's loss by this ratio corrects the estimate, and the cap bounds the variance a token the
    engine found unlikely could add (verl's and OpenRLHF's "tis"). Shape: elementwise.
    """
    log_ratio = (old_logp.detach() - engine_logp.detach()).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.exp(log_ratio).clamp(max=cap)
