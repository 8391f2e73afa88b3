import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from ampo_train.comprehension import (
    Scoring,
    answer_token_mask,
    comprehension_score,
    no_reasoning_trace,
    score_candidates,
    trace_likelihood_score,
    with_ground_truth,
)


# ---------------------------------------------------------------- with_ground_truth

def test_nested_braces_are_replaced_whole():
    text = r"so x = \boxed{\frac{1}{2}}."
    new, span = with_ground_truth(text, "0.5")
    assert new == r"so x = \boxed{0.5}."
    # "so x = " is 7 chars, "\boxed{" 7 more -> the answer starts at 14 and ends at 17
    assert span == (14, 17)
    assert new[14:17] == "0.5"


def test_last_box_wins_and_truncated_box_is_skipped():
    new, span = with_ground_truth(r"try \boxed{1}, finally \boxed{2}", "7")
    assert new == r"try \boxed{1}, finally \boxed{7}"
    assert new[span[0]:span[1]] == "7"
    # the last \boxed{ never closes (trace cut off): fall back to the balanced one before it
    new, span = with_ground_truth(r"\boxed{3} and \boxed{4", "9")
    assert new == r"\boxed{9} and \boxed{4"
    assert span == (7, 8)


def test_escaped_braces_spaces_and_missing_box():
    # \{ and \} are literal braces: they do not close the box
    new, span = with_ground_truth(r"A = \boxed{\{1,2\}} done", "S")
    assert new == r"A = \boxed{S} done"
    assert new[span[0]:span[1]] == "S"
    # an unbalanced \left\{ ... \right. inside is fine too
    new, _ = with_ground_truth(r"\boxed{\left\{ x \right.}", "y")
    assert new == r"\boxed{y}"
    # "\boxed {5}" with a space before the brace
    new, span = with_ground_truth(r"\boxed {5}", "6")
    assert new == r"\boxed {6}" and span == (8, 9)
    assert with_ground_truth("the answer is 5", "5") == ("the answer is 5", None)
    assert no_reasoning_trace("1/2") == r"\boxed{1/2}"


# ---------------------------------------------------------------- answer_token_mask

def test_answer_token_mask_overlap():
    # answer span [7, 11)
    offsets = [(0, 3), (3, 7), (7, 8), (8, 11), (11, 12), (6, 9), (0, 0)]
    # (3,7) ends where the answer starts: no; (7,8), (8,11) inside: yes; (11,12) starts at its
    # end: no; (6,9) straddles the start: yes; (0,0) zero width (special token): no
    assert answer_token_mask(offsets, (7, 11)).tolist() == [False, False, True, True, False, True, False]
    assert answer_token_mask(offsets, None).tolist() == [False] * 7


# ---------------------------------------------------------------- scores

LP = torch.log(torch.tensor([0.5, 0.2, 0.8, 0.9]))
MASK = torch.tensor([False, True, True, False])


def test_comprehension_score_kinds_by_hand():
    # answer tokens have p = 0.2 and 0.8
    assert comprehension_score(LP, MASK) == pytest.approx(0.5)  # (0.2 + 0.8) / 2
    assert comprehension_score(LP, MASK, "mean_logp") == pytest.approx(-0.9162907)  # ln(0.16) / 2
    assert comprehension_score(LP, MASK, "prob") == pytest.approx(0.16)  # 0.2 * 0.8
    assert comprehension_score(LP, MASK, "geo_mean_prob") == pytest.approx(0.4)  # sqrt(0.16)
    none = torch.zeros(4, dtype=torch.bool)
    assert comprehension_score(LP, none) == 0.0
    assert comprehension_score(LP, none, "prob") == 0.0
    assert comprehension_score(LP, none, "mean_logp") == float("-inf")
    with pytest.raises(ValueError):
        comprehension_score(LP, MASK, "median")


