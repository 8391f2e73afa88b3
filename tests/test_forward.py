"""The trainer's forward passes through hidden states and the chunked LM head, against the plain
full-logits forward: values and gradients (full and LoRA), and how many logits ever exist at once."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch.testing import assert_close

from ampo_train.data import Row, collate
from ampo_train.forward import final_hidden, lm_head, response_logprobs
from ampo_train.lm_head import effective_chunk_size
from ampo_train.loss import token_entropy, token_logprobs

# Large enough that the CPU chunk floor (2**24 logits) is 256 positions, so a few hundred response
# tokens take several chunks, as a real vocabulary does.
VOCAB = 65536


def _model(vocab=VOCAB, hidden=32, layers=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024, pad_token_id=0,
        tie_word_embeddings=False))


def _rows(lengths, seed=1):
    gen = torch.Generator().manual_seed(seed)
    def ids(n):
        return torch.randint(3, VOCAB, (n,), generator=gen).tolist()

    return [Row(ids(p), ids(r), 0.0) for p, r in lengths]


def _plain(model, mb, temperature):
    """The pre-issue-14 path: every response position's logits, then log_softmax."""
    r = mb.response_width
    logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids,
                   use_cache=False).logits[:, -(r + 1):-1]
    keep = mb.response_mask
    return (torch.where(keep, token_logprobs(logits, mb.response_ids, temperature), 0.0),
            torch.where(keep, token_entropy(logits, temperature), 0.0))


def _grads(model, lp, ent, mb):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(lp.shape, generator=gen)
    loss = (lp * w).sum() + 0.3 * (ent * w.flip(-1)).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("lora", [False, True])
def test_chunked_response_logprobs_match_the_full_logits_path(lora):
    model = _model()
    if lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)  # B != 0
        model = get_peft_model(model, lora)
    rows = _rows([(7, 250), (3, 120), (12, 200)])  # left-padded prompts, 570 response tokens: 3 chunks
    mb = collate(rows, 0)
    assert effective_chunk_size(1, VOCAB, torch.device("cpu")) == 256 < int(mb.response_mask.sum())
    lp, ent = response_logprobs(model, mb, 0.7, chunk_size=1, with_entropy=True)
    lp0, ent0 = _plain(model, mb, 0.7)
    assert_close(lp, lp0, rtol=1e-5, atol=1e-5)
    assert_close(ent, ent0, rtol=1e-5, atol=1e-5)
    for g, g0 in zip(_grads(model, lp, ent, mb), _grads(model, lp0, ent0, mb)):
        assert_close(g, g0, rtol=1e-4, atol=1e-6)


def _head_calls(model):
    """Record the number of logits of every call of the LM head."""
    sizes = []
    handle = lm_head(model).register_forward_hook(lambda module, args, out: sizes.append(out.numel()))
    return sizes, handle


def test_no_pass_ever_holds_more_than_one_chunk_of_logits():
    from ampo_train.comprehension import Scoring, score_candidates
    from tests.trainer_fixtures import make_tokenizer

    model = _model(layers=1, hidden=16)
    chunk = effective_chunk_size(1, VOCAB, torch.device("cpu"))
    sizes, handle = _head_calls(model)
    try:
        mb = collate(_rows([(5, 400), (9, 300)]), 0)  # 700 response positions
        lp, ent = response_logprobs(model, mb, 1.0, chunk_size=1, with_entropy=True)
        (lp.sum() + ent.sum()).backward()  # the backward recomputes chunk by chunk
        assert max(sizes) <= chunk * VOCAB and sum(sizes) >= 2 * 700 * VOCAB  # forward + recompute
        sizes.clear()
        with torch.no_grad():
            response_logprobs(model, mb, 1.0, chunk_size=1)
        assert max(sizes) <= chunk * VOCAB

        # comprehension scoring: trace_likelihood scores every token of long traces
        sizes.clear()
        traces = ["x" * 600 + " \\boxed{3}", "y" * 500 + " \\boxed{4}"]
        tok = make_tokenizer()
        scores = score_candidates(model, tok, "what is 1+2?", traces, "3", Scoring(scored="trace", chunk_size=1))
        assert len(scores) == 2 and all(s < 0 for s in scores)
        assert max(sizes) <= chunk * VOCAB and sum(sizes) >= 1100 * VOCAB
        sizes.clear()
        score_candidates(model, tok, "what is 1+2?", traces, "3", Scoring(chunk_size=1))  # a few answer tokens
        assert max(sizes) <= 2 * VOCAB  # the model's own head on its last position, or 2 answer tokens
    finally:
        handle.remove()


@pytest.mark.parametrize("lora", [False, True])
def test_final_hidden_is_the_heads_input_and_leaves_no_hooks(lora):
    model = _model(vocab=50, layers=3).eval()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(3, 50, (2, 9))
    with torch.no_grad():
        hidden = final_hidden(model, ids, torch.ones_like(ids))
        assert_close(lm_head(model)(hidden), model(input_ids=ids).logits)
    # nothing stays attached to slow down generation's many forward calls
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_head_with_soft_capping_is_refused():
    model = _model(vocab=50, layers=1)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        lm_head(model)


def test_config_default_chunk_is_the_modules():
    from ampo_train.config import TrainConfig
    from ampo_train.lm_head import DEFAULT_CHUNK_SIZE

    assert TrainConfig.model_fields["logit_chunk_size"].default == DEFAULT_CHUNK_SIZE
    assert TrainConfig.model_fields["micro_batch_tokens"].default is None  # null: micro_batch_size rows
