"""Resuming never executes code from a checkpoint folder, and every saved state comes back exactly.

A hostile checkpoint is modelled by a pickle whose ``__reduce__`` creates a marker file: loading it
the unsafe way creates the file (checked first, so the refusals below are not vacuous), and every
refusal must leave it absent while the real CLI answers one line and exit 2.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import pickle
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ampo_common.errors import InputError
from ampo_train.checkpoint import FORMAT_KEY, CheckpointContent, load_checkpoint, restore_rng, rng_state, save_checkpoint
from ampo_train.distributed import load_optimizer_state, optimizer_state
from ampo_train.config import load_train_config
from ampo_train.trainer import train
from cli.train import app
from tests.trainer_fixtures import base_config, make_world, write_config

REPO = Path(__file__).resolve().parents[1]
RUN = dict(max_steps=4, save_steps=2, lr_scheduler="linear", warmup_steps=2)
VARIANTS = {"full": {}, "lora": {"lora": {"r": 4, "alpha": 8}}}


class RunsCode:
    """Unpickled, this opens ``marker`` for writing, creating it: a stand-in for any code at all."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def write_payload(path: Path, marker: Path, kind: str) -> None:
    """``pickle``: a bare pickle; ``torch.save``: a torch zip file whose data.pkl holds the object."""
    path.unlink(missing_ok=True)
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"state": RunsCode(marker)}))
    else:
        torch.save({"state": {0: RunsCode(marker)}, "param_groups": []}, path)


# ----------------------------------------------------------------------------- a real run's checkpoints


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("safety-world"), num_prompts=6, covered=0.5)


@pytest.fixture(scope="module")
def checkpoints(world, tmp_path_factory):
    """One step-2 checkpoint per variant, written by the trainer; tests copy before touching them."""
    root = tmp_path_factory.mktemp("safety-runs")
    found = {}
    for name, extra in VARIANTS.items():
        cfg = load_train_config(write_config(root / f"{name}.yaml", base_config(world, root / name, **RUN, **extra)))
        train(cfg, until_step=2)
        found[name] = root / name / "checkpoints" / "step-000002"
    return found


def copy_of(checkpoints, variant: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(checkpoints[variant], tmp_path / "step-000002"))


def resume(*args: str):
    return CliRunner().invoke(app, ["run", *[str(a) for a in args]])


def assert_one_line_refusal(result, *expected: str) -> str:
    line = result.output.strip()
    assert result.exit_code == 2, result.output
    assert "\n" not in line and line.startswith("error:"), result.output
    for text in expected:
        assert text in line, line
    return line


# ----------------------------------------------------------------------------- hostile files


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_the_payload_does_run_code_when_unpickled(tmp_path, kind):
    marker = tmp_path / "ran"
    write_payload(tmp_path / "payload", marker, kind)
    if kind == "pickle":
        pickle.loads((tmp_path / "payload").read_bytes())
    else:
        torch.load(tmp_path / "payload", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.json", "rng.json", "trainer_state.json",
                                  "model/model.safetensors", "model/pytorch_model.bin"])
def test_a_hostile_state_file_is_refused_and_never_run(checkpoints, world, tmp_path, name, kind):
    folder = copy_of(checkpoints, "full", tmp_path)
    marker = tmp_path / "ran"
    write_payload(folder / name, marker, kind)
    args = ["--resume", folder]
    if name == "trainer_state.json":  # without --config the CLI reads the saved config from this file
        args = ["--config", write_config(tmp_path / "train.yaml", base_config(world, tmp_path / "out", **RUN)), *args]
    result = resume(*args)
    assert_one_line_refusal(result, name.split("/")[-1])
    assert not marker.exists()


def test_a_hostile_adapter_file_is_refused(checkpoints, tmp_path):
    folder = copy_of(checkpoints, "lora", tmp_path)
    marker = tmp_path / "ran"
    write_payload(folder / "model" / "adapter_model.bin", marker, "torch.save")
    assert_one_line_refusal(resume("--resume", folder), "adapter_model.bin", "safetensors")
    assert not marker.exists()


def test_a_stray_file_of_the_old_layout_is_never_read(checkpoints, tmp_path):
    folder = copy_of(checkpoints, "full", tmp_path)
    marker = tmp_path / "ran"
    for name in ("rng.pt", "scheduler.pt"):  # the first release's names: nothing reads them now
        write_payload(folder / name, marker, "torch.save")
    loaded = load_checkpoint(folder)
    assert loaded.step == 2 and len(loaded.rng_states) == 1
    assert not marker.exists()


# ----------------------------------------------------------------------------- the first release's format


