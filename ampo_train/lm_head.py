"""Per-token log-probs and entropy through the LM head, one chunk of positions at a time.

The plain path (``token_logprobs(model(...).logits, ...)``) materialises ``[N, T, V]`` logits,
plus float32 copies and autograd's saved tensors of the same size. At Qwen's vocabulary (151,936)
one 8k-token row's float32 logits alone are 5 GB. Here the logits of at most ``chunk_size``
positions exist at any moment, in the forward AND in the backward pass:

* forward: for each chunk of flattened positions, ``head(hidden_chunk)`` -> ``[C, V]`` logits ->
  log-prob of the target and (optionally) entropy -> ``[C]`` results; the logits are dropped;
* backward: each chunk's logits are recomputed from the saved ``[C, H]`` hidden states
  (``torch.utils.checkpoint``, non-reentrant), and the gradient w.r.t. the logits is formed in
  closed form from one probability buffer (``_LogProbEntropy``), then pushed through the head.

A plain ``torch.nn.Linear`` head (the common case: Qwen, Llama, tied or not, LoRA on the other
layers) runs through ``_LinearHeadLogProbs``, the same chunk loop in one autograd function that
calls ``F.linear`` itself: its weight is cast to the compute dtype once per forward pass (under
autocast a frozen float32 head was otherwise cast on every chunk, forward and backward: autocast
caches the casts of leaves that require grad only), the gradients of the chunks' hidden states go
into one ``[M, H]`` buffer, and a trainable head's weight gradient is summed chunk by chunk into one
float32 accumulator, handed to autograd once per call (micro-batch), instead of one full-size
weight gradient per chunk for autograd to cast and add. On a CPU in float32 its results are bit for
bit those of calling the head chunk by chunk (tests/test_lm_head.py).

Any other head is *called*, never unpacked into ``F.linear(h, head.weight)``: a peft/LoRA-wrapped
head, a sharded head, any callable; each of its parameters receives its gradient through autograd
as usual (checkpointing also replays the RNG, so a LoRA dropout on the head draws the same mask
when the chunk is recomputed).

On CUDA a plain head can instead go through the fused Triton kernel of ``ampo_train.fused_logprob``
(no float32 copy of any logits, one pass over each logits tile forward and backward);
``select_logprob_kernel`` picks (TrainConfig ``logprob_kernel``: auto, chunked or fused).

Prior art read (not copied): Liger-kernel's fused linear cross-entropy (chunks positions, but
computes the gradients eagerly in the forward, which only works for a scalar loss known in
advance), Apple's cut-cross-entropy (the logits tiles never leave on-chip memory; a scalar loss
too), and TRL 1.16's ``trl/kernels/chunked_logprob.py`` (cuBLAS tiles of [4096 positions x 32768
vocabulary] folded by a Triton kernel into an online logsumexp, against ``lm_head.weight``
directly, so no LoRA head). Our outputs are per-token and feed an arbitrary loss (PPO clip,
shaping, entropy bonus, KL), so the backward takes incoming per-token gradients for both outputs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from dataclasses import dataclass, replace
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

Head = Callable[[Tensor], Tensor]
LogprobKernel = Literal["auto", "chunked", "fused"]  # TrainConfig.logprob_kernel

# Positions per chunk. At V = 151,936 one chunk's float32 logits are 256 * V * 4 B = 148 MiB and
# the chunk's peak (logits, the gradient buffer and the row blocks' work buffers) about 0.4 GiB:
# small beside a 24 GB GPU, yet a [256, H] x [H, V] matmul is large enough to run efficiently
# (512 measured 4% faster on CPU for 70% more memory: 757 vs 441 MiB at 4096 positions).
DEFAULT_CHUNK_SIZE = 256

# On CPU a chunk holds at least this many logits (64 MiB in float32). glibc serves allocations
# under 32 MiB from its heap, and a stream of chunk-sized buffers interleaved with the small
# tensors that stay alive (per-chunk outputs, saved statistics) fragmented it: RSS grew up to
# 3.3x the full logits' size with 31 MiB chunks (V = 32,000, 256 positions) and 0.34-0.39x with
# 35 MiB chunks. Buffers above 32 MiB are mmap'ed and go back to the OS when freed.
CPU_MIN_CHUNK_ELEMENTS = 1 << 24


# On CPU, elementwise work on a chunk's logits runs over blocks of rows of about _BLOCK_ELEMENTS
# (64 MiB in float32), so its float32 temporaries stay small beside the chunk's logits. Blocks are
# of equal size and, wherever the chunk allows, at least _MIN_BLOCK_ELEMENTS: just above glibc's
# largest mmap threshold (32 MiB), so that they are mmap'ed and go back to the OS when freed
# (see CPU_MIN_CHUNK_ELEMENTS for what smaller ones did to RSS on CPU). On a GPU the whole chunk
# is one block: its temporaries are a few of the chunk's size (chunk_size bounds them), and every
# block is another round of kernel launches; on an H200 whole chunks made a Qwen2-0.5B update
# 6-19% faster (bench/gpu_check.py --parts chunk_sweep; bench/results/gpu-h200.json).
_BLOCK_ELEMENTS = 1 << 24
_MIN_BLOCK_ELEMENTS = (1 << 23) + (1 << 18)


def _row_blocks(rows: int, vocab: int, device: torch.device | None = None) -> list[slice]:
    """Equal slices of ``range(rows)``: about ``_BLOCK_ELEMENTS / vocab`` rows each, and
    none under ``_MIN_BLOCK_ELEMENTS / vocab`` rows unless the whole range is; one slice on a
    device other than the CPU."""
    if rows == 0:
        return []
    if device is not None and device.type != "cpu":
        return [slice(0, rows)]
    elements = rows * max(vocab, 1)
    count = max(1, min(-(-elements // _BLOCK_ELEMENTS), elements // _MIN_BLOCK_ELEMENTS))
    step = -(-rows // count)
    return [slice(i, i + step) for i in range(0, rows, step)]


def _scaled_float(logits: Tensor, temperature: float, out: Tensor | None = None) -> Tensor:
    """``logits / temperature`` in float32, in ``out`` when given, else in a fresh buffer (either
    way safe to modify in place)."""
    if out is None:
        z = logits.to(torch.float32, copy=True)
    else:
        z = out.copy_(logits)
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _logit_stats(logits: Tensor, targets: Tensor, temperature: float, with_entropy: bool) -> dict[str, Tensor]:
    """Per-row ``lse = logsumexp(z)``, ``logp = z[target] - lse`` and, with entropy,
    ``entropy = sum softmax(z) * (lse - z)`` and ``mean_z = lse - entropy`` (the backward's E),
    for z = logits / T (float32).

    The entropy is summed from non-negative terms. The textbook ``lse - sum p * z`` subtracts two
    numbers of the logits' size (tens, at a real vocabulary) whose difference may be 0.01, and the
    float32 rounding of lse shifts every p by the same factor: at V = 151,936 with peaked logits
    that lost ~1e-3, against ~1e-5 this way (and the products are summed in place, no temporary).

    ``[M, V]`` -> ``[M]`` each; the float32 work runs block by block over rows.
    """
    lse, logp, entropy = [], [], []
    for rows in _row_blocks(logits.shape[0], logits.shape[-1], logits.device):
        z = _scaled_float(logits[rows], temperature)
        block_lse = torch.logsumexp(z, dim=-1)
        lse.append(block_lse)
        logp.append(z.gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1) - block_lse)
        if with_entropy:
            p = torch.sub(z, block_lse.unsqueeze(-1)).exp_()
            surprise = z.neg_().add_(block_lse.unsqueeze(-1))  # lse - z >= 0, in z's own buffer (a fresh copy)
            # torch's sum reduces in a tree (cascade on CPU): 1e-5 over 152k terms where a bmm
            # dot product, accumulating in order, lost 1.4e-4 on near-uniform rows.
            entropy.append(p.mul_(surprise).sum(-1))
    stats = {"lse": torch.cat(lse), "logp": torch.cat(logp)}
    if with_entropy:
        stats["entropy"] = torch.cat(entropy)
        stats["mean_z"] = stats["lse"] - stats["entropy"]
    return stats


class _LogProbEntropy(torch.autograd.Function):
    """``[M, V]`` logits -> log-prob of ``targets`` ``[M]`` (and entropy ``[M]``), float32.

    With z = logits / T, lse = logsumexp(z), p = softmax(z), E = sum p * z:
        logp = z[target] - lse            d logp / dz = onehot(target) - p
        H    = lse - E                    d H / dz    = p * (E - z)
    Only the logits (in their own dtype) and two ``[M]`` vectors are saved, and the gradient is
    formed block by block into one ``[M, V]`` buffer: the composed ops would have autograd keep
    softmax, the float32 copy and ``p * z``, each another ``[M, V]`` float32 tensor.

    ``cache``: a dict shared by the first forward and checkpoint's recomputation of the same
    chunk. The first forward fills it with the ``[M]`` statistics; the recomputation (which runs
    only to re-create the saved logits) reuses them instead of redoing the chunk's exp/logsumexp.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, temperature: float, with_entropy: bool,
                cache: dict | None):
        if cache is not None and cache:
            stats = cache
        else:
            stats = _logit_stats(logits, targets, temperature, with_entropy)
            if cache is not None:
                cache.update(stats)
        ctx.temperature, ctx.with_entropy = temperature, with_entropy
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.save_for_backward(logits, targets, stats["lse"])
            return stats["logp"].clone()
        ctx.save_for_backward(logits, targets, stats["lse"], stats["mean_z"])
        return stats["logp"].clone(), stats["entropy"].clone()

    @staticmethod
    def backward(ctx, grad_logp: Tensor | None, grad_entropy: Tensor | None = None):
        logits, targets, lse, *rest = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None
        return _logits_grad(logits, targets, lse, rest[0] if rest else None, grad_logp, grad_entropy,
                            ctx.temperature), None, None, None, None


