"""The chunked LM-head path against the plain one (full logits through ``loss.token_logprobs``
and ``loss.token_entropy``): values and gradients, a hand-worked case, and bounded memory."""

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from ampo_train.lm_head import _row_blocks, chunked_logprobs, effective_chunk_size
from ampo_train.loss import token_entropy, token_logprobs

LN2 = math.log(2.0)


@pytest.fixture(autouse=True)
def small_chunks_on_cpu(monkeypatch):
    """No CPU floor on the chunk size: the chunk sizes a test names are the ones that run."""
    monkeypatch.setattr("ampo_train.lm_head.CPU_MIN_CHUNK_ELEMENTS", 0)


def _run_both(head, hidden, targets, temperature, chunk_size, with_entropy, params, mask=None):
    """Values and gradients (w.r.t. hidden and ``params``) of a loss mixing both outputs with
    random per-token weights, through the chunked path and through the plain full-logits one."""
    gen = torch.Generator().manual_seed(1)
    w_lp = torch.randn(targets.shape, generator=gen)
    w_ent = torch.randn(targets.shape, generator=gen)
    keep = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask

    def grads_of(lp, ent):
        loss = (torch.where(keep, lp, 0.0) * w_lp).sum()
        if ent is not None:
            loss = loss + (torch.where(keep, ent, 0.0) * w_ent).sum()
        return torch.autograd.grad(loss, [hidden, *params])

    out = chunked_logprobs(hidden, head, targets, temperature, chunk_size=chunk_size, with_entropy=with_entropy, mask=mask)
    lp, ent = out if with_entropy else (out, None)
    chunked = (lp, ent, grads_of(lp, ent))

    logits = head(hidden)
    lp = token_logprobs(logits, targets, temperature)
    ent = token_entropy(logits, temperature) if with_entropy else None
    plain = (lp, ent, grads_of(lp, ent))
    return chunked, plain