def write_first_release_format(folder: Path) -> None:
    """Rewrite a checkpoint exactly as the first release's ``save_checkpoint`` wrote it: torch.save of
    the optimizer's and the scheduler's state_dicts and of the per-process RNG states as the
    generators return them (tuples, a numpy array, byte tensors), and no format key."""
    state = json.loads((folder / "trainer_state.json").read_text())
    del state[FORMAT_KEY]
    optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
    scheduler = json.loads((folder / "scheduler.json").read_text())
    rng = []
    for s in json.loads((folder / "rng.json").read_text()):
        py, npy = s["python"], s["numpy"]
        guide = s.get("guidance") or {"version": 3, "internal": list(random.Random(0).getstate()[1]), "gauss_next": None}
        rng.append({
            "python": (py["version"], tuple(py["internal"]), py["gauss_next"]),
            "numpy": (npy["algorithm"], np.array(npy["keys"], dtype=np.uint32), npy["pos"], npy["has_gauss"],
                      npy["cached_gaussian"]),
            "torch": torch.tensor(list(bytes.fromhex(s["torch"])), dtype=torch.uint8),
            "guidance": (guide["version"], tuple(guide["internal"]), guide["gauss_next"]),
        })
    for name in ("scheduler.json", "rng.json"):
        (folder / name).unlink()
    torch.save(optimizer, folder / "optimizer.pt")
    torch.save(scheduler, folder / "scheduler.pt")
    torch.save(rng, folder / "rng.pt")
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=2, default=str))


