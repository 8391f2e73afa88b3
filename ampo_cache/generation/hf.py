"""The transformers backend: batched `generate` on CPU or GPU. The embedded default and the tests'."""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from ampo_cache.generation import Conversation, Generation
from ampo_common.sequences import cut_at_eos, eos_token_ids
from ampo_cache.teachers import Teacher


def pick_dtype(name: str, device: str) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class TransformersBackend:
    name = "transformers"

    def __init__(self, teacher: Teacher, device: str | None = None, model: torch.nn.Module | None = None):
        """``model``: an already loaded model to sample from (e.g. a student with its LoRA adapter
        merged) instead of loading ``teacher.model``; the tokenizer still comes from that folder."""
        hf_logging.disable_progress_bar()  # our own progress bar is on screen
        self.teacher = teacher
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(teacher.model)
        # Left padding: every prompt in a batch then ends where generation starts.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(teacher.model, dtype=pick_dtype(teacher.dtype, self.device))
        self.model = model.to(self.device).eval()
        self.eos_ids = set(eos_token_ids(self.model, self.tokenizer))

    def render(self, conversations: Sequence[Conversation]) -> list[str]:
        return [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]

    @torch.no_grad()
    def generate(self, conversations: Sequence[Conversation], n: int, seed: int | None = None) -> list[list[Generation]]:
        sampling = self.teacher.sampling
        # The chat template already holds any BOS it wants: add no special tokens twice.
        batch = self.tokenizer(self.render(conversations), return_tensors="pt", padding=True,
                               add_special_tokens=False).to(self.device)
        if seed is not None:
            torch.manual_seed(seed)
        greedy = sampling.temperature == 0
        output = self.model.generate(
            **batch,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=sampling.top_k or None,
            max_new_tokens=sampling.max_tokens,
            num_return_sequences=n,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=sorted(self.eos_ids),
        )
        completions = output[:, batch["input_ids"].shape[1]:].tolist()
        results = [self._one(tokens) for tokens in completions]
        return [results[i * n:(i + 1) * n] for i in range(len(conversations))]

    def _one(self, tokens: list[int]) -> Generation:
        kept, finish_reason = cut_at_eos(tokens, self.eos_ids)
        return Generation(text=self.tokenizer.decode(kept, skip_special_tokens=True), num_tokens=len(kept),
                          finish_reason=finish_reason)

    def close(self) -> None:
        del self.model
        if self.device == "cuda":
            torch.cuda.empty_cache()
