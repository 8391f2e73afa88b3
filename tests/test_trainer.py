"""The trainer: config, the guidance step, the mixed batch, and short real runs on a tiny world."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses
import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ampo_common.errors import InputError
from ampo_cache.lookup import CachedTrace
from ampo_train.config import GuidanceSettings, load_train_config
from ampo_train.data import PromptSampler, Row, collate, prepare_prompts, teacher_response_ids
from ampo_train.guided_step import WholeTraces
from ampo_train.seeds import RoundSeeds, rollout_seed
from ampo_train.rewards import format_ok, has_repetition, score_responses
from ampo_train.rollout import Rollout
from ampo_train.forward import response_logprobs
from ampo_train.trainer import train
from ampo_train.update import UpdateSettings
from tests.trainer_fixtures import base_config, make_policy, make_tokenizer, make_world, write_config

METRIC_KEYS = {
    "step", "reward", "reward_mixed", "accuracy", "guidance/fraction", "guidance/guided", "guidance/needed",
    "guidance/no_trace", "guidance/injected", "comprehension/picked", "comprehension/unpicked",
    "response_length/mean", "entropy", "clip/fraction", "clip/low", "clip/high", "clip/dual", "grad_norm",
    "time/generate", "time/guidance", "time/update", "tokens_per_second", "loss/policy", "lr",
}

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("trainer-world"), num_prompts=12, covered=0.75)


def _config(world, tmp_path, name="train.yaml", **overrides):
    return load_train_config(write_config(tmp_path / name, base_config(world, tmp_path / "out", **overrides)))


def _trace(teacher, text, idx=0):
    return CachedTrace(teacher, idx, text, None, len(text))


# ----------------------------------------------------------------------------- config


def test_config_overrides_defaults_and_located_errors(world, tmp_path):
    path = write_config(tmp_path / "train.yaml", base_config(world, tmp_path / "out"))
    cfg = load_train_config(path, ["guidance.k=3", "lr=1e-5", "lora.r=4", "loss.dual_clip=null", "output_dir=rel"])
    assert cfg.guidance.k == 3 and cfg.lr == 1e-5 and cfg.lora.r == 4 and cfg.lora.alpha == 32
    assert cfg.loss.dual_clip is None
    assert cfg.output_dir == (tmp_path.cwd() / "rel").resolve()  # command-line paths are relative to here
    # the reference defaults
    assert (cfg.loss.aggregation, cfg.loss.advantage_scale, cfg.loss.entropy_coef, cfg.loss.kl_coef) == (
        "seq_mean_token_sum_norm", "none", 0.001, 0.0)
    assert (cfg.loss.clip_low, cfg.loss.clip_high, cfg.loss.shaping_gamma, cfg.weight_decay) == (0.2, 0.2, 0.1, 0.1)
    assert cfg.guidance.max_candidates == 4 and cfg.loss_length == 64  # max(max_new_tokens 12, target 64)

    with pytest.raises(InputError, match=r"command line: 'guidance\.k=lots': Input should be a valid integer"):
        load_train_config(path, ["guidance.k=lots"])
    with pytest.raises(InputError, match=r"command line: 'guidance\.kk=2': unknown key"):
        load_train_config(path, ["guidance.kk=2"])
    with pytest.raises(InputError, match="cannot exceed group_size"):
        load_train_config(path, ["guidance.k=9"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("  k: 2\n", "  k: 2\n  rnak: random\n"))
    line = bad.read_text().splitlines().index("  rnak: random") + 1
    with pytest.raises(InputError, match=rf"bad\.yaml:{line}: guidance\.rnak: unknown key"):
        load_train_config(bad)
    # The file alone is wrong in one way (no store for its guidance), the overrides fix that and
    # break something else: the error names what is wrong with the combination, not the file's.
    no_store = tmp_path / "no_store.yaml"
    no_store.write_text(path.read_text() + f"store: {tmp_path / 'absent'}\n")
    with pytest.raises(InputError, match=r"with guidance\.mode=off prompts_per_step=3 mini_batch_prompts=2: .*multiple of mini_batch_prompts"):
        load_train_config(no_store, ["guidance.mode=off", "prompts_per_step=3", "mini_batch_prompts=2"])
    # YAML 1.1 reads bare `off` and `no` as false: both still mean what a user typed
    assert load_train_config(path, ["guidance.mode=off", "mixed_precision=no"]).mixed_precision == "no"
    assert load_train_config(path, ["mixed_precision=bf16"]).mixed_precision == "bf16"


# ----------------------------------------------------------------------------- rewards


def test_reward_terms():
    assert format_ok(r"so \boxed{4}") and not format_ok(r"\boxed{4} or \boxed{5}") and not format_ok("4")
    assert has_repetition("a b " * 20, window=2, count=10) and not has_repetition("a b c d", window=2, count=2)
    from ampo_cache.verify import Verifier
    from ampo_train.config import RewardSettings

    texts = [r"\boxed{4}", r"\boxed{5}", "4", r"\boxed{4} \boxed{4}"]
    plain = score_responses(Verifier(workers=0), texts, ["4"] * 4, RewardSettings())
    assert plain.rewards.tolist() == [1.0, 0.0, 1.0, 1.0] and plain.correct.tolist() == [True, False, True, True]
    mixed = score_responses(Verifier(workers=0), texts, ["4"] * 4, RewardSettings(format_coef=0.1))
    torch.testing.assert_close(mixed.rewards, torch.tensor([1.0, 0.1, 0.9, 0.9]))
    rep = score_responses(Verifier(workers=0), ["x y " * 12 + r"\boxed{4}"], ["4"],
                          RewardSettings(repetition_penalty=True, repetition_window=2, repetition_count=10))
    assert rep.rewards.tolist() == [0.0]  # 1 - 1


# ----------------------------------------------------------------------------- the guidance step


def _batch(*ids):
    from ampo_cache.prompts import Prompt

    return prepare_prompts([Prompt(i, f"What is {n} + 1?", str(n + 1)) for n, i in enumerate(ids)], make_tokenizer())


SEEDS = RoundSeeds(seed=0, step=1, round_index=0, positions=(0, 1, 2, 3), chunk=4)


def _plan(store, correct, settings, scorer=None):
    lookup = (lambda ids: {i: store.get(i, []) for i in ids}) if store is not None else None
    batch = _batch(*[f"p{b}" for b in range(len(correct))])
    return WholeTraces(settings, lookup, scorer).plan(batch, torch.tensor(correct, dtype=torch.bool), 1, SEEDS)


def test_plan_guidance_picks_top_k_and_replaces_only_wrong_rollouts():
    store = {
        "p0": [_trace("alpha", "a" * 30), _trace("beta", "b" * 20), _trace("beta", "bb" * 5, 1), _trace("gamma", "c" * 40)],
        "p2": [_trace("alpha", "short")],
        # p3 is absent from the store
    }
    correct = [[0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    scored = []

    def scorer(prompt, texts):
        scored.append((prompt.prompt_id, list(texts)))
        # p0's candidates in selection order: beta "bb"*5 (10 chars), beta "b"*20 -> no: one per teacher
        # first: beta's shortest (10), alpha (30), gamma (40), then beta's other (20).
        return [{"bbbbbbbbbb": 0.2, "a" * 30: 0.9, "c" * 40: 0.5, "b" * 20: 0.7, "short": 0.3}[t] for t in texts], None

    plan = _plan(store, correct, GuidanceSettings(k=2), scorer)
    # p1 has a correct rollout: not guided; p3 has no trace: counted, not an error
    assert [p for p, _ in scored] == ["p0", "p2"]
    assert scored[0][1] == ["b" * 10, "a" * 30, "c" * 40, "b" * 20]
    r = plan.report
    assert (r.prompts, r.needed, r.guided, r.no_trace, r.injected) == (4, 3, 2, 1, 3)
    assert r.reasons["all_wrong"] == 2 and r.reasons["below_threshold"] == 0
    assert r.per_teacher == Counter({"alpha": 2, "beta": 1})
    assert sorted(r.picked_scores) == [0.3, 0.7, 0.9] and sorted(r.unpicked_scores) == [0.2, 0.5]
    by_prompt = {}
    for inj in plan.injections:
        by_prompt.setdefault(inj.prompt_index, []).append(inj)
    # top 2 of p0 by score: alpha (0.9) then beta's 20-char trace (0.7); effective k = 1 for p2
    assert [i.trace.text for i in by_prompt[0]] == ["a" * 30, "b" * 20]
    assert [i.trace.text for i in by_prompt[2]] == ["short"]
    # the replaced slots are those each prompt's own generator draws from its wrong rollouts
    expected0 = SEEDS.prompt_rng(0).sample([0, 1, 2, 3], 2)
    expected2 = SEEDS.prompt_rng(2).sample([0, 1, 2, 3], 1)
    assert [i.slot for i in by_prompt[0]] == expected0 and [i.slot for i in by_prompt[2]] == expected2
    assert not any(i.replaced_correct for i in plan.injections)


def test_plan_guidance_off_always_and_random():
    store = {"p0": [_trace("alpha", "x")], "p1": [_trace("beta", "y")]}
    correct = [[0, 0], [1, 0]]
    off = _plan(store, correct, GuidanceSettings(mode="off", k=1))
    assert off.injections == [] and off.report.needed == 0
    always = _plan(store, correct, GuidanceSettings(mode="always", k=1, rank="random"))
    assert always.report.guided == 2 and always.report.reasons["always"] == 1
    assert always.injections[1].slot == 1  # p1: the one wrong rollout is the one replaced
    assert all(i.score is None for i in always.injections)  # random ranking scores nothing
    no_store = _plan(None, correct, GuidanceSettings(k=1))
    assert no_store.report.no_trace == 1 and no_store.injections == []


def test_wrong_only_injects_min_k_wrong_as_the_reference():
    store = {"p0": [_trace("alpha", "x"), _trace("beta", "yy")], "p1": [_trace("alpha", "z"), _trace("beta", "ww")],
             "p2": [_trace("alpha", "v")]}
    correct = [[1, 1, 0], [1, 1, 1], [0, 0, 0]]
    ours = _plan(store, correct, GuidanceSettings(mode="always", k=2, rank="random"))
    assert [len([i for i in ours.injections if i.prompt_index == b]) for b in range(3)] == [2, 2, 1]
    assert sum(i.replaced_correct for i in ours.injections) == 3  # p0: one correct slot, p1: two
    ref = _plan(store, correct, GuidanceSettings(mode="always", k=2, rank="random", replace="wrong_only"))
    # p0: one wrong rollout -> one trace, into that slot; p1: all correct -> none; p2: one candidate
    assert [(i.prompt_index, i.slot) for i in ref.injections] == [(0, 2), (2, ref.injections[1].slot)]
    assert not any(i.replaced_correct for i in ref.injections)
    assert (ref.report.guided, ref.report.all_correct, ref.report.injected) == (2, 1, 2)


def test_teacher_rows_tokens_mask_and_rewards(world):
    tok = make_tokenizer()
    from ampo_cache.prompts import Prompt
    from ampo_train.guided_step import GuidancePlan, GuidanceReport, Injection
    from ampo_train.rewards import Rewards
    from ampo_train.sampling import RowSettings, build_rows

    prompts = prepare_prompts([Prompt("p0", "What is 1 + 2?", "3")], tok)
    assert prompts[0].text == "<|user|>What is 1 + 2?\n<|assistant|>"
    text = r"1+2=3. \boxed{3}"
    ids = teacher_response_ids(tok, text, 64)
    assert ids == tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert teacher_response_ids(tok, text, 5) == ids[:5]  # cut: no EOS
    group = [Rollout([5, 6, tok.eos_token_id], "stop"), Rollout([7, 8, 9], "length"), Rollout([5], "length")]
    trace = _trace("alpha", text)
    plan = GuidancePlan([Injection(0, 1, trace, text, 0.5)], GuidanceReport())
    scored = Rewards(torch.tensor([0.0, 1.0, 0.0]), torch.tensor([False, True, False]), ["wrong", "correct", "wrong"])
    rows = build_rows(prompts, [group], scored, plan, tok, RowSettings(64, 1.0, False, "none"))
    assert [r.is_teacher for r in rows] == [False, True, False]
    assert rows[1].response_ids == ids and rows[1].reward == 1.0 and rows[1].teacher == "alpha" and rows[1].finished
    assert rows[0].response_ids == [5, 6, tok.eos_token_id] and rows[0].finished and not rows[2].finished
    # advantages over the mixed group: rewards [0, 1, 0] -> mean 1/3
    assert [round(r.advantage, 4) for r in rows] == [-0.3333, 0.6667, -0.3333]
    batch = collate(rows, tok.pad_token_id)
    assert batch.response_mask.sum(dim=1).tolist() == [3, len(ids), 1]  # the mask covers the trace + EOS
    assert batch.is_teacher.tolist() == [False, True, False]
    # the overlong filter masks the truncated rollouts (never the teacher trace)
    filtered = build_rows(prompts, [group], scored, plan, tok, RowSettings(64, 1.0, True, "none"))
    assert [r.in_loss for r in filtered] == [True, True, False]
    assert collate(filtered, tok.pad_token_id).response_mask.sum(dim=1).tolist() == [3, len(ids), 0]


def test_padded_batch_logprobs_match_unpadded_forward(world):
    """Left-padded prompts + right-padded responses give each row the log-probs of its own forward
    (the plain full-logits path), through hidden states and the chunked LM head; padding reads 0."""
    from transformers import AutoModelForCausalLM

    from ampo_train.loss import token_logprobs

    model = AutoModelForCausalLM.from_pretrained(world["student"]).eval()
    rows = [Row([3, 4, 5, 6, 7], [8, 9, 2], 0.0), Row([10, 11], [12, 13, 14, 15, 16], 1.0), Row([20], [21], 0.0)]
    batch = collate(rows, 0)
    with torch.no_grad():
        lp = response_logprobs(model, batch, temperature=0.7, chunk_size=2)
        assert bool((lp[~batch.response_mask] == 0).all())
        for i, row in enumerate(rows):
            ids = torch.tensor([list(row.prompt_ids) + row.response_ids])
            logits = model(ids).logits[0, len(row.prompt_ids) - 1:-1]
            alone = token_logprobs(logits, torch.tensor(row.response_ids), temperature=0.7)
            torch.testing.assert_close(lp[i, :len(row.response_ids)], alone, atol=1e-5, rtol=1e-5)


def test_prompt_sampler_is_an_endless_reproducible_stream():
    a = PromptSampler(5, seed=3)
    first = a.next_batch(4) + a.next_batch(4)  # crosses into epoch 1
    assert sorted(first[:5]) == [0, 1, 2, 3, 4] and a.epoch == 1
    b = PromptSampler(5, seed=3)
    b.next_batch(4)
    state = b.state_dict()
    c = PromptSampler(5, seed=3)
    c.load_state_dict(state)
    assert c.next_batch(4) == first[4:]


# ----------------------------------------------------------------------------- real runs


def test_adaptive_run_guides_logs_and_saves_a_loadable_adapter(world, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = _config(world, tmp_path, lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
                  guidance__score_baseline=True, save_steps=1, keep_checkpoints=1)
    result = train(cfg)
    lines = [json.loads(line) for line in (cfg.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        assert METRIC_KEYS <= set(m), METRIC_KEYS - set(m)
        # a random student never answers: every prompt needs guidance; 1 in 4 prompts has no trace
        assert m["accuracy"] == 0.0 and m["reward"] == 0.0
        assert m["guidance/needed"] == 4
        assert m["guidance/guided"] + m["guidance/no_trace"] == 4 and m["guidance/guided"] >= 1
        assert m["guidance/injected"] == 2 * m["guidance/guided"]  # k = 2, every covered prompt has >= 2 teachers
        assert sum(v for k, v in m.items() if k.startswith("guidance/teacher/")) == m["guidance/injected"]
        assert set(k for k in m if k.startswith("guidance/teacher/")) == {f"guidance/teacher/{t}" for t in ("alpha", "beta", "gamma")}
        # injected rows carry reward 1: the mixed mean is injected / (prompts x G)
        assert m["reward_mixed"] == pytest.approx(m["guidance/injected"] / 16)
        assert 0 <= m["comprehension/picked"] <= 1 and m["comprehension/gain"] is not None
        assert m["clip/fraction"] == 0.0  # lockstep, one update per step: ratio exactly 1
        # transformers samples from the training weights: its log-probs are the trainer's
        assert m["rollout/logprob_diff"] < 1e-5 and m["rollout/sync_bytes"] == 0
        assert m["grad_norm"] > 0
    assert [p.name for p in (cfg.output_dir / "checkpoints").iterdir()] == ["step-000002"]  # keep_checkpoints=1
    # the saved adapter reproduces the trained model
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.student), result.final_dir).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, result.model(ids).logits)
        base = AutoModelForCausalLM.from_pretrained(cfg.student)(ids).logits
    assert not torch.allclose(base, result.model(ids).logits)  # it did train
    assert (result.final_dir / "tokenizer.json").is_file()


@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_engine_without_vllm_is_one_line_before_loading(world, tmp_path):
    from cli.train import app

    path = write_config(tmp_path / "train.yaml", base_config(world, tmp_path / "out"))
    result = CliRunner().invoke(app, ["run", "--config", str(path), "rollout.engine=vllm"])
    assert result.exit_code == 2, result.output
    assert "rollout.engine: vllm is not installed: pip install -e \".[vllm]\"" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()  # nothing loaded, nothing written


def test_an_old_vllm_is_one_line_naming_the_version_needed(monkeypatch):
    """vLLM before 0.16.0 lacks reload_weights(weights_iterator=..., is_checkpoint_format=...): a user
    who has one reads which version to install, before anything loads, not a TypeError mid-run."""
    import tomllib

    import ampo_cache.generation as generation
    from ampo_train import rollout
    from ampo_train.config import RolloutSettings

    monkeypatch.setattr(generation, "vllm_available", lambda: True)
    monkeypatch.setattr(rollout, "_installed_vllm_version", lambda: "0.15.1")
    with pytest.raises(InputError, match=r"^rollout.engine: vllm 0.15.1 is too old: ampo needs vllm>=0.16.0 "):
        rollout.check_engine(RolloutSettings(engine="vllm"))
    with pytest.raises(InputError, match=r"^--engine: vllm 0.15.1 is too old"):
        rollout.check_engine(RolloutSettings(engine="vllm"), key="--engine")
    for version in ("0.16.0", "0.32.0+cpu", "1.0.0rc1"):
        monkeypatch.setattr(rollout, "_installed_vllm_version", lambda: version)
        assert rollout.check_engine(RolloutSettings(engine="vllm")) == "vllm"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["vllm"] == [f"vllm>={rollout.MIN_VLLM}"]  # the pin and the check say the same


def test_rollout_seeds_and_engine_choice():
    from ampo_train.config import RolloutSettings
    from ampo_train.rollout import Rollout, resolve_engine

    seeds = {rollout_seed(0, step, rank) for step in range(1, 50) for rank in range(4)}
    assert len(seeds) == 49 * 4 and all(0 <= s < 2 ** 31 for s in seeds)  # one stream per (step, process)
    assert rollout_seed(3, 7, 1) == rollout_seed(3, 7, 1) != rollout_seed(4, 7, 1)
    assert rollout_seed(3, 7, 1) != rollout_seed(3, 7, 1, purpose="prefix")
    assert resolve_engine(RolloutSettings(engine="transformers")) == "transformers"
    if not torch.cuda.is_available():
        assert resolve_engine(RolloutSettings(engine="auto")) == "transformers"  # vLLM only pays on a GPU
    stop = Rollout.cut([5, 2, 7, 2], {2}, [-0.1, -0.2, -0.3, -0.4])
    assert (stop.token_ids, stop.finish_reason, stop.logprobs) == ([5, 2], "stop", [-0.1, -0.2])
    assert Rollout.cut([5, 6], {2}).finish_reason == "length"


def test_rank_positions_and_round_seeds_do_not_depend_on_the_process_count():
    """8 prompts, updates of 4, 2 processes: each takes its half of every update's prompts; one
    process with calls of 2 prompts and two processes with calls of 2 make the same four calls
    with the same seeds, and draw the same guidance generator per prompt."""
    from ampo_train.data import rank_positions

    assert rank_positions(8, 0, 1, 8) == list(range(8))
    assert rank_positions(8, 0, 2, 8) == [0, 1, 2, 3] and rank_positions(8, 1, 2, 8) == [4, 5, 6, 7]
    assert rank_positions(8, 0, 2, 4) == [0, 1, 4, 5] and rank_positions(8, 1, 2, 4) == [2, 3, 6, 7]
    one = RoundSeeds(seed=5, step=3, round_index=0, positions=tuple(range(8)), chunk=2)
    ranks = [RoundSeeds(5, 3, 0, tuple(rank_positions(8, r, 2, 4)), chunk=2) for r in range(2)]
    calls = {(p[start], seed) for r in ranks for start, _, seed in r.chunks() for p in [r.positions]}
    assert calls == {(start, seed) for start, _, seed in one.chunks()}
    assert [(a, b) for a, b, _ in RoundSeeds(5, 3, 0, tuple(range(5)), chunk=2).chunks()] == [(0, 2), (2, 4), (4, 5)]
    assert one.prompt_rng(6).random() == ranks[1].prompt_rng(2).random() != one.prompt_rng(5).random()
    again = RoundSeeds(seed=5, step=3, round_index=1, positions=tuple(range(8)), chunk=2)
    assert again.chunks()[0][2] != one.chunks()[0][2]  # a dynamic-sampling round of its own


def test_truncated_importance_sampling_scales_rollout_gradients(world, tmp_path):
    """With every engine log-prob log 2 above the trainer's, the weight is 0.5: the rollout rows'
    gradient halves, teacher rows are untouched; a ratio of 3 is capped at is_cap = 2."""
    from transformers import AutoModelForCausalLM

    from ampo_train.metrics import StepStats
    from ampo_train.update import minibatch_backward

    cfg = _config(world, tmp_path, loss={"entropy_coef": 0.0})
    model = AutoModelForCausalLM.from_pretrained(world["student"])
    policy = make_policy(model, cfg.rollout)
    rows = [Row([5, 6, 7], [8, 9, 10, 2], 0.0, advantage=0.7), Row([5, 6], [11, 12], 0.0, advantage=-0.4)]
    current = policy.logprobs(rows, 8)

    def grads(shift, tis):
        shifted = [dataclasses.replace(row, engine_logp=lp + shift) for row, lp in zip(rows, current)]
        model.zero_grad()
        run_cfg = cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"is_correction": tis})})
        stats = StepStats()
        minibatch_backward(policy, shifted, UpdateSettings.from_config(run_cfg), stats)
        return [p.grad.clone() for p in model.parameters()], stats.summary()

    plain, _ = grads(0.0, None)
    halved, summary = grads(math.log(2), "tis")
    capped, _ = grads(-math.log(3), "tis")
    assert summary["rollout/is_weight"] == pytest.approx(0.5)
    assert summary["rollout/logprob_diff"] == pytest.approx(math.log(2), abs=1e-5)
    for a, b, c in zip(plain, halved, capped):
        torch.testing.assert_close(b, 0.5 * a, atol=1e-8, rtol=1e-5)
        torch.testing.assert_close(c, 2.0 * a, atol=1e-8, rtol=1e-5)


def test_mode_off_from_the_command_line_is_plain_grpo(world, tmp_path):
    from transformers import AutoModelForCausalLM

    from cli.train import app

    path = write_config(tmp_path / "train.yaml", base_config(world, tmp_path / "out"))
    result = CliRunner().invoke(app, ["run", "--config", str(path), "guidance.mode=off", "max_steps=1"])
    assert result.exit_code == 0, result.output
    assert "step 1/1" in result.output
    m = json.loads((tmp_path / "out" / "metrics.jsonl").read_text())
    assert (m["guidance/needed"], m["guidance/guided"], m["guidance/injected"]) == (0, 0, 0)
    assert m["reward_mixed"] == m["reward"] and m["comprehension/picked"] is None
    # all rollouts wrong and nothing injected: zero advantages, so the policy loss is exactly 0
    # (only the entropy bonus moves the weights)
    assert m["accuracy"] == 0.0 and m["loss/policy"] == 0.0 and m["grad_norm"] > 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")
    assert model.config.vocab_size == len(make_tokenizer())
    bad = CliRunner().invoke(app, ["run", "--config", str(path), "guidance.k=lots"])
    assert bad.exit_code == 2 and "guidance.k=lots" in bad.output


@pytest.mark.parametrize("rule", ["guidance.mode=pass_threshold", "guidance.mode=adaptive_k"])
def test_the_reference_rules_run_from_the_command_line(world, tmp_path, rule):
    """The random student fails everything: each rule guides the groups with traces, adaptive_k
    with int(4 x 0.5 - 0) = 2 traces each (G = 4), logged with their reason and counts."""
    from cli.train import app

    path = write_config(tmp_path / "train.yaml", base_config(world, tmp_path / "out"))
    result = CliRunner().invoke(app, ["run", "--config", str(path), rule, "guidance.pass_num=2", "max_steps=1"])
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "out" / "metrics.jsonl").read_text())
    assert m["guidance/guided"] > 0 and m["guidance/guided_by/all_wrong"] == m["guidance/guided"]
    assert m["guidance/k_mean"] == 2.0 and m["guidance/teacher_incorrect"] == 0
    assert m["guidance/teacher_correct"] == m["guidance/injected"] and m["guidance/replaced_correct"] == 0


@pytest.mark.parametrize("aggregation", ["seq_mean_token_sum_norm", "token_mean", "seq_mean_token_mean"])
def test_micro_batches_accumulate_to_the_full_batch(world, tmp_path, aggregation):
    """Gradient accumulation over micro-batches of 3 rows, or packed by a token budget (rows
    reordered by length), gives the gradient of one batch of 10; activation offloading (a GPU
    saving, no-op on a CPU) changes nothing in the result."""
    from transformers import AutoModelForCausalLM

    from ampo_train.batching import padded_tokens
    from ampo_train.metrics import StepStats
    from ampo_train.update import micro_batches, minibatch_backward, row_lengths

    cfg = _config(world, tmp_path, loss={"aggregation": aggregation, "entropy_coef": 0.01})
    model = AutoModelForCausalLM.from_pretrained(world["student"])
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(10):
        prompt = torch.randint(3, 80, (int(torch.randint(2, 7, (1,), generator=gen)),), generator=gen).tolist()
        response = torch.randint(3, 80, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen).tolist()
        rows.append(Row(prompt, response, 0.0, is_teacher=i % 4 == 1, advantage=float(torch.randn(1, generator=gen))))
    budget = 40
    packed = micro_batches(rows, UpdateSettings.from_config(cfg.model_copy(update={"micro_batch_tokens": budget})))
    # the budget case is a real one: several micro-batches, rows out of order, each within budget
    assert 3 < len(packed) < 10 and [i for b in packed for i in b] != list(range(10))
    assert all(len(b) == 1 or padded_tokens(row_lengths(rows), b) <= budget for b in packed)
    grads, entropy = [], []
    for micro, tokens, offload in ((10, None, False), (3, None, False), (10, budget, False), (3, None, True)):
        model.zero_grad()
        stats = StepStats()
        minibatch_backward(make_policy(model, cfg.rollout), rows, UpdateSettings.from_config(
            cfg.model_copy(update={"micro_batch_size": micro, "micro_batch_tokens": tokens,
                                   "activation_offload": offload})), stats)
        grads.append([p.grad.clone() for p in model.parameters()])
        summary = stats.summary()
        entropy.append(summary["entropy"])
        assert summary["update/micro_batches"] == (len(packed) if tokens else -(-10 // micro))
    assert any(g.abs().sum() > 0 for g in grads[0])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)
    assert entropy == pytest.approx([entropy[0]] * 4, rel=1e-5)


def test_minibatches_kl_and_lora_reference(world, tmp_path):
    """Two updates per step (old log-probs from a no-grad pass) with a KL term to the adapter-free base."""
    cfg = _config(world, tmp_path, max_steps=2, mini_batch_prompts=2, ppo_epochs=2, lr=3e-2,
                  lora={"r": 4, "alpha": 8}, loss={"kl_coef": 0.1}, micro_batch_size=4)
    result = train(cfg)
    first, second = result.history
    assert first["kl"] is not None and first["kl"] >= 0 and second["kl"] > 0  # the policy left the base
    assert first["lr"] == pytest.approx(3e-2)
    # 4 updates per step (2 mini-batches x 2 epochs): later updates see ratios != 1 and clip. Every
    # rollout is wrong (advantage -0.5 or 0), so only the lower clip can bind.
    assert first["clip/fraction"] > 0 and first["clip/low"] == first["clip/fraction"] and first["clip/high"] == 0


def test_tiny_world_train_yaml_runs(tiny_world, tmp_path):
    """The tiny world's generated train.yaml fits this schema and trains (its store is built by
    `ampo-cache build`, which this test skips: guidance off)."""
    cfg = load_train_config(tiny_world.train_yaml, [
        "guidance.mode=off", f"output_dir={tmp_path / 'out'}", "max_steps=1", "prompts_per_step=2", "mini_batch_prompts=null", "group_size=4",
        "rollout.max_new_tokens=32", "tensorboard=false"])
    result = train(cfg)
    assert result.final_dir is not None and result.history[0]["response_length/mean"] > 0


def test_trains_from_verl_layout_prompts(tiny_world, tmp_path):
    """Training prompts in the verl layout (chat-list `prompt`, `reward_model.ground_truth`) work as ours."""
    verl = os.path.join(os.path.dirname(__file__), "..", "data", "examples", "verl.parquet")
    cfg = load_train_config(tiny_world.train_yaml, [
        f"prompts={verl}", "guidance.mode=off", f"output_dir={tmp_path / 'out'}", "max_steps=1",
        "prompts_per_step=2", "mini_batch_prompts=null", "group_size=2", "rollout.max_new_tokens=8", "tensorboard=false"])
    result = train(cfg)
    assert result.history[0]["response_length/mean"] > 0