def _assert_same(chunked, plain, mask=None):
    (lp, ent, grads), (lp0, ent0, grads0) = chunked, plain
    assert lp.dtype == torch.float32 and lp.shape == lp0.shape
    if mask is not None:  # positions left out read 0
        assert bool((lp[~mask] == 0).all())
        lp0 = torch.where(mask, lp0, 0.0)
        ent0 = None if ent0 is None else torch.where(mask, ent0, 0.0)
    assert_close(lp, lp0, rtol=1e-5, atol=1e-5)
    if ent0 is not None:
        assert ent.dtype == torch.float32
        assert_close(ent, ent0, rtol=1e-5, atol=1e-5)
    for g, g0 in zip(grads, grads0):
        assert_close(g, g0, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- worked by hand

def _hand_case(bias: bool):
    # V = 3, H = 2, one position, target 0. Head weight W = [[ln2, 0], [0, 1], [0, -1]], hidden
    # h = [1, 0]: logits = W h (+ b) = [ln2, 0, 0] (with b = [0.5, 0.5, 0.5], [ln2 + .5, .5, .5]:
    # a constant shift that changes nothing below).
    weight = torch.tensor([[LN2, 0.0], [0.0, 1.0], [0.0, -1.0]])
    head = nn.Linear(2, 3, bias=bias)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias:
            head.bias.fill_(0.5)
    hidden = torch.tensor([[[1.0, 0.0]]], requires_grad=True)
    return head, hidden, torch.tensor([[0]])


@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_by_hand(bias):
    # p = softmax([ln2, 0, 0]) = [2, 1, 1] / 4 = [0.5, 0.25, 0.25]
    # logp(target 0) = ln 0.5 = -ln2
    # H = -sum p ln p = 0.5 ln2 + 2 * 0.25 * ln4 = 1.5 ln2
    # d logp / d logits = onehot - p = [0.5, -0.25, -0.25]
    # d H / d logits = p * (E[z] - z), E[z] = 0.5 ln2:  [-0.25 ln2, 0.125 ln2, 0.125 ln2]
    # Loss = logp + H: g = [0.5 - 0.25 ln2, -0.25 + 0.125 ln2, -0.25 + 0.125 ln2]
    #   d / d h = W^T g = [ln2 * g0, g1 - g2] = [ln2 (0.5 - 0.25 ln2), 0]
    #   d / d W = g h^T = [[g0, 0], [g1, 0], [g2, 0]];  d / d b = g
    head, hidden, targets = _hand_case(bias)
    lp, ent = chunked_logprobs(hidden, head, targets, with_entropy=True, chunk_size=1)
    assert_close(lp, torch.tensor([[-LN2]]))
    assert_close(ent, torch.tensor([[1.5 * LN2]]))
    (lp + ent).sum().backward()
    g = torch.tensor([0.5 - 0.25 * LN2, -0.25 + 0.125 * LN2, -0.25 + 0.125 * LN2])
    assert_close(hidden.grad, torch.tensor([[[LN2 * g[0].item(), 0.0]]]))
    assert_close(head.weight.grad, torch.stack([g, torch.zeros(3)], dim=1))
    if bias:
        assert_close(head.bias.grad, g)


def test_temperature_by_hand():
    # Same head at T = 0.5 with logits [ln2 / 2, 0, 0] (weight halved): z = logits / T = [ln2, 0, 0],
    # so the same p, logp and H as above; d / d logits = (d / d z) / T, twice the z-gradient:
    # logp only: d logp / d logits = 2 * [0.5, -0.25, -0.25] = [1, -0.5, -0.5],
    # d / d h = W^T [1, -0.5, -0.5] = [ln2 / 2 * 1, -0.5 + 0.5] = [ln2 / 2, 0]
    head, hidden, targets = _hand_case(False)
    with torch.no_grad():
        head.weight[0, 0] = LN2 / 2
    lp, ent = chunked_logprobs(hidden, head, targets, temperature=0.5, with_entropy=True)
    assert_close(lp, torch.tensor([[-LN2]]))
    assert_close(ent, torch.tensor([[1.5 * LN2]]))
    lp.sum().backward()
    assert_close(hidden.grad, torch.tensor([[[LN2 / 2, 0.0]]]))
    assert_close(head.weight.grad[:, 0], torch.tensor([1.0, -0.5, -0.5]))


# ---------------------------------------------------------------- against the plain path

@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_size", [4, 64])  # 4 does not divide N*T = 15; 64 > N*T
def test_matches_plain_path(temperature, with_entropy, bias, chunk_size):
    torch.manual_seed(0)
    n, t, h, v = 3, 5, 8, 37
    head = nn.Linear(h, v, bias=bias)
    hidden = torch.randn(n, t, h, requires_grad=True)
    targets = torch.randint(0, v, (n, t))
    params = list(head.parameters())
    _assert_same(*_run_both(head, hidden, targets, temperature, chunk_size, with_entropy, params))


def test_tied_head_gets_both_gradients():
    # The head shares its weight with the input embedding (tie_word_embeddings): the gradient that
    # reaches the shared parameter through the chunked head must equal the plain path's, and the
    # embedding's own contribution must add to it, as autograd does for any shared parameter.
    torch.manual_seed(0)
    v, h = 29, 6
    embed = nn.Embedding(v, h)
    head = nn.Linear(h, v, bias=False)
    head.weight = embed.weight
    ids = torch.randint(0, v, (2, 7))
    targets = torch.randint(0, v, (2, 7))
    results = []
    for chunked in (True, False):
        embed.zero_grad()
        hidden = torch.tanh(embed(ids))  # a stand-in for the model body
        if chunked:
            lp, ent = chunked_logprobs(hidden, head, targets, 0.7, chunk_size=3, with_entropy=True)
        else:
            logits = head(hidden)
            lp, ent = token_logprobs(logits, targets, 0.7), token_entropy(logits, 0.7)
        (lp.sum() - 0.1 * ent.sum()).backward()
        results.append((lp.detach(), embed.weight.grad.clone()))
    assert_close(results[0][0], results[1][0])
    assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-5)


