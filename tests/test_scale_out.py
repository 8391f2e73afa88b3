"""Scale-out with `accelerate launch` on 2 CPU processes (gloo): FSDP2 and DeepSpeed ZeRO-2 and
ZeRO-3 train like DDP, resume exactly, save a normal model folder; launches this trainer cannot
run fail in one line. The DeepSpeed tests need deepspeed (the dev extra installs it)."""

import importlib.util
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

from ampo_train.metrics import WALL_TIME_KEYS
from tests.test_accelerate import REPO, launch, launch_program
from tests.trainer_fixtures import base_config, make_world, write_config

EXAMPLES = REPO / "examples" / "accelerate"
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not "
                                     'installed (pip install -c constraints/cpu.txt -e ".[deepspeed]")')
SHARDED = ["fsdp2", pytest.param("zero2", marks=needs_deepspeed), pytest.param("zero3", marks=needs_deepspeed)]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train(root: Path, world: dict, name: str, launcher: str, *extra: str, **overrides) -> Path:
    """The same 3-step AMPO run (guidance on, 2 updates per step, 4 micro-batches per update),
    checkpointed every step, launched with ``examples/accelerate/<launcher>``; its output folder."""
    out = root / f"out-{name}"
    settings = dict(max_steps=3, save_steps=1, lr=1e-2, lora=None, micro_batch_size=2, mini_batch_prompts=2)
    config = write_config(root / f"{name}.yaml", base_config(world, out, **{**settings, **overrides}))
    launch(config, *extra, config_file=EXAMPLES / launcher)
    return out


