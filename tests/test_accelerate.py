"""`accelerate launch` with 2 CPU processes (gloo): different prompts per rank, synchronised
gradients (identical weights at the end), and only rank 0 writing metrics and checkpoints."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ampo_train.trainer import DEBUG_DIR_ENV
from tests.trainer_fixtures import base_config, make_world, write_config

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: Path, *extra: str, config_file: Path | None = None, debug: Path | None = None, timeout: int = 300):
    """`accelerate launch` of `ampo-train run` in 2 processes: plain (accelerate's flag is named for
    GPUs; on a machine without one it starts 2 gloo CPU processes) or from an Accelerate config
    file; ``debug``: the trainer's per-rank debug folder. Returns the completed process."""
    return launch_program(["-m", "cli.train", "run", "--config", str(config), *extra], config_file=config_file,
                          debug=debug, timeout=timeout)


def launch_program(program: list[str], config_file: Path | None = None, debug: Path | None = None,
                   timeout: int = 300):
    """`accelerate launch` of ``program`` (a script and its arguments, or ``-m`` and a module) as
    ``launch`` starts the trainer."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    if debug is not None:
        env[DEBUG_DIR_ENV] = str(debug)
    if config_file is None:
        how = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no"]
    else:
        how = ["--config_file", str(config_file)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *how, "--main_process_port", str(_free_port()),
           *program]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_two_processes_train_different_prompts_in_sync(tmp_path):
    world = make_world(tmp_path / "world", num_prompts=8, covered=0.75)
    config = write_config(tmp_path / "train.yaml", base_config(
        world, tmp_path / "out", max_steps=2, save_steps=1, lora={"r": 4, "alpha": 8}, lr=1e-2))
    debug = tmp_path / "ranks"
    done = launch(config, debug=debug)

    ranks = [json.loads((debug / f"rank{r}.json").read_text()) for r in (0, 1)]
    for step in range(2):
        mine, theirs = ranks[0]["prompt_ids"][step], ranks[1]["prompt_ids"][step]
        assert len(mine) == len(theirs) == 2  # 4 prompts per step, split in two
        assert not set(mine) & set(theirs)  # the ranks train on different prompts
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]  # gradients were all-reduced

    out = tmp_path / "out"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]  # one writer: no duplicated lines
    assert all(m["guidance/prompts"] == 4 for m in lines)  # metrics gathered from both ranks
    assert done.stdout.count("step 1/2") == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    rng = json.loads((out / "checkpoints" / "step-000002" / "rng.json").read_text())
    assert len(rng) == 2  # both ranks' RNG states, written by rank 0
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_two_processes_with_a_token_budget_agree_on_micro_batches(tmp_path):
    """Token-budget packing gives each rank its own micro-batch count (teacher traces make some
    rows long); the ranks agree on the largest (the others split micro-batches), so the run
    completes and both end with the same weights."""
    world = make_world(tmp_path / "world", num_prompts=8, covered=0.75)
    config = write_config(tmp_path / "train.yaml", base_config(
        world, tmp_path / "out", max_steps=3, lora={"r": 4, "alpha": 8}, lr=1e-2, micro_batch_tokens=120))
    debug = tmp_path / "ranks"
    launch(config, debug=debug)
    ranks = [json.loads((debug / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    print([(m.get("update/micro_batches"), m.get("update/split"), m.get("update/padding")) for m in lines])
    # each rank packed its 8 rows into several micro-batches, and at least once the ranks' counts
    # differed, so one of them split micro-batches to match the other
    assert all(m["update/micro_batches"] > 2 for m in lines)
    assert sum(m.get("update/split") or 0 for m in lines) > 0


@pytest.mark.parametrize("aggregation", ["seq_mean_token_sum_norm", "token_mean"])
def test_entropy_and_kl_are_global_token_means_under_ddp(tmp_path, aggregation):
    """Two processes holding 33 and 7 response tokens make the same gradient as one process holding
    all 40 rows' worth (tests/ddp_loss_probe.py): the entropy bonus and the KL term are token means
    over the whole mini-batch, like the policy loss, not means of the two per-process means."""
    from safetensors.torch import load_file

    world = make_world(tmp_path / "world", num_prompts=2, covered=0.0)
    probe = [str(REPO / "tests" / "ddp_loss_probe.py"), str(world["student"]), aggregation]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    single = subprocess.run([sys.executable, *probe, str(tmp_path / "one.safetensors")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    launch_program([*probe, str(tmp_path / "two.safetensors")])
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    scale = max(float(g.abs().max()) for g in one.values())
    assert scale > 0
    for name, grad in one.items():
        torch.testing.assert_close(two[name], grad, atol=1e-6 * scale, rtol=1e-4, msg=name)


def test_dynamic_sampling_processes_agree_on_rounds_and_groups(tmp_path):
    """Each process drops its own zero-spread groups, but they draw the same rounds and keep the
    same number of groups, so they make the same updates and end with the same weights."""
    world = make_world(tmp_path / "world", num_prompts=8, covered=0.5)
    config = write_config(tmp_path / "train.yaml", base_config(
        world, tmp_path / "out", max_steps=2, lora={"r": 4, "alpha": 8}, lr=1e-2,
        dynamic_sampling={"enabled": True, "max_resample_rounds": 2}))
    debug = tmp_path / "ranks"
    launch(config, debug=debug)
    ranks = [json.loads((debug / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]
    assert len(ranks[0]["prompt_ids"]) == len(ranks[1]["prompt_ids"])  # the same rounds on both
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["dynamic/kept_groups"] % 2 == 0 for m in lines)  # the same count on each of the 2 processes


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_two_processes_one_tracker_writer(tmp_path):
    """Only the main process logs to the trackers: one TensorBoard event file, every step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    world = make_world(tmp_path / "world", num_prompts=8, covered=0.5)
    config = write_config(tmp_path / "train.yaml", base_config(
        world, tmp_path / "out", max_steps=2, lora={"r": 4, "alpha": 8}, report_to=["tensorboard"], tensorboard=None))
    launch(config)
    events = list((tmp_path / "out" / "ampo").glob("events.out.tfevents.*"))
    assert len(events) == 1, events
    accumulator = EventAccumulator(str(tmp_path / "out" / "ampo"), size_guidance={"scalars": 0})
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("reward")] == [1, 2]
