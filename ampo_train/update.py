"""A step's updates: old log-probs before the first update, then per mini-batch the mixed loss
accumulated over micro-batches, clipped and applied.

    settings = UpdateSettings.from_config(cfg)      # what the update reads of train.yaml
    logprobs = sampling_logprobs(policy, rows, settings, stats)   # RowLogprobs: old / reference, when needed
    norms = update_policy(policy, rows, logprobs, settings, stats, optimization, step)
        for each PPO epoch, each mini-batch of settings.prompts_per_update prompts:
            optimization.place(step, j, n)          # the LR of update j of the step's n (schedule.py)
            minibatch_backward(policy, mini, settings, stats, backward, num_tokens, logprobs)
            optimization.apply(policy, stats)       # clip, step (or skip a non-finite update)

Normalisers: every token mean (``token_mean``, the entropy bonus, KL) divides by the tokens the loss
trains (``Row.loss_tokens``: a prefix given as context and a row the overlong filter masked count
for nothing), all processes together; the per-sequence modes divide by the *configured* rows of a
mini-batch, so a short last mini-batch (dynamic sampling ran out of groups) weighs in proportion
to its rows, not as much as a full one.

Each micro-batch's loss is normalised by its mini-batch's totals, so the accumulated gradient is
the whole mini-batch's, for every aggregation mode (``ampo_train.loss.aggregate``), however the
rows are grouped: ``micro_batch_size`` rows in order, or packed by the token budget
``micro_batch_tokens`` (``ampo_train.batching``). Log-probs and entropy come from the chunked LM
head (``Policy.response_logprobs``): no ``[rows, tokens, vocabulary]`` logits, except under FSDP2 and
ZeRO-3, where the update's pass runs the model's own head inside its forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
from accelerate import Accelerator
from torch import Tensor

from ampo_train.batching import micro_batch_groups, padded_tokens, split_to_count
from ampo_train.config import LossSettings, TrainConfig
from ampo_train.data import Row, RowBatch, collate, row_lengths
from ampo_train.distributed import accumulating, update_applied
from ampo_train.loss import aggregate, kl_k3, mixed_token_loss, truncated_is_weight
from ampo_train.metrics import Name, StepStats


@dataclass(frozen=True)
class UpdateSettings:
    """What the update reads of train.yaml (``from_config``); each field is documented there."""

    group_size: int
    prompts_per_update: int  # all processes together
    updates_per_step: int  # as configured: mini-batches per step x PPO epochs
    micro_batch_size: int
    micro_batch_tokens: int | None = None
    loss: LossSettings = field(default_factory=LossSettings)
    loss_length: int = 512  # L of seq_mean_token_sum_norm
    ppo_epochs: int = 1
    activation_offload: bool = False
    is_correction: str | None = None
    is_cap: float = 2.0
    entropy_metric: bool = True  # compute the entropy for the metric even without a bonus (entropy_every)

    @classmethod
    def from_config(cls, cfg: TrainConfig, step: int | None = None) -> "UpdateSettings":
        """``step``: the step these updates belong to (whether it logs the entropy: ``entropy_every``)."""
        entropy_metric = bool(cfg.entropy_every) and (step is None or step % cfg.entropy_every == 0)
        return cls(cfg.group_size, cfg.prompts_per_update, cfg.updates_per_step, cfg.micro_batch_size,
                   cfg.micro_batch_tokens, cfg.loss, cfg.loss_length, cfg.ppo_epochs, cfg.activation_offload,
                   cfg.rollout.is_correction, cfg.rollout.is_cap, entropy_metric)


@dataclass(frozen=True)
class Normalisers:
    """What a mini-batch's losses are divided by (``minibatch_backward``)."""

    tokens: float  # token means (token_mean, entropy, KL): the tokens the loss trains, all processes' / processes
    sequences: int  # per-sequence modes: the mini-batch's configured rows on this process

    @classmethod
    def local(cls, rows: Sequence[Row]) -> "Normalisers":
        """One process holding ``rows``, a whole mini-batch."""
        return cls(sum(r.loss_tokens for r in rows), len(rows))


