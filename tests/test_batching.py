"""Token-budget micro-batching: hand-worked packings and properties over random lengths."""

import random

import pytest

from ampo_train.batching import (micro_batch_groups, padded_tokens, row_count_batches, split_to_count,
                                 token_budget_batches)
from ampo_train.data import Row, collate


def test_padded_tokens_matches_collate():
    # prompts 2 and 4 -> P = 4 (left-padded); responses 3 and 6 -> R = 6: 2 rows x 10 = 20
    lengths = [(2, 3), (4, 6)]
    rows = [Row([1] * p, [2] * r, 0.0) for p, r in lengths]
    assert padded_tokens(lengths, [0, 1]) == collate(rows, pad_id=0).input_ids.numel() == 20
    # every response empty: collate still keeps one response column
    assert padded_tokens([(3, 0), (3, 0)], [0, 1]) == collate([Row([1] * 3, [], 0.0)] * 2, 0).input_ids.numel() == 8
    assert padded_tokens(lengths, []) == 0


def test_packing_by_hand():
    # row:    0       1        2       3       4
    # (p,r): (2,3)   (2,10)   (2,1)   (4,6)   (2,3)       totals 5, 12, 3, 10, 5
    # order (longest first, ties by index): 1, 3, 0, 4, 2; budget 24:
    #   [1]             P=2 R=10 -> 12
    #   + 3  -> P=4 R=10: 2 x 14 = 28 > 24   close [1]
    #   [3]             P=4 R=6  -> 10
    #   + 0  -> P=4 R=6:  2 x 10 = 20 <= 24
    #   + 4  -> P=4 R=6:  3 x 10 = 30 > 24   close [0, 3]
    #   [4]             P=2 R=3  -> 5
    #   + 2  -> P=2 R=3:  2 x 5 = 10 <= 24   end  [2, 4]
    lengths = [(2, 3), (2, 10), (2, 1), (4, 6), (2, 3)]
    batches = token_budget_batches(lengths, 24)
    assert batches == [[1], [0, 3], [2, 4]]
    assert [padded_tokens(lengths, b) for b in batches] == [12, 20, 10]
    # a row-count micro-batch of 2 in the original order would pad to 2x12 + 2x10 + 1x5 = 49 tokens
    # (rows 0,1 -> 2 x (2 + 10); rows 2,3 -> 2 x (4 + 6); row 4 -> 5); the budget packing pads to 42.


def test_prompt_and_response_widths_are_separate():
    # (10, 1) and (1, 10) have the same total, but together they pad to P = 10, R = 10: 2 x 20 = 40
    lengths = [(10, 1), (1, 10)]
    assert token_budget_batches(lengths, 30) == [[0], [1]]
    assert token_budget_batches(lengths, 40) == [[0, 1]]


def test_a_row_over_budget_gets_a_micro_batch_of_its_own():
    # row 0 alone pads to 35 > 16: it cannot be split, so it goes alone; the others pack as usual
    lengths = [(5, 30), (1, 1), (1, 2)]
    batches = token_budget_batches(lengths, 16)
    assert batches == [[0], [1, 2]]
    assert padded_tokens(lengths, [0]) == 35 > 16
    assert padded_tokens(lengths, [1, 2]) == 6


def test_ties_broken_by_index_and_empty_responses_count_one_column():
    assert token_budget_batches([(2, 2)] * 4, 8) == [[0, 1], [2, 3]]
    assert token_budget_batches([(3, 0), (3, 0)], 8) == [[0, 1]]  # 2 x (3 + 1)
    assert token_budget_batches([(3, 0), (3, 0)], 7) == [[0], [1]]
    assert token_budget_batches([], 8) == []


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        token_budget_batches([(1, 1)], 0)
    with pytest.raises(ValueError):
        token_budget_batches([(1, -1)], 10)


def _random_cases(count=300, seed=0):
    rng = random.Random(seed)  # seeded: the same cases every run (hypothesis is not a dependency)
    for _ in range(count):
        n = rng.randint(0, 40)
        lengths = [(rng.randint(0, 50), rng.choice([0, rng.randint(0, 200)])) for _ in range(n)]
        yield lengths, rng.randint(1, 2000)


def test_properties_on_random_lengths():
    for lengths, max_tokens in _random_cases():
        _check_properties(lengths, max_tokens)


def _check_properties(lengths, max_tokens):
    batches = token_budget_batches(lengths, max_tokens)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every row exactly once
    for b in batches:
        assert b and b == sorted(b)
        assert len(b) == 1 or padded_tokens(lengths, b) <= max_tokens, (lengths, max_tokens, b)
    assert token_budget_batches(lengths, max_tokens) == batches  # deterministic
    # greedy: each micro-batch was closed because the next row in sorted order (the longest of
    # the following micro-batch, ties by index) would have taken it over budget
    for a, b in zip(batches, batches[1:]):
        trigger = min(b, key=lambda i: (-sum(lengths[i]), i))
        assert padded_tokens(lengths, a + [trigger]) > max_tokens


