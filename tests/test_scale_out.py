"""Scale-out with `accelerate launch` on 2 CPU processes (gloo): FSDP2 trains like DDP, resumes
exactly, saves a normal model folder; launches this trainer cannot run fail in one line."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.test_accelerate import REPO, launch
from tests.trainer_fixtures import base_config, make_world, write_config

EXAMPLES = REPO / "examples" / "accelerate"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 3-step AMPO run (guidance on, 2 updates per step, 4 micro-batches per update)
    under DDP and FSDP2; the FSDP2 run resumed from its step-2 checkpoint, and the DDP run's step-2
    checkpoint resumed under FSDP2."""
    root = tmp_path_factory.mktemp("scale")
    world = make_world(root / "world", num_prompts=8, covered=0.75)
    outs = {}
    for name, launcher in (("ddp", "ddp.yaml"), ("fsdp2", "fsdp2.yaml")):
        out = root / f"out-{name}"
        config = write_config(root / f"{name}.yaml", base_config(
            world, out, max_steps=3, save_steps=1, keep_checkpoints=None, lr=1e-2, lora=None,
            micro_batch_size=2, mini_batch_prompts=2))
        launch(config, config_file=EXAMPLES / launcher)
        outs[name] = out
    for name, source in (("resumed", "fsdp2"), ("crossed", "ddp")):  # both from step 2, under FSDP2
        out = root / f"out-{name}"
        config = write_config(root / f"{name}.yaml", base_config(
            world, out, max_steps=3, save_steps=1, lr=1e-2, lora=None, micro_batch_size=2, mini_batch_prompts=2))
        launch(config, "--resume", str(outs[source] / "checkpoints" / "step-000002"), config_file=EXAMPLES / "fsdp2.yaml")
        outs[name] = out
    outs["world"] = world
    return outs


def test_fsdp2_trains_as_ddp_does(runs):
    """Same rollouts, guidance and losses (every step's metrics), and the same weights within
    float32 round-off: the paths differ in summation order only (FSDP2 reduce-scatters and runs the
    LM head inside the model's forward), which AdamW at lr 1e-2 amplifies on near-zero gradients."""
    ddp, fsdp = _metrics(runs["ddp"]), _metrics(runs["fsdp2"])
    assert [m["step"] for m in fsdp] == [1, 2, 3]
    for a, b in zip(ddp, fsdp):
        for key in ("reward/mean", "guidance/injected", "guidance/guided", "response_length/mean", "tokens/trained"):
            assert a[key] == b[key], key
        # per process: 2 updates x (1 prompt x G = 4 rows in micro-batches of 2); summed over both
        assert b["update/micro_batches"] == a["update/micro_batches"] == 8
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert sum(m["guidance/injected"] for m in fsdp) > 0  # AMPO guidance really ran
    start = _weights(runs["world"]["student"])
    a, b = _weights(runs["ddp"] / "final"), _weights(runs["fsdp2"] / "final")
    assert a.keys() == b.keys() == start.keys()
    difference = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
    change = torch.cat([(a[k] - start[k]).flatten() for k in a]).norm()
    assert change > 0.1 and difference < 1e-3 * change


def test_fsdp2_resume_is_exact_and_the_final_folder_is_a_normal_model(runs):
    from transformers import AutoModelForCausalLM

    assert [m["step"] for m in _metrics(runs["resumed"])] == [3]
    a, b = _weights(runs["fsdp2"] / "final"), _weights(runs["resumed"] / "final")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    model = AutoModelForCausalLM.from_pretrained(runs["fsdp2"] / "final")  # gathered, not sharded
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in a.values())
    state = json.loads((runs["fsdp2"] / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert state["layout"] == "fsdp2" and state["world_size"] == 2
    # the optimizer state is keyed by parameter name, gathered whole: the same file as under DDP
    optimizer = torch.load(runs["fsdp2"] / "checkpoints" / "step-000002" / "optimizer.pt", weights_only=True)
    ddp_optimizer = torch.load(runs["ddp"] / "checkpoints" / "step-000002" / "optimizer.pt", weights_only=True)
    assert list(optimizer["state"]) == list(ddp_optimizer["state"]) and sorted(optimizer["state"]) == sorted(a)
    for name, moments in optimizer["state"].items():
        assert moments["exp_avg"].shape == a[name].shape


@pytest.mark.parametrize("env, setting", [
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DEEPSPEED"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "fsdp_version 1"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "LoRA under FSDP2"),
])
def test_a_launch_the_trainer_cannot_run_fails_in_one_line(tmp_path, env, setting):
    """What `accelerate launch` tells the processes, refused before anything is built or written:
    exit 2, one line naming the setting."""
    world = make_world(tmp_path / "world", num_prompts=4)
    config = write_config(tmp_path / "train.yaml", base_config(world, tmp_path / "out", lora={"r": 4, "alpha": 8}))
    done = subprocess.run([sys.executable, "-m", "cli.train", "run", "--config", str(config)], cwd=REPO,
                          env={**os.environ, **env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and setting in lines[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_example_configs_load_with_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    ddp = load_config_from_file(str(EXAMPLES / "ddp.yaml"))
    assert ddp.distributed_type == "MULTI_GPU" and ddp.num_processes == 2
    fsdp = load_config_from_file(str(EXAMPLES / "fsdp2.yaml"))
    assert fsdp.distributed_type == "FSDP" and fsdp.fsdp_config["fsdp_version"] == 2
    assert yaml.safe_load((EXAMPLES / "fsdp2.yaml").read_text())["fsdp_config"]["fsdp_reshard_after_forward"] is True


def test_a_ddp_checkpoint_resumes_under_fsdp2(runs):
    """Checkpoints are the same files under every layout: DDP's step 2 continued under FSDP2
    ends where the DDP run ended, within float32 round-off."""
    a, b = _weights(runs["ddp"] / "final"), _weights(runs["crossed"] / "final")
    start = _weights(runs["world"]["student"])
    difference = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
    change = torch.cat([(a[k] - start[k]).flatten() for k in a]).norm()
    assert difference < 1e-4 * change
