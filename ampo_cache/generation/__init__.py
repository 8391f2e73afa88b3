"""Generation backends behind one small interface: chat prompts in, n traces per prompt out.

    backend = open_backend(teacher)          # loads the model once
    backend.generate(conversations, n)       # -> one list of n Generation per conversation
    backend.close()                          # frees its memory before the next teacher loads

Both backends render prompts with the teacher tokenizer's own chat template, so a trace is the
same text whichever engine wrote it. The trainer's rollouts will sit behind the same shape.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Protocol, Sequence

from ampo_cache.teachers import Teacher

Conversation = list[dict]  # chat messages: [{"role": "system"|"user", "content": str}, ...]


@dataclass(frozen=True)
class Generation:
    text: str  # the assistant's text, special tokens removed
    num_tokens: int  # generated tokens, the final EOS included when there is one
    finish_reason: str  # "stop" (EOS) or "length" (max_tokens reached)


class Backend(Protocol):
    name: str

    def generate(self, conversations: Sequence[Conversation], n: int, seed: int | None = None) -> list[list[Generation]]: ...

    def close(self) -> None: ...


def conversation(problem: str, system_prompt: str | None) -> Conversation:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": problem}]


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(teacher: Teacher) -> str:
    """`auto` means vLLM where it can run well (importable and a GPU present), else transformers."""
    if teacher.backend != "auto":
        return teacher.backend
    if vllm_available():
        import torch

        if torch.cuda.is_available():
            return "vllm"
    return "transformers"


def open_backend(teacher: Teacher) -> Backend:
    name = resolve_backend(teacher)
    if name == "vllm":
        from ampo_cache.generation.vllm_backend import VLLMBackend

        return VLLMBackend(teacher)
    from ampo_cache.generation.hf import TransformersBackend

    return TransformersBackend(teacher)
