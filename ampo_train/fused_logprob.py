"""Per-token log-probs and entropy through a plain LM head, fused: cuBLAS logits tiles folded by
Triton kernels, forward and backward, with no float32 copy of any logits.

    logp, entropy = fused_linear_logprobs(hidden, head.weight, head.bias, targets, temperature, True)

``hidden`` ``[M, H]``, ``weight`` ``[V, H]`` (``bias`` ``[V]`` or None), ``targets`` ``[M]`` ->
``[M]`` float32 log-probs of ``log_softmax((hidden @ weight.T + bias) / temperature)`` (and the
entropy), differentiable w.r.t. hidden, weight and bias. ``lm_head.chunked_logprobs`` calls it
when ``select_logprob_kernel`` picks ``fused`` (TrainConfig ``logprob_kernel``).

How: the ``[M, V]`` logits exist one ``[ROWS_PER_TILE, COLS_PER_TILE]`` tile at a time, in the
compute dtype (bf16 under autocast), in one reused buffer. The vocabulary is the outer loop, so
each tile of the weight is cast to the compute dtype once per pass (a frozen float32 head under
autocast: two casts of the whole head per micro-batch, forward and backward) and only one weight
tile's cast exists at a time.

* Forward: ``torch.mm`` writes a tile; ``_fold_tile`` (one program per row) reads it once and folds
  it into per-row running statistics, an online logsumexp: the max ``m``, ``s = sum exp(z - m)``
  and, only with entropy, ``r = sum exp(z - m) * (m - z)``; plus the target's logit. Then
  ``logp = (z_target - m) - log s`` and ``H = log s + r / s``: the entropy ``sum p * (lse - z)`` of
  issue 23 (``lm_head._logit_stats``), a sum of non-negative terms, so it stays precise on peaked
  logits where ``lse - E[z]`` cancels (when ``m`` grows, ``r`` is rescaled exactly:
  ``r' = e^(m - m') * (r + (m' - m) * s)``, every term non-negative).
* Backward: each tile is recomputed and ``_tile_grad`` overwrites it, in place, with the gradient
  w.r.t. the logits, ``(g_lp * (onehot - p) - g_H * p * (log p + H)) / T``; then
  ``grad_h += tile @ w`` (float32, ``[M, H]``), ``grad_w += tile^T @ h`` into one float32
  accumulator for the whole call, only when the weight requires grad (a frozen head: no weight
  gradient work at all), ``grad_b += sum(tile)`` likewise.
* Nothing for an entropy nobody needs: ``with_entropy=False`` compiles the forward kernel without
  the entropy sum; an entropy returned but detached (a metric) reaches the backward as no
  gradient, and the backward kernel is compiled without its term.

Prior art read (not copied): TRL 1.16's ``trl/kernels/chunked_logprob.py`` (the same split: cuBLAS
tiles, a Triton online logsumexp, the backward rewriting each tile in place; its entropy is
``lse - E[z]`` and its loops run positions outside vocabulary, recasting the weight per tile per
4096 positions), Liger-kernel's ``fused_linear_cross_entropy`` and Apple's cut-cross-entropy
(matmul and softmax in one kernel, for a scalar cross-entropy loss).

Triton's CPU interpreter (``TRITON_INTERPRET=1``, set before this module is imported) runs these
kernels on CPU tensors: ``tests/test_fused_logprob.py`` checks them against float64 there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ampo_train.lm_head import head_compute_dtype, no_autocast

# Tile of logits that exists at once: 2048 positions x 32768 vocabulary entries, 128 MiB in bf16
# (256 MiB in float32), one weight tile's cast 32768 x H (56 MiB in bf16 at H = 896). A
# [2048, 896] x [896, 32768] matmul is 120 GFLOP, large enough for cuBLAS to run near its peak.
ROWS_PER_TILE = 2048
COLS_PER_TILE = 32768
# Columns a kernel program handles per step (a power of two); Triton's CPU interpreter runs each
# step as numpy calls, whose overhead larger blocks amortise.
MAX_BLOCK = 1024
MAX_BLOCK_INTERPRETED = 16384


@triton.jit
def _fold_tile(tile_ptr, row_stride, n_cols, col_offset, targets_ptr, max_ptr, sum_ptr, spread_ptr, target_ptr,
               inv_t, WITH_ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
    """One row of a logits tile folded into the row's running (max, sum, spread) and target logit."""
    row = tl.program_id(0).to(tl.int64)
    base = tile_ptr + row * row_stride
    m = tl.load(max_ptr + row)
    s = tl.load(sum_ptr + row)
    if WITH_ENTROPY:
        spread = tl.load(spread_ptr + row)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < n_cols
        z = tl.load(base + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_t
        new_m = tl.maximum(m, tl.max(z, axis=0))
        scale = tl.exp(m - new_m)  # 0 on the first block (m = -inf)
        e = tl.exp(z - new_m)  # 0 outside the tile
        if WITH_ENTROPY:
            # sum e * (m - z) relative to the new max: the old terms rescaled, every term >= 0
            shift = tl.where(s > 0, new_m - m, 0.0)
            spread = scale * (spread + shift * s) + tl.sum(e * tl.where(inside, new_m - z, 0.0), axis=0)
        s = s * scale + tl.sum(e, axis=0)
        m = new_m
    tl.store(max_ptr + row, m)
    tl.store(sum_ptr + row, s)
    if WITH_ENTROPY:
        tl.store(spread_ptr + row, spread)
    local = tl.load(targets_ptr + row) - col_offset
    hit = (local >= 0) & (local < n_cols)
    target_z = tl.load(base + local, mask=hit, other=0.0).to(tl.float32) * inv_t
    tl.store(target_ptr + row, target_z, mask=hit)


@triton.jit
def _tile_grad(tile_ptr, row_stride, n_cols, col_offset, targets_ptr, max_ptr, log_sum_ptr, entropy_ptr,
               grad_logp_ptr, grad_entropy_ptr, inv_t, HAS_LOGP_GRAD: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
               BLOCK: tl.constexpr):
    """One block of one row of a logits tile, overwritten with the gradient w.r.t. those logits."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < n_cols
    ptrs = tile_ptr + row * row_stride + cols
    z = tl.load(ptrs, mask=inside, other=0.0).to(tl.float32) * inv_t
    logp = (z - tl.load(max_ptr + row)) - tl.load(log_sum_ptr + row)
    p = tl.exp(logp)
    grad = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_LOGP_GRAD:  # d logp_target / d z = onehot(target) - p
        g = tl.load(grad_logp_ptr + row)
        target = tl.load(targets_ptr + row) - col_offset
        grad += tl.where(cols == target, g, 0.0) - g * p
    if HAS_ENTROPY_GRAD:  # d H / d z = -p * (log p + H)
        g = tl.load(grad_entropy_ptr + row)
        grad -= g * p * (logp + tl.load(entropy_ptr + row))
    tl.store(ptrs, (grad * inv_t).to(tile_ptr.dtype.element_ty), mask=inside)


def _tiles(rows: int, cols: int, tile: tuple[int, int]):
    """(column slice, row slice) pairs, the vocabulary outermost."""
    for c in range(0, cols, tile[1]):
        for r in range(0, rows, tile[0]):
            yield slice(c, min(c + tile[1], cols)), slice(r, min(r + tile[0], rows))


def _logits_tile(buffer: Tensor, h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``h @ w.T (+ b)`` written into the front of ``buffer``, as a contiguous ``[rows, cols]``."""
    out = buffer[:h.shape[0] * w.shape[0]].view(h.shape[0], w.shape[0])
    if b is None:
        return torch.mm(h, w.t(), out=out)
    return torch.addmm(b, h, w.t(), out=out)


def _interpreted() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_fold_tile).__name__ == "InterpretedFunction"


