"""A step's data, made in one place: the mixed batch built once from the rollouts and the guidance
plan, the overlong rules, and dynamic sampling's extra rounds.

    scored = rewarder(texts, answers, lengths)            # rewards.Rewarder: .correct (verifier), .rewards (shaped)
    rows = build_rows(batch, groups, scored, plan, tokenizer, RowSettings.from_config(cfg))
    records, rows = fill_step(draw_round, cfg.dynamic_sampling, groups_wanted, G, device, stats)

``build_rows`` is the only place a ``Row`` is made: its reward (the shaped one), its verdict, its
loss mask (``overlong.filter``) and its advantage (over the mixed group) are set there, once, and
nothing writes into a row afterwards.

Which field each rule reads, by name:
- the guidance rules: the on-policy verdicts (``StepRecord.correct``);
- the advantages: the mixed group's shaped rewards (``Row.reward``: a rollout's verdict with the
  format/repetition terms and the soft overlong penalty; a whole teacher trace's teacher_reward; a
  prefix continuation's own shaped reward);
- dynamic sampling: the mixed group's verdicts (``Row.correct``), as DAPO filters on accuracy: a
  length penalty alone gives an all-correct group a reward spread, not something to learn;
- ``frac_reward_zero_std`` (TRL's name): the on-policy shaped rewards, as TRL computes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ampo_train.advantages import group_advantages, has_spread
from ampo_train.config import DynamicSampling, TrainConfig
from ampo_train.data import Row, TrainPrompt, teacher_response_ids
from ampo_train.guided_step import Continuation, GuidancePlan, Injection
from ampo_train.metrics import Name, StepStats
from ampo_train.rewards import Rewards
from ampo_train.rollout import Rollout
from ampo_train.step_record import StepRecord


@dataclass(frozen=True)
class RowSettings:
    """What ``build_rows`` needs of train.yaml."""

    target_length: int  # teacher traces are cut to this many student tokens (EOS included)
    teacher_reward: float  # a whole injected (verified) trace's reward
    overlong_filter: bool  # a response cut at the budget (no EOS) is masked out of the loss
    advantage_scale: str  # "none" or "group" (advantages.group_advantages)

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "RowSettings":
        return cls(cfg.target_length, cfg.guidance.teacher_reward, cfg.overlong.filter, cfg.loss.advantage_scale)


def build_rows(batch: Sequence[TrainPrompt], groups: Sequence[Sequence[Rollout]], scored: Rewards,
               plan: GuidancePlan, tokenizer, settings: RowSettings) -> list[Row]:
    """The mixed batch: G rows per prompt (in prompt order), the plan's injections in their slots,
    each row complete (reward, verdict, loss mask, advantage over its mixed group)."""
    injected, G = plan.at(), len(groups[0]) if groups else 0
    rows = []
    for b, (prompt, group) in enumerate(zip(batch, groups)):
        for g, rollout in enumerate(group):
            injection = injected.get((b, g))
            if injection is None:
                rows.append(_rollout_row(prompt, rollout, float(scored.rewards[b * G + g]), bool(scored.correct[b * G + g])))
            elif injection.continuation is not None:
                rows.append(_continuation_row(prompt, injection.continuation, injection.trace.teacher))
            else:
                rows.append(_teacher_row(prompt, injection, tokenizer, settings))
    rewards = torch.tensor([row.reward for row in rows], dtype=torch.float32).view(len(batch), G)
    advantages = group_advantages(rewards, scale=settings.advantage_scale).flatten().tolist()
    return [_complete(row, advantage, settings.overlong_filter) for row, advantage in zip(rows, advantages)]


def _complete(row: Row, advantage: float, overlong_filter: bool) -> Row:
    # DAPO's overlong filter: a response cut at the budget teaches nothing about its ending (a teacher
    # trace is the teacher's: never filtered).
    in_loss = row.is_teacher or row.finished or not overlong_filter
    return Row(row.prompt_ids, row.response_ids, row.reward, row.correct, row.is_teacher, row.teacher, row.finished,
               advantage, row.engine_logp, row.prefix_len, row.prefix_in_loss, in_loss)


def _rollout_row(prompt: TrainPrompt, rollout: Rollout, reward: float, correct: bool) -> Row:
    engine_logp = None if rollout.logprobs is None else torch.tensor(rollout.logprobs, dtype=torch.float32)
    return Row(prompt.token_ids, list(rollout.token_ids), reward, correct, finished=rollout.finish_reason == "stop",
               engine_logp=engine_logp)


def _teacher_row(prompt: TrainPrompt, injection: Injection, tokenizer, settings: RowSettings) -> Row:
    ids = teacher_response_ids(tokenizer, injection.text, settings.target_length)
    return Row(prompt.token_ids, ids, settings.teacher_reward, True, is_teacher=True, teacher=injection.trace.teacher,
               finished=bool(ids) and ids[-1] == tokenizer.eos_token_id)


def _continuation_row(prompt: TrainPrompt, continuation: Continuation, teacher: str) -> Row:
    rollout, prefix = continuation.rollout, continuation.prefix_ids
    engine_logp = None
    if rollout.logprobs is not None:  # the engine sampled the continuation only
        engine_logp = torch.tensor([0.0] * len(prefix) + list(rollout.logprobs), dtype=torch.float32)
    return Row(prompt.token_ids, prefix + list(rollout.token_ids), continuation.reward, continuation.correct,
               teacher=teacher, finished=rollout.finish_reason == "stop", engine_logp=engine_logp,
               prefix_len=len(prefix), prefix_in_loss=continuation.prefix_in_loss)


def group_verdicts(rows: Sequence[Row], group_size: int) -> torch.Tensor:
    """``[B, G]`` the mixed groups' verdicts (teacher traces: correct)."""
    return torch.tensor([row.correct for row in rows], dtype=torch.bool).view(-1, group_size)


def fill_step(draw: Callable[[int], StepRecord], settings: DynamicSampling, wanted: int, group_size: int,
              agreed_min: Callable[[int], int], stats: StepStats) -> tuple[list[StepRecord], list[Row]]:
    """DAPO's dynamic sampling: rounds (``draw(round_index)``) until every process has ``wanted``
    groups whose mixed verdicts are not all equal, at most ``max_resample_rounds`` more; the other
    groups are dropped. ``agreed_min(count)``: the smallest count over the processes (they keep the
    same number of groups, so they make the same updates and collectives). Disabled: one round,
    every group kept."""
    first = draw(0)
    if not settings.enabled:
        return [first], first.rows
    records, kept = [first], []
    while True:
        record = records[-1]
        for b in has_spread(group_verdicts(record.rows, group_size)).nonzero().flatten().tolist():
            kept.extend(record.rows[b * group_size:(b + 1) * group_size])
        agreed = agreed_min(len(kept) // group_size)
        if agreed >= wanted or len(records) > settings.max_resample_rounds:
            break
        records.append(draw(len(records)))
    groups = min(agreed, wanted)
    drawn = sum(len(r.prompts) for r in records)
    stats.replicated(Name.DYNAMIC_ROUNDS, len(records) - 1)  # the same on every process: not a sum
    stats.total(Name.DYNAMIC_DRAWN, drawn)
    stats.total(Name.DYNAMIC_KEPT, groups)
    stats.total(Name.DYNAMIC_DROPPED, drawn - groups)
    return records, kept[:groups * group_size]
