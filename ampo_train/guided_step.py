"""One step's guidance: which prompts, their cached traces, the student's scores, the replacement.

Composes the pure pieces of ``ampo_train.guidance`` with the store lookup and a scorer:

    source = TraceSource(index.lookup, StudentScorer(policy, tokenizer, batch, settings, max_len), text_of)
    plan = plan_guidance(prompt_ids, rewards[B, G], source, settings, rng)
    plan.rewards        # [B, G] the mixed group's rewards (injected slots = teacher_reward)
    plan.injections     # which slot of which prompt receives which trace
    plan.report         # counts and scores for the step's metrics
    rows = mixed_rows(batch, groups, plan, tokenizer, max_len)   # the batch the loss sees

A prompt selected for guidance with no correct cached trace (or absent from the store) stays a
plain GRPO group and is counted in ``report.no_trace``; it is never an error.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

import torch
from torch import Tensor

from ampo_cache.lookup import CachedTrace
from ampo_train.comprehension import Scoring, no_reasoning_trace, score_candidates
from ampo_train.config import GuidanceSettings
from ampo_train.data import Row, TrainPrompt, teacher_response_ids
from ampo_train.guidance import candidate_traces, correct_flags, needs_guidance, rank_candidates, replace_rollouts
from ampo_train.rollout import Rollout

Lookup = Callable[[Sequence[str]], Mapping[str, Sequence[CachedTrace]]]


class Scorer(Protocol):
    def __call__(self, prompt_index: int, texts: Sequence[str]) -> tuple[list[float], float | None]:
        """Scores of ``texts`` (candidate traces of the batch's prompt ``prompt_index``), and the
        no-reasoning baseline score when it is enabled (else None)."""
        ...


@dataclass(frozen=True)
class TraceSource:
    """Where a step's candidate traces come from, how they are ranked and what is injected."""

    lookup: Lookup | None  # the store's TraceIndex.lookup (correct traces per prompt); None = no store
    scorer: Scorer | None = None  # scores candidates; unused (may be None) for rank "random"
    # the text injected for a trace of prompt b (e.g. without a duplicated <think>); it is also what is scored
    text_of: Callable[[int, CachedTrace], str] = lambda b, trace: trace.text


@dataclass(frozen=True)
class Injection:
    prompt_index: int  # index of the prompt in this process's batch
    slot: int  # the rollout (0..G-1) the trace replaces
    trace: CachedTrace
    text: str  # the trace as it is injected (and was scored)
    score: float | None  # None for rank "random"


@dataclass
class GuidanceReport:
    prompts: int = 0  # prompts in the batch
    needed: int = 0  # prompts the mode selected for guidance
    guided: int = 0  # prompts that received traces
    no_trace: int = 0  # selected, but no correct cached trace
    all_correct: int = 0  # selected (always/hybrid), but replace: wrong_only and no rollout was wrong
    injected: int = 0  # traces injected
    per_teacher: Counter = field(default_factory=Counter)  # injected traces per teacher
    picked_scores: list[float] = field(default_factory=list)
    unpicked_scores: list[float] = field(default_factory=list)
    score_gains: list[float] = field(default_factory=list)  # picked score - no-reasoning score


@dataclass
class GuidancePlan:
    rewards: Tensor  # [B, G]
    injections: list[Injection]
    report: GuidanceReport


def plan_guidance(prompt_ids: Sequence[str], rewards: Tensor, source: TraceSource, settings: GuidanceSettings,
                  rng: random.Random, correct_threshold: float = 0.5) -> GuidancePlan:
    """Decide this step's injections (see the module docstring).

    Args:
        prompt_ids: the B prompts of this process's batch.
        rewards: ``[B, G]`` on-policy rewards.
        source: the store's lookup, the scorer and the injected text (``TraceSource``).
        rng: the trainer's guidance generator (hybrid draws, random ranking, replaced slots).
        correct_threshold: a response counts as correct when its reward exceeds this.
    """
    report = GuidanceReport(prompts=len(prompt_ids))
    mixed = rewards.clone().to(torch.float32)
    injections: list[Injection] = []
    if settings.mode == "off":
        return GuidancePlan(mixed, injections, report)

    needed = needs_guidance(rewards, settings.mode, rng, settings.hybrid_fraction, correct_threshold).tolist()
    report.needed = sum(needed)
    wanted = [prompt_ids[b] for b, need in enumerate(needed) if need]
    found = source.lookup(wanted) if (source.lookup is not None and wanted) else {}

    for b, need in enumerate(needed):
        if not need:
            continue
        candidates = candidate_traces(list(found.get(prompt_ids[b], ())), settings.max_candidates)
        if not candidates:
            report.no_trace += 1
            continue
        k = settings.k
        if settings.replace == "wrong_only":  # the reference: at most one trace per wrong rollout
            k = min(k, int((~correct_flags(rewards[b], correct_threshold)).sum()))
            if k == 0:
                report.all_correct += 1
                continue
        texts = [source.text_of(b, c) for c in candidates]
        scores: list[float] | None = None
        baseline = None
        if settings.rank != "random":
            if source.scorer is None:
                raise ValueError(f"rank {settings.rank!r} needs a scorer")
            scores, baseline = source.scorer(b, texts)
        picked = rank_candidates(scores, [c.num_chars for c in candidates], k, settings.rank, rng)
        slots, mixed[b] = replace_rollouts(mixed[b], [candidates[i] for i in picked], rng, mode=settings.mode,
                                           correct_threshold=correct_threshold, teacher_reward=settings.teacher_reward)
        for i, slot in zip(picked, slots):
            score = None if scores is None else scores[i]
            injections.append(Injection(b, slot, candidates[i], texts[i], score))
            report.per_teacher[candidates[i].teacher] += 1
            if score is not None:
                report.picked_scores.append(score)
                if baseline is not None:
                    report.score_gains.append(score - baseline)
        if scores is not None:
            report.unpicked_scores.extend(s for i, s in enumerate(scores) if i not in picked)
        report.guided += 1
        report.injected += len(picked)
    return GuidancePlan(mixed, injections, report)


class StudentScorer:
    """Scores a batch's candidates with the current student: no grad, this step's weights before
    the update, one batched forward per guided prompt (``comprehension.score_candidates``). With
    ``score_baseline`` the bare ``\\boxed{answer}`` rides in the same batch as the no-reasoning
    baseline "score A"."""

    def __init__(self, policy, tokenizer, batch: Sequence[TrainPrompt], settings: GuidanceSettings,
                 max_target_length: int):
        self.module, self.tokenizer, self.batch, self.settings = policy.module, tokenizer, batch, settings
        self.scoring = Scoring(rank=settings.rank, kind=settings.score, temperature=policy.forward.temperature,
                               max_response_tokens=max_target_length, chunk_size=policy.forward.chunk_size)

    def __call__(self, prompt_index: int, texts: Sequence[str]) -> tuple[list[float], float | None]:
        prompt = self.batch[prompt_index]
        with_baseline = self.settings.score_baseline and self.settings.rank == "comprehension"
        candidates = list(texts) + ([no_reasoning_trace(prompt.answer)] if with_baseline else [])
        scores = score_candidates(self.module, self.tokenizer, prompt.text, candidates, prompt.answer, self.scoring)
        if with_baseline:
            return scores[:-1], scores[-1]
        return scores, None


def mixed_rows(batch: Sequence[TrainPrompt], groups: Sequence[Sequence[Rollout]], plan: GuidancePlan, tokenizer,
               target_length: int) -> list[Row]:
    """The mixed batch: G rows per prompt, injected teacher traces in the slots the plan chose
    (tokenised with the student's tokenizer, one EOS, cut at ``target_length``)."""
    injected = {(inj.prompt_index, inj.slot): inj for inj in plan.injections}
    rows: list[Row] = []
    for b, (prompt, group) in enumerate(zip(batch, groups)):
        for g, rollout in enumerate(group):
            reward = float(plan.rewards[b, g])
            injection = injected.get((b, g))
            if injection is None:
                engine_logp = None if rollout.logprobs is None else torch.tensor(rollout.logprobs, dtype=torch.float32)
                rows.append(Row(prompt.token_ids, list(rollout.token_ids), reward,
                                finished=rollout.finish_reason == "stop", engine_logp=engine_logp))
            else:
                ids = teacher_response_ids(tokenizer, injection.text, target_length)
                rows.append(Row(prompt.token_ids, ids, reward, is_teacher=True, teacher=injection.trace.teacher,
                                finished=bool(ids) and ids[-1] == tokenizer.eos_token_id))
    return rows