def _lora_head(h, v, dropout=0.0):
    peft = pytest.importorskip("peft")

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(h, v, bias=False)

    model = peft.get_peft_model(Holder(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["head"],
                                                          lora_dropout=dropout, init_lora_weights=False))
    return model.base_model.model.head  # a peft LoRA Linear: base frozen, adapter trainable


@pytest.mark.parametrize("with_entropy", [False, True])
def test_lora_head_gradients_reach_the_adapter(with_entropy):
    torch.manual_seed(0)
    n, t, h, v = 2, 6, 8, 23
    head = _lora_head(h, v)
    params = [p for p in head.parameters() if p.requires_grad]
    assert len(params) == 2  # lora_A and lora_B; the base weight is frozen
    hidden = torch.randn(n, t, h, requires_grad=True)
    targets = torch.randint(0, v, (n, t))
    chunked, plain = _run_both(head, hidden, targets, 0.7, 5, with_entropy, params)
    _assert_same(chunked, plain)
    assert all(bool(g.abs().sum() > 0) for g in chunked[2])


def test_lora_dropout_is_replayed_when_the_chunk_is_recomputed():
    # With LoRA dropout the backward recomputes the chunk's logits: it must draw the same dropout
    # mask as the forward did. One chunk covering every position draws exactly the plain path's
    # mask from the same seed, so values and gradients must match the plain path.
    n, t, h, v = 2, 5, 8, 19
    torch.manual_seed(0)
    head = _lora_head(h, v, dropout=0.5)
    head.train()
    params = [p for p in head.parameters() if p.requires_grad]
    hidden = torch.randn(n, t, h, requires_grad=True)
    targets = torch.randint(0, v, (n, t))

    def run(chunked):
        torch.manual_seed(123)
        if chunked:
            lp = chunked_logprobs(hidden, head, targets, chunk_size=n * t)
        else:
            lp = token_logprobs(head(hidden), targets)
        return lp, torch.autograd.grad(lp.sum(), [hidden, *params])

    lp, grads = run(True)
    lp0, grads0 = run(False)
    assert_close(lp, lp0)
    for g, g0 in zip(grads, grads0):
        assert_close(g, g0, rtol=1e-5, atol=1e-5)


def test_mask_skips_positions_and_matches_elsewhere():
    torch.manual_seed(0)
    n, t, h, v = 3, 6, 8, 17
    head = nn.Linear(h, v)
    hidden = torch.randn(n, t, h, requires_grad=True)
    targets = torch.randint(0, v, (n, t))
    lengths = torch.tensor([6, 2, 4])  # right-padded responses
    mask = torch.arange(t) < lengths.unsqueeze(-1)
    calls = []
    counting = lambda x: (calls.append(x.shape[:-1].numel()), head(x))[1]  # noqa: E731
    chunked, plain = _run_both(counting, hidden, targets, 0.7, 4, True, list(head.parameters()), mask=mask)
    _assert_same(chunked, plain, mask=mask)
    assert bool((chunked[1][~mask] == 0).all())
    assert bool((chunked[2][0][~mask] == 0).all())  # no gradient to padding hidden states
    # 12 real positions in chunks of 4 (forward; the backward recomputes 3 more), then the plain
    # path's one call over all 18.
    assert calls == [4, 4, 4, 4, 4, 4, 18]


def test_empty_mask_still_backpropagates():
    head = nn.Linear(4, 5)
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    lp = chunked_logprobs(hidden, head, torch.zeros(2, 3, dtype=torch.long), mask=torch.zeros(2, 3, dtype=torch.bool))
    assert lp.shape == (2, 3) and bool((lp == 0).all())
    lp.sum().backward()
    assert bool((hidden.grad == 0).all())