def test_the_first_release_format_is_what_it_was(checkpoints, tmp_path):
    """The reconstruction above holds what the first release held: its rng.pt needs numpy's
    unpickling (so weights_only refuses it) and unpickled unsafely it restores the generators."""
    folder = copy_of(checkpoints, "full", tmp_path)
    write_first_release_format(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["model", "optimizer.pt", "rng.pt", "scheduler.pt",
                                                         "trainer_state.json"]
    with pytest.raises(pickle.UnpicklingError, match="numpy"):
        torch.load(folder / "rng.pt", weights_only=True)
    (old,) = torch.load(folder / "rng.pt", weights_only=False)
    random.setstate(old["python"])
    np.random.set_state(old["numpy"])
    torch.set_rng_state(old["torch"])
    draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    restore_rng(load_checkpoint(checkpoints["full"]).rng_states[0])
    assert draws == (random.random(), float(np.random.rand()), float(torch.rand(1)))


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_an_older_checkpoint_is_refused_with_how_to_go_on(checkpoints, world, tmp_path, variant):
    folder = copy_of(checkpoints, variant, tmp_path)
    write_first_release_format(folder)
    marker = tmp_path / "ran"
    write_payload(folder / "rng.pt", marker, "torch.save")  # whatever its pickles hold, none is loaded
    line = assert_one_line_refusal(resume("--resume", folder), str(folder), "older version")
    assert not marker.exists()

    # ...and the advice works: a new run starts from the checkpoint's weights
    new_run = write_config(tmp_path / "new.yaml", base_config(world, tmp_path / "new", max_steps=1))
    tokenizer = re.search(r"tokenizer=(\S+)", line).group(1)
    assert Path(tokenizer).resolve() == world["student"].resolve()
    if variant == "full":
        student = re.search(r"student=(\S+)", line).group(1)
        assert student == str(folder / "model")
    else:
        assert "LoRA adapter" in line
        student = tmp_path / "merged"
        merge = re.search(r'python -c "([^"]+)"', line).group(1).replace("MERGED", str(student))
        subprocess.run([sys.executable, "-c", merge], check=True, cwd=REPO, capture_output=True, timeout=120)
    result = resume("--config", new_run, f"student={student}", f"tokenizer={tokenizer}")
    assert result.exit_code == 0, result.output
    assert "step 1/1" in result.output


def test_a_newer_format_is_refused(checkpoints, tmp_path):
    folder = copy_of(checkpoints, "full", tmp_path)
    state = json.loads((folder / "trainer_state.json").read_text())
    (folder / "trainer_state.json").write_text(json.dumps({**state, FORMAT_KEY: 3}))
    with pytest.raises(InputError, match="newer version"):
        load_checkpoint(folder)


@pytest.mark.parametrize("damage", ["missing key", "short state", "not a list"])
def test_a_damaged_rng_file_is_one_line_before_training(checkpoints, tmp_path, damage):
    folder = copy_of(checkpoints, "full", tmp_path)
    states = json.loads((folder / "rng.json").read_text())
    if damage == "missing key":
        del states[0]["numpy"]
    elif damage == "short state":
        states[0]["python"]["internal"] = states[0]["python"]["internal"][:100]
    else:
        states = states[0]
    (folder / "rng.json").write_text(json.dumps(states))
    with pytest.raises(InputError, match=r"rng\.json: ") as caught:
        load_checkpoint(folder)
    assert "\n" not in str(caught.value)


# ----------------------------------------------------------------------------- round trips


@pytest.fixture
def tiny(world):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(world["student"])


def _train_steps(model, optimizer, n: int, scheduler=None) -> None:
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    for _ in range(n):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()


def _save(tmp_path, model, optimizer, scheduler, rng_states) -> Path:
    content = CheckpointContent(model, None, optimizer_state(model, optimizer), scheduler.state_dict(), rng_states,
                                {"data": {"epoch": 0, "offset": 0}})
    return save_checkpoint(tmp_path / "checkpoints", 3, content)


def _draws() -> list:
    return [random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(3).tolist(),
            torch.rand(3).tolist(), torch.randn(3).tolist()]


def _schedule(optimizer, kind="constant", warmup=0):
    from ampo_train.schedule import UpdateSchedule

    return UpdateSchedule(optimizer, kind, warmup, updates_per_step=2, max_steps=6)


def test_rng_states_restore_to_identical_draws(tiny, tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draws()  # leaves cached gaussians in python's and numpy's (3 normals) states
    state = rng_state()
    assert state["python"]["gauss_next"] is not None and state["numpy"]["has_gauss"] == 1
    expected = _draws()

    optimizer = torch.optim.AdamW(tiny.parameters())
    folder = _save(tmp_path, tiny, optimizer, _schedule(optimizer), [state])
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    assert _draws() != expected  # without restoring, the draws differ
    restore_rng(load_checkpoint(folder).rng_states[0])
    assert _draws() == expected


def test_optimizer_state_comes_back_equal_and_steps_the_same(tiny, tmp_path):
    import copy

    optimizer = torch.optim.AdamW(tiny.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    _train_steps(tiny, optimizer, 2)
    folder = _save(tmp_path, tiny, optimizer, _schedule(optimizer), [rng_state()])
    loaded = load_checkpoint(folder).optimizer
    # keyed by parameter name (the same file under DDP and FSDP2), every moment exactly as it was
    names = [name for name, _ in tiny.named_parameters()]
    assert loaded["param_groups"][0]["params"] == names and list(loaded["state"]) == names
    for name, p in tiny.named_parameters():
        moments = optimizer.state[p]
        assert moments.keys() == loaded["state"][name].keys()
        for key, value in moments.items():
            torch.testing.assert_close(loaded["state"][name][key], value, atol=0, rtol=0)

    twin = copy.deepcopy(tiny)
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    _schedule(twin_optimizer)  # as in the trainer
    load_optimizer_state(twin, twin_optimizer, loaded)
    _train_steps(tiny, optimizer, 1)
    _train_steps(twin, twin_optimizer, 1)
    for (name, a), b in zip(tiny.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("name,warmup", [("constant", 0), ("constant", 3), ("linear", 3), ("cosine", 3)])
def test_scheduler_continues_the_same_lr_sequence(tiny, tmp_path, name, warmup):
    """Resumed after 2 steps of 2 updates (one short step), the schedule's state (updates applied)
    comes back and the learning rates of the steps after it are those of the uninterrupted run:
    they depend on the step, not on a counter a short step left behind."""
    def fresh():
        optimizer = torch.optim.AdamW(tiny.parameters(), lr=1e-2)
        return optimizer, _schedule(optimizer, name, warmup)

    def steps(schedule, optimizer, plan):
        lrs = []
        for step, count in plan:
            for j in range(count):
                schedule.place(step, j, count)
                optimizer.step()
                schedule.step()
                lrs.append((schedule.get_last_lr()[0], optimizer.param_groups[0]["lr"]))
        return lrs

    optimizer, schedule = fresh()
    steps(schedule, optimizer, [(1, 2), (2, 1)])
    folder = _save(tmp_path, tiny, optimizer, schedule, [rng_state()])
    loaded = load_checkpoint(folder)
    resumed_optimizer, resumed = fresh()
    load_optimizer_state(tiny, resumed_optimizer, loaded.optimizer)
    resumed.load_state_dict(loaded.scheduler)
    assert resumed.applied == 3
    later = [(3, 2), (4, 2), (5, 1), (6, 2)]
    assert steps(resumed, resumed_optimizer, later) == steps(schedule, optimizer, later)
    if name != "constant" or warmup:
        assert len({lr for lr, _ in steps(*fresh()[::-1], [(1, 2), (2, 2)])}) > 1  # it moves


def test_a_state_that_json_cannot_hold_is_refused_at_save(tiny, tmp_path):
    """A scheduler whose lambda keeps an object in its __dict__ would need pickling to restore:
    saving says so and writes nothing."""

    class Halving:
        def __init__(self):
            self.memo = {1, 2}  # a set: not JSON

        def __call__(self, step):
            return 0.5 ** step

    optimizer = torch.optim.AdamW(tiny.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, Halving())
    with pytest.raises(TypeError, match=r"scheduler state\['lr_lambdas'\]\[0\]\['memo'\] is a set"):
        _save(tmp_path, tiny, optimizer, scheduler, [rng_state()])
    assert not (tmp_path / "checkpoints").exists()
