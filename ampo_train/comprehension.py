"""Comprehension-based ranking of teacher traces: how well does the current student follow a trace?

A trace's final answer is swapped for the ground truth, the student reads prompt + trace once
(no grad), and the score is the mean probability it gives the ground-truth answer tokens. A
trace that leads the student to "expect" the right answer is one it understands. The pure parts
(text surgery, token/answer overlap, score formulas) are separate from the single model-facing
helper ``score_candidates``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

from ampo_cache.boxed import last_box
from ampo_train.config import ScoreKind
from ampo_train.forward import device_of, eval_mode, final_hidden, lm_head
from ampo_train.lm_head import DEFAULT_CHUNK_SIZE, chunked_logprobs


def with_ground_truth(trace_text: str, answer: str) -> tuple[str, tuple[int, int] | None]:
    """Replace the content of the last ``\\boxed{...}`` by ``answer``.

    The box is the one the verifier reads the answer from (``ampo_cache.boxed.last_box``): the
    last *balanced* one, so a trailing unclosed ``\\boxed{`` (a truncated trace) is skipped in
    favour of the one before it. (The reference instead keeps the text up to its last
    ``<answer>`` tag; our traces put their final answer in a box.)

    Returns:
        (new_text, (start, end)) where ``new_text[start:end] == answer``; or
        (trace_text, None) when the text has no balanced ``\\boxed{}``.
    """
    box = last_box(trace_text)
    if box is None:
        return trace_text, None
    start = box.content_start
    return trace_text[:start] + answer + trace_text[box.content_end:], (start, start + len(answer))


def no_reasoning_trace(answer: str) -> str:
    """A "trace" with no reasoning, only the boxed answer: scoring it gives the student's
    probability of the ground truth straight after the prompt (the optional baseline "score A";
    score - score A is how much a teacher's reasoning helps)."""
    return "\\boxed{" + answer + "}"


def answer_token_mask(offsets: Sequence[tuple[int, int]], span: tuple[int, int] | None) -> Tensor:
    """``[T]`` bool: True for every token whose character span overlaps the answer span.

    Offsets are (start, end) character positions of the tokens in the text the span refers to
    (a fast tokenizer's ``offset_mapping``). Overlap is strict: (s, e) overlaps [a, b) iff
    s < b and e > a, so neighbours that only touch the answer do not count, a token straddling
    its edge (e.g. ``{1`` in a byte-level BPE) does, and zero-width tokens (specials) never do.
    """
    if span is None:
        return torch.zeros(len(offsets), dtype=torch.bool)
    a, b = span
    return torch.tensor([e > s and s < b and e > a for s, e in offsets], dtype=torch.bool)


def _empty_score(kind: ScoreKind) -> float:
    # The worst value of each scale: probabilities bottom out at 0, log-probs at -inf (0 would be
    # the *best* mean log-prob).
    return float("-inf") if kind == "mean_logp" else 0.0


def comprehension_score(token_logprobs: Tensor, answer_mask: Tensor, kind: ScoreKind = "mean_prob") -> float:
    """Score from the student's log-probs of a trace's tokens, over the answer tokens.

    Args:
        token_logprobs: ``[T]`` log p of each response token (at the scoring temperature).
        answer_mask: ``[T]`` bool, from ``answer_token_mask``.
        kind: ``mean_prob`` (AMPO default, the reference's ``mean_exp_log_softmax``): mean of
            exp(log p); ``mean_logp``: mean log p; ``prob``: exp(sum log p), the probability
            of the whole answer; ``geo_mean_prob``: exp(mean log p).

    Returns:
        A float, higher is better. No answer token: 0 (for ``mean_logp``: -inf), the lowest
        score, so a trace with no locatable answer is ranked last.
    """
    keep = answer_mask.to(torch.bool)
    if not bool(keep.any()):
        return _empty_score(kind)
    lp = token_logprobs[keep].double()
    if kind == "mean_prob":
        return float(lp.exp().mean())
    if kind == "mean_logp":
        return float(lp.mean())
    if kind == "prob":
        return float(lp.sum().exp())
    if kind == "geo_mean_prob":
        return float(lp.mean().exp())
    raise ValueError(f"unknown comprehension score kind {kind!r}")


def trace_likelihood_score(token_logprobs: Tensor, mask: Tensor | None = None) -> float:
    """Length-normalised log-likelihood: mean log p over the trace's tokens (``[T]``).

    ``mask`` (``[T]`` bool) restricts the tokens; -inf when nothing is left.
    """
    lp = token_logprobs if mask is None else token_logprobs[mask.to(torch.bool)]
    if lp.numel() == 0:
        return float("-inf")
    return float(lp.double().mean())


@dataclass(frozen=True)
class Scoring:
    """How ``score_candidates`` scores (the trainer's comes from ``GuidanceSettings`` and the policy)."""

    scored: Literal["answer", "trace"] = "answer"  # answer: the ground-truth answer tokens' score of `kind`
    #                                   (comprehension); trace: mean log-prob of the unmodified trace
    kind: ScoreKind = "mean_prob"
    temperature: float = 1.0  # the rollout temperature (logits are divided by it)
    max_response_tokens: int | None = None  # cut each trace here first (the injection limit): an answer beyond it
    #                                          is not locatable
    chunk_size: int = DEFAULT_CHUNK_SIZE  # positions per LM-head chunk: only the scored positions go through the head


# A row to score: the trace's tokens and which of them are scored (None: nothing scorable).
_ScoredRow = tuple[list[int], list[bool]]


def _rendered(tokenizer, prompt: str | list[dict]) -> list[int]:
    text = prompt if isinstance(prompt, str) else \
        tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not prompt_ids:
        raise ValueError("the prompt tokenises to nothing; the first trace token would have no prediction")
    return prompt_ids


def _scored_row(tokenizer, text: str, answer: str, scoring: Scoring) -> _ScoredRow | None:
    """One candidate as tokens and the mask of its scored tokens (cut after the last answer token
    for comprehension: a causal model's logits there cannot depend on what follows)."""
    limit = scoring.max_response_tokens
    if scoring.scored == "trace":
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])[:limit]
        return (ids, [True] * len(ids)) if ids else None
    if scoring.scored != "answer":
        raise ValueError(f"unknown scoring target {scoring.scored!r}")
    new_text, span = with_ground_truth(text, answer)
    if span is None:
        return None
    enc = tokenizer(new_text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])[:limit]
    mask = answer_token_mask(list(enc["offset_mapping"])[: len(ids)], span).tolist()
    if not any(mask):
        return None
    last = max(j for j, m in enumerate(mask) if m)
    return ids[: last + 1], mask[: last + 1]