def test_row_count_and_the_trainer_switch():
    assert row_count_batches(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert row_count_batches(0, 3) == []
    lengths = [(2, 3), (2, 10), (2, 1), (4, 6), (2, 3)]
    assert micro_batch_groups(lengths, 2, None) == [[0, 1], [2, 3], [4]]  # null budget: rows in order
    assert micro_batch_groups(lengths, 2, 24) == token_budget_batches(lengths, 24)  # the budget ignores rows
    with pytest.raises(ValueError):
        row_count_batches(3, 0)


def test_split_to_count_by_hand():
    # packed under 24: [1] (12 padded tokens), [0, 3] (20), [2, 4] (10). To reach 4 micro-batches
    # the largest splittable one goes first: [0, 3] -> [3] (total 10), [0] (5), longest first, in
    # its place. For 5, [1] is a single row, so [2, 4] -> [4] (5), [2] (3).
    lengths = [(2, 3), (2, 10), (2, 1), (4, 6), (2, 3)]
    batches = token_budget_batches(lengths, 24)
    assert split_to_count(lengths, batches, 3) == batches  # already there
    assert split_to_count(lengths, batches, 4) == [[1], [3], [0], [2, 4]]
    assert split_to_count(lengths, batches, 5) == [[1], [3], [0], [4], [2]]
    assert split_to_count(lengths, batches, 9) == [[1], [3], [0], [4], [2]]  # one row each: as far as it goes


def test_split_to_count_properties():
    for lengths, max_tokens in _random_cases(count=150, seed=1):
        batches = token_budget_batches(lengths, max_tokens)
        for extra in (0, 1, 3, 50):
            split = split_to_count(lengths, batches, len(batches) + extra)
            assert len(split) == min(len(batches) + extra, len(lengths))
            assert sorted(i for b in split for i in b) == list(range(len(lengths)))  # the same rows
            for b in split:  # each part of a micro-batch pads to no more than the budget it was packed under
                assert b and b == sorted(b)
                assert len(b) == 1 or padded_tokens(lengths, b) <= max_tokens


# ---------------------------------------------------------------- padding-free packed rows
# Not used by the trainer yet: this pins down what the installed transformers does when several
# sequences are concatenated into one row with position ids restarting at 0 (no attention mask).
# Its mask builder (masking_utils.find_packed_sequence_indices) detects the restarts and confines
# attention to each sequence for eager and sdpa (and flex_attention); flash_attention_2/3 derive
# cu_seqlens from the position ids instead (one row only; not testable on CPU). Detection is off
# whenever an attention mask or a KV cache is present, so both must be absent.

def _tiny_llama(impl):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    model.set_attn_implementation(impl)
    return model


def _packed(seqs):
    import torch

    ids = torch.cat(seqs).unsqueeze(0)
    positions = torch.cat([torch.arange(len(s)) for s in seqs]).unsqueeze(0)
    return ids, positions


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_packed_rows_attend_within_each_sequence(impl):
    import torch

    model = _tiny_llama(impl)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 50, (n,), generator=gen) for n in (5, 3, 7, 1)]
    separate = torch.cat([model(input_ids=s.unsqueeze(0), use_cache=False).logits[0] for s in seqs])
    ids, positions = _packed(seqs)
    packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-5)

    # gradients too: the same loss through both layouts gives the same parameter gradients
    weight = model.model.layers[0].self_attn.q_proj.weight
    grad_sep = torch.autograd.grad(separate.square().sum(), weight)[0]
    grad_packed = torch.autograd.grad(packed.square().sum(), weight)[0]
    torch.testing.assert_close(grad_packed, grad_sep, rtol=1e-4, atol=1e-5)

    # two packed rows of equal length in one batch work the same way
    two = model(input_ids=torch.cat([_packed(seqs[:2])[0], _packed(seqs[2:])[0]]),
                position_ids=torch.cat([_packed(seqs[:2])[1], _packed(seqs[2:])[1]]), use_cache=False).logits
    torch.testing.assert_close(two.reshape(-1, 50), separate, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_packing_is_not_detected_with_a_mask_or_a_cache(impl):
    # The pitfalls: an all-ones attention mask, or leaving use_cache at the config's default (True:
    # a cache is created), silently turns packed rows into one long sequence.
    import torch

    model = _tiny_llama(impl)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 50, (n,), generator=gen) for n in (5, 3)]
    separate = torch.cat([model(input_ids=s.unsqueeze(0), use_cache=False).logits[0] for s in seqs])
    ids, positions = _packed(seqs)
    with_mask = model(input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids),
                      use_cache=False).logits[0]
    with_cache = model(input_ids=ids, position_ids=positions).logits[0]
    for wrong in (with_mask, with_cache):
        assert torch.allclose(wrong[:5], separate[:5], atol=1e-5)  # the first sequence is unaffected
        assert not torch.allclose(wrong[5:], separate[5:], atol=1e-3)  # the second saw the first