def _block(cols: int) -> int:
    return min(MAX_BLOCK_INTERPRETED if _interpreted() else MAX_BLOCK, triton.next_power_of_2(cols))


class _FusedLinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float,
                with_entropy: bool, tile: tuple[int, int]):
        rows, vocab, device = hidden.shape[0], weight.shape[0], hidden.device
        dtype = head_compute_dtype(hidden, weight)
        h = hidden.to(dtype).contiguous()
        targets = targets.contiguous()
        row_max = torch.full((rows,), float("-inf"), device=device)
        sum_exp, target_z = torch.zeros(rows, device=device), torch.zeros(rows, device=device)
        spread = torch.zeros(rows, device=device) if with_entropy else sum_exp  # (unused without entropy)
        buffer = torch.empty(min(rows, tile[0]) * min(vocab, tile[1]), dtype=dtype, device=device)
        block = _block(min(vocab, tile[1]))
        with no_autocast(device):
            w = b = None
            for cols, part in _tiles(rows, vocab, tile):
                if part.start == 0:  # a new vocabulary tile: its weight cast once for every row tile
                    w = weight[cols].to(dtype)
                    b = None if bias is None else bias[cols].to(dtype)
                logits = _logits_tile(buffer, h[part], w, b)
                _fold_tile[(logits.shape[0],)](
                    logits, logits.stride(0), logits.shape[1], cols.start, targets[part], row_max[part],
                    sum_exp[part], spread[part], target_z[part], 1.0 / temperature,
                    WITH_ENTROPY=with_entropy, BLOCK=block)
        log_sum = sum_exp.log()
        logp = (target_z - row_max) - log_sum
        entropy = log_sum + spread / sum_exp if with_entropy else None
        ctx.temperature, ctx.tile, ctx.hidden_dtype = temperature, tile, hidden.dtype
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(h, weight, bias, targets, row_max, log_sum, entropy)
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp: Tensor | None, grad_entropy: Tensor | None = None):
        h, weight, bias, targets, row_max, log_sum, entropy = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return (None,) * 7
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        rows, vocab, device = h.shape[0], weight.shape[0], h.device
        grad_logp = None if grad_logp is None else grad_logp.float().contiguous()
        grad_entropy = None if grad_entropy is None else grad_entropy.float().contiguous()
        grad_h = torch.zeros(h.shape, device=device) if need_h else None
        grad_w = torch.zeros(weight.shape, device=device) if need_w else None  # the one float32 accumulator
        grad_b = torch.zeros(vocab, device=device) if need_b else None
        buffer = torch.empty(min(rows, ctx.tile[0]) * min(vocab, ctx.tile[1]), dtype=h.dtype, device=device)
        block = _block(min(vocab, ctx.tile[1]))
        with no_autocast(device):
            w = b = None
            for cols, part in _tiles(rows, vocab, ctx.tile):
                if part.start == 0:
                    w = weight[cols].to(h.dtype)
                    b = None if bias is None else bias[cols].to(h.dtype)
                grad = _logits_tile(buffer, h[part], w, b)
                _tile_grad[(grad.shape[0], triton.cdiv(grad.shape[1], block))](
                    grad, grad.stride(0), grad.shape[1], cols.start, targets[part], row_max[part], log_sum[part],
                    entropy[part] if entropy is not None else log_sum[part],
                    grad_logp[part] if grad_logp is not None else log_sum[part],
                    grad_entropy[part] if grad_entropy is not None else log_sum[part], 1.0 / ctx.temperature,
                    HAS_LOGP_GRAD=grad_logp is not None, HAS_ENTROPY_GRAD=grad_entropy is not None, BLOCK=block)
                if need_h:
                    _add_product(grad_h[part], grad, w)
                if need_w:
                    _add_product(grad_w[cols], grad.t(), h[part])
                if need_b:
                    grad_b[cols] += grad.sum(0, dtype=torch.float32)
        return (None if grad_h is None else grad_h.to(ctx.hidden_dtype),
                None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)