@dataclass(frozen=True)
class RowLogprobs:
    """Each row's sampling-time (``old``) and reference (``ref``, for KL) log-probs, in row order;
    None where the step does not need them."""

    old: list[Tensor] | None = None
    ref: list[Tensor] | None = None

    def rows(self, indices: Sequence[int]) -> "RowLogprobs":
        pick = (lambda values: None if values is None else [values[i] for i in indices])
        return RowLogprobs(pick(self.old), pick(self.ref))


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

    def place(self, step: int | None, index: int, count: int) -> None:
        """The LR of update ``index`` of the ``count`` step ``step`` makes (``schedule.UpdateSchedule``);
        None: a caller outside the loop (tests, benchmarks) that keeps its scheduler's LR."""
        if step is not None:
            self.scheduler.place(step, index, count)

    def apply(self, policy: TrainablePolicy, stats: StepStats) -> float:
        """Clip the accumulated gradient and step, unless its norm is not finite: then, as the
        reference does, the update is skipped (weights, optimizer moments and LR schedule untouched)
        and counted in ``skipped_updates``. Returns the gradient norm before clipping. (Under
        DeepSpeed its engine has already clipped and stepped, or skipped, in the last backward, and
        this reads the norm it computed: see ``ampo_train/zero.py``.)"""
        accelerator, optimizer = self.accelerator, self.optimizer
        grad_norm = float(accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm or float("inf")))
        stats.mean(Name.LR, self.scheduler.get_last_lr()[0])
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
            stats.mean(Name.GRAD_NORM, grad_norm)
            stats.replicated(Name.UPDATES, 1)
            self.scheduler.step()
            policy.weights_changed()
        else:
            stats.replicated(Name.SKIPPED_UPDATES, 1)
        optimizer.zero_grad(set_to_none=True)
        return grad_norm


