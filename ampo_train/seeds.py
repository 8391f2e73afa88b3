"""Where a step's randomness comes from: keyed by the *global* position of each prompt in the
step, never by the process, so a run draws the same rollouts and the same guidance on any number
of processes, and a resumed run draws what the uninterrupted one would have.

    seeds = RoundSeeds(cfg.seed, step, round_index, positions, chunk=cfg.rollout.batch_size or len(positions))
    for start, end, seed in seeds.chunks():   # one generate call per chunk of this process's prompts
        ...
    rng = seeds.prompt_rng(b)                 # guidance's draws for this process's prompt b

A generate call's seed is keyed by the global position of its first prompt. Its samples depend on
which prompts share the call, so processes reproduce one process exactly when the calls are the
same: ``rollout.batch_size`` dividing each process's share of an update
(``mini_batch_prompts / processes``; ``data.rank_positions``). Guidance draws are per prompt and
always the same.

A generate call samples from a generator seeded for that call (the engines' private streams), so
nothing depends on torch's global generator or on what else the process drew before.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass


def rollout_seed(seed: int, step: int, position: int, round_index: int = 0, purpose: str = "rollout") -> int:
    """The seed of one generate call: a hash of (seed, step, the global position of the call's first
    prompt, the dynamic-sampling round), so calls never share a stream; ``purpose`` separates the
    continuations of prefix guidance from the rollouts of the same prompts."""
    key = f"ampo-{purpose}/{seed}/{step}/{position}" + (f"/{round_index}" if round_index else "")
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFF_FFFF


@dataclass(frozen=True)
class RoundSeeds:
    """One sampling round's seeds on one process."""

    seed: int  # train.yaml's seed
    step: int
    round_index: int  # dynamic sampling's round (0: the step's first)
    positions: tuple[int, ...]  # the global position, in the round's prompts, of each of this process's prompts
    chunk: int  # prompts per generate call (rollout.batch_size, or this process's share)

    def chunks(self, purpose: str = "rollout") -> list[tuple[int, int, int]]:
        """(start, end, seed) of each generate call over this process's prompts; a call's seed
        depends on the global position of its first prompt alone."""
        count = len(self.positions)
        return [(start, min(start + self.chunk, count),
                 rollout_seed(self.seed, self.step, self.positions[start], self.round_index, purpose))
                for start in range(0, count, self.chunk)]

    def prompt_rng(self, b: int) -> random.Random:
        """Guidance's generator for this process's prompt ``b`` (hybrid draws, random ranking,
        replaced slots)."""
        return random.Random(f"ampo-guidance/{self.seed}/{self.step}/{self.round_index}/{self.positions[b]}")
