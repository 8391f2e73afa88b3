"""Rollouts behind one small interface: prompt token ids in, G sampled responses per prompt out.

    engine = TransformersRollout(lambda: unwrapped_model, tokenizer, cfg.rollout)
    groups = engine.generate([prompt_ids, ...], n=G)       # -> [[Rollout x G] per prompt]
    engine.after_update()                                   # weights changed (a no-op here)

The loop only sees this interface, so a vLLM engine (colocated, weights or only the LoRA adapter
pushed in ``after_update``) can replace transformers `generate` without touching it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Protocol, Sequence

import torch

from ampo_train.config import RolloutSettings

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Rollout:
    token_ids: list[int]  # generated tokens, through the first EOS when there is one
    finish_reason: FinishReason  # "stop": ended with EOS; "length": cut at max_new_tokens


class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], n: int) -> list[list[Rollout]]:
        """``n`` samples for each prompt (token ids, no padding), in prompt order."""
        ...

    def after_update(self) -> None:
        """Called after every optimizer update, so an engine holding its own copy of the weights can sync."""
        ...


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a response: the generation config's EOS ids and the tokenizer's."""
    config = getattr(model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None)
    found = set(ids if isinstance(ids, list) else [ids]) if ids is not None else set()
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return sorted(found)


class TransformersRollout:
    """Batched ``model.generate`` on the training model itself (shared weights: nothing to sync).

    Sampling draws from torch's global generator, so the trainer's seeding and the RNG state saved
    in checkpoints make rollouts reproducible on a given machine.
    """

    def __init__(self, model_fn: Callable[[], torch.nn.Module], tokenizer, settings: RolloutSettings):
        self.model_fn = model_fn  # returns the unwrapped (no DDP) model at call time
        self.tokenizer = tokenizer
        self.settings = settings
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = eos_token_ids(model_fn(), tokenizer)
        if not self.eos_ids:
            raise ValueError("the student has no EOS token: responses could never finish")

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], n: int) -> list[list[Rollout]]:
        step = self.settings.batch_size or len(prompts)
        out: list[list[Rollout]] = []
        for start in range(0, len(prompts), step):
            out.extend(self._generate(prompts[start:start + step], n))
        return out

    def _generate(self, prompts: Sequence[Sequence[int]], n: int) -> list[list[Rollout]]:
        model = self.model_fn()
        device = next(model.parameters()).device
        width = max(len(p) for p in prompts)
        # Left padding: every prompt ends where generation starts.
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, ids in enumerate(prompts):
            input_ids[i, width - len(ids):] = torch.as_tensor(list(ids), dtype=torch.long)
            attention[i, width - len(ids):] = 1
        s = self.settings
        # min_p = 0 filters nothing, yet transformers still adds a MinP warper for it (a softmax, a
        # top-k and a scatter over the vocabulary at every generated token); pass it only to
        # cancel a min_p the model's own generation config sets.
        cancel = {"min_p": 0.0} if getattr(getattr(model, "generation_config", None), "min_p", None) else {}
        was_training = model.training
        model.eval()  # no dropout while sampling
        try:
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                # Every knob that reshapes the distribution is set explicitly: a None would be filled
                # from the model's generation_config (hub models ship top_k, repetition_penalty, ...),
                # and the loss's log-probs must describe the distribution that actually sampled.
                do_sample=True,
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k,
                typical_p=1.0,
                repetition_penalty=1.0,
                no_repeat_ngram_size=0,
                max_new_tokens=s.max_new_tokens,
                num_return_sequences=n,
                pad_token_id=self.pad_id,
                eos_token_id=self.eos_ids,
                **cancel,
            )
        finally:
            model.train(was_training)
        completions = output[:, width:].tolist()
        rollouts = [self._one(tokens) for tokens in completions]
        return [rollouts[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _one(self, tokens: list[int]) -> Rollout:
        eos = set(self.eos_ids)
        stop = next((i for i, t in enumerate(tokens) if t in eos), None)
        if stop is None:
            return Rollout(tokens, "length")
        return Rollout(tokens[:stop + 1], "stop")

    def after_update(self) -> None:
        pass  # generate runs on the training weights themselves
