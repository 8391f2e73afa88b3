"""What the trainer feeds the model: prompts rendered with the student's chat template, teacher
traces tokenised with the student's tokenizer, rows padded into batches, and the prompt order.

A *row* is one response to one prompt, on-policy or injected: ``prompt_ids + response_ids``.
Batches are laid out like TRL's: prompts left-padded to a common width P, responses
right-padded to a common width R, so response token j of every row sits at column P + j and is
predicted by the logits at column P + j - 1. Position ids are counted from each row's first real
token, so a left-padded prompt sees the same positions as it did during generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ampo_cache.generation import conversation
from ampo_cache.prompts import Prompt


@dataclass(frozen=True)
class TrainPrompt:
    """A training prompt with its rendering for this student."""

    prompt: Prompt
    text: str  # the chat template's rendering, generation prompt included
    token_ids: tuple[int, ...]

    @property
    def prompt_id(self) -> str:
        return self.prompt.prompt_id

    @property
    def answer(self) -> str:
        return self.prompt.answer


def render_prompt(tokenizer, problem: str, system_prompt: str | None = None) -> str:
    """The student's chat template applied to (system, user) with the assistant turn opened.

    A tokenizer without a chat template (a base model) gets the bare problem and a newline.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(conversation(problem, system_prompt), add_generation_prompt=True, tokenize=False)
    return (f"{system_prompt}\n\n" if system_prompt else "") + problem + "\n"


def prepare_prompts(prompts: Sequence[Prompt], tokenizer, system_prompt: str | None = None) -> list[TrainPrompt]:
    """Render and tokenise every prompt once. The template already holds any BOS it wants, so no
    special tokens are added (the same convention as the cache build and comprehension scoring)."""
    out = []
    for p in prompts:
        text = render_prompt(tokenizer, p.problem, system_prompt)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"prompt {p.prompt_id} renders to no tokens")
        out.append(TrainPrompt(p, text, tuple(ids)))
    return out


def assistant_text(trace_text: str, rendered_prompt: str) -> str:
    """A cached trace as the assistant's continuation of ``rendered_prompt``.

    Reasoning models' templates may already open the think block (``...<think>\\n``); a trace
    that starts with the same marker would then repeat it, so it is dropped (as the reference
    does).
    """
    for marker in ("<think>\n", "<think>"):
        if rendered_prompt.endswith(marker) and trace_text.startswith(marker):
            return trace_text[len(marker):]
    return trace_text


