"""One step's guidance: which prompts, which cached traces, which slots, behind one interface.

A run chooses its guide once, in ``setup`` (``open_guide``):

    guide = open_guide(cfg, index, policy, tokenizer, rewarder)   # WholeTraces or PrefixTraces
    plan = guide.plan(batch, correct[B, G], step, seeds)          # seeds: seeds.RoundSeeds
    plan.injections     # which slot of which prompt receives which trace (with prefix guidance: the
                        # trace's prefix and the student's continuation, verified and rewarded)
    plan.report         # counts and scores for the step's metrics

Both implementations read the verifier's verdicts (``correct``), never the shaped rewards, and
return a plan; neither writes into the step's rows, which ``sampling.build_rows`` makes from the
plan in one place. The trigger rule (``guidance.mode``) and the ranking rule (``guidance.rank``)
are looked up in ``ampo_train.guidance``'s registries. A prompt selected for guidance with no
correct cached trace (or absent from the store) stays a plain GRPO group and is counted in
``report.no_trace``; it is never an error.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Protocol, Sequence

from torch import Tensor

from ampo_cache.lookup import CachedTrace
from ampo_train.comprehension import Scoring, no_reasoning_trace, score_candidates
from ampo_train.config import GuidanceSettings, PrefixSettings, RolloutSettings
from ampo_train.data import TrainPrompt, assistant_text
from ampo_train.guidance import (REASONS, Trigger, can_replace_correct, candidate_traces, check_ranking,
                                 rank_candidates, replacement_slots, trigger_rule)
from ampo_train.prefix import answer_start, prefix_fraction, prefix_length
from ampo_train.rewards import Rewarder
from ampo_train.rollout import Rollout
from ampo_train.seeds import RoundSeeds

Lookup = Callable[[Sequence[str]], Mapping[str, Sequence[CachedTrace]]]


class Scorer(Protocol):
    def __call__(self, prompt: TrainPrompt, texts: Sequence[str]) -> tuple[list[float], float | None]:
        """Scores of ``texts`` (candidate traces of ``prompt``), and the no-reasoning baseline
        score when it is enabled (else None)."""
        ...


@dataclass(frozen=True)
class Continuation:
    """Prefix guidance in one slot: a teacher trace's first tokens, then the student's own."""

    prefix_ids: list[int]
    rollout: Rollout  # the student's continuation (its engine log-probs)
    prefix_in_loss: bool  # the prefix is trained as teacher tokens (guidance.prefix.loss_on_prefix)
    correct: bool  # the verifier's verdict, and the answer it read lies in what the student wrote
    reward: float  # the shaped reward of prefix + continuation (overlong penalty included)


@dataclass(frozen=True)
class Injection:
    prompt_index: int  # index of the prompt in this process's batch
    slot: int  # the rollout (0..G-1) the trace replaces
    trace: CachedTrace
    text: str  # the trace as it is injected (and was scored)
    score: float | None  # None when the ranking rule scores nothing
    replaced_correct: bool = False  # the slot held a rollout the verifier judged correct
    continuation: Continuation | None = None  # prefix guidance: what fills the slot instead of the whole trace


@dataclass
class GuidanceReport:
    prompts: int = 0  # prompts in the batch
    needed: int = 0  # prompts the trigger rule selected
    reasons: Counter = field(default_factory=Counter)  # guided prompts per reason (guidance.REASONS)
    guided: int = 0  # prompts that received traces
    no_trace: int = 0  # selected, but no correct cached trace: a cache miss
    missed: list[int] = field(default_factory=list)  # the batch indices of those prompts
    all_correct: int = 0  # selected, but only wrong rollouts may be replaced and none was wrong
    injected: int = 0  # traces injected
    per_teacher: Counter = field(default_factory=Counter)  # injected traces per teacher
    picked_scores: list[float] = field(default_factory=list)
    unpicked_scores: list[float] = field(default_factory=list)
    score_gains: list[float] = field(default_factory=list)  # picked score - no-reasoning score
    prefix_tokens: list[int] = field(default_factory=list)  # prefix guidance: the prefix given per injection

    def count_reason(self, trigger: Trigger) -> None:
        self.reasons[trigger.reason] += 1


@dataclass(frozen=True)
class GuidancePlan:
    injections: list[Injection]
    report: GuidanceReport

    def at(self) -> dict[tuple[int, int], Injection]:
        """The injections by (prompt index, slot)."""
        return {(inj.prompt_index, inj.slot): inj for inj in self.injections}


class Guide(Protocol):
    def plan(self, batch: Sequence[TrainPrompt], correct: Tensor, step: int, seeds: RoundSeeds) -> GuidancePlan:
        """This step's injections for ``batch`` (``correct``: ``[B, G]`` the verifier's verdicts of
        its rollouts; ``seeds``: every draw, per prompt and per generate call)."""
        ...


class WholeTraces:
    """AMPO: the picked traces replace rollouts whole (reward ``teacher_reward``; verified traces).
    Each prompt draws from its own generator (``RoundSeeds.prompt_rng``): the hybrid rule's draw,
    then a random ranking's and the replaced slots'."""

    def __init__(self, settings: GuidanceSettings, lookup: Lookup | None, scorer: Scorer | None):
        self.settings, self.lookup, self.scorer = settings, lookup, scorer
        self.rule, self.ranking = trigger_rule(settings.mode), check_ranking(settings.rank)
        self.replace_correct = can_replace_correct(settings)

    def plan(self, batch: Sequence[TrainPrompt], correct: Tensor, step: int, seeds: RoundSeeds) -> GuidancePlan:
        report, injections = GuidanceReport(prompts=len(batch), reasons=Counter({r: 0 for r in REASONS})), []
        flags = correct.tolist()
        rngs = [seeds.prompt_rng(b) for b in range(len(batch))]
        triggers = [self.rule.decide(f, self.settings, rng) for f, rng in zip(flags, rngs)]
        wanted = [batch[b].prompt_id for b, t in enumerate(triggers) if t.guided]
        report.needed = len(wanted)
        found = self.lookup(wanted) if (self.lookup is not None and wanted) else {}
        for b, trigger in enumerate(triggers):
            if trigger.guided:
                candidates = candidate_traces(list(found.get(batch[b].prompt_id, ())), self.settings.max_candidates)
                injections += self._inject(b, batch[b], flags[b], trigger, candidates, rngs[b], report)
        return GuidancePlan(injections, report)

    def _inject(self, b: int, prompt: TrainPrompt, correct: list[bool], trigger: Trigger,
                candidates: list[CachedTrace], rng: random.Random, report: GuidanceReport) -> list[Injection]:
        """One guided prompt: rank its candidates, keep the top k, choose the slots they take."""
        if not candidates:
            report.no_trace += 1
            report.missed.append(b)
            return []
        k = trigger.k if self.replace_correct else min(trigger.k, correct.count(False))
        if k == 0:
            report.all_correct += 1
            return []
        texts = [assistant_text(c.text, prompt.text) for c in candidates]
        scores, baseline = None, None
        if self.ranking.scored is not None:
            if self.scorer is None:
                raise ValueError(f"rank {self.settings.rank!r} needs a scorer")
            scores, baseline = self.scorer(prompt, texts)
        picked = rank_candidates(scores, [c.num_chars for c in candidates], k, self.settings.rank, rng)
        slots = replacement_slots(correct, len(picked), rng, self.replace_correct)
        out = [Injection(b, slot, candidates[i], texts[i], None if scores is None else scores[i], correct[slot])
               for i, slot in zip(picked, slots)]
        for injection in out:
            report.per_teacher[injection.trace.teacher] += 1
            if injection.score is not None:
                report.picked_scores.append(injection.score)
                if baseline is not None:
                    report.score_gains.append(injection.score - baseline)
        if scores is not None:
            report.unpicked_scores.extend(s for i, s in enumerate(scores) if i not in picked)
        report.count_reason(trigger)
        report.guided += 1
        report.injected += len(out)
        return out


class StudentScorer:
    """Scores a prompt's candidates with the current student: no grad, this step's weights before
    the update, one batched forward per guided prompt (``comprehension.score_candidates``). With
    ``score_baseline`` the bare ``\\boxed{answer}`` rides in the same batch as the no-reasoning
    baseline "score A"."""

    def __init__(self, policy, tokenizer, settings: GuidanceSettings, max_target_length: int):
        self.module, self.tokenizer = policy.module, tokenizer
        scored = check_ranking(settings.rank).scored or "answer"
        self.with_baseline = settings.score_baseline and scored == "answer"
        self.scoring = Scoring(scored=scored, kind=settings.score, temperature=policy.forward.temperature,
                               max_response_tokens=max_target_length, chunk_size=policy.forward.chunk_size)

    def __call__(self, prompt: TrainPrompt, texts: Sequence[str]) -> tuple[list[float], float | None]:
        candidates = list(texts) + ([no_reasoning_trace(prompt.answer)] if self.with_baseline else [])
        scores = score_candidates(self.module, self.tokenizer, prompt.text, candidates, prompt.answer, self.scoring)
        if self.with_baseline:
            return scores[:-1], scores[-1]
        return scores, None


class PrefixTraces:
    """Prefix guidance (QuestA, UFT, Prefix-RFT, BREAD): the whole-trace plan, then every picked
    trace cut to its first ``prefix_fraction`` of tokens at this step (before the first place it
    states an answer, ``prefix.answer_start``) and continued by the student from prompt + prefix.
    The continuation is verified and rewarded as any rollout (the overlong rules included, on the
    whole response); it counts as solved only if the answer the verifier read lies in what the
    student wrote, so a prefix that already held the answer earns nothing."""

    def __init__(self, whole: WholeTraces, policy, tokenizer, rewarder: Rewarder, settings: PrefixSettings,
                 rollout: RolloutSettings, max_steps: int):
        self.whole, self.policy, self.tokenizer, self.rewarder = whole, policy, tokenizer, rewarder
        self.settings, self.rollout, self.max_steps = settings, rollout, max_steps
        self.budget = rollout.max_new_tokens

    def plan(self, batch: Sequence[TrainPrompt], correct: Tensor, step: int, seeds: RoundSeeds) -> GuidancePlan:
        plan = self.whole.plan(batch, correct, step, seeds)
        if not plan.injections:
            return plan
        fraction = prefix_fraction(self.settings, step, self.max_steps)
        prefixes = [self._prefix(inj.text, batch[inj.prompt_index].answer, fraction) for inj in plan.injections]
        rollouts = self._continue(batch, plan.injections, prefixes, seeds)
        texts = [self.tokenizer.decode(p + r.token_ids, skip_special_tokens=True) for p, r in zip(prefixes, rollouts)]
        given = [len(self.tokenizer.decode(p, skip_special_tokens=True)) for p in prefixes]
        answers = [batch[inj.prompt_index].answer for inj in plan.injections]
        lengths = [len(p) + len(r.token_ids) for p, r in zip(prefixes, rollouts)]
        scored = self.rewarder(texts, answers, lengths, own_from=given)
        injections = [replace(inj, continuation=Continuation(prefix, rollout, self.settings.loss_on_prefix,
                                                             bool(scored.correct[i]), float(scored.rewards[i])))
                      for i, (inj, prefix, rollout) in enumerate(zip(plan.injections, prefixes, rollouts))]
        plan.report.prefix_tokens.extend(len(p) for p in prefixes)
        return GuidancePlan(injections, plan.report)

    def _prefix(self, text: str, answer: str, fraction: float) -> list[int]:
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        n = prefix_length(encoded["offset_mapping"], answer_start(text, answer), fraction)
        return list(encoded["input_ids"][:min(n, self.budget - 1)])

    def _continue(self, batch: Sequence[TrainPrompt], injections: Sequence[Injection], prefixes: list[list[int]],
                  seeds: RoundSeeds) -> list[Rollout]:
        """The student's continuations, one per injection, a generate call per chunk of the
        batch's prompts (as their rollouts), each with the budget its longest prefix leaves and
        every continuation cut to what its own prefix leaves."""
        out: dict[int, Rollout] = {}
        for start, end, seed in seeds.chunks(purpose="prefix"):
            mine = [i for i, inj in enumerate(injections) if start <= inj.prompt_index < end]
            if not mine:
                continue
            budget = self.budget - min(len(prefixes[i]) for i in mine)
            settings = self.rollout.model_copy(update={"max_new_tokens": budget})
            prompts = [list(batch[injections[i].prompt_index].token_ids) + prefixes[i] for i in mine]
            for i, group in zip(mine, self.policy.generate(prompts, 1, seed=seed, settings=settings)):
                out[i] = _within(group[0], self.budget - len(prefixes[i]))
        return [out[i] for i in range(len(injections))]


def _within(rollout: Rollout, limit: int) -> Rollout:
    """A continuation cut to the tokens left after its prefix (generated with a common budget)."""
    if len(rollout.token_ids) <= limit:
        return rollout
    logprobs = None if rollout.logprobs is None else rollout.logprobs[:limit]
    return Rollout(rollout.token_ids[:limit], "length", logprobs)


def open_guide(cfg, lookup: Lookup | None, policy, tokenizer, rewarder: Rewarder) -> Guide:
    """The run's guide (``cfg``: the ``TrainConfig``): whole traces (AMPO), or with
    ``guidance.prefix`` their prefixes, continued by the student."""
    scorer = StudentScorer(policy, tokenizer, cfg.guidance, cfg.target_length)
    whole = WholeTraces(cfg.guidance, lookup, scorer)
    if cfg.guidance.prefix is None:
        return whole
    return PrefixTraces(whole, policy, tokenizer, rewarder, cfg.guidance.prefix, cfg.rollout, cfg.max_steps)