def _resume(root: Path, world: dict, name: str, launcher: str, source: Path) -> Path:
    return _train(root, world, name, launcher, "--resume", str(source / "checkpoints" / "step-000002"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The run under DDP and FSDP2; the FSDP2 run resumed from its step-2 checkpoint ("fsdp2
    resumed"), and the DDP run's step-2 checkpoint resumed under FSDP2 ("fsdp2 crossed")."""
    root = tmp_path_factory.mktemp("scale")
    world = make_world(root / "world", num_prompts=8, covered=0.75)
    outs = {"world": world}
    for name in ("ddp", "fsdp2"):
        outs[name] = _train(root, world, name, f"{name}.yaml", keep_checkpoints=None)
    outs["fsdp2 resumed"] = _resume(root, world, "resumed", "fsdp2.yaml", outs["fsdp2"])
    outs["fsdp2 crossed"] = _resume(root, world, "crossed", "fsdp2.yaml", outs["ddp"])
    return outs


@pytest.fixture(scope="module")
def zero_runs(runs, tmp_path_factory):
    """The run under ZeRO-2 and ZeRO-3, each resumed from its own step-2 checkpoint, and the DDP
    run's step-2 checkpoint resumed under ZeRO-3; with the DDP run of ``runs`` to compare."""
    root, world = tmp_path_factory.mktemp("zero"), runs["world"]
    outs = {"world": world, "ddp": runs["ddp"]}
    for name in ("zero2", "zero3"):
        outs[name] = _train(root, world, name, f"{name}.yaml", keep_checkpoints=None)
        outs[f"{name} resumed"] = _resume(root, world, f"{name}-resumed", f"{name}.yaml", outs[name])
    outs["zero3 crossed"] = _resume(root, world, "zero3-crossed", "zero3.yaml", runs["ddp"])
    return outs


def _outs(request, layout: str) -> dict:
    return request.getfixturevalue("zero_runs" if layout.startswith("zero") else "runs")


@pytest.mark.parametrize("layout", SHARDED)
def test_a_sharded_layout_trains_as_ddp_does(request, layout):
    """Same rollouts, guidance and losses (every step's metrics), and the same weights within
    float32 round-off: the paths differ in summation order only (FSDP2 and ZeRO-3 run the LM head
    inside the model's forward; ZeRO flattens parameters and reduce-scatters, DeepSpeed's engine
    clips and steps), which AdamW at lr 1e-2 amplifies on near-zero gradients."""
    runs = _outs(request, layout)
    ddp, sharded = _metrics(runs["ddp"]), _metrics(runs[layout])
    assert [m["step"] for m in sharded] == [1, 2, 3]
    for a, b in zip(ddp, sharded):
        for key in ("reward", "guidance/injected", "guidance/guided", "response_length/mean", "tokens/trained",
                    "lr", "skipped_updates"):
            assert a[key] == b[key], key
        # per process: 2 updates x (1 prompt x G = 4 rows in micro-batches of 2); summed over both
        assert b["update/micro_batches"] == a["update/micro_batches"] == 8
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert sum(m["guidance/injected"] for m in sharded) > 0  # AMPO guidance really ran
    start = _weights(runs["world"]["student"])
    a, b = _weights(runs["ddp"] / "final"), _weights(runs[layout] / "final")
    assert a.keys() == b.keys() == start.keys()
    difference = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
    change = torch.cat([(a[k] - start[k]).flatten() for k in a]).norm()
    assert change > 0.1 and difference < 1e-3 * change


@pytest.mark.parametrize("layout", SHARDED)
def test_resume_is_exact_and_the_final_folder_is_a_normal_model(request, layout):
    from transformers import AutoModelForCausalLM

    runs = _outs(request, layout)
    resumed = runs[f"{layout} resumed"]
    assert [m["step"] for m in _metrics(resumed)] == [3]
    def untimed(metrics: dict) -> dict:
        return {k: v for k, v in metrics.items() if not k.startswith(WALL_TIME_KEYS)}

    assert untimed(_metrics(resumed)[0]) == untimed(_metrics(runs[layout])[2])
    a, b = _weights(runs[layout] / "final"), _weights(resumed / "final")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    model = AutoModelForCausalLM.from_pretrained(runs[layout] / "final")  # gathered, not sharded
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in a.values())
    state = json.loads((runs[layout] / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert state["layout"] == layout and state["world_size"] == 2
    # the optimizer state is keyed by parameter name, gathered whole: the same file as under DDP
    optimizer = torch.load(runs[layout] / "checkpoints" / "step-000002" / "optimizer.pt", weights_only=True)
    ddp_optimizer = torch.load(runs["ddp"] / "checkpoints" / "step-000002" / "optimizer.pt", weights_only=True)
    assert list(optimizer["state"]) == list(ddp_optimizer["state"]) and sorted(optimizer["state"]) == sorted(a)
    assert optimizer["param_groups"] == ddp_optimizer["param_groups"]
    for name, moments in optimizer["state"].items():
        assert moments.keys() == ddp_optimizer["state"][name].keys()
        assert moments["exp_avg"].shape == a[name].shape
        assert torch.equal(moments["step"], ddp_optimizer["state"][name]["step"])


@pytest.mark.parametrize("env, setting", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "fsdp_version 1"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "LoRA under FSDP2"),
    pytest.param({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "LoRA under DeepSpeed",
                 marks=needs_deepspeed),
    pytest.param({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"},
                 "zero_optimization.stage 1", marks=needs_deepspeed),
    pytest.param({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": {
        "zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}},
        "ds.json: optimizer: train.yaml sets the optimizer", marks=needs_deepspeed),
    pytest.param({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": {
        "zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4}},
        "ds.json: train_micro_batch_size_per_gpu: 4", marks=needs_deepspeed),
])
def test_a_launch_the_trainer_cannot_run_fails_in_one_line(tmp_path, env, setting):
    """What `accelerate launch` tells the processes (a DeepSpeed config file included), refused
    before anything is built or written: exit 2, one line naming the setting."""
    world = make_world(tmp_path / "world", num_prompts=4)
    config = write_config(tmp_path / "train.yaml", base_config(world, tmp_path / "out", lora={"r": 4, "alpha": 8}))
    env = dict(env)
    if isinstance(env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"), dict):  # a DeepSpeed config file of its own
        (tmp_path / "ds.json").write_text(json.dumps(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]))
        env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(tmp_path / "ds.json")
    done = subprocess.run([sys.executable, "-m", "cli.train", "run", "--config", str(config)], cwd=REPO,
                          env={**os.environ, **env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and setting in lines[0] and "Traceback" not in done.stderr, lines
    assert not (tmp_path / "out").exists()


def test_example_configs_load_with_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    ddp = load_config_from_file(str(EXAMPLES / "ddp.yaml"))
    assert ddp.distributed_type == "MULTI_GPU" and ddp.num_processes == 2
    fsdp = load_config_from_file(str(EXAMPLES / "fsdp2.yaml"))
    assert fsdp.distributed_type == "FSDP" and fsdp.fsdp_config["fsdp_version"] == 2
    assert yaml.safe_load((EXAMPLES / "fsdp2.yaml").read_text())["fsdp_config"]["fsdp_reshard_after_forward"] is True
    for stage in (2, 3):
        zero = load_config_from_file(str(EXAMPLES / f"zero{stage}.yaml"))
        assert zero.distributed_type == "DEEPSPEED" and zero.num_processes == 2
        settings = zero.deepspeed_config
        assert settings["zero_stage"] == stage and settings["gradient_accumulation_steps"] == 1
        assert settings["offload_optimizer_device"] == settings["offload_param_device"] == "none"
        assert "gradient_clipping" not in settings and "deepspeed_config_file" not in settings  # train.yaml's
    assert zero.deepspeed_config["zero3_init_flag"] is True  # ZeRO-3: each process loads only its partition


@pytest.mark.parametrize("layout", ["fsdp2", pytest.param("zero3", marks=needs_deepspeed)])
def test_a_ddp_checkpoint_resumes_under_a_sharded_layout(request, layout):
    """Checkpoints are the same files under every layout: DDP's step 2 continued under FSDP2 or
    ZeRO-3 ends where the DDP run ended, within float32 round-off."""
    runs = _outs(request, layout)
    a, b = _weights(runs["ddp"] / "final"), _weights(runs[f"{layout} crossed"] / "final")
    start = _weights(runs["world"]["student"])
    difference = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
    change = torch.cat([(a[k] - start[k]).flatten() for k in a]).norm()
    assert difference < 1e-4 * change


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_skips_an_update_with_a_non_finite_gradient(tmp_path, stage):
    """The trainer's update through DeepSpeed's engine (tests/zero_skip_probe.py): an infinite
    gradient leaves the weights, AdamW's state and the LR schedule untouched and is counted;
    the next finite gradient updates as usual and steps the schedule."""
    world = make_world(tmp_path / "world", num_prompts=4)
    out = tmp_path / "seen.json"
    launch_program([str(REPO / "tests" / "zero_skip_probe.py"), str(world["student"]), str(out)],
                   config_file=EXAMPLES / f"zero{stage}.yaml")
    seen = json.loads(out.read_text())
    assert seen["poisoned_norm"] in ("inf", "nan") and seen["skipped"] == 1
    assert seen["after_skip"] == seen["start"] and seen["state_after_skip"] == 0 and seen["lr_after_skip"] == 1e-2
    assert seen["finite_norm"] > 0 and seen["skipped_after_update"] == 1
    assert seen["after_update"] != seen["start"] and seen["lr_after_update"] < 1e-2


@needs_deepspeed
def test_zero3_loads_the_kl_reference_whole(tmp_path):
    """With a KL term the frozen reference is loaded beside the ZeRO-3 student: whole on every
    process (transformers would partition it as it does the student, and nothing would gather it)."""
    world = make_world(tmp_path / "world", num_prompts=8, covered=0.75)
    out = _train(tmp_path, world, "kl", "zero3.yaml", max_steps=2, save_steps=100, mini_batch_prompts=4,
                 loss__kl_coef=0.05)  # one update per step: step 1 measures KL before any update
    kl = [m["kl"] for m in _metrics(out)]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[1] > 0  # the policy moved away from the reference