def teacher_response_ids(tokenizer, text: str, max_length: int) -> list[int]:
    """A teacher trace as student tokens: the trace's tokens plus one EOS, cut at ``max_length``.

    A trace longer than that loses its tail and its EOS (it is then, honestly, unfinished).
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids[:max_length]


@dataclass(frozen=True)
class Row:
    """One response to one prompt, as the loss sees it: an on-policy rollout, an injected teacher
    trace, or (prefix guidance) a trace's prefix continued by the student. Made once, complete, by
    ``sampling.build_rows``; nothing writes into it afterwards (the sampling-time and reference
    log-probs travel beside the rows: ``update.RowLogprobs``)."""

    prompt_ids: Sequence[int]
    response_ids: list[int]
    reward: float  # the shaped reward the advantage is computed from (teacher traces: teacher_reward)
    correct: bool = False  # the verifier's verdict (teacher traces: verified correct)
    is_teacher: bool = False
    teacher: str | None = None  # the teacher's name for injected rows
    finished: bool = True  # ended with EOS (rollouts cut at max_new_tokens are not)
    advantage: float = 0.0
    engine_logp: Tensor | None = field(default=None, repr=False)  # [len(response_ids)], the rollout engine's
    # Prefix guidance: the first prefix_len response tokens are a teacher's, the rest the student's
    # continuation; the prefix is trained as teacher tokens (prefix_in_loss) or is context only.
    prefix_len: int = 0
    prefix_in_loss: bool = False
    in_loss: bool = True  # False: every token masked out of the loss (overlong.filter on a truncated rollout)

    def loss_mask(self) -> list[bool]:
        """Which response tokens the loss trains (the same rule ``collate`` pads into ``response_mask``)."""
        n = len(self.response_ids)
        if not self.in_loss:
            return [False] * n
        context = 0 if (self.is_teacher or self.prefix_in_loss) else self.prefix_len
        return [False] * context + [True] * (n - context)

    @property
    def loss_tokens(self) -> int:
        """Tokens of this row the loss trains: the normaliser of every token mean counts these."""
        return sum(self.loss_mask())

    def sampled_mask(self) -> list[bool]:
        """The tokens the engine sampled and the loss trains (``rollout/logprob_diff`` compares these)."""
        if self.is_teacher:
            return [False] * len(self.response_ids)
        return [m and j >= self.prefix_len for j, m in enumerate(self.loss_mask())]


@dataclass
class RowBatch:
    """Rows padded into tensors (see the module docstring for the layout)."""

    input_ids: Tensor  # [N, P + R]
    attention_mask: Tensor  # [N, P + R]
    position_ids: Tensor  # [N, P + R]
    response_ids: Tensor  # [N, R]
    response_mask: Tensor  # [N, R] bool: the tokens that count
    is_teacher: Tensor  # [N] bool: a whole teacher trace
    teacher_tokens: Tensor  # [N, R] bool: the tokens trained as teacher tokens (whole traces, trained prefixes)
    advantages: Tensor  # [N] float32
    old_logp: Tensor | None  # [N, R] or None when not computed
    ref_logp: Tensor | None  # [N, R] or None
    engine_logp: Tensor | None  # [N, R] the engine's sampling log-probs (0 on teacher rows), or None
    prompt_width: int  # P

    @property
    def response_width(self) -> int:
        return self.response_ids.shape[1]

    def to(self, device) -> "RowBatch":
        moved = {name: (value.to(device) if isinstance(value, Tensor) else value) for name, value in self.__dict__.items()}
        return RowBatch(**moved)


def row_lengths(rows: Sequence[Row]) -> list[tuple[int, int]]:
    """(prompt tokens, response tokens) per row: what ``batching`` packs micro-batches by."""
    return [(len(r.prompt_ids), len(r.response_ids)) for r in rows]


def collate(rows: Sequence[Row], pad_id: int, old_logp: Sequence[Tensor] | None = None,
            ref_logp: Sequence[Tensor] | None = None) -> RowBatch:
    """Pad rows to ``[N, P + R]`` (prompts left, responses right); ``old_logp`` / ``ref_logp``: each
    row's sampling-time / reference log-probs, in row order (``update.RowLogprobs``), or None."""
    n = len(rows)
    p = max(len(r.prompt_ids) for r in rows)
    r_width = max(max(len(r.response_ids) for r in rows), 1)
    input_ids = torch.full((n, p + r_width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, p + r_width), dtype=torch.long)
    response_ids = torch.full((n, r_width), pad_id, dtype=torch.long)
    response_mask = torch.zeros((n, r_width), dtype=torch.bool)
    teacher_tokens = torch.zeros((n, r_width), dtype=torch.bool)
    rollouts = [r for r in rows if not r.is_teacher]
    engine = torch.zeros((n, r_width)) if rollouts and all(r.engine_logp is not None for r in rollouts) else None
    for i, row in enumerate(rows):
        lp, lr = len(row.prompt_ids), len(row.response_ids)
        input_ids[i, p - lp:p] = torch.as_tensor(list(row.prompt_ids))
        input_ids[i, p:p + lr] = torch.as_tensor(row.response_ids, dtype=torch.long)
        attention[i, p - lp:p + lr] = 1
        response_ids[i, :lr] = torch.as_tensor(row.response_ids, dtype=torch.long)
        response_mask[i, :lr] = torch.as_tensor(row.loss_mask(), dtype=torch.bool)
        if row.is_teacher:
            teacher_tokens[i] = True
        elif row.prefix_len:
            teacher_tokens[i, :row.prefix_len] = row.prefix_in_loss
        if engine is not None and not row.is_teacher:
            engine[i, :lr] = row.engine_logp
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    return RowBatch(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=position_ids,
        response_ids=response_ids,
        response_mask=response_mask,
        is_teacher=torch.tensor([r.is_teacher for r in rows], dtype=torch.bool),
        teacher_tokens=teacher_tokens,
        advantages=torch.tensor([r.advantage for r in rows], dtype=torch.float32),
        old_logp=_padded(old_logp, rows, r_width),
        ref_logp=_padded(ref_logp, rows, r_width),
        engine_logp=engine,
        prompt_width=p,
    )


def _padded(values: Sequence[Tensor] | None, rows: Sequence[Row], width: int) -> Tensor | None:
    if values is None:
        return None
    out = torch.zeros((len(rows), width))
    for i, (row, v) in enumerate(zip(rows, values)):
        out[i, :len(row.response_ids)] = v
    return out


class PromptSampler:
    """An endless, reproducible stream of prompt indices: a fresh permutation per epoch.

    The position is two integers (epoch, offset): saved in checkpoints, it lets a resumed run
    draw exactly the prompts the uninterrupted run would have. Every process holds the same
    sampler and takes its own slice of each global batch.
    """

    def __init__(self, num_prompts: int, seed: int, shuffle: bool = True):
        if num_prompts < 1:
            raise ValueError("no prompts to sample from")
        self.num_prompts, self.seed, self.shuffle = num_prompts, seed, shuffle
        self.epoch, self.offset = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_prompts)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_prompts)

    def next_batch(self, size: int) -> list[int]:
        """The next ``size`` indices of the global stream (crossing into the next epoch as needed)."""
        out: list[int] = []
        while len(out) < size:
            if self.offset == self.num_prompts:
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(size - len(out), self.num_prompts - self.offset)
            out.extend(int(i) for i in self._order[self.offset:self.offset + take])
            self.offset += take
        return out

    @property
    def epochs(self) -> float:
        """Passes over the prompts so far, fractional (1.5: half-way through the second)."""
        return self.epoch + self.offset / self.num_prompts

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "num_prompts": self.num_prompts, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["num_prompts"] != self.num_prompts:
            raise ValueError(f"checkpoint was taken with {state['num_prompts']} prompts, this run has {self.num_prompts}")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation(self.epoch)


def rank_positions(count: int, rank: int, world: int, per_update: int) -> list[int]:
    """The positions, in a step's ``count`` prompts, that process ``rank`` of ``world`` takes: its
    share of every optimizer update's ``per_update`` prompts (contiguous when the step makes one
    update). So an update trains on the same prompts whatever the process count, as one process
    would (``per_update`` and ``count`` divide by ``world``)."""
    share = per_update // world
    return [block + rank * share + i for block in range(0, count, per_update) for i in range(share)]
