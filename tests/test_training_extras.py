"""What the trainer reports besides its step metrics (evaluation every N steps, samples.jsonl), and
how it survives a non-finite gradient."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import math

import pytest
import torch

from ampo_common.errors import InputError
from ampo_train.config import load_train_config
from tests.trainer_fixtures import base_config, make_world, write_config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("extras-world"), num_prompts=8, covered=0.75)


def test_eval_during_training_and_sample_log(world, tmp_path):
    from ampo_train.evaluation.benchmarks import load_benchmark
    from ampo_train.evaluation.runner import EvalSettings, ModelSpec, evaluate
    from ampo_train.trainer import train

    extra = dict(max_steps=3, log_samples_every=2, log_samples_groups=1,
                 eval={"files": [str(world["prompts"])], "every": 2, "samples": 2, "k": [1, 2], "limit": 5})
    cfg = load_train_config(write_config(tmp_path / "train.yaml", base_config(world, tmp_path / "out", **extra)))
    result = train(cfg)
    lines = [json.loads(line) for line in (cfg.output_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = [m["step"] for m in lines if "eval/prompts/avg@2" in m]
    assert evaluated == [2, 3]  # every 2 steps, and after the last
    assert all(0.0 <= m["eval/prompts/pass@2"] <= 1.0 and m["time/eval"] > 0 for m in lines if m["step"] in evaluated)
    assert all(m["skipped_updates"] == 0 for m in lines)

    # the same numbers `ampo-train eval` gives on the saved model with the same settings and seed
    report = evaluate([ModelSpec.parse(str(result.final_dir))],
                      {"prompts": load_benchmark(world["prompts"])[:5]},
                      EvalSettings(samples=2, ks=[1, 2], temperature=0.6, max_tokens=cfg.rollout.max_new_tokens,
                                   seed=cfg.seed, verify_workers=0))[0]
    assert lines[-1]["eval/prompts/avg@2"] == report["benchmarks"]["prompts"]["avg@n"]
    assert lines[-1]["eval/prompts/pass@2"] == report["benchmarks"]["prompts"]["pass@k"]["2"]

    rows = [json.loads(line) for line in (cfg.output_dir / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2] * cfg.group_size  # one group, at step 2 only
    # a random student fails everything: the logged group is a guided one, with its teacher traces
    injected = [r for r in rows if r["injected"]]
    assert len(injected) == cfg.guidance.k and all(r["teacher"] and r["reward"] == 1.0 for r in injected)
    assert all(r["comprehension"] is not None and r["correct"] is True for r in injected)  # verified traces
    assert all(r["correct"] is False and r["teacher"] is None for r in rows if not r["injected"])
    assert len({r["prompt_id"] for r in rows}) == 1 and all(r["response"] for r in injected)


def test_eval_settings_are_checked_before_anything_loads(world, tmp_path):
    bad = base_config(world, tmp_path / "out", eval={"files": [str(world["prompts"])], "samples": 2, "k": [4]})
    with pytest.raises(InputError, match=r"eval: every k must be between 1 and samples \(2\)"):
        load_train_config(write_config(tmp_path / "bad.yaml", bad))
    missing = base_config(world, tmp_path / "out", eval={"files": [str(tmp_path / "nope.jsonl")]})
    from ampo_train.trainer import train

    with pytest.raises(InputError, match="nope.jsonl"):
        train(load_train_config(write_config(tmp_path / "missing.yaml", missing)))
    assert not (tmp_path / "out").exists()


def _optimization(model, accelerator=None):
    from accelerate import Accelerator
    from transformers import get_scheduler

    from ampo_train.update import Optimization

    accelerator = accelerator or Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=10)
    model, optimizer = accelerator.prepare(model, optimizer)
    return Optimization(accelerator, model, optimizer, scheduler, max_grad_norm=1.0)


def test_a_non_finite_gradient_skips_the_update(world):
    """An inf in the gradient: weights, optimizer state and LR schedule untouched, counted; the next
    finite gradient updates as usual."""
    from transformers import AutoModelForCausalLM

    from ampo_train.metrics import StepStats
    from tests.trainer_fixtures import make_policy

    model = AutoModelForCausalLM.from_pretrained(world["student"])
    optimization = _optimization(model)
    policy = make_policy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def backward_with(poison: bool):
        loss = model(torch.tensor([[5, 6, 7, 8]])).logits.float().pow(2).mean()
        loss.backward()
        if poison:
            next(model.parameters()).grad[0, 0] = float("inf")

    stats = StepStats()
    backward_with(poison=True)
    norm = optimization.apply(policy, stats)
    assert not math.isfinite(norm) and stats.summary()["skipped_updates"] == 1
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all() and torch.equal(p, before[name]), name
        assert p.grad is None  # nothing carried into the next update
    assert optimization.optimizer.state == {} and optimization.scheduler.get_last_lr() == [1e-2]

    backward_with(poison=False)
    assert math.isfinite(optimization.apply(policy, stats))
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert stats.summary()["skipped_updates"] == 1 and policy._stale


def test_fp16_loss_scaling_skips_an_overflow_and_backs_off(world):
    """What Accelerate builds for ``mixed_precision: fp16`` on a GPU (native AMP with a GradScaler,
    here a CPU GradScaler): an overflowing update is skipped by the scaler itself, which halves its
    scale, and the next finite update steps (before the fix it raised "unscale_() has already been
    called on this optimizer since the last update()")."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from ampo_train.metrics import StepStats
    from tests.trainer_fixtures import make_policy

    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    accelerator.native_amp = True
    accelerator.state._mixed_precision = "fp16"  # what unscale_gradients checks
    assert accelerator.mixed_precision == "fp16"
    model = AutoModelForCausalLM.from_pretrained(world["student"])
    optimization = _optimization(model, accelerator)
    policy = make_policy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def update(poison: bool) -> float:
        loss = model(torch.tensor([[5, 6, 7, 8]])).logits.float().pow(2).mean()
        accelerator.backward(loss * float("inf") if poison else loss)  # scaled by 2^16 first
        return optimization.apply(policy, stats)

    stats = StepStats()
    assert not math.isfinite(update(poison=True))
    assert stats.summary()["skipped_updates"] == 1 and accelerator.scaler.get_scale() == 2.0 ** 15
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert optimization.scheduler.get_last_lr() == [1e-2] and not policy._stale
    assert math.isfinite(update(poison=False))
    assert stats.summary()["skipped_updates"] == 1 and policy._stale
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert optimization.scheduler.get_last_lr() != [1e-2]  # the schedule counted the applied update
    assert math.isfinite(update(poison=False))  # and the scaler keeps working
