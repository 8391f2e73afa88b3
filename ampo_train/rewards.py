"""Rewards of on-policy responses: the shared verifier's verdict, plus the reference's optional terms.

    reward = (1 - format_coef) x correct + format_coef x format          (format_coef = 0: 0/1)
    reward -= 1   if repetition_penalty and reward != 0 and some window of words repeats too often
    reward += overlong_penalty(length)    DAPO's soft length penalty (overlong.soft_penalty_tokens)

``correct`` comes from ``ampo_cache.verify`` (the same judge as the cache build), so a response
and a cached trace with the same final answer are judged alike. Accuracy is logged from the
verifier's verdicts, not from the reward, so it means the same with or without the extra terms.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ampo_cache.boxed import boxes
from ampo_cache.verify import Verifier
from ampo_train.config import RewardSettings


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


def score_responses(verifier: Verifier, texts: Sequence[str], answers: Sequence[str], settings: RewardSettings) -> Rewards:
    """Verify each response against its prompt's ground truth and turn the verdicts into rewards."""
    verdicts = verifier.verify(list(texts), list(answers))
    correct = torch.tensor([v.correct for v in verdicts], dtype=torch.bool)
    rewards = correct.to(torch.float32)
    if settings.format_coef:
        fmt = torch.tensor([format_ok(t) for t in texts], dtype=torch.float32)
        rewards = (1 - settings.format_coef) * rewards + settings.format_coef * fmt
    if settings.repetition_penalty:
        repeated = torch.tensor(
            [has_repetition(t, settings.repetition_window, settings.repetition_count) for t in texts], dtype=torch.bool)
        rewards = torch.where(repeated & (rewards != 0), rewards - 1.0, rewards)
    return Rewards(rewards, correct, [v.status for v in verdicts])
