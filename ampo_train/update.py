"""A step's updates: old log-probs before the first update, then per mini-batch the mixed loss
accumulated over micro-batches, clipped and applied.

    prepare_rows(policy, rows, cfg, stats)          # row.old_logp / row.ref_logp when the step needs them
    norms = update_policy(policy, rows, cfg, stats, optimization)
        for each PPO epoch, each mini-batch of cfg.prompts_per_update prompts:
            minibatch_backward(policy, mini, cfg, stats, backward, no_sync, num_tokens)
            optimization.apply(policy, stats)       # clip, step (or skip a non-finite update), LR

Each micro-batch's loss is normalised by its mini-batch's totals, so the accumulated gradient is
the whole mini-batch's, for every aggregation mode (``ampo_train.loss.aggregate``), however the
rows are grouped: ``micro_batch_size`` rows in order, or packed by the token budget
``micro_batch_tokens`` (``ampo_train.batching``). Log-probs and entropy come from the chunked LM
head (``Policy.response_logprobs``): no ``[rows, tokens, vocabulary]`` logits, except under FSDP2 and
ZeRO-3, where the update's pass runs the model's own head inside its forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from accelerate import Accelerator
from torch import Tensor

from ampo_train.batching import micro_batch_groups, padded_tokens, split_to_count
from ampo_train.config import TrainConfig
from ampo_train.data import Row, RowBatch, collate, row_lengths
from ampo_train.distributed import accumulating, update_applied
from ampo_train.loss import aggregate, kl_k3, mixed_token_loss, truncated_is_weight
from ampo_train.metrics import StepStats


class TrainablePolicy(Protocol):
    """What the update needs of the student (``policy.Policy`` is one)."""

    pad_id: int

    @property
    def device(self) -> torch.device: ...

    def response_logprobs(self, mb: RowBatch, with_entropy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """With gradients: ``[N, R]`` log-probs of the response tokens (and entropies)."""
        ...

    def logprobs(self, rows: Sequence[Row], micro_batch_size: int, reference: bool = False,
                 max_tokens: int | None = None) -> list[Tensor]:
        """Without gradients: each row's response log-probs (the reference's with ``reference``)."""
        ...

    def weights_changed(self) -> None:
        """An optimizer step changed the weights (the rollout engine must be synced)."""
        ...


@dataclass
class Optimization:
    """What turns an accumulated gradient into an update: Accelerate's accelerator and wrapped
    model, the optimizer, the LR schedule (unprepared: it counts applied updates only, whatever the
    process count) and train.yaml's clipping norm."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    max_grad_norm: float | None = None

    def backward(self, loss: Tensor) -> None:
        self.accelerator.backward(loss)

    def no_sync(self):
        """Around a micro-batch's backward that is not its mini-batch's last (``distributed.accumulating``)."""
        return accumulating(self.accelerator, self.model)

    def apply(self, policy: TrainablePolicy, stats: StepStats) -> float:
        """Clip the accumulated gradient and step, unless its norm is not finite: then, as the
        reference does, the update is skipped (weights, optimizer moments and LR schedule untouched)
        and counted in ``skipped_updates``. Returns the gradient norm before clipping. (Under
        DeepSpeed its engine has already clipped and stepped, or skipped, in the last backward, and
        this reads the norm it computed: see ``ampo_train/zero.py``.)"""
        accelerator, optimizer = self.accelerator, self.optimizer
        grad_norm = float(accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm or float("inf")))
        stats.mean("lr", self.scheduler.get_last_lr()[0])
        if getattr(accelerator, "scaler", None) is not None:
            # fp16 loss scaling (a GradScaler): the scaler must see every update. Its step skips an
            # overflowing one by itself and lowers the scale; had we skipped the call, the next
            # update would fail ("unscale_() has already been called") and the scale never back off.
            optimizer.step()
            applied = not optimizer.step_was_skipped
        else:
            applied = update_applied(accelerator, grad_norm)
            if applied:
                optimizer.step()  # DeepSpeed: a no-op (its engine stepped)
        if applied:
            stats.mean("grad_norm", grad_norm)
            self.scheduler.step()
            policy.weights_changed()
        else:
            stats.total("skipped_updates", 1)
        optimizer.zero_grad(set_to_none=True)
        return grad_norm