def _logits_grad(logits: Tensor, targets: Tensor, lse: Tensor, mean_z: Tensor | None, grad_logp: Tensor | None,
                 grad_entropy: Tensor | None, t: float) -> Tensor:
    """The gradient w.r.t. ``[M, V]`` logits (their dtype) of ``sum(grad_logp * logp + grad_entropy
    * H)`` (``_LogProbEntropy``'s formulas), formed block by block in one buffer; an absent
    incoming gradient costs nothing (a detached entropy: no entropy term at all)."""
    grad = torch.empty_like(logits)
    in_place = grad.dtype == torch.float32  # then each block is built in its slice of grad
    for rows in _row_blocks(logits.shape[0], logits.shape[-1], logits.device):
        # p * (g_H * (E - z) - g_lp) + g_lp * onehot(target), then / T, built in z's buffer
        z = _scaled_float(logits[rows], t, out=grad[rows] if in_place else None)
        p = torch.sub(z, lse[rows].unsqueeze(-1)).exp_()
        if grad_entropy is not None:
            z.sub_(mean_z[rows].unsqueeze(-1)).mul_(-grad_entropy[rows].float().unsqueeze(-1))
        else:
            z.zero_()
        if grad_logp is not None:
            g = grad_logp[rows].float().unsqueeze(-1)
            z.sub_(g).mul_(p).scatter_add_(-1, targets[rows].unsqueeze(-1), g)
        else:
            z.mul_(p)
        if t != 1.0:
            z.div_(t)  # d z / d logits = 1 / T
        if not in_place:
            grad[rows] = z
    return grad


