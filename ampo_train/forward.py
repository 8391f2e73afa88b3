"""The student's forward passes, without ``[rows, positions, vocabulary]`` logits.

A causal LM's logits are ``[rows, positions, vocabulary]``: at Qwen's vocabulary (151,936) one
8k-token row's float32 logits are 5 GB, several times the rest of a LoRA update. The trainer needs
only the log-prob of one token per position (and the entropy), so the model runs with
``logits_to_keep=1`` (its own head on one position), the decoder's output (the normed input of the
LM head) is taken on the way, and the head is then applied a chunk of positions at a time by
``lm_head.chunked_logprobs``, forward and backward (on CUDA, a plain head through the fused Triton
kernel of ``ampo_train.fused_logprob``: TrainConfig ``logprob_kernel``).

The forward goes through the model object it is given, so a DDP wrapper's hooks (gradient
all-reduce) and a peft adapter apply as usual; the head is the unwrapped model's
``get_output_embeddings()``, whose parameters are the same tensors.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ampo_train.data import RowBatch
from ampo_train.lm_head import DEFAULT_CHUNK_SIZE, HeadPass, LogprobKernel, head_logprobs
from ampo_train.loss import token_entropy, token_logprobs


def unwrapped(model):
    """The model under a DDP / DeepSpeed / compile wrapper (a peft model stays a peft model)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def lm_head(model):
    """The LM head to apply to ``final_hidden``'s states. Models that transform the head's output
    (soft-capping, a logit scale) would need that transform too: refused rather than mis-scored."""
    inner = unwrapped(model)
    config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier"):
        value = getattr(config, name, None)
        if value is not None and value != 1.0:
            raise NotImplementedError(f"{type(inner).__name__} has {name}={value}: its logits are not head(hidden), "
                                      "which the chunked log-prob path assumes")
    return inner.get_output_embeddings()


def final_hidden(model, input_ids: Tensor, attention_mask: Tensor | None = None,
                 position_ids: Tensor | None = None) -> Tensor:
    """``[N, T, H]`` final hidden states (after the last norm: the LM head's input) at every position.

    A forward hook on the decoder (``get_decoder()``, e.g. ``LlamaModel``) takes its
    ``last_hidden_state`` during the call and is removed after it. (``output_hidden_states`` would
    do the same, but transformers 5 then installs capture hooks on every layer for good, and
    generation, which runs these layers hundreds of times per step, measured 5% slower.)
    """
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    captured: list[Tensor] = []
    handle = unwrapped(model).get_decoder().register_forward_hook(
        lambda module, args, output: captured.append(output[0]))
    try:
        try:
            model(**kwargs, logits_to_keep=1)
        except TypeError:  # a forward without logits_to_keep: its full logits are computed and dropped
            captured.clear()
            model(**kwargs)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"{type(unwrapped(model)).__name__}: expected one decoder output, got {len(captured)}")
    return captured[0]


def response_logprobs(model, mb: RowBatch, temperature: float, chunk_size: int | None = DEFAULT_CHUNK_SIZE,
                      with_entropy: bool = False, kernel: LogprobKernel = "auto") -> Tensor | tuple[Tensor, Tensor]:
    """``[N, R]`` float32 log-probs of the response tokens (and their entropy), 0 on padding.

    Response token j is predicted at column P + j - 1: the hidden states at the last R + 1
    columns but the final one. Only the response mask's positions go through the head, by the
    ``kernel`` path (``lm_head.select_logprob_kernel``: auto, chunked or fused). With
    ``with_entropy=False`` nothing of the entropy is computed.
    ``chunk_size=None``: the model's own head inside its forward (``[N, R, V]`` logits). FSDP2
    needs that for a pass with gradients: the head's sharded parameters are gathered, and their
    gradients reduced, only around the root module's own forward and backward.
    """
    r = mb.response_width
    if chunk_size is None:
        kwargs = dict(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False, logits_to_keep=r + 1)
        if mb.position_ids is not None:
            kwargs["position_ids"] = mb.position_ids
        logits = model(**kwargs).logits[:, :-1]
        logp = torch.where(mb.response_mask, token_logprobs(logits, mb.response_ids, temperature), 0.0)
        if not with_entropy:
            return logp
        return logp, torch.where(mb.response_mask, token_entropy(logits, temperature), 0.0)
    hidden = final_hidden(model, mb.input_ids, mb.attention_mask, mb.position_ids)[:, -(r + 1):-1]
    return head_logprobs(hidden, lm_head(model), mb.response_ids, HeadPass(temperature, chunk_size, with_entropy, kernel),
                         mask=mb.response_mask)


@contextlib.contextmanager
def eval_mode(model):
    """Eval mode (no dropout noise in samples or scores) for a no-grad pass, then every submodule's
    own mode again: a model whose parts were in different modes (a peft model with a frozen base
    kept in eval) comes back exactly as it was, which ``model.train(was_training)`` would not do."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def device_of(model) -> torch.device:
    return next(model.parameters()).device
