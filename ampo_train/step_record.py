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
    correct: Tensor  # [B, G] bool: the verifier's verdicts of the rollouts (what the guidance rules read)
    rewards: Tensor  # [B, G] the rollouts' shaped rewards (format, repetition, overlong penalty)
    plan: GuidancePlan  # the injections
    rows: list[Row]  # the mixed batch the loss saw, B x G in order (sampling.build_rows)

    @property
    def group_size(self) -> int:
        return self.rewards.shape[1]