def test_no_grad_path_matches_and_records_nothing():
    torch.manual_seed(0)
    head = nn.Linear(8, 13)
    hidden = torch.randn(4, 5, 8)
    targets = torch.randint(0, 13, (4, 5))
    with torch.no_grad():
        lp, ent = chunked_logprobs(hidden, head, targets, 0.7, chunk_size=3, with_entropy=True)
        logits = head(hidden)
    assert not lp.requires_grad
    assert_close(lp, token_logprobs(logits, targets, 0.7))
    assert_close(ent, token_entropy(logits, 0.7))


def test_bfloat16_head_matches_plain_path():
    # A bf16 model: logits come out in bf16 and the log-probs are still computed in float32;
    # the gradient reaching the bf16 logits is in bf16, as on the plain path.
    torch.manual_seed(0)
    head = nn.Linear(8, 31).to(torch.bfloat16)
    hidden = torch.randn(2, 5, 8, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 31, (2, 5))
    chunked, plain = _run_both(head, hidden, targets, 1.0, 3, True, list(head.parameters()))
    assert chunked[0].dtype == torch.float32
    assert_close(chunked[0], plain[0])
    assert_close(chunked[1], plain[1])
    for g, g0 in zip(chunked[2], plain[2]):
        assert g.dtype == torch.bfloat16
        assert_close(g.float(), g0.float(), rtol=2e-2, atol=2e-2)


def test_rejects_bad_arguments():
    head = nn.Linear(4, 5)
    hidden = torch.randn(2, 3, 4)
    targets = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError):
        chunked_logprobs(hidden, head, targets, temperature=0.0)
    with pytest.raises(ValueError):
        chunked_logprobs(hidden, head, targets, chunk_size=0)
    with pytest.raises(ValueError):
        chunked_logprobs(hidden, head, torch.zeros(2, 4, dtype=torch.long))


def test_entropy_is_precise_at_a_real_vocabulary():
    """At Qwen's vocabulary (151,936) with peaked logits (entropies down to 1e-7, logits near 300),
    both entropy paths stay within 2e-4 of a float64 reference and the chunked gradient within 0.1%.
    The former ``lse - sum p * z`` cancelled two ~300-sized numbers: 1.7e-3 off, gradient 0.7% off."""
    gen = torch.Generator().manual_seed(0)
    vocab, width, rows = 151936, 64, 48
    head = nn.Linear(width, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, width, generator=gen) * 4.0)
    hidden = torch.randn(rows, width, generator=gen) * 1.5
    targets = torch.randint(0, vocab, (rows,), generator=gen)

    def reference_entropy(z):
        return (torch.softmax(z, -1) * (torch.logsumexp(z, -1, keepdim=True) - z)).sum(-1)

    exact_hidden = hidden.double().requires_grad_()
    exact = reference_entropy(exact_hidden @ head.weight.detach().double().T)
    exact.sum().backward()
    ours_hidden = hidden.clone().requires_grad_()
    _, ours = chunked_logprobs(ours_hidden, head, targets, with_entropy=True)
    ours.sum().backward()
    with torch.no_grad():
        logits = head(hidden)
        assert exact.min() < 1e-3 and logits.abs().max() > 100  # the hard case: peaked, large logits
        assert (ours.double() - exact).abs().max() < 2e-4
        assert (token_entropy(logits).double() - exact).abs().max() < 2e-4
        assert (ours_hidden.grad.double() - exact_hidden.grad).norm() / exact_hidden.grad.norm() < 1e-3


# ---------------------------------------------------------------- memory

def test_effective_chunk_size_floor_on_cpu_only(monkeypatch):
    monkeypatch.setattr("ampo_train.lm_head.CPU_MIN_CHUNK_ELEMENTS", 1 << 24)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert effective_chunk_size(256, 151936, cpu) == 256  # 256 * V = 39M logits > 2**24
    assert effective_chunk_size(256, 32000, cpu) == 525  # ceil(2**24 / 32000)
    assert effective_chunk_size(256, 32000, gpu) == 256
    assert effective_chunk_size(256, 32000, cpu, min_chunk_elements=0) == 256
    assert effective_chunk_size(256, None, cpu) == 256  # vocabulary unknown: no floor


