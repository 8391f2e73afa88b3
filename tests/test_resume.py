"""An interrupted and resumed run reaches exactly the parameters of an uninterrupted one (CPU, same seed)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import pytest
import torch

from ampo_common.errors import InputError
from ampo_train.checkpoint import find_checkpoint
from ampo_train.config import load_train_config
from ampo_train.metrics import WALL_TIME_KEYS
from ampo_train.trainer import train
from tests.trainer_fixtures import base_config, make_world, write_config



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("resume-world"), num_prompts=6, covered=0.5)


def _params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _stable(metrics):
    return [{k: v for k, v in m.items() if not k.startswith(WALL_TIME_KEYS)} for m in metrics]


@pytest.mark.parametrize("variant", ["lora-hybrid", "full-adaptive"])
def test_resume_reaches_the_same_parameters(world, tmp_path, variant):
    # Settings that consume every piece of saved state: per-step prompt order across an epoch
    # boundary (6 prompts, 4 per step), hybrid draws and replaced slots (guidance RNG), sampling
    # (torch RNG), two updates per step (optimizer moments), warm-up + linear decay (scheduler).
    extra = dict(max_steps=4, save_steps=2, mini_batch_prompts=2, lr_scheduler="linear", warmup_steps=2, lr=1e-2)
    if variant == "lora-hybrid":
        extra.update(lora={"r": 4, "alpha": 8}, guidance__mode="hybrid", guidance__hybrid_fraction=0.5)

    whole = load_train_config(write_config(tmp_path / "a.yaml", base_config(world, tmp_path / "whole", **extra)))
    uninterrupted = train(whole)

    split = load_train_config(write_config(tmp_path / "b.yaml", base_config(world, tmp_path / "split", **extra)))
    first = train(split, until_step=2)
    assert first.final_dir is None and first.step == 2
    assert find_checkpoint(split.output_dir).name == "step-000002"
    resumed = train(split, resume=split.output_dir)  # a fresh model, optimizer, RNG...: all from disk
    assert resumed.step == 4 and resumed.final_dir is not None

    a, b = _params(uninterrupted.model), _params(resumed.model)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=name)
    # ...and it did train (the comparison is not trivially between two untouched models)
    assert any(not torch.equal(a[n], _params(first.model)[n]) for n in a)

    # the metrics file holds steps 1..4 once, equal to the uninterrupted run's
    lines = [json.loads(line) for line in (split.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert _stable(lines) == _stable(uninterrupted.history)


def test_resume_errors_are_one_line(tmp_path):
    with pytest.raises(InputError, match="no checkpoint here"):
        find_checkpoint(tmp_path)