def _scored_logprobs(model, prompt_ids: list[int], rows: Sequence[_ScoredRow], pad_id: int,
                     scoring: Scoring) -> list[Tensor]:
    """One batched forward over prompt + each row; the log-probs of each row's scored tokens."""
    device = device_of(model)
    p = len(prompt_ids)
    width = p + max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    # Response token j sits at p + j and is predicted by the hidden state at p + j - 1; only those
    # (row, position) pairs go through the LM head.
    scored = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    for r, (ids, mask) in enumerate(rows):
        input_ids[r, : p + len(ids)] = torch.tensor(prompt_ids + ids)
        attention[r, : p + len(ids)] = 1
        scored[r, p - 1:p - 1 + len(mask)] = torch.tensor(mask, dtype=torch.bool)
    input_ids, attention, scored = input_ids.to(device), attention.to(device), scored.to(device)
    with eval_mode(model):
        hidden = final_hidden(model, input_ids, attention)[:, :-1]
        lp = chunked_logprobs(hidden, lm_head(model), input_ids[:, 1:], scoring.temperature,
                              chunk_size=scoring.chunk_size, mask=scored).cpu()  # [N, width - 1], 0 where not scored
    return [lp[r, [p + j - 1 for j, m in enumerate(mask) if m]] for r, (_, mask) in enumerate(rows)]


@torch.no_grad()
def score_candidates(model, tokenizer, prompt: str | list[dict], trace_texts: Sequence[str], answer: str,
                     scoring: Scoring = Scoring()) -> list[float]:
    """Score candidate traces for one prompt with the current student in ONE batched forward.

    Args:
        model: a ``transformers`` causal LM (final hidden states and ``get_output_embeddings()``),
            the weights of this step before the update. It is put in eval mode for the pass
            (no dropout noise in the scores) and restored afterwards.
        tokenizer: the student's *fast* tokenizer (offset mapping is required).
        prompt: chat messages (rendered with the chat template and ``add_generation_prompt``) or
            an already rendered prompt string.
        trace_texts: the candidates' texts, exactly as they would be injected.
        answer: the ground-truth answer text that replaces each trace's last boxed content.
        scoring: what is scored and how (``Scoring``).

    Returns:
        One float per trace, in input order (see ``comprehension_score`` /
        ``trace_likelihood_score`` for the empty cases).

    Prompt and trace are tokenised separately (``add_special_tokens=False``) and concatenated,
    as the trainer does for rollouts and injected traces.
    """
    prompt_ids = _rendered(tokenizer, prompt)
    rows = [_scored_row(tokenizer, text, answer, scoring) for text in trace_texts]
    empty = _empty_score(scoring.kind) if scoring.scored == "answer" else float("-inf")
    live = [row for row in rows if row is not None]
    if not live:
        return [empty] * len(rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scored = iter(_scored_logprobs(model, prompt_ids, live, pad, scoring))
    scores: list[float] = []
    for row in rows:
        if row is None:
            scores.append(empty)
            continue
        row_lp = next(scored)
        if scoring.scored == "answer":
            scores.append(comprehension_score(row_lp, torch.ones_like(row_lp, dtype=torch.bool), scoring.kind))
        else:
            scores.append(trace_likelihood_score(row_lp))
    return scores