def test_trace_likelihood_score_by_hand():
    # ln(0.5 * 0.2 * 0.8 * 0.9) / 4 = ln(0.072) / 4 = -2.6310892 / 4 = -0.6577723
    assert trace_likelihood_score(LP) == pytest.approx(-0.6577723)
    # masked: (ln 0.2 + ln 0.8) / 2
    assert trace_likelihood_score(LP, MASK) == pytest.approx(-0.9162907)
    assert trace_likelihood_score(LP[:0]) == float("-inf")


# ---------------------------------------------------------------- model-facing helper

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,=+-/\\{}<>\n"


@pytest.fixture(scope="module")
def tiny():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # one token per character (newline included), with exact character offsets
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        initializer_range=0.3, pad_token_id=0, bos_token_id=None, eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    return model, tok, vocab


TRACES = [
    "half of one is \\boxed{\\frac{1}{2}}",
    "it is \\boxed{1/2} and then some more words after the box",
    "no box here, the answer is 0.5",
]
MESSAGES = [{"role": "user", "content": "what is 1/2"}]


def _manual_logprobs(model, vocab, prompt_text, response_text, temperature):
    """log p of every response character, from one unpadded forward of prompt + response."""
    ids = torch.tensor([[vocab[c] for c in prompt_text + response_text]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double() / temperature
    lp = torch.log_softmax(logits, dim=-1)
    p = len(prompt_text)
    # character j of the response is token p + j, predicted by the logits at p + j - 1
    return torch.stack([lp[p + j - 1, ids[0, p + j]] for j in range(len(response_text))])


def test_score_candidates_matches_a_manual_forward(tiny):
    model, tok, vocab = tiny
    model.train()
    prompt_text = "<user>what is 1/2\n<assistant>"
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == prompt_text

    scores = score_candidates(model, tok, MESSAGES, TRACES, "0.5", Scoring(temperature=0.7))
    assert model.training  # mode restored

    expected = []
    for text in TRACES[:2]:
        new_text, (a, b) = with_ground_truth(text, "0.5")
        lp = _manual_logprobs(model, vocab, prompt_text, new_text, 0.7)
        # char-level tokenizer: the answer tokens are exactly characters a..b-1
        expected.append(lp[a:b].exp().mean().item())
    assert scores[:2] == pytest.approx(expected, rel=1e-5)
    assert scores[2] == 0.0  # no \boxed{} -> no locatable answer
    assert 0.0 < scores[0] < 1.0 and scores[0] != scores[1]

    # a rendered prompt string gives the same result as chat messages
    again = score_candidates(model, tok, prompt_text, TRACES, "0.5", Scoring(temperature=0.7))
    assert again == pytest.approx(scores, rel=1e-6)


def test_score_candidates_other_kinds_and_trace_likelihood(tiny):
    model, tok, vocab = tiny
    prompt_text = "<user>what is 1/2\n<assistant>"
    new_text, (a, b) = with_ground_truth(TRACES[0], "0.5")
    lp = _manual_logprobs(model, vocab, prompt_text, new_text, 1.0)[a:b]
    got = score_candidates(model, tok, MESSAGES, TRACES[:1], "0.5", Scoring(kind="prob"))
    assert got[0] == pytest.approx(lp.sum().exp().item(), rel=1e-5)
    got = score_candidates(model, tok, MESSAGES, TRACES, "0.5", Scoring(kind="mean_logp"))
    assert got[0] == pytest.approx(lp.mean().item(), rel=1e-5)
    assert got[2] == float("-inf")

    # trace likelihood: mean log p over every character of the UNMODIFIED trace
    got = score_candidates(model, tok, MESSAGES, TRACES, "0.5", Scoring(scored="trace"))
    for text, score in zip(TRACES, got):
        assert score == pytest.approx(_manual_logprobs(model, vocab, prompt_text, text, 1.0).mean().item(), rel=1e-5)


def test_score_candidates_truncation_hides_a_late_answer(tiny):
    model, tok, _ = tiny
    # trace 0's answer starts at character 22; keep only 10 tokens -> not locatable -> 0
    assert score_candidates(model, tok, MESSAGES, TRACES[:1], "0.5", Scoring(max_response_tokens=10)) == [0.0]
