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

The head is *called*, never unpacked into ``F.linear(h, head.weight)``: a plain Linear, a head
tied to the input embeddings, a head with a bias, or a peft/LoRA-wrapped head all work, and each
of their parameters receives its gradient through autograd as usual (checkpointing also replays
the RNG, so a LoRA dropout on the head draws the same mask when the chunk is recomputed).

Prior art read (not copied): Liger-kernel's fused linear cross-entropy (chunks positions, but
computes the gradients eagerly in the forward, which only works for a scalar loss known in
advance) and TRL 1.16's ``_ChunkedLogProbFunction`` (chunks the vocabulary against
``lm_head.weight`` directly, so no bias or LoRA head, and its backward ignores the entropy's
gradient). Our outputs are per-token and feed an arbitrary loss (PPO clip, shaping, entropy
bonus, KL), so the backward must take incoming per-token gradients for both outputs.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

Head = Callable[[Tensor], Tensor]

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
        t = ctx.temperature
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None
        grad = torch.empty_like(logits)
        in_place = grad.dtype == torch.float32  # then each block is built in its slice of grad
        for rows in _row_blocks(logits.shape[0], logits.shape[-1], logits.device):
            # p * (g_H * (E - z) - g_lp) + g_lp * onehot(target), then / T, built in z's buffer
            z = _scaled_float(logits[rows], t, out=grad[rows] if in_place else None)
            p = torch.sub(z, lse[rows].unsqueeze(-1)).exp_()
            if grad_entropy is not None:
                z.sub_(rest[0][rows].unsqueeze(-1)).mul_(-grad_entropy[rows].float().unsqueeze(-1))
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
        return grad, None, None, None, None


def _chunk_logprobs(head: Head, hidden: Tensor, targets: Tensor, temperature: float, with_entropy: bool,
                    cache: dict | None = None):
    """One chunk: ``[C, H]`` hidden, ``[C]`` targets -> ``[C]`` log-probs (and ``[C]`` entropy)."""
    return _LogProbEntropy.apply(head(hidden), targets, temperature, with_entropy, cache)


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
    more than ``chunk_size`` positions' logits, forward or backward.

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
        mask: optional ``[N, T]`` bool; positions where it is False (padding) are not computed at
            all and read 0 in both outputs (they get no gradient).

    Returns:
        ``[N, T]`` float32 log-probs, or ``(logprobs, entropy)``, both ``[N, T]`` float32.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
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

    chunk_size = effective_chunk_size(chunk_size, _vocab_size(head), hidden.device)
    # Checkpointing only matters when autograd records: under no_grad (old log-probs, reference
    # log-probs, comprehension scores) each chunk's logits are dropped anyway.
    recording = torch.is_grad_enabled()
    logps, ents = [], []
    for start in range(0, flat_h.shape[0], chunk_size):
        args = (head, flat_h[start:start + chunk_size], flat_t[start:start + chunk_size], temperature, with_entropy)
        if recording:
            out = checkpoint(_chunk_logprobs, *args, {}, use_reentrant=False)
        else:
            out = _chunk_logprobs(*args)
        if with_entropy:
            logps.append(out[0])
            ents.append(out[1])
        else:
            logps.append(out)

    def assemble(parts: list[Tensor]) -> Tensor:
        # no position at all: an empty result still attached to ``hidden``, so that a loss built
        # from it can be backpropagated like any other micro-batch's
        values = torch.cat(parts) if parts else flat_h.float().sum(-1)
        if keep is not None:  # scatter the kept positions back; differentiable w.r.t. values
            values = values.new_zeros(lead.numel()).index_put((keep,), values)
        return values.view(lead)

    if with_entropy:
        return assemble(logps), assemble(ents)
    return assemble(logps)
