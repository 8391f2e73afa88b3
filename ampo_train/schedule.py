"""The learning-rate schedule, placed by training progress rather than by counting updates.

    schedule = UpdateSchedule(optimizer, "cosine", warmup=10, updates_per_step=2, max_steps=200)
    schedule.place(step, j, n)   # before update j (0-based) of the n this step makes: sets every group's lr
    schedule.step()              # after an applied update (a skipped, non-finite one is not counted)

A step normally makes ``updates_per_step`` updates (mini-batches x PPO epochs), but not always:
dynamic sampling may end a step with fewer groups than it asked for, and so with fewer updates. A
schedule that counted updates would then never reach its end (a linear decay stopping part way).
So the position is the step's progress: update j of the n a step makes sits at
``((step - 1) + j / n) x updates_per_step``, on the horizon ``max_steps x updates_per_step``. A full
step (n = updates_per_step) lands on exactly the positions an update counter would: the figures
are those of transformers' ``get_scheduler`` (constant, constant_with_warmup, linear, cosine),
computed with the same expressions; a short step spreads its updates over the step's span; a
resumed run lands on the same learning rates, since they depend on the step alone. ``applied``
counts the updates actually made (checkpointed; ``optimizer/updates`` in the metrics).
"""

from __future__ import annotations

import math

import torch


def lr_factor(kind: str, position: float, warmup: int, total: int) -> float:
    """The multiplier of the base learning rate at ``position`` (in updates), as transformers'
    schedules compute it: linear warm-up over ``warmup`` updates, then constant, linear decay to 0
    at ``total``, or a half cosine to 0 at ``total``."""
    if position < warmup:
        return float(position) / float(max(1, warmup))
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return max(0.0, float(total - position) / float(max(1, total - warmup)))
    if kind == "cosine":
        progress = float(position - warmup) / float(max(1, total - warmup))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    raise ValueError(f"unknown lr_scheduler {kind!r}")


class UpdateSchedule:
    """Sets the optimizer's learning rates by progress (module docstring); the interface of a torch
    scheduler where the trainer needs one (``step``, ``get_last_lr``, ``state_dict``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, warmup: int, updates_per_step: int,
                 max_steps: int):
        self.optimizer, self.kind, self.warmup = optimizer, kind, warmup
        self.updates_per_step, self.total = updates_per_step, max_steps * updates_per_step
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.applied = 0
        self._set(0.0)

    def place(self, step: int, index: int, count: int) -> None:
        """Before update ``index`` (0-based) of the ``count`` that step ``step`` (1-based) makes."""
        self._set((step - 1) * self.updates_per_step + index * self.updates_per_step / count)

    def _set(self, position: float) -> None:
        factor = lr_factor(self.kind, position, self.warmup, self.total)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def step(self) -> None:
        self.applied += 1

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"applied": self.applied, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        # A checkpoint of an older version holds a LambdaLR's state: its last_epoch counted applied updates.
        self.applied = int(state.get("applied", state.get("last_epoch", 0)))