def _chunk_logprobs(head: Head, hidden: Tensor, targets: Tensor, temperature: float, with_entropy: bool,
                    cache: dict | None = None):
    """One chunk: ``[C, H]`` hidden, ``[C]`` targets -> ``[C]`` log-probs (and ``[C]`` entropy)."""
    return _LogProbEntropy.apply(head(hidden), targets, temperature, with_entropy, cache)


def head_compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's on ``hidden``'s device when it is on (what
    ``F.linear`` would cast both to), else the two dtypes promoted."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def no_autocast(device: torch.device):
    """Autocast off on ``device``: the head's code casts explicitly (and ``out=`` needs it)."""
    return torch.autocast(device.type, enabled=False) if torch.is_autocast_enabled(device.type) \
        else contextlib.nullcontext()


def _chunk_slices(rows: int, chunk_size: int) -> list[slice]:
    return [slice(start, min(start + chunk_size, rows)) for start in range(0, rows, chunk_size)]


class _LinearHeadLogProbs(torch.autograd.Function):
    """The chunk loop of ``chunked_logprobs`` for a plain ``nn.Linear`` head, as one function:
    ``[M, H]`` hidden, ``[V, H]`` weight (``[V]`` bias) -> ``[M]`` log-probs (and entropies).

    Forward: each chunk's logits ``F.linear(h, w, b)`` -> ``_logit_stats``, dropped; ``w`` and ``b``
    are the head's parameters cast to ``dtype`` once, kept for the backward (a frozen float32 head
    under bf16 autocast is cast once per micro-batch instead of twice per chunk). Backward: chunk
    by chunk in reverse (the order autograd ran the per-chunk graphs in, so that the sums below
    are the same, bit for bit), logits recomputed, ``_logits_grad``, then
    ``grad_h = g @ w`` into one ``[M, H]`` buffer, ``grad_w += g^T @ h`` into one float32
    accumulator (through one reused ``[V, H]`` buffer) and ``grad_b += sum(g)``.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, how: "HeadPass",
                dtype: torch.dtype):
        temperature, with_entropy, chunk_size = how.temperature, how.with_entropy, how.chunk_size
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        with no_autocast(hidden.device):
            parts = [_logit_stats(F.linear(hidden[rows].to(dtype), w, b), targets[rows], temperature, with_entropy)
                     for rows in _chunk_slices(hidden.shape[0], chunk_size)]
        stats = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
        ctx.temperature, ctx.chunk_size, ctx.dtype = temperature, chunk_size, dtype
        ctx.weight_dtype, ctx.bias_dtype = weight.dtype, None if bias is None else bias.dtype
        ctx.set_materialize_grads(False)
        saved = (stats["lse"], stats["mean_z"]) if with_entropy else (stats["lse"],)
        ctx.save_for_backward(hidden, w, b, targets, *saved)
        if not with_entropy:
            return stats["logp"]
        return stats["logp"], stats["entropy"]

    @staticmethod
    def backward(ctx, grad_logp: Tensor | None, grad_entropy: Tensor | None = None):
        hidden, w, b, targets, lse, *rest = ctx.saved_tensors
        mean_z = rest[0] if rest else None
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_logp is None and grad_entropy is None:
            return (None,) * 6
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = grad_b = product = None
        with no_autocast(hidden.device):
            for rows in reversed(_chunk_slices(hidden.shape[0], ctx.chunk_size)):
                h = hidden[rows].to(ctx.dtype)
                g = _logits_grad(F.linear(h, w, b), targets[rows], lse[rows], None if mean_z is None else mean_z[rows],
                                 None if grad_logp is None else grad_logp[rows],
                                 None if grad_entropy is None else grad_entropy[rows], ctx.temperature)
                if need_h:
                    grad_h[rows] = g.mm(w)
                if need_w:  # the first chunk's product becomes the accumulator; later ones go through one buffer
                    product = torch.mm(g.t(), h, out=product) if grad_w is not None else None
                    grad_w = _float32(torch.mm(g.t(), h)) if grad_w is None else grad_w.add_(product)
                if need_b:
                    grad_b = _float32(g.sum(0)) if grad_b is None else grad_b.add_(g.sum(0))
        return (grad_h, None if grad_w is None else grad_w.to(ctx.weight_dtype),
                None if grad_b is None else grad_b.to(ctx.bias_dtype), None, None, None)


def _float32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.float()


@dataclass(frozen=True)
class KernelChoice:
    """Which log-prob path runs (``chunked`` or ``fused``), and why."""

    kernel: Literal["chunked", "fused"]
    reason: str


@functools.cache
def triton_available() -> bool:
    """Whether ``triton`` imports (it ships with CUDA builds of torch; ``pip install triton`` or the
    ``triton`` extra elsewhere)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 (a broken install is "not available", whatever it raises)
        return False
    return True


