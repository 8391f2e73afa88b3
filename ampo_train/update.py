"""A step's gradient: old log-probs before the first update, then per mini-batch the mixed loss
accumulated over micro-batches.

    prepare_rows(policy, rows, cfg, stats)      # row.old_logp / row.ref_logp when the step needs them
    for mini in mini-batches:
        minibatch_backward(policy, mini, cfg, stats, accelerator.backward, no_sync)
        ... clip, optimizer.step()               (the loop in trainer.py)

Each micro-batch's loss is normalised by its mini-batch's totals, so the accumulated gradient is
the whole mini-batch's, for every aggregation mode (``ampo_train.loss.aggregate``).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import Tensor

from ampo_train.config import TrainConfig
from ampo_train.data import Row, RowBatch, collate
from ampo_train.loss import aggregate, kl_k3, mixed_token_loss, token_entropy, token_logprobs, truncated_is_weight
from ampo_train.metrics import StepStats


def micro_batches(rows: Sequence[Row], size: int) -> list[list[Row]]:
    return [list(rows[i:i + size]) for i in range(0, len(rows), size)]


def record_logprob_diff(stats: StepStats, trainer_logp: Tensor, engine_logp: Tensor, mask: Tensor) -> None:
    """``rollout/logprob_diff`` (mean |engine - trainer| over the rollout tokens) and its max: the
    number that shows an engine sampling with weights other than the trainer's (a sync that
    silently stopped) or with different numerics."""
    diff = (engine_logp - trainer_logp).abs()[mask]
    if diff.numel():
        stats.mean("rollout/logprob_diff", float(diff.sum()), diff.numel())
        stats.maximum("rollout/logprob_diff_max", float(diff.max()))


@torch.no_grad()
def prepare_rows(policy, rows: Sequence[Row], cfg: TrainConfig, stats: StepStats) -> None:
    """Sampling-time log-probs (``row.old_logp``) and, for KL, the reference's (``row.ref_logp``).

    Computed once per step before the first update, so every mini-batch and PPO epoch measures its
    ratio against the policy that sampled. With one update per step they are not computed: the
    update's own forward, detached, is exactly that policy (lockstep), and the engine comparison
    is made there.
    """
    if cfg.updates_per_step > 1:
        for row, logp in zip(rows, policy.logprobs(rows, cfg.micro_batch_size)):
            row.old_logp = logp
            if not row.is_teacher and row.engine_logp is not None:
                mask = torch.ones_like(logp, dtype=torch.bool)
                record_logprob_diff(stats, logp, row.engine_logp, mask)
    if cfg.loss.kl_coef:
        for row, logp in zip(rows, policy.logprobs(rows, cfg.micro_batch_size, reference=True)):
            row.ref_logp = logp


def minibatch_backward(policy, mini: Sequence[Row], cfg: TrainConfig, stats: StepStats,
                       backward: Callable[[Tensor], None],
                       no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                       num_tokens: float | None = None) -> None:
    """Accumulate one mini-batch's gradient over micro-batches of ``cfg.micro_batch_size`` rows.

    Gradients are all-reduced across processes once, on the last micro-batch (``no_sync`` on the
    others). ``num_tokens``: the token_mean normaliser; None = this process's mini-batch tokens.
    """
    local_tokens = sum(len(r.response_ids) for r in mini)
    chunks = micro_batches(mini, cfg.micro_batch_size)
    for i, chunk in enumerate(chunks):
        with contextlib.nullcontext() if i == len(chunks) - 1 else no_sync():
            mb = collate(chunk, policy.pad_id).to(policy.device)
            loss = micro_loss(policy, mb, cfg, len(mini), num_tokens if num_tokens is not None else local_tokens,
                              local_tokens, stats)
            backward(loss)


def micro_loss(policy, mb: RowBatch, cfg: TrainConfig, num_sequences: int, num_tokens: float,
               local_tokens: int, stats: StepStats) -> Tensor:
    """The loss of one micro-batch, normalised so that a mini-batch's micro-batches add up to its loss.

    ``num_sequences``: sequences in this process's mini-batch; ``num_tokens``: the token_mean
    normaliser (all processes' tokens / processes, so DDP's gradient average is the global token
    mean); ``local_tokens``: this process's mini-batch tokens (entropy and KL token means).
    """
    lc = cfg.loss
    temperature = policy.temperature
    logits = policy.response_logits(mb)
    logp = token_logprobs(logits, mb.response_ids, temperature)
    mask = mb.response_mask
    rollout_tokens = mask & ~mb.is_teacher.unsqueeze(-1)
    # Lockstep (one update per step): the sampling policy is the current one, detached.
    old = mb.old_logp if mb.old_logp is not None else logp.detach()
    if mb.old_logp is None and mb.engine_logp is not None:
        record_logprob_diff(stats, old, mb.engine_logp, rollout_tokens)
    token = mixed_token_loss(logp, old, mb.advantages, mb.is_teacher, lc.clip_low, lc.clip_high, lc.dual_clip,
                             lc.shaping_gamma)
    token_loss = token.loss
    if cfg.rollout.is_correction == "tis" and mb.engine_logp is not None:
        weight = truncated_is_weight(old, mb.engine_logp, cfg.rollout.is_cap)
        token_loss = torch.where(rollout_tokens, token_loss * weight, token_loss)
        stats.mean("rollout/is_weight", float(weight[rollout_tokens].sum()), int(rollout_tokens.sum()))
    policy_loss = aggregate(token_loss, mask, lc.aggregation, max_response_length=cfg.loss_length,
                            num_sequences=num_sequences, num_tokens=num_tokens)
    loss = policy_loss
    if lc.entropy_coef:
        per_token_entropy = token_entropy(logits, temperature)
    else:  # only a metric: a few rows at a time, so no [N, R, V] temporaries beside the logits
        with torch.no_grad():
            per_token_entropy = torch.cat([token_entropy(part, temperature) for part in logits.detach().split(4)])
    entropy = torch.where(mask, per_token_entropy, 0.0).sum() / max(local_tokens, 1)
    if lc.entropy_coef:
        loss = loss - lc.entropy_coef * entropy
    if lc.kl_coef:
        kl = torch.where(mask, kl_k3(logp, mb.ref_logp), 0.0).sum() / max(local_tokens, 1)
        loss = loss + lc.kl_coef * kl
        stats.mean("kl", float(kl.detach()) * local_tokens, int(mask.sum()))

    with torch.no_grad():
        adv = mb.advantages.unsqueeze(-1).expand_as(mask)
        n_on = int(rollout_tokens.sum())
        stats.mean("clip/fraction", int((token.clipped & rollout_tokens).sum()), n_on)
        stats.mean("clip/high", int((token.clipped & rollout_tokens & (adv > 0)).sum()), n_on)
        stats.mean("clip/low", int((token.clipped & rollout_tokens & (adv < 0)).sum()), n_on)
        stats.mean("clip/dual", int((token.dual_clipped & rollout_tokens).sum()), n_on)
        stats.mean("entropy", float(entropy) * local_tokens, int(mask.sum()))
        stats.mean("loss/policy", float(policy_loss.detach()), 0.0)  # counted once per update, in the loop
        teacher_tokens = mask & mb.is_teacher.unsqueeze(-1)
        if bool(teacher_tokens.any()):
            stats.mean("teacher_token_prob", float(logp.detach().exp()[teacher_tokens].sum()), int(teacher_tokens.sum()))
    return loss