def update_policy(policy: TrainablePolicy, rows: Sequence[Row], cfg: TrainConfig, stats: StepStats,
                  optimization: Optimization) -> list[float]:
    """The step's optimizer updates: for each PPO epoch, each mini-batch of
    ``cfg.prompts_per_update`` prompts (this process's share of them, G rows each) is accumulated
    over micro-batches and applied. Returns the gradient norm of every update (a non-finite one was
    skipped)."""
    accelerator = optimization.accelerator
    world, group = accelerator.num_processes, cfg.group_size
    local_prompts = cfg.prompts_per_update // world
    stats.total("skipped_updates", 0)
    norms = []
    for _ in range(cfg.ppo_epochs):
        for first in range(0, len(rows) // group, local_prompts):
            mini = rows[first * group:(first + local_prompts) * group]
            num_tokens = None
            if world > 1:  # token means are global: every process divides by the mean share of tokens
                local = torch.tensor([sum(len(r.response_ids) for r in mini)], device=accelerator.device)
                num_tokens = float(accelerator.reduce(local, "sum").item()) / world
            minibatch_backward(policy, mini, cfg, stats, optimization, num_tokens)
            stats.mean("loss/policy", 0.0, 1.0)
            norms.append(optimization.apply(policy, stats))
    return norms


def micro_batches(rows: Sequence[Row], cfg: TrainConfig) -> list[list[int]]:
    """Row indices per micro-batch: ``cfg.micro_batch_tokens`` packing, else ``micro_batch_size`` rows."""
    return micro_batch_groups(row_lengths(rows), cfg.micro_batch_size, cfg.micro_batch_tokens)


def agreed_count(count: int, device: torch.device, op: str = "max") -> int:
    """The largest (``op="min"``: smallest) ``count`` over all processes (an all-reduce; ``count``
    itself in one process).

    FSDP and ZeRO-3 gather parameters in every forward, collectives that wait for all ranks, so
    every process must run the same number of forward/backward calls per mini-batch. (Plain DDP
    with ``no_sync`` happens to tolerate unequal counts: one all-reduce per rank either way.)
    Row-count micro-batches give every rank the same count; token-budget packing need not (verl
    agrees on a count the same way).
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return count
    value = torch.tensor([count], dtype=torch.long, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
    return int(value.item())


def offloaded(enabled: bool):
    """``torch.autograd.graph.save_on_cpu``: tensors saved for backward wait in (pinned) CPU
    memory. A GPU-memory saving only; on a CPU it changes nothing (tensors stay where they are)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())


def record_logprob_diff(stats: StepStats, trainer_logp: Tensor, engine_logp: Tensor, mask: Tensor) -> None:
    """``rollout/logprob_diff`` (mean |engine - trainer| over the rollout tokens) and its max: the
    number that shows an engine sampling with weights other than the trainer's (a sync that
    silently stopped) or with different numerics."""
    diff = (engine_logp - trainer_logp).abs()[mask]
    if diff.numel():
        stats.mean("rollout/logprob_diff", float(diff.sum()), diff.numel())
        stats.maximum("rollout/logprob_diff_max", float(diff.max()))


@torch.no_grad()
def prepare_rows(policy: TrainablePolicy, rows: Sequence[Row], cfg: TrainConfig, stats: StepStats) -> None:
    """Sampling-time log-probs (``row.old_logp``) and, for KL, the reference's (``row.ref_logp``).

    Computed once per step before the first update, so every mini-batch and PPO epoch measures its
    ratio against the policy that sampled. With one update per step they are not computed: the
    update's own forward, detached, is exactly that policy (lockstep), and the engine comparison
    is made there.
    """
    if cfg.updates_per_step > 1:
        for row, logp in zip(rows, policy.logprobs(rows, cfg.micro_batch_size, max_tokens=cfg.micro_batch_tokens)):
            row.old_logp = logp
            if not row.is_teacher and row.engine_logp is not None:
                mask = torch.arange(len(logp)) >= row.prefix_len  # the tokens the engine sampled
                record_logprob_diff(stats, logp, row.engine_logp, mask)
    if cfg.loss.kl_coef:
        for row, logp in zip(rows, policy.logprobs(rows, cfg.micro_batch_size, reference=True,
                                                   max_tokens=cfg.micro_batch_tokens)):
            row.ref_logp = logp


class Backward(Protocol):
    """How a micro-batch's loss is backpropagated (``Optimization``; a test passes ``PlainBackward``)."""

    def backward(self, loss: Tensor) -> None: ...

    def no_sync(self) -> contextlib.AbstractContextManager: ...