def triton_interpreting() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run in its CPU interpreter (tests, CI smoke)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def plain_head_problem(head: Head) -> str | None:
    """None when ``head`` is a plain ``torch.nn.Linear`` whose weight can be used directly (so the
    head need not be called); else why not, in words."""
    if type(head) is not torch.nn.Linear:  # noqa: E721 (a subclass, e.g. a quantized Linear, is not plain)
        return f"the head is a {type(head).__module__}.{type(head).__name__}, not a plain torch.nn.Linear"
    if head._forward_pre_hooks or head._forward_hooks:
        return "the head has forward hooks (a sharding wrapper gathers its weight in them), so it must be called"
    weight = head.weight
    if getattr(weight, "ds_id", None) is not None or type(weight).__name__ == "DTensor" or \
            tuple(weight.shape) != (head.out_features, head.in_features):
        return "the head's weight is sharded (DeepSpeed ZeRO-3 or a DTensor)"
    return None


def select_logprob_kernel(setting: LogprobKernel, head: Head, device: torch.device) -> KernelChoice:
    """``chunked``, ``fused`` or ``auto`` (TrainConfig ``logprob_kernel``) -> the path that runs.

    ``auto``: fused on CUDA when triton imports and the head is a plain Linear, chunked otherwise
    (the reason says why). ``fused`` where it cannot run raises ValueError naming the reason; on a
    CPU it runs only under Triton's interpreter (``TRITON_INTERPRET=1``, for tests).
    """
    if setting not in ("auto", "chunked", "fused"):
        raise ValueError(f"logprob_kernel must be auto, chunked or fused, got {setting!r}")
    if setting == "chunked":
        return KernelChoice("chunked", "logprob_kernel: chunked")
    if device.type != "cuda" and not (setting == "fused" and triton_interpreting()):
        problem = f"{device.type} device: the fused kernel runs on CUDA (or on a CPU under TRITON_INTERPRET=1, tests)"
    elif not triton_available():
        problem = "triton is not importable (it comes with CUDA builds of torch; pip install triton)"
    else:
        problem = plain_head_problem(head)
    if problem is None:
        return KernelChoice("fused", f"{device.type}, triton, a plain Linear head")
    if setting == "fused":
        raise ValueError(f"logprob_kernel: fused cannot run here: {problem}")
    return KernelChoice("chunked", problem)