def update_policy(policy: TrainablePolicy, rows: Sequence[Row], logprobs: RowLogprobs, settings: UpdateSettings,
                  stats: StepStats, optimization: Optimization, step: int | None = None) -> list[float]:
    """The step's optimizer updates: for each PPO epoch, each mini-batch of
    ``settings.prompts_per_update`` prompts (this process's share of them, G rows each) is
    accumulated over micro-batches and applied; ``step`` places each update's LR. Returns the
    gradient norm of every update (a non-finite one was skipped)."""
    accelerator = optimization.accelerator
    world, group = accelerator.num_processes, settings.group_size
    local_prompts = settings.prompts_per_update // world
    starts = range(0, len(rows) // group, local_prompts)
    count = settings.ppo_epochs * len(starts)  # the same on every process: they keep as many groups
    stats.replicated(Name.SKIPPED_UPDATES, 0)
    stats.replicated(Name.UPDATES, 0)
    norms = []
    for index in range(count):
        first = starts[index % len(starts)]
        chosen = range(first * group, min(first + local_prompts, len(rows) // group) * group)
        mini = [rows[i] for i in chosen]
        num_tokens = sum(r.loss_tokens for r in mini)
        if world > 1:  # token means are global: every process divides by the mean share of tokens
            local = torch.tensor([num_tokens], device=accelerator.device)
            num_tokens = float(accelerator.reduce(local, "sum").item()) / world
        optimization.place(step, index, count)
        minibatch_backward(policy, mini, settings, stats, optimization, logprobs.rows(chosen),
                           Normalisers(num_tokens, local_prompts * group))
        stats.mean(Name.LOSS_POLICY, 0.0, 1.0)
        norms.append(optimization.apply(policy, stats))
    return norms


def micro_batches(rows: Sequence[Row], settings: UpdateSettings) -> list[list[int]]:
    """Row indices per micro-batch: ``micro_batch_tokens`` packing, else ``micro_batch_size`` rows."""
    return micro_batch_groups(row_lengths(rows), settings.micro_batch_size, settings.micro_batch_tokens)


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
    """``rollout/logprob_diff`` (mean |engine - trainer| over the rollout tokens the loss trains) and
    its max: the number that shows an engine sampling with weights other than the trainer's (a sync
    that silently stopped) or with different numerics. A row outside the loss has no trainer
    log-probs worth comparing (its no-grad pass is not what the update sees): ``mask`` leaves it out."""
    diff = (engine_logp - trainer_logp).abs()[mask]
    if diff.numel():
        stats.mean(Name.LOGPROB_DIFF, float(diff.sum()), diff.numel())
        stats.maximum(Name.LOGPROB_DIFF_MAX, float(diff.max()))


@torch.no_grad()
def sampling_logprobs(policy: TrainablePolicy, rows: Sequence[Row], settings: UpdateSettings,
                      stats: StepStats) -> RowLogprobs:
    """Sampling-time log-probs (``old``) and, for KL, the reference's (``ref``), in row order.

    Computed once per step before the first update, so every mini-batch and PPO epoch measures its
    ratio against the policy that sampled. With one update per step they are not computed: the
    update's own forward, detached, is exactly that policy (lockstep), and the engine comparison
    is made there.
    """
    old = ref = None
    if settings.updates_per_step > 1:
        old = policy.logprobs(rows, settings.micro_batch_size, max_tokens=settings.micro_batch_tokens)
        for row, logp in zip(rows, old):
            if row.engine_logp is not None and not row.is_teacher:
                record_logprob_diff(stats, logp, row.engine_logp, torch.tensor(row.sampled_mask(), dtype=torch.bool))
    if settings.loss.kl_coef:
        ref = policy.logprobs(rows, settings.micro_batch_size, reference=True, max_tokens=settings.micro_batch_tokens)
    return RowLogprobs(old, ref)


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


def minibatch_backward(policy: TrainablePolicy, mini: Sequence[Row], settings: UpdateSettings, stats: StepStats,
                       backward: Backward = PlainBackward(), logprobs: RowLogprobs = RowLogprobs(),
                       norm: Normalisers | None = None) -> None:
    """Accumulate one mini-batch's gradient over micro-batches (``micro_batches``).

    Gradients are all-reduced across processes once, on the last micro-batch (``backward.no_sync``
    on the others). ``norm.tokens``: the normaliser of every token mean (token_mean aggregation, the
    entropy bonus, KL): the tokens the loss trains, all processes' / processes, so that DDP's
    gradient average is the token mean over the whole mini-batch, as one process holding every row
    would compute it. ``norm.sequences``: the per-sequence modes', the mini-batch's configured rows
    on this process. None: ``Normalisers.local(mini)``. ``logprobs``: the rows' old / reference
    log-probs.
    Under several processes the ranks first agree on one micro-batch count (``agreed_count``), and
    a rank with fewer splits its largest micro-batches (``batching.split_to_count``): every rank
    holds the same number of rows, so that count is always reachable.

    Statistics: ``update/micro_batches`` (forward/backward calls), ``update/split`` (calls added to
    match another rank's count), ``update/padding`` (share of the padded input that is padding),
    ``update/loss_tokens`` and ``update/token_normaliser`` (the tokens trained, and what the token
    means divided by: the same, summed over processes).
    """
    lengths = row_lengths(mini)
    groups = micro_batches(mini, settings)
    count = agreed_count(len(groups), policy.device)
    if count > len(groups):
        stats.total(Name.SPLIT, count - len(groups))
        groups = split_to_count(lengths, groups, count)
        if len(groups) != count:
            raise RuntimeError(f"{len(mini)} rows cannot make the {count} micro-batches another process runs")
    stats.total(Name.MICRO_BATCHES, len(groups))
    padded = sum(padded_tokens(lengths, g) for g in groups)
    stats.mean(Name.PADDING, padded - sum(p + r for p, r in lengths), padded)
    norm = norm or Normalisers.local(mini)
    stats.total(Name.TOKEN_NORMALISER, norm.tokens)
    for i, group in enumerate(groups):
        with contextlib.nullcontext() if i == len(groups) - 1 else backward.no_sync():
            chosen = logprobs.rows(group)
            mb = collate([mini[j] for j in group], policy.pad_id, chosen.old, chosen.ref).to(policy.device)
            with offloaded(settings.activation_offload):
                loss = micro_loss(policy, mb, settings, norm, stats)
            backward.backward(loss)


def micro_loss(policy: TrainablePolicy, mb: RowBatch, settings: UpdateSettings, norm: Normalisers,
               stats: StepStats) -> Tensor:
    """The loss of one micro-batch, normalised (``norm``, see ``minibatch_backward``) so that a
    mini-batch's micro-batches add up to its loss."""
    lc, num_tokens = settings.loss, norm.tokens
    # One pass gives both; without an entropy bonus the entropy is only a metric (detached: its
    # backward term is skipped), and on a step that does not log it, not computed at all.
    with_entropy = bool(lc.entropy_coef) or settings.entropy_metric
    out = policy.response_logprobs(mb, with_entropy=with_entropy)
    logp, per_token_entropy = out if with_entropy else (out, None)
    mask = mb.response_mask
    rollout_tokens = mask & ~mb.teacher_tokens
    # Lockstep (one update per step): the sampling policy is the current one, detached.
    old = mb.old_logp if mb.old_logp is not None else logp.detach()
    if mb.old_logp is None and mb.engine_logp is not None:
        record_logprob_diff(stats, old, mb.engine_logp, rollout_tokens)
    token = mixed_token_loss(logp, old, mb.advantages, mb.teacher_tokens, lc)
    token_loss = token.loss
    if settings.is_correction == "tis" and mb.engine_logp is not None:
        weight = truncated_is_weight(old, mb.engine_logp, settings.is_cap)
        token_loss = torch.where(rollout_tokens, token_loss * weight, token_loss)
        stats.mean(Name.IS_WEIGHT, float(weight[rollout_tokens].sum()), int(rollout_tokens.sum()))
    policy_loss = aggregate(token_loss, mask, lc.aggregation, max_response_length=settings.loss_length,
                            num_sequences=norm.sequences, num_tokens=num_tokens)
    loss = policy_loss
    entropy_sum = None
    if per_token_entropy is not None:
        if not lc.entropy_coef:
            per_token_entropy = per_token_entropy.detach()
        entropy = torch.where(mask, per_token_entropy, 0.0).sum() / max(num_tokens, 1)
        if lc.entropy_coef:
            loss = loss - lc.entropy_coef * entropy
        entropy_sum = float(entropy.detach()) * num_tokens
    if lc.kl_coef:
        kl = torch.where(mask, kl_k3(logp, mb.ref_logp), 0.0).sum() / max(num_tokens, 1)
        loss = loss + lc.kl_coef * kl
        stats.mean(Name.KL, float(kl.detach()) * num_tokens, int(mask.sum()))
    _loss_stats(stats, token, logp, mb, entropy_sum, float(policy_loss.detach()))
    return loss


@torch.no_grad()
def _loss_stats(stats: StepStats, token, logp: Tensor, mb: RowBatch, entropy_sum: float | None,
                policy_loss: float) -> None:
    mask = mb.response_mask
    rollout_tokens = mask & ~mb.teacher_tokens
    adv = mb.advantages.unsqueeze(-1).expand_as(mask)
    n_on = int(rollout_tokens.sum())
    stats.mean(Name.CLIP_FRACTION, int((token.clipped & rollout_tokens).sum()), n_on)
    stats.mean(Name.CLIP_HIGH, int((token.clipped & rollout_tokens & (adv > 0)).sum()), n_on)
    stats.mean(Name.CLIP_LOW, int((token.clipped & rollout_tokens & (adv < 0)).sum()), n_on)
    stats.mean(Name.CLIP_DUAL, int((token.dual_clipped & rollout_tokens).sum()), n_on)
    if entropy_sum is not None:
        stats.mean(Name.ENTROPY, entropy_sum, int(mask.sum()))  # the token sum: merged, a global mean
    stats.total(Name.LOSS_TOKENS, int(mask.sum()))
    stats.mean(Name.LOSS_POLICY, policy_loss, 0.0)  # counted once per update, in the loop
    teacher_tokens = mask & mb.teacher_tokens
    if bool(teacher_tokens.any()):
        stats.mean(Name.TEACHER_TOKEN_PROB, float(logp.detach().exp()[teacher_tokens].sum()), int(teacher_tokens.sum()))
