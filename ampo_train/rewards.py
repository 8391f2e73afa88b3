"""Rewards of on-policy responses: the shared verifier's verdict, plus the reference's optional terms.

    reward = (1 - format_coef) x correct + format_coef x format          (format_coef = 0: 0/1)
    reward -= 1   if repetition_penalty and reward != 0 and some window of words repeats too often
    reward += overlong_penalty(length)    DAPO's soft length penalty (overlong.soft_penalty_tokens)

``correct`` comes from ``ampo_cache.verify`` (the same judge as the cache build), so a response
and a cached trace with the same final answer are judged alike. The two are kept apart: the
verdict (``Rewards.correct``) is what accuracy, the guidance rules and dynamic sampling read; the
shaped reward (``Rewards.rewards``) is what the advantages are computed from. So a length penalty
or a format term never decides that a solved prompt failed.

    rewarder = Rewarder(verifier, cfg.reward, cfg.overlong, cfg.rollout.max_new_tokens)
    scored = rewarder(texts, answers, lengths)   # rollouts and prefix continuations alike
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ampo_cache.boxed import boxes
from ampo_cache.verify import Verifier, answer_position
from ampo_train.config import OverlongSettings, RewardSettings


def format_ok(text: str) -> bool:
    """The answer format: exactly one ``\\boxed{...}`` (our traces' convention; the reference checks
    for exactly one ``<answer>...</answer>``)."""
    return len(boxes(text)) == 1


def has_repetition(text: str, window: int = 10, count: int = 10) -> bool:
    """True when some run of ``window`` consecutive words occurs at least ``count`` times."""
    words = text.split()
    if len(words) < window + count - 1:
        return False
    seen = Counter(tuple(words[i:i + window]) for i in range(len(words) - window + 1))
    return max(seen.values()) >= count


def overlong_penalty(lengths: Tensor, max_tokens: int, cache_tokens: int, penalty: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment: 0 up to ``max_tokens - cache_tokens`` tokens, then falling
    linearly to ``-penalty`` at ``max_tokens`` (and ``-penalty`` beyond). ``lengths``: ``[N]``
    generated tokens (the EOS included); returns ``[N]`` float32 to add to the rewards."""
    free = max_tokens - cache_tokens
    over = (lengths.to(torch.float32) - free).clamp(min=0.0) / cache_tokens
    return -penalty * over.clamp(max=1.0)


@dataclass
class Rewards:
    rewards: Tensor  # [N] float32
    correct: Tensor  # [N] bool, the verifier's verdict
    statuses: list[str]  # the verifier's status per response


def score_responses(verifier: Verifier, texts: Sequence[str], answers: Sequence[str], settings: RewardSettings,
                    own_from: Sequence[int] | None = None) -> Rewards:
    """Verify each response against its prompt's ground truth and turn the verdicts into rewards.

    ``own_from``: per response, the character where the student's own text starts (prefix
    guidance: after the given prefix); a response counts as correct only if the answer the
    verifier read lies there, so a prefix that already stated the answer earns nothing."""
    verdicts = verifier.verify(list(texts), list(answers))
    correct = torch.tensor([v.correct and (own_from is None or (answer_position(t) or 0) >= own_from[i])
                            for i, (v, t) in enumerate(zip(verdicts, texts))], dtype=torch.bool)
    rewards = correct.to(torch.float32)
    if settings.format_coef:
        fmt = torch.tensor([format_ok(t) for t in texts], dtype=torch.float32)
        rewards = (1 - settings.format_coef) * rewards + settings.format_coef * fmt
    if settings.repetition_penalty:
        repeated = torch.tensor(
            [has_repetition(t, settings.repetition_window, settings.repetition_count) for t in texts], dtype=torch.bool)
        rewards = torch.where(repeated & (rewards != 0), rewards - 1.0, rewards)
    return Rewards(rewards, correct, [v.status for v in verdicts])


class Rewarder:
    """The step's reward function: the verifier, the reward terms and DAPO's soft overlong penalty
    (``overlong.soft_penalty_tokens``), for every response the student wrote (rollouts and prefix
    continuations: ``lengths`` counts the whole response, a given prefix included)."""

    def __init__(self, verifier: Verifier, settings: RewardSettings, overlong: OverlongSettings, max_tokens: int):
        self.verifier, self.settings, self.overlong, self.max_tokens = verifier, settings, overlong, max_tokens

    def __call__(self, texts: Sequence[str], answers: Sequence[str], lengths: Sequence[int],
                 own_from: Sequence[int] | None = None) -> Rewards:
        """``lengths``: tokens per response (the soft penalty); ``own_from``: see ``score_responses``."""
        scored = score_responses(self.verifier, texts, answers, self.settings, own_from)
        if self.overlong.soft_penalty_tokens:
            penalty = overlong_penalty(torch.tensor(list(lengths)), self.max_tokens, self.overlong.soft_penalty_tokens,
                                       self.overlong.penalty)
            scored = Rewards(scored.rewards + penalty, scored.correct, scored.statuses)
        return scored