def _vocab_size(head: Head) -> int | None:
    """The head's output size when it says so (Linear and peft's LoRA Linear do), else None."""
    size = getattr(head, "out_features", None)
    if isinstance(size, int):
        return size
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, Tensor) and weight.dim() == 2 else None


def effective_chunk_size(chunk_size: int, vocab: int | None, device: torch.device,
                         min_chunk_elements: int | None = None) -> int:
    """Positions per chunk actually used: ``chunk_size``, raised on CPU so that a chunk's logits
    are at least ``min_chunk_elements`` (default ``CPU_MIN_CHUNK_ELEMENTS`` on CPU, none on
    other devices; no floor when the vocabulary size is unknown)."""
    if min_chunk_elements is None:
        min_chunk_elements = CPU_MIN_CHUNK_ELEMENTS if device.type == "cpu" else 0  # read at call time (tests set it)
    if not vocab or min_chunk_elements <= 0:
        return chunk_size
    return max(chunk_size, -(-min_chunk_elements // vocab))


@dataclass(frozen=True)
class HeadPass:
    """How one pass through the LM head is computed (``head_logprobs``)."""

    temperature: float = 1.0  # the sampling temperature (> 0): logits are divided by it
    chunk_size: int = DEFAULT_CHUNK_SIZE  # positions per chunk (``effective_chunk_size`` on a CPU)
    with_entropy: bool = False  # also the per-position entropy (False: nothing of it is computed)
    kernel: LogprobKernel = "auto"  # auto, chunked or fused (``select_logprob_kernel``)


def chunked_logprobs(
    hidden: Tensor,
    head: Head,
    targets: Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = False,
    mask: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probs of ``targets`` under ``log_softmax(head(hidden) / temperature)``, never holding
    more than ``chunk_size`` positions' logits (the fused kernel: one tile's), forward or backward.

    Equal, values and gradients, to ``loss.token_logprobs(head(hidden), targets, temperature)``
    (and ``loss.token_entropy``) within float32 round-off.

    Args:
        hidden: ``[N, T, H]`` (or any ``[..., H]``) final hidden states at the positions that
            predict ``targets`` (already shifted: position t predicts ``targets[..., t]``).
            Any float dtype; gradients flow back to it.
        head: the LM head, called on ``[C, H]`` -> ``[C, V]`` (e.g.
            ``model.get_output_embeddings()``; tied, biased or LoRA-wrapped heads are fine:
            its parameters get their gradients through the call).
        targets: ``[N, T]`` (matching ``hidden``'s leading dims) long token ids.
        temperature: the sampling temperature (> 0); logits are divided by it.
        chunk_size: positions per chunk (flattened over N * T); on CPU raised to at least
            ``CPU_MIN_CHUNK_ELEMENTS / V`` (glibc fragmentation, see there; ``effective_chunk_size``).
        with_entropy: also return the per-position entropy of ``softmax(logits / temperature)``.
            False computes nothing of it, forward or backward; a returned entropy that is detached
            (a metric) costs no backward work either.
        mask: optional ``[N, T]`` bool; positions where it is False (padding) are not computed at
            all and read 0 in both outputs (they get no gradient).
        kernel: ``auto``, ``chunked`` or ``fused`` (``select_logprob_kernel``).

    Returns:
        ``[N, T]`` float32 log-probs, or ``(logprobs, entropy)``, both ``[N, T]`` float32.
    """
    return head_logprobs(hidden, head, targets, HeadPass(temperature, chunk_size, with_entropy), mask)


def head_logprobs(hidden: Tensor, head: Head, targets: Tensor, how: HeadPass = HeadPass(),
                  mask: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """``chunked_logprobs`` with every setting in ``how`` (its ``kernel`` too)."""
    if how.temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {how.temperature}")
    if how.chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {how.chunk_size}")
    lead = targets.shape
    flat_h, flat_t, keep = _flatten(hidden, targets, mask)
    outs = _empty_result(flat_h, head, how.with_entropy) if flat_h.shape[0] == 0 else \
        _flat_logprobs(flat_h, head, flat_t, how)

    def assemble(values: Tensor) -> Tensor:
        if keep is not None:  # scatter the kept positions back; differentiable w.r.t. values
            values = values.new_zeros(lead.numel()).index_put((keep,), values)
        return values.view(lead)

    if how.with_entropy:
        return assemble(outs[0]), assemble(outs[1])
    return assemble(outs[0])


def _flatten(hidden: Tensor, targets: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """``[..., H]`` hidden and ``[...]`` targets as ``[M, H]`` and ``[M]``: every position, or with
    ``mask`` only its True ones (``keep``: their flat indices, to scatter the results back)."""
    lead = targets.shape
    if hidden.shape[:-1] != lead:
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match targets {tuple(lead)}")
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = targets.reshape(-1).long()
    keep = None
    if mask is not None:
        if mask.shape != lead:
            raise ValueError(f"mask {tuple(mask.shape)} does not match targets {tuple(lead)}")
        keep = mask.reshape(-1).to(torch.bool).nonzero().squeeze(-1)
        flat_h, flat_t = flat_h.index_select(0, keep), flat_t.index_select(0, keep)
    return flat_h, flat_t, keep


def _empty_result(flat_h: Tensor, head: Head, with_entropy: bool) -> tuple[Tensor, ...]:
    """No position at all: an empty result still attached to ``hidden`` and to the head's trainable
    weights (zero gradients), so that a loss built from it is backpropagated like any other
    micro-batch's. Under DDP a process whose rows are all outside the loss (the overlong filter)
    must still reach the gradient all-reduce of every parameter, or the processes' collectives part
    ways (found by the option matrix's 2-process runs)."""
    anchor = sum((p.sum() for p in head.parameters() if p.requires_grad), flat_h.new_zeros(()))
    empty = flat_h.float().sum(-1) + 0.0 * anchor.float()
    return (empty, empty) if with_entropy else (empty,)


def _flat_logprobs(flat_h: Tensor, head: Head, flat_t: Tensor, how: HeadPass) -> tuple[Tensor, ...]:
    """``[M, H]`` hidden, ``[M]`` targets (M > 0) -> ``([M] logp,)`` or ``([M] logp, [M] entropy)``
    through the fused kernel, the plain-Linear chunk function or the generic chunk loop."""
    temperature, with_entropy = how.temperature, how.with_entropy
    if select_logprob_kernel(how.kernel, head, flat_h.device).kernel == "fused":
        from ampo_train.fused_logprob import fused_linear_logprobs

        out = fused_linear_logprobs(flat_h, head.weight, head.bias, flat_t, temperature, with_entropy)
        return out if with_entropy else (out,)
    chunk_size = effective_chunk_size(how.chunk_size, _vocab_size(head), flat_h.device)
    if plain_head_problem(head) is None:
        out = _LinearHeadLogProbs.apply(flat_h, head.weight, head.bias, flat_t, replace(how, chunk_size=chunk_size),
                                        head_compute_dtype(flat_h, head.weight))
        return out if with_entropy else (out,)
    # Checkpointing only matters when autograd records: under no_grad (old log-probs, reference
    # log-probs, comprehension scores) each chunk's logits are dropped anyway.
    recording = torch.is_grad_enabled()
    logps, ents = [], []
    for rows in _chunk_slices(flat_h.shape[0], chunk_size):
        args = (head, flat_h[rows], flat_t[rows], temperature, with_entropy)
        out = checkpoint(_chunk_logprobs, *args, {}, use_reentrant=False) if recording else _chunk_logprobs(*args)
        logps.append(out[0] if with_entropy else out)
        if with_entropy:
            ents.append(out[1])
    return (torch.cat(logps), torch.cat(ents)) if with_entropy else (torch.cat(logps),)
