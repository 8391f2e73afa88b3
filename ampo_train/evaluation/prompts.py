"""What the model is asked, and in which calls: chat rendering, the context check, generation batches.

The chat. A row whose prompt is a chat-message list (verl's ``prompt``: system turn + user turn) is
rendered with the model's chat template exactly as given. ``system_prompt`` replaces its system
turn(s) (``""`` removes them; ``None`` keeps the file's). A plain-text problem becomes one user
turn, after a system turn ``system_prompt`` when that is set, as in training.

The context. A prompt plus ``max_tokens`` new tokens must fit the model's positions
(``max_position_embeddings``). A longer prompt is an error naming its file, row and lengths,
raised while the prompts are prepared, before any generation; with ``truncate="left"`` its first
tokens are cut instead (the end of a prompt holds the question and the assistant header, as in
verl's ``truncation: left``), and the cut is counted in the results.

The batches. Problems are packed into generate calls by a token budget, as the trainer packs its
micro-batches (``ampo_train.batching.token_budget_batches``): a call's padded size, sequences x
(longest prompt + ``max_tokens``), stays within the budget, whatever the prompts' lengths. The n
samples of a problem always share a call; a problem whose n sequences alone exceed the budget goes
alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ampo_common.errors import InputError
from ampo_cache.generation import conversation
from ampo_train.batching import token_budget_batches
from ampo_train.evaluation.benchmarks import BenchItem

TRUNCATIONS = ("error", "left")
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


@dataclass(frozen=True)
class Prompt:
    """One problem's prompt as the model receives it."""

    ids: tuple[int, ...]
    text: str  # the rendered chat (after a cut: the kept tokens, decoded)
    cut: int = 0  # tokens cut from the left to fit the context


def model_context(config) -> int | None:
    """The positions a model holds, from its transformers config (None when it does not say)."""
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class PromptRenderer:
    """Chat messages -> token ids for one model (its tokenizer and context), checked against the context.

    ``model`` names the model in error messages; ``context`` None skips the context check (an
    engine whose model does not say).
    """

    def __init__(self, tokenizer, system_prompt: str | None, max_tokens: int, context: int | None = None,
                 truncate: str = "error", model: str = "the model"):
        if truncate not in TRUNCATIONS:
            raise InputError("--truncate-prompts", f"expected one of {', '.join(TRUNCATIONS)}, got {truncate!r}")
        self.tokenizer, self.system_prompt, self.max_tokens = tokenizer, system_prompt, max_tokens
        self.context, self.truncate, self.model = context, truncate, model

    def chat(self, item: BenchItem | str) -> list[dict[str, str]]:
        """The messages the model is prompted with (see the module's docstring)."""
        if isinstance(item, str) or item.messages is None:
            return conversation(item if isinstance(item, str) else item.problem, self.system_prompt)
        turns = [{"role": role, "content": content} for role, content in item.messages]
        if self.system_prompt is None:
            return turns
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [t for t in turns if t["role"] != "system"]

    def text(self, item: BenchItem | str) -> str:
        return self.tokenizer.apply_chat_template(self.chat(item), add_generation_prompt=True, tokenize=False)

    def ids(self, items: Sequence[BenchItem | str]) -> list[list[int]]:
        """Rendered prompts as token ids (the template holds any BOS: no special tokens added)."""
        return [self.tokenizer(self.text(i), add_special_tokens=False)["input_ids"] for i in items]

    def room(self) -> int | None:
        """The longest prompt that leaves room for ``max_tokens`` new tokens (None: unchecked)."""
        if self.context is None:
            return None
        room = self.context - self.max_tokens
        if room < 1:
            raise InputError("--max-tokens", f"{self.max_tokens} new tokens leave no room for a prompt: {self.model} "
                                             f"holds {self.context} positions (max_position_embeddings)")
        return room

    def prepare(self, items: Sequence[BenchItem]) -> list[Prompt]:
        """Every item's prompt, fitted to the context; a prompt too long (unless cut) is an error
        naming the first such row and how many there are, before anything is generated."""
        if not items:
            return []
        room = self.room()
        texts = [self.text(i) for i in items]
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        long = [k for k, row in enumerate(ids) if room is not None and len(row) > room]
        if long and self.truncate == "error":
            raise InputError(self._where(items, long[0]), self._too_long(len(ids[long[0]]), room, long, len(items)))
        prompts = []
        for k, (text, row) in enumerate(zip(texts, ids)):
            cut = len(row) - room if room is not None and len(row) > room else 0
            if cut:
                row = row[cut:]
                text = self.tokenizer.decode(row, skip_special_tokens=False)
            prompts.append(Prompt(tuple(row), text, cut))
        return prompts

    @staticmethod
    def _where(items: Sequence[BenchItem], k: int) -> str:
        return items[k].where or f"problem {k}"

    def _too_long(self, length: int, room: int, long: list[int], count: int) -> str:
        others = f"; {len(long)} of the {count} prompts are too long" if len(long) > 1 else ""
        return (f"the prompt is {length} tokens (chat template applied) but {self.model} holds {self.context} "
                f"positions and --max-tokens {self.max_tokens} leaves {room} for the prompt{others}: shorten the "
                f"prompts, lower --max-tokens, or cut them with --truncate-prompts left")


def generation_batches(prompt_lengths: Sequence[int], samples: int, max_tokens: int, budget: int) -> list[list[int]]:
    """Problem indices per generate call: ``samples`` sequences per problem, and per call
    ``samples x problems x (longest prompt + max_tokens) <= budget`` (a problem over it alone goes
    alone). Longest prompts first, so a budget too large for memory fails at the first call."""
    if budget < 1:
        raise InputError("--batch-tokens", f"expected a positive token budget, got {budget}")
    per_sequence = max(1, budget // samples)
    return token_budget_batches([(length, max_tokens) for length in prompt_lengths], per_sequence)