def _add_product(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` (``acc`` float32): in place when ``a`` is float32 too, else through one
    product in ``a``'s dtype (the matmul itself accumulates in float32 either way)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(torch.mm(a, b))


def fused_linear_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                          temperature: float = 1.0, with_entropy: bool = False,
                          tile: tuple[int, int] | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """``[M]`` float32 log-probs of ``targets`` under ``log_softmax((hidden @ weight.T + bias) / T)``,
    and with ``with_entropy`` the ``[M]`` entropies; see the module docstring.

    Args:
        hidden: ``[M, H]``, any float dtype (cast to autocast's dtype when autocast is on).
        weight: ``[V, H]`` the head's weight; its gradient is computed only if it requires one.
        bias: ``[V]`` or None.
        targets: ``[M]`` long token ids.
        temperature: > 0; the logits are divided by it.
        with_entropy: also return the entropy (else nothing of it is computed).
        tile: (positions, vocabulary entries) of the logits tile (default ``ROWS_PER_TILE``,
            ``COLS_PER_TILE``; tests use small tiles).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or targets.shape != hidden.shape[:1]:
        raise ValueError(f"shapes do not fit: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
                         f"targets {tuple(targets.shape)} (expected [M, H], [V, H], [M])")
    if hidden.device.type == "cpu" and not _interpreted():
        raise RuntimeError("the fused log-prob kernel runs on CPU tensors only under Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before ampo_train.fused_logprob is imported")
    return _FusedLinearLogProbs.apply(hidden, weight, bias, targets.long(), temperature, with_entropy,
                                      tile or (ROWS_PER_TILE, COLS_PER_TILE))