def test_row_blocks_cover_rows_in_equal_large_blocks():
    # 256 rows x 151,936 = 38.9M elements -> 3 blocks of ~13M (between 8.65M and 16.8M)
    blocks = _row_blocks(256, 151936)
    assert [(b.start, min(b.stop, 256)) for b in blocks] == [(0, 86), (86, 172), (172, 256)]
    assert _row_blocks(10, 11) == [slice(0, 10)]  # small: one block
    assert _row_blocks(0, 11) == []
    assert _row_blocks(256, 151936, torch.device("cuda")) == [slice(0, 256)]  # a GPU: the whole chunk at once


def test_logits_are_not_kept_for_backward():
    # What autograd keeps between forward and backward, seen through saved-tensor hooks: the plain
    # path keeps [N, T, V]-sized tensors; the chunked path keeps nothing of vocabulary size
    # (it keeps the chunks' inputs and the head's weight, and re-creates the logits in the backward). The
    # peak RSS itself is measured by bench/lm_head_memory.py (too slow for a unit test: showing a
    # bound well under the full logits takes logits far larger than a chunk).
    torch.manual_seed(0)
    n, t, h, v = 2, 32, 8, 1000
    head = nn.Linear(h, v)
    hidden = torch.randn(n, t, h, requires_grad=True)
    targets = torch.randint(0, v, (n, t))

    params = {p.data_ptr() for p in head.parameters()}

    def largest_saved(fn):
        sizes = []

        def pack(x):
            if x.data_ptr() not in params:  # the head's own weight is saved by reference, no copy
                sizes.append(x.numel())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = fn()
        return out, max(sizes, default=0)

    _, plain = largest_saved(lambda: token_entropy(head(hidden)) + token_logprobs(head(hidden), targets))
    _, chunked = largest_saved(lambda: chunked_logprobs(hidden, head, targets, chunk_size=16, with_entropy=True))
    assert plain >= n * t * v
    assert chunked < v  # nothing of vocabulary size at all


# ---------------------------------------------------------------- the plain-Linear path and the cheap fixes

