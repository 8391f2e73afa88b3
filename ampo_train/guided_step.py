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

from ampo_cache.boxed import boxes
from ampo_cache.lookup import CachedTrace
from ampo_train.comprehension import Scoring, no_reasoning_trace, score_candidates
from ampo_train.config import GuidanceSettings
from ampo_train.data import Row, TrainPrompt, teacher_response_ids
from ampo_train.guidance import candidate_traces, correct_flags, needs_guidance, rank_candidates, replace_rollouts
from ampo_train.prefix import prefix_fraction, prefix_length
from ampo_train.rewards import score_responses
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
    no_trace: int = 0  # selected, but no correct cached trace: a cache miss
    missed: list[int] = field(default_factory=list)  # the batch indices of those prompts
    all_correct: int = 0  # selected (always/hybrid), but replace: wrong_only and no rollout was wrong
    injected: int = 0  # traces injected
    per_teacher: Counter = field(default_factory=Counter)  # injected traces per teacher
    picked_scores: list[float] = field(default_factory=list)
    unpicked_scores: list[float] = field(default_factory=list)
    score_gains: list[float] = field(default_factory=list)  # picked score - no-reasoning score
    prefix_tokens: list[int] = field(default_factory=list)  # prefix guidance: the prefix given per injection
    prefix_solved: int = 0  # prefix guidance: continuations the verifier found correct


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
            report.missed.append(b)
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


@dataclass(frozen=True)
class Continuation:
    """Prefix guidance in one slot: a teacher trace's first tokens, then the student's own."""

    prefix_ids: list[int]
    rollout: Rollout  # the student's continuation (its engine log-probs)
    in_loss: bool  # the prefix is trained as teacher tokens (guidance.prefix.loss_on_prefix)


def answer_start(text: str) -> int | None:
    """Where the answer a trace ends with begins: the opening of the outermost box around its last
    ``\\boxed{}`` (None: no box). A prefix is cut before it, so the student still writes the answer."""
    found = boxes(text)
    if not found:
        return None
    last = found[-1]
    return min(box.start for box in found if box.start <= last.start and box.content_end >= last.content_end)


class PrefixGuide:
    """Prefix guidance for a step: every injection of the plan becomes the start of its trace
    (``prefix.prefix_fraction`` of its tokens at this step, cut before the answer) and the
    student's continuation from prompt + prefix, verified like any rollout; the slot's reward is
    that verdict (a wrong continuation earns nothing)."""

    def __init__(self, policy, tokenizer, verifier, cfg):
        self.policy, self.tokenizer, self.verifier, self.cfg = policy, tokenizer, verifier, cfg

    def continue_traces(self, batch: Sequence[TrainPrompt], plan: GuidancePlan, step: int,
                        seed: int) -> dict[tuple[int, int], Continuation]:
        cfg = self.cfg
        if not plan.injections:
            return {}
        fraction = prefix_fraction(cfg.guidance.prefix, step, cfg.max_steps)
        budget = cfg.rollout.max_new_tokens
        prefixes = []
        for injection in plan.injections:
            encoded = self.tokenizer(injection.text, add_special_tokens=False, return_offsets_mapping=True)
            n = prefix_length(encoded["offset_mapping"], answer_start(injection.text), fraction)
            prefixes.append(list(encoded["input_ids"][:min(n, budget - 1)]))
        settings = cfg.rollout.model_copy(update={"max_new_tokens": budget - min(len(p) for p in prefixes)})
        prompts = [list(batch[inj.prompt_index].token_ids) + prefix for inj, prefix in zip(plan.injections, prefixes)]
        rollouts = [group[0] for group in self.policy.generate(prompts, 1, seed=seed, settings=settings)]
        rollouts = [_within(r, budget - len(prefix)) for r, prefix in zip(rollouts, prefixes)]
        texts = [self.tokenizer.decode(prefix + r.token_ids, skip_special_tokens=True) for prefix, r in zip(prefixes, rollouts)]
        scored = score_responses(self.verifier, texts, [batch[inj.prompt_index].answer for inj in plan.injections],
                                 cfg.reward)
        continuations = {}
        for i, (injection, prefix, rollout) in enumerate(zip(plan.injections, prefixes, rollouts)):
            plan.rewards[injection.prompt_index, injection.slot] = float(scored.rewards[i])
            continuations[(injection.prompt_index, injection.slot)] = Continuation(
                prefix, rollout, cfg.guidance.prefix.loss_on_prefix)
        plan.report.prefix_tokens.extend(len(p) for p in prefixes)
        plan.report.prefix_solved += int(scored.correct.sum())
        return continuations


def _within(rollout: Rollout, limit: int) -> Rollout:
    """A continuation cut to the tokens left after its prefix (generated with a common budget)."""
    if len(rollout.token_ids) <= limit:
        return rollout
    logprobs = None if rollout.logprobs is None else rollout.logprobs[:limit]
    return Rollout(rollout.token_ids[:limit], "length", logprobs)


def mixed_rows(batch: Sequence[TrainPrompt], groups: Sequence[Sequence[Rollout]], plan: GuidancePlan, tokenizer,
               target_length: int, continuations: Mapping[tuple[int, int], Continuation] | None = None) -> list[Row]:
    """The mixed batch: G rows per prompt, injected teacher traces in the slots the plan chose
    (tokenised with the student's tokenizer, one EOS, cut at ``target_length``), or with prefix
    guidance the prefix + the student's continuation (``continuations``)."""
    injected = {(inj.prompt_index, inj.slot): inj for inj in plan.injections}
    continuations = continuations or {}
    rows: list[Row] = []
    for b, (prompt, group) in enumerate(zip(batch, groups)):
        for g, rollout in enumerate(group):
            reward = float(plan.rewards[b, g])
            injection = injected.get((b, g))
            if (b, g) in continuations:
                rows.append(_continuation_row(prompt, continuations[(b, g)], reward, injection.trace.teacher))
            elif injection is None:
                engine_logp = None if rollout.logprobs is None else torch.tensor(rollout.logprobs, dtype=torch.float32)
                rows.append(Row(prompt.token_ids, list(rollout.token_ids), reward,
                                finished=rollout.finish_reason == "stop", engine_logp=engine_logp))
            else:
                ids = teacher_response_ids(tokenizer, injection.text, target_length)
                rows.append(Row(prompt.token_ids, ids, reward, is_teacher=True, teacher=injection.trace.teacher,
                                finished=bool(ids) and ids[-1] == tokenizer.eos_token_id))
    return rows


def _continuation_row(prompt: TrainPrompt, continuation: Continuation, reward: float, teacher: str) -> Row:
    rollout, prefix = continuation.rollout, continuation.prefix_ids
    engine_logp = None
    if rollout.logprobs is not None:  # the engine sampled the continuation only
        engine_logp = torch.tensor([0.0] * len(prefix) + list(rollout.logprobs), dtype=torch.float32)
    return Row(prompt.token_ids, prefix + list(rollout.token_ids), reward, teacher=teacher,
               finished=rollout.finish_reason == "stop", engine_logp=engine_logp, prefix_len=len(prefix),
               prefix_in_loss=continuation.in_loss)
