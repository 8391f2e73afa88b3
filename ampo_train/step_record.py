"""What one step produced on this process, as the loop hands it to the metrics and the sample log."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ampo_train.data import Row, TrainPrompt
from ampo_train.guided_step import GuidancePlan
from ampo_train.rollout import Rollout


@dataclass
class StepRecord:
    prompts: list[TrainPrompt]  # this process's share of the step's prompts (B)
    groups: list[list[Rollout]]  # G rollouts per prompt
    texts: list[str]  # the rollouts decoded, B x G in order
    correct: Tensor  # [B x G] bool: the verifier's verdicts (before any injection)
    rewards: Tensor  # [B, G] on-policy rewards
    plan: GuidancePlan  # the injections and the mixed group's rewards
    rows: list[Row]  # the mixed batch the loss saw, B x G in order

    @property
    def group_size(self) -> int:
        return self.rewards.shape[1]
