"""The fused Triton log-prob kernel (``ampo_train.fused_logprob``) against float64, run by Triton's
CPU interpreter: values and gradients (hidden, weight, bias), temperature, peaked logits at a real
vocabulary, bf16 autocast, a frozen head, a detached entropy, and through the model and the policy.

Needs triton (``pip install -e ".[triton]"``, the optional CI step ``AMPO_CI_TRITON=1``); skipped
without it. ``TRITON_INTERPRET=1`` must be set before the kernels are defined, hence at the top.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from ampo_train.fused_logprob import fused_linear_logprobs  # noqa: E402
from ampo_train.lm_head import HeadPass, chunked_logprobs, head_logprobs, select_logprob_kernel  # noqa: E402

pytestmark = pytest.mark.triton
SMALL_TILE = (4, 16)  # 15 positions x 37 entries: 4 x 3 tiles, the last ones partial


def _problem(m=15, h=8, v=37, bias=True, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * scale
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    targets = torch.randint(0, v, (m,), generator=gen)
    w_lp, w_ent = torch.randn(m, generator=gen, dtype=torch.float64), torch.randn(m, generator=gen, dtype=torch.float64)
    return hidden, weight, b, targets, w_lp, w_ent


def _reference(hidden, weight, bias, targets, temperature):
    """float64 log-probs and entropy of the full logits (autograd through log_softmax)."""
    z = hidden @ weight.T + (bias if bias is not None else 0.0)
    logp = torch.log_softmax(z / temperature, -1)
    return logp.gather(-1, targets[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def _run(fn, inputs, w_lp, w_ent, with_entropy):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in inputs]
    out = fn(*leaves)
    lp, ent = out if with_entropy else (out, None)
    loss = (lp * w_lp.to(lp.dtype)).sum() + ((ent * w_ent.to(ent.dtype)).sum() if ent is not None else 0.0)
    loss.backward()
    return lp.detach(), None if ent is None else ent.detach(), [x.grad if x is not None else None for x in leaves]


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_float64(with_entropy, bias, temperature):
    hidden, weight, b, targets, w_lp, w_ent = _problem(bias=bias)
    lp0, ent0, grads0 = _run(lambda h, w, b_: _reference(h, w, b_, targets, temperature)[:2 if with_entropy else 1]
                             if with_entropy else _reference(h, w, b_, targets, temperature)[0],
                             (hidden, weight, b), w_lp, w_ent, with_entropy)
    lp, ent, grads = _run(lambda h, w, b_: fused_linear_logprobs(h, w, b_, targets, temperature, with_entropy, SMALL_TILE),
                          (hidden.float(), weight.float(), None if b is None else b.float()), w_lp, w_ent, with_entropy)
    assert lp.dtype == torch.float32 and lp.shape == (15,)
    assert float((lp.double() - lp0).abs().max()) < 1e-5  # the goal: log-probs within 1e-5 under fp32
    if with_entropy:
        assert float((ent.double() - ent0).abs().max()) < 1e-5
    for g, g0 in zip(grads, grads0):
        if g0 is not None:
            assert g.dtype == torch.float32
            assert _rel(g, g0) < 1e-5  # the goal is 1e-3 (relative); measured ~3e-7


def test_peaked_logits_at_a_real_vocabulary():
    """Qwen's vocabulary (151,936), logits near 280, entropies down to 1e-8: the entropy summed from
    non-negative terms (issue 23's form, online) stays within 1e-4 of float64, and within 10% on the
    peaked rows, where the textbook ``lse - E[z]`` on the same float32 logits is off by more than
    50%; the gradient within 1e-3."""
    hidden, weight, _, targets, _, _ = _problem(m=16, h=64, v=151936, bias=False, scale=4.0)
    hidden = hidden * 1.5
    lp0, ent0, (g0, _) = _run(lambda h, w: _reference(h, w, None, targets, 1.0), (hidden, weight),
                              torch.ones(16), torch.ones(16), True)
    lp, ent, (g, _) = _run(lambda h, w: fused_linear_logprobs(h, w, None, targets, 1.0, True),
                           (hidden.float(), weight.float()), torch.ones(16), torch.ones(16), True)
    z = hidden.float() @ weight.float().T
    assert float(ent0.min()) < 1e-6 and float(z.abs().max()) > 100  # the hard case
    textbook = torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)
    assert float((ent.double() - ent0).abs().max()) < 1e-4
    peaked = ent0 < 1e-3

    def worst_relative(e):
        return float(((e.double() - ent0).abs() / ent0)[peaked].max())

    assert worst_relative(ent) < 0.1 < 0.5 < worst_relative(textbook)  # measured: 4.6% vs 120%
    assert float((lp.double() - lp0).abs().max()) < 1e-4  # float32 logits near 280 carry ~2e-5 each
    assert _rel(g, g0) < 1e-3


def test_bf16_autocast_keeps_float32_outputs_and_gradients():
    hidden, weight, b, targets, w_lp, w_ent = _problem(v=300, h=16, m=20)
    lp0, ent0, grads0 = _run(lambda h, w, b_: _reference(h, w, b_, targets, 0.7), (hidden, weight, b), w_lp, w_ent, True)

    def fused(h, w, b_):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fused_linear_logprobs(h, w, b_, targets, 0.7, True, (8, 128))

    lp, ent, grads = _run(fused, (hidden.float(), weight.float(), b.float()), w_lp, w_ent, True)
    assert lp.dtype == ent.dtype == torch.float32
    assert float((lp.double() - lp0).abs().max()) < 0.1 and float((ent.double() - ent0).abs().max()) < 0.1
    for g, g0 in zip(grads, grads0):
        assert g.dtype == torch.float32 and _rel(g, g0) < 0.05  # bf16 logits: ~1% (reported on the GPU)


class _MatmulCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_frozen_head_gets_no_weight_gradient_work():
    # 15 positions x 37 entries in 4 x 3 tiles. The backward recomputes each tile and multiplies it
    # by the weight (the hidden states' gradient); only a trainable head adds the third product.
    hidden, weight, b, targets, _, _ = _problem()
    counts, grads = {}, {}
    for trainable in (True, False):
        h = hidden.float().requires_grad_()
        w = weight.float().requires_grad_(trainable)
        lp = fused_linear_logprobs(h, w, None, targets, 1.0, False, SMALL_TILE)
        with _MatmulCount() as mode:
            lp.sum().backward()
        counts[trainable], grads[trainable] = mode.count, (h.grad, w.grad)
    assert counts[True] == 3 * 12 and counts[False] == 2 * 12
    assert grads[False][1] is None
    assert torch.equal(grads[False][0], grads[True][0])


def test_detached_entropy_costs_no_backward_work():
    # An entropy computed for a metric only: the backward gets no gradient for it, and runs the
    # kernel without the entropy term (the same gradient, bit for bit, as with_entropy=False).
    hidden, weight, b, targets, _, _ = _problem()
    grads = {}
    for with_entropy in (False, True):
        h = hidden.float().requires_grad_()
        out = fused_linear_logprobs(h, weight.float(), b.float(), targets, 0.7, with_entropy, SMALL_TILE)
        if with_entropy:
            assert isinstance(out, tuple) and not out[1].detach().requires_grad
            out = out[0]
        else:
            assert isinstance(out, torch.Tensor)
        out.sum().backward()
        grads[with_entropy] = h.grad
    assert torch.equal(grads[True], grads[False])


def test_fused_selection_under_the_interpreter():
    head = nn.Linear(4, 9)
    assert select_logprob_kernel("fused", head, torch.device("cpu")).kernel == "fused"
    assert select_logprob_kernel("auto", head, torch.device("cpu")).kernel == "chunked"  # auto: CUDA only
    peft = pytest.importorskip("peft")

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 9)

    lora_head = peft.get_peft_model(Holder(), peft.LoraConfig(r=2, target_modules=["head"])).base_model.model.head
    with pytest.raises(ValueError, match="fused cannot run here: the head is a peft"):
        head_logprobs(torch.randn(2, 3, 4), lora_head, torch.zeros(2, 3, dtype=torch.long), HeadPass(kernel="fused"))


def test_chunked_logprobs_with_mask_through_the_fused_kernel():
    torch.manual_seed(0)
    head = nn.Linear(8, 37)
    hidden = torch.randn(3, 6, 8, requires_grad=True)
    targets = torch.randint(0, 37, (3, 6))
    mask = torch.arange(6) < torch.tensor([6, 2, 4]).unsqueeze(-1)
    outs = {}
    for kernel in ("chunked", "fused"):
        hidden.grad = None
        head.zero_grad(set_to_none=True)
        lp, ent = head_logprobs(hidden, head, targets, HeadPass(0.7, 4, True, kernel), mask=mask)
        (lp.sum() + 0.5 * ent.sum()).backward()
        outs[kernel] = (lp.detach(), ent.detach(), hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone())
    for a, b in zip(outs["fused"], outs["chunked"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert bool((outs["fused"][0][~mask] == 0).all()) and bool((outs["fused"][2][~mask] == 0).all())


def _llama(vocab=512, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, pad_token_id=0, tie_word_embeddings=True))


@pytest.mark.parametrize("lora", [False, True])
def test_model_update_and_policy_passes_match_the_chunked_path(lora):
    # The update's forward (Policy.response_logprobs, with grad) and the old/reference passes
    # (Policy.logprobs, no grad) through the fused kernel: the chunked path's numbers within fp32
    # round-off. Under LoRA (all-linear) the head stays a plain frozen Linear: fused applies.
    from ampo_train.data import Row, collate
    from ampo_train.policy import ForwardSettings, Policy

    model = _llama()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    gen = torch.Generator().manual_seed(1)
    rows = [Row(torch.randint(3, 512, (p,), generator=gen).tolist(), torch.randint(3, 512, (r,), generator=gen).tolist(),
                0.0) for p, r in [(5, 30), (9, 12), (3, 21)]]
    mb = collate(rows, 0)
    params = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for kernel in ("chunked", "fused"):
        policy = Policy(model, None, 0, ForwardSettings(0.7, logprob_kernel=kernel))
        lp, ent = policy.response_logprobs(mb, with_entropy=True)
        w = torch.randn(lp.shape, generator=torch.Generator().manual_seed(2))
        grads = torch.autograd.grad((lp * w).sum() + 0.1 * (ent * w).sum(), params)
        old = policy.logprobs(rows, micro_batch_size=2)
        results[kernel] = (lp.detach(), ent.detach(), grads, old)
    (lp, ent, grads, old), (lp0, ent0, grads0, old0) = results["fused"], results["chunked"]
    torch.testing.assert_close(lp, lp0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent0, rtol=1e-5, atol=1e-5)
    for g, g0 in zip(grads, grads0):
        assert float((g - g0).norm() / g0.norm()) < 1e-5
    for a, b in zip(old, old0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
