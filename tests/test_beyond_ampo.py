"""Beyond AMPO, each an option of `ampo-train run`, default off: prefix guidance (a teacher trace's
start, the student writes the rest), DAPO's dynamic sampling and its overlong handling. The pure
parts against numbers worked out by hand, then short real runs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import math

import pytest
import torch

from ampo_common.errors import InputError
from ampo_train.advantages import has_spread
from ampo_train.config import PrefixSettings, load_train_config
from ampo_train.data import Row, collate
from ampo_train.prefix import answer_start, prefix_fraction, prefix_length
from ampo_train.rewards import overlong_penalty
from ampo_train.trainer import train
from tests.trainer_fixtures import base_config, make_tokenizer, make_world, write_config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("beyond-world"), num_prompts=8, covered=0.75)


# ----------------------------------------------------------------------------- prefix guidance, pure


def test_prefix_schedules_by_hand():
    constant = PrefixSettings(fraction=0.5, schedule="constant", final=0.0)
    assert [prefix_fraction(constant, t, 5) for t in (1, 3, 5)] == [0.5, 0.5, 0.5]
    linear = PrefixSettings(fraction=0.5, schedule="linear", final=0.1)
    # progress (t - 1) / 4 = 0, .25, .5, .75, 1 -> 0.5 + (0.1 - 0.5) x progress
    assert [prefix_fraction(linear, t, 5) for t in range(1, 6)] == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.1])
    cosine = PrefixSettings(fraction=0.5, schedule="cosine", final=0.0)
    # 0.5 x (1 + cos(pi x progress)) / 2: 0.5, 0.4268, 0.25, 0.0732, 0
    assert [prefix_fraction(cosine, t, 5) for t in range(1, 6)] == pytest.approx(
        [0.5, 0.25 * (1 + math.cos(math.pi / 4)), 0.25, 0.25 * (1 - math.cos(math.pi / 4)), 0.0])
    assert prefix_fraction(cosine, 9, 5) == pytest.approx(0.0)  # past the end: the final value
    assert prefix_fraction(cosine, 1, 1) == 0.5  # a one-step run: the start


def test_prefix_is_cut_at_a_token_and_before_the_answer():
    text = r"12+30=42 \boxed{42}"
    tokenizer = make_tokenizer()  # one token per character: offsets (i, i + 1)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert len(offsets) == 19 and answer_start(text) == 9
    assert prefix_length(offsets, 9, 0.25) == 4  # floor(0.25 x 19) = 4: "12+3"
    assert prefix_length(offsets, 9, 0.5) == 9  # floor(9.5) = 9: "12+30=42 ", up to the box
    assert prefix_length(offsets, 9, 0.9) == 9  # floor(17.1) = 17, but never into the answer
    assert prefix_length(offsets, None, 0.9) == 17  # no box: anywhere
    assert prefix_length(offsets, 9, 0.0) == 0
    # a token that straddles the answer's start is not given: "42 \b" as one token would end at 10
    assert prefix_length([(0, 2), (2, 4), (4, 9), (9, 12), (12, 19)], 8, 1.0) == 2
    assert answer_start(r"so \boxed{\boxed{3}}") == 3  # the outermost box around the answer
    assert answer_start("no box here") is None
    # the first place any answer form appears: the answer stated in prose before its box, "the
    # answer is", an R1-style box inside the thinking before the final one
    assert answer_start(text, "42") == 6  # "=42 " states it before the box
    assert answer_start("17+25 gives 42. So the answer is: \\boxed{42}", "42") == 12
    assert answer_start("so the answer is 7, see", None) == 3
    r1 = "<think>\n17+25: 7+5=12, carry.\n\\boxed{42}\n</think>\nThe sum is \\boxed{42}"
    assert answer_start(r1, "42") == r1.index("\\boxed")
    assert answer_start("12+30=142 and 4.2 then 42", "42") == 23  # a standalone number only


def test_a_prefix_row_trains_its_continuation_and_masks_or_trains_its_prefix():
    pad = 0
    masked = Row([5, 6], [10, 11, 12, 13, 2], 1.0, prefix_len=2, prefix_in_loss=False)
    trained = Row([5, 6], [10, 11, 12, 13, 2], 1.0, prefix_len=2, prefix_in_loss=True)
    teacher = Row([5, 6], [20, 21, 2], 1.0, is_teacher=True)
    cut = Row([5, 6], [30, 31, 32], 0.0, finished=False, in_loss=False)  # overlong.filter
    batch = collate([masked, trained, teacher, cut], pad)
    assert batch.response_mask.tolist() == [[False, False, True, True, True], [True] * 5,
                                            [True, True, True, False, False], [False] * 5]
    assert batch.teacher_tokens.tolist() == [[False] * 5, [True, True, False, False, False], [True] * 5, [False] * 5]


# ----------------------------------------------------------------------------- DAPO, pure


def test_dynamic_sampling_keeps_groups_with_a_spread():
    rewards = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.9, 0.9, 1.0]])
    assert has_spread(rewards).tolist() == [False, True, False, True]


def test_overlong_soft_penalty_by_hand():
    # budget 10, cache 4: free up to 6 tokens, then -1/4 per token, -1 at 10 and beyond
    lengths = torch.tensor([5, 6, 7, 8, 10, 12])
    assert overlong_penalty(lengths, 10, 4).tolist() == pytest.approx([0, 0, -0.25, -0.5, -1, -1])
    assert overlong_penalty(lengths, 10, 4, penalty=0.5).tolist() == pytest.approx([0, 0, -0.125, -0.25, -0.5, -0.5])


def test_options_refused_with_what_they_cannot_run_with(world, tmp_path):
    path = write_config(tmp_path / "train.yaml", base_config(world, tmp_path / "out"))
    with pytest.raises(InputError, match="guidance.prefix cuts the traces guidance injects: it needs guidance.mode"):
        load_train_config(path, ["guidance.mode=off", "guidance.prefix={fraction: 0.5}"])
    with pytest.raises(InputError, match=r"overlong.soft_penalty_tokens \(12\) must be below rollout.max_new_tokens \(12\)"):
        load_train_config(path, ["overlong.soft_penalty_tokens=12"])


# ----------------------------------------------------------------------------- short real runs


def _run(world, tmp_path, name, **overrides):
    cfg = load_train_config(write_config(tmp_path / f"{name}.yaml", base_config(world, tmp_path / name, **overrides)))
    return train(cfg).history


def test_prefix_guidance_run(world, tmp_path):
    """The random student fails everything: guided groups get prefix rows (the trace's start plus
    the student's continuation), judged by the verifier, not credited by fiat."""
    history = _run(world, tmp_path, "prefix", max_steps=3, log_samples_every=1,
                   guidance={"mode": "adaptive", "k": 2, "prefix": {"fraction": 0.6, "schedule": "linear", "final": 0.2}})
    assert all(m["guidance/guided"] > 0 and m["guidance/prefix_tokens"] > 0 for m in history)
    assert history[0]["guidance/prefix_tokens"] > history[-1]["guidance/prefix_tokens"]  # the schedule shrinks it
    assert all(m["guidance/offpolicy_token_frac"] == 0 for m in history)  # the prefix is context only
    samples = [json.loads(line) for line in (tmp_path / "prefix" / "samples.jsonl").read_text().splitlines()]
    prefixed = [s for s in samples if s["prefix_tokens"]]
    assert prefixed and all(s["teacher"] and not s["injected"] and s["reward"] in (0.0, 1.0) for s in prefixed)
    trained = _run(world, tmp_path, "prefix-trained", max_steps=2,
                   guidance={"mode": "adaptive", "k": 2, "prefix": {"fraction": 0.5, "schedule": "constant",
                                                                    "loss_on_prefix": True}})
    assert all(m["guidance/offpolicy_token_frac"] > 0 for m in trained)


def test_dynamic_sampling_run(world, tmp_path):
    """Adaptive guidance makes guided groups (0/1 rewards) the only ones with a spread; the rest are
    dropped and more prompts drawn, at most twice more."""
    history = _run(world, tmp_path, "dynamic", max_steps=2, dynamic_sampling={"enabled": True, "max_resample_rounds": 2})
    for m in history:
        assert m["dynamic/drawn_groups"] == 4 * (1 + m["dynamic/rounds"]) and m["dynamic/rounds"] <= 2
        assert m["dynamic/kept_groups"] + m["dynamic/dropped_groups"] == m["dynamic/drawn_groups"]
        assert m["dynamic/kept_groups"] <= 4
    off = _run(world, tmp_path, "dynamic-off", max_steps=1, guidance={"mode": "off"},
               dynamic_sampling={"enabled": True, "max_resample_rounds": 1})
    # GRPO with a student that solves nothing: no group has a spread, nothing is trained on
    assert off[0]["dynamic/kept_groups"] == 0 and off[0]["dynamic/rounds"] == 1 and off[0].get("grad_norm") is None


def test_overlong_run(world, tmp_path):
    """The random student rarely writes EOS within 12 tokens: most rollouts are truncated. The soft
    penalty takes the whole penalty off those; the filter leaves their tokens out of the loss."""
    history = _run(world, tmp_path, "overlong", max_steps=2, overlong={"filter": True, "soft_penalty_tokens": 4,
                                                                       "penalty": 0.5})
    for m in history:
        # a truncated rollout: 0 (wrong) - 0.5 (at the budget); one that ended sooner loses less
        assert -0.5 <= m["reward"] <= -0.5 * m["response_length/truncated"] + 1e-6 < 0
        assert m["guidance/offpolicy_token_frac"] > 0 and m["grad_norm"] is not None
