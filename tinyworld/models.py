"""Tiny Llama models and the short supervised training that gives each its skills.

Sizes are chosen for a 2-core CPU: hidden 128, 4 layers, 4 heads of 32 (vLLM's CPU attention
needs heads of 32 or more), ~0.85M parameters. Loss is on the assistant's tokens only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tinyworld.determinism import ADAMW_OPTIONS
from tinyworld.problems import Problem


@dataclass(frozen=True)
class ModelSize:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 384
    max_positions: int = 160


def new_model(tokenizer: PreTrainedTokenizerFast, size: ModelSize, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
        max_position_embeddings=size.max_positions, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def chat_example(tokenizer: PreTrainedTokenizerFast, problem: Problem, trace: str) -> tuple[list[int], int]:
    """Token ids of prompt + trace + EOS, and where the assistant's part starts."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": problem.text}], add_generation_prompt=True,
                                           tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    trace_ids = tokenizer(trace, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + trace_ids, len(prompt_ids)


def collate(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100)
    for row, (ids, start) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        labels[row, start : len(ids)] = torch.tensor(ids[start:])
    return input_ids, attention, labels


def train(
    model: LlamaForCausalLM,
    next_batch: Callable[[], list[tuple[list[int], int]]],
    steps: int,
    lr: float,
    pad_id: int,
    on_step: Callable[[float], None] | None = None,
) -> float:
    """AdamW with a short warm-up and cosine decay; returns the last loss."""
    # fused: ATen's own AdamW, whose square root is exact on every CPU (tinyworld.determinism)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98), **ADAMW_OPTIONS)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    loss_value = float("nan")
    for _ in range(steps):
        input_ids, attention, labels = collate(next_batch(), pad_id)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if on_step:
            on_step(loss_value)
    model.eval()
    return loss_value