class PlainBackward:
    """``loss.backward()`` in one process: no accumulation context needed."""

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def no_sync(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def minibatch_backward(policy: TrainablePolicy, mini: Sequence[Row], cfg: TrainConfig, stats: StepStats,
                       backward: Backward = PlainBackward(), num_tokens: float | None = None) -> None:
    """Accumulate one mini-batch's gradient over micro-batches (``micro_batches``).

    Gradients are all-reduced across processes once, on the last micro-batch (``backward.no_sync``
    on the others). ``num_tokens``: the normaliser of every token mean (token_mean aggregation, the
    entropy bonus, KL): all processes' mini-batch tokens / processes, so that DDP's gradient average
    is the token mean over the whole mini-batch, as one process holding every row would compute it;
    None = this process's mini-batch tokens (one process).
    Under several processes the ranks first agree on one micro-batch count (``agreed_count``), and
    a rank with fewer splits its largest micro-batches (``batching.split_to_count``): every rank
    holds the same number of rows, so that count is always reachable.

    Statistics: ``update/micro_batches`` (forward/backward calls), ``update/split`` (calls added to
    match another rank's count), ``update/padding`` (share of the padded input that is padding).
    """
    local_tokens = sum(len(r.response_ids) for r in mini)
    lengths = row_lengths(mini)
    groups = micro_batches(mini, cfg)
    count = agreed_count(len(groups), policy.device)
    if count > len(groups):
        stats.total("update/split", count - len(groups))
        groups = split_to_count(lengths, groups, count)
        if len(groups) != count:
            raise RuntimeError(f"{len(mini)} rows cannot make the {count} micro-batches another process runs")
    stats.total("update/micro_batches", len(groups))
    padded = sum(padded_tokens(lengths, g) for g in groups)
    stats.mean("update/padding", padded - sum(p + r for p, r in lengths), padded)
    normaliser = num_tokens if num_tokens is not None else local_tokens
    for i, group in enumerate(groups):
        with contextlib.nullcontext() if i == len(groups) - 1 else backward.no_sync():
            mb = collate([mini[j] for j in group], policy.pad_id).to(policy.device)
            with offloaded(cfg.activation_offload):
                loss = micro_loss(policy, mb, cfg, len(mini), normaliser, stats)
            backward.backward(loss)


def micro_loss(policy: TrainablePolicy, mb: RowBatch, cfg: TrainConfig, num_sequences: int, num_tokens: float,
               stats: StepStats) -> Tensor:
    """The loss of one micro-batch, normalised so that a mini-batch's micro-batches add up to its loss.

    ``num_sequences``: sequences in this process's mini-batch; ``num_tokens``: the normaliser of the
    token means (token_mean aggregation, entropy, KL): all processes' tokens / processes, so DDP's
    gradient average is the global token mean (``minibatch_backward``).
    """
    lc = cfg.loss
    # One chunked pass gives both; without an entropy bonus the entropy is only a metric (detached:
    # its backward term is skipped).
    logp, per_token_entropy = policy.response_logprobs(mb, with_entropy=True)
    if not lc.entropy_coef:
        per_token_entropy = per_token_entropy.detach()
    mask = mb.response_mask
    rollout_tokens = mask & ~mb.teacher_tokens
    # Lockstep (one update per step): the sampling policy is the current one, detached.
    old = mb.old_logp if mb.old_logp is not None else logp.detach()
    if mb.old_logp is None and mb.engine_logp is not None:
        record_logprob_diff(stats, old, mb.engine_logp, rollout_tokens)
    token = mixed_token_loss(logp, old, mb.advantages, mb.teacher_tokens, lc)
    token_loss = token.loss
    if cfg.rollout.is_correction == "tis" and mb.engine_logp is not None:
        weight = truncated_is_weight(old, mb.engine_logp, cfg.rollout.is_cap)
        token_loss = torch.where(rollout_tokens, token_loss * weight, token_loss)
        stats.mean("rollout/is_weight", float(weight[rollout_tokens].sum()), int(rollout_tokens.sum()))
    policy_loss = aggregate(token_loss, mask, lc.aggregation, max_response_length=cfg.loss_length,
                            num_sequences=num_sequences, num_tokens=num_tokens)
    loss = policy_loss
    entropy = torch.where(mask, per_token_entropy, 0.0).sum() / max(num_tokens, 1)
    if lc.entropy_coef:
        loss = loss - lc.entropy_coef * entropy
    if lc.kl_coef:
        kl = torch.where(mask, kl_k3(logp, mb.ref_logp), 0.0).sum() / max(num_tokens, 1)
        loss = loss + lc.kl_coef * kl
        stats.mean("kl", float(kl.detach()) * num_tokens, int(mask.sum()))

    with torch.no_grad():
        adv = mb.advantages.unsqueeze(-1).expand_as(mask)
        n_on = int(rollout_tokens.sum())
        stats.mean("clip/fraction", int((token.clipped & rollout_tokens).sum()), n_on)
        stats.mean("clip/high", int((token.clipped & rollout_tokens & (adv > 0)).sum()), n_on)
        stats.mean("clip/low", int((token.clipped & rollout_tokens & (adv < 0)).sum()), n_on)
        stats.mean("clip/dual", int((token.dual_clipped & rollout_tokens).sum()), n_on)
        stats.mean("entropy", float(entropy) * num_tokens, int(mask.sum()))  # the token sum: merged, a global mean
        stats.mean("loss/policy", float(policy_loss.detach()), 0.0)  # counted once per update, in the loop
        teacher_tokens = mask & mb.teacher_tokens
        if bool(teacher_tokens.any()):
            stats.mean("teacher_token_prob", float(logp.detach().exp()[teacher_tokens].sum()), int(teacher_tokens.sum()))
    return loss