class _OpLog(TorchDispatchMode):
    """Every ATen op that runs inside the context, with its output shapes (forward and backward: on
    CPU the backward runs on the calling thread)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.ops.append((str(func), [tuple(o.shape) for o in outs if isinstance(o, torch.Tensor)]))
        return out

    def count(self, name: str, shape: tuple[int, ...] | None = None, last_dim: int | None = None) -> int:
        return sum(1 for op, shapes in self.ops if op == name and any(
            (shape is None or s == shape) and (last_dim is None or (s and s[-1] == last_dim)) for s in shapes))

    def vocab_sized(self, vocab: int) -> list[str]:
        """The ops that wrote a tensor whose last dimension is the vocabulary (per-logit work)."""
        return [op for op, shapes in self.ops if any(len(s) == 2 and s[-1] == vocab for s in shapes)]


def _plain_and_generic(head, hidden, targets, temperature, chunk_size, with_entropy, passes=2):
    """Outputs and accumulated gradients (hidden, then the head's parameters) through the plain-Linear
    path (``head`` itself) and through the generic chunk loop (the same head behind a lambda)."""
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(targets.shape, generator=gen) for _ in range(2)]
    results = []
    for fn in (head, lambda x: head(x)):
        hidden.grad = None
        head.zero_grad(set_to_none=True)
        for _ in range(passes):  # the second pass accumulates into .grad, as micro-batches do
            out = chunked_logprobs(hidden, fn, targets, temperature, chunk_size=chunk_size, with_entropy=with_entropy)
            lp, ent = out if with_entropy else (out, None)
            loss = (lp * weights[0]).sum() + ((ent * weights[1]).sum() if ent is not None else 0.0)
            loss.backward()
        grads = [hidden.grad] + [p.grad for p in head.parameters()]
        results.append((lp.detach(), None if ent is None else ent.detach(), [g.clone() for g in grads if g is not None]))
    return results


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_plain_linear_head_is_bit_for_bit_the_generic_chunk_loop(with_entropy, bias, temperature):
    # A plain Linear goes through _LinearHeadLogProbs (one function, one weight-gradient accumulator);
    # on CPU in float32 it must give exactly what calling the head chunk by chunk gave.
    torch.manual_seed(0)
    head = nn.Linear(8, 37, bias=bias)
    hidden = torch.randn(3, 5, 8, requires_grad=True)
    targets = torch.randint(0, 37, (3, 5))
    (lp, ent, grads), (lp0, ent0, grads0) = _plain_and_generic(head, hidden, targets, temperature, 4, with_entropy)
    assert torch.equal(lp, lp0)
    assert ent is None or torch.equal(ent, ent0)
    assert len(grads) == len(grads0) == 2 + bias
    for g, g0 in zip(grads, grads0):
        assert torch.equal(g, g0)


def test_frozen_head_is_cast_once_under_autocast():
    # LoRA's frozen float32 head under bf16 autocast: autocast caches casts of leaves that require
    # grad only, so calling the head per chunk cast the whole [V, H] weight in every chunk's forward
    # and again in its recomputation. The plain-Linear path casts it once per call.
    torch.manual_seed(0)
    v, h, chunks = 64, 8, 6
    head = nn.Linear(h, v, bias=False).requires_grad_(False)
    hidden = torch.randn(chunks * 4, h, requires_grad=True)
    targets = torch.randint(0, v, (chunks * 4,))
    results = {}
    for name, fn in (("plain", head), ("generic", lambda x: head(x))):
        hidden.grad = None
        with _OpLog() as log, torch.autocast("cpu", dtype=torch.bfloat16):
            lp, ent = chunked_logprobs(hidden, fn, targets, chunk_size=4, with_entropy=True)
            (lp.sum() + ent.sum()).backward()
        results[name] = (log.count("aten._to_copy.default", shape=(v, h)), lp.detach(), hidden.grad.clone())
    assert results["generic"][0] == 2 * chunks  # before: forward and recomputation, every chunk
    assert results["plain"][0] == 1
    assert torch.equal(results["plain"][1], results["generic"][1])  # the same bf16 weight, the same numbers
    assert torch.equal(results["plain"][2], results["generic"][2])


def test_trainable_head_weight_gradient_is_accumulated_once():
    # Full fine-tuning: each chunk's [V, H] weight-gradient product goes into one accumulator (two
    # fresh [V, H] tensors for the call, the accumulator and one buffer that every later product
    # reuses), where the chunk loop made a fresh one per chunk; the sum is the float64 reference's.
    torch.manual_seed(0)
    v, h, chunks = 53, 8, 5
    head = nn.Linear(h, v, bias=False)
    hidden = torch.randn(chunks * 3, h, requires_grad=True)
    targets = torch.randint(0, v, (chunks * 3,))
    counts = {}
    for name, fn in (("plain", head), ("generic", lambda x: head(x))):
        head.zero_grad(set_to_none=True)
        lp = chunked_logprobs(hidden, fn, targets, 0.7, chunk_size=3)
        with _OpLog() as log:
            lp.sum().backward()
        counts[name] = (log.count("aten.mm.default", shape=(v, h)) + log.count("aten.mm.default", shape=(h, v)),
                        log.count("aten.mm.out", shape=(v, h)))
    assert counts["generic"] == (chunks, 0)
    assert counts["plain"] == (2, chunks - 2)
    w64 = head.weight.detach().double().requires_grad_()
    z = hidden.detach().double() @ w64.T / 0.7
    torch.log_softmax(z, -1).gather(-1, targets[:, None]).sum().backward()
    assert float((head.weight.grad.double() - w64.grad).norm() / w64.grad.norm()) < 1e-6


@pytest.mark.parametrize("kind", ["plain", "generic"])
def test_no_entropy_work_unless_asked(kind):
    # with_entropy=False: no per-logit entropy op in the forward (the exp/mul/sum of softmax * (lse - z)).
    # An entropy returned but detached (a metric): its backward is exactly the log-prob-only backward.
    torch.manual_seed(0)
    v = 41
    head = nn.Linear(8, v)
    fn = head if kind == "plain" else (lambda x: head(x))
    hidden = torch.randn(12, 8, requires_grad=True)
    targets = torch.randint(0, v, (12,))
    forward_ops, backward_ops, grads = {}, {}, {}
    for with_entropy in (False, True):
        with _OpLog() as log:
            out = chunked_logprobs(hidden, fn, targets, 0.7, chunk_size=5, with_entropy=with_entropy)
        forward_ops[with_entropy] = log.vocab_sized(v)
        lp = out[0] if with_entropy else out  # the entropy, if any, is left out of the loss: detached
        hidden.grad = None
        with _OpLog() as log:
            lp.sum().backward()
        backward_ops[with_entropy], grads[with_entropy] = log.vocab_sized(v), hidden.grad.clone()
    assert "aten.exp_.default" not in forward_ops[False] and "aten.mul_.Tensor" not in forward_ops[False]
    assert forward_ops[True].count("aten.exp_.default") == 3  # one per chunk of 5, 5, 2 positions
    assert backward_ops[True] == backward_ops[False]
    assert torch.equal(grads[True], grads[False])


def test_kernel_selection_without_a_gpu():
    from ampo_train.lm_head import select_logprob_kernel, triton_available

    head = nn.Linear(4, 7)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    choice = select_logprob_kernel("auto", head, cpu)
    assert choice.kernel == "chunked" and "cpu device" in choice.reason
    assert select_logprob_kernel("chunked", head, cuda).kernel == "chunked"
    on_cuda = select_logprob_kernel("auto", head, cuda)  # the rule only: nothing runs on the device
    assert on_cuda.kernel == ("fused" if triton_available() else "chunked")
    if not triton_available():
        assert "triton is not importable" in on_cuda.reason
        with pytest.raises(ValueError, match="logprob_kernel: fused cannot run here: triton"):
            select_logprob_kernel("fused", head, cuda)
    with pytest.raises(ValueError, match="auto, chunked or fused"):
        select_logprob_kernel("fast", head, cpu)


def test_kernel_selection_keeps_called_heads_chunked():
    from ampo_train.lm_head import plain_head_problem, select_logprob_kernel, triton_available

    lora = _lora_head(8, 23)
    assert "not a plain torch.nn.Linear" in plain_head_problem(lora)
    hooked = nn.Linear(8, 23)
    hooked.register_forward_pre_hook(lambda module, args: None)
    assert "forward hooks" in plain_head_problem(hooked)
    assert plain_head_problem(nn.Linear(8, 23)) is None
    if triton_available():
        choice = select_logprob_kernel("auto", lora, torch.device("cuda"))
        assert choice.kernel == "chunked" and "not a plain" in choice.reason


def test_logprob_kernel_setting_is_auto_by_default_and_checked(tmp_path):
    from pydantic import ValidationError

    from ampo_train.config import TrainConfig
    from ampo_train.policy import ForwardSettings

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"problem": "1 + 1?", "answer": "2"}\n')
    base = {"student": "s", "prompts": str(prompts), "output_dir": str(tmp_path / "out")}
    assert TrainConfig.model_validate(base).logprob_kernel == "auto" == ForwardSettings().logprob_kernel
    assert TrainConfig.model_validate({**base, "logprob_kernel": "fused"}).logprob_kernel == "fused"
    with pytest.raises(ValidationError, match="1 validation error for TrainConfig\nlogprob_kernel"):
        TrainConfig.model_validate({**base, "logprob_kernel": "fast"})
