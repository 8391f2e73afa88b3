"""Experiment trackers through Accelerate (TensorBoard and MLflow written and read back with their own
readers, a resumed run continuing the same runs without a step twice), TRL's metric names, and a
missing tracker package stopping a run in one line before anything loads."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
import json
import shutil

import pytest
from typer.testing import CliRunner

from ampo_common.errors import InputError
from ampo_train.config import load_train_config
from ampo_train.trainer import train
from ampo_train.tracking import flat_config, tracker_names
from tests.trainer_fixtures import base_config, make_world, write_config

needs = pytest.mark.skipif(not (importlib.util.find_spec("tensorboard") and importlib.util.find_spec("mlflow")),
                           reason="tensorboard and mlflow are in the dev extra")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("tracking-world"), num_prompts=8, covered=0.5)


def test_tracker_names_and_a_missing_package(monkeypatch):
    import ampo_train.tracking as tracking

    monkeypatch.setattr(tracking, "installed", lambda name: name in ("tensorboard", "mlflow"))
    assert tracker_names(None) == ["tensorboard"]  # the default: TensorBoard when installed
    assert tracker_names(None, tensorboard=False) == []  # the older switch
    assert tracker_names("all") == ["tensorboard", "mlflow"] and tracker_names("none") == []
    assert tracker_names(["mlflow", "tensorboard", "mlflow"]) == ["mlflow", "tensorboard"]
    with pytest.raises(InputError, match=r"^report_to: wandb is not installed: pip install -e \".\[wandb\]\"$"):
        tracker_names(["tensorboard", "wandb"])
    with pytest.raises(InputError, match=r"^report_to: unknown tracker 'neptune'"):
        tracker_names(["neptune"])
    monkeypatch.setattr(tracking, "installed", lambda name: False)
    assert tracker_names(None) == []  # no TensorBoard installed: the default logs to metrics.jsonl alone


def test_flat_config_has_scalar_values_only():
    flat = flat_config({"lr": 1e-6, "lora": None, "guidance": {"k": 2, "rank": "comprehension"}, "eval": {"k": [1, 4]}})
    assert flat == {"lr": 1e-6, "lora": "null", "guidance.k": 2, "guidance.rank": "comprehension", "eval.k": "[1, 4]"}


def test_a_missing_tracker_is_one_line_before_anything_loads(world, tmp_path, monkeypatch):
    import ampo_train.tracking as tracking
    from cli.train import app

    monkeypatch.setattr(tracking, "installed", lambda name: name != "comet_ml")
    path = write_config(tmp_path / "train.yaml", base_config(world, tmp_path / "out", report_to=["comet_ml"]))
    result = CliRunner().invoke(app, ["run", "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "error: report_to: comet_ml is not installed: pip install comet_ml"
    assert not (tmp_path / "out").exists()  # nothing loaded, nothing written
    assert load_train_config(path, ["report_to=mlflow"]).report_to == ["mlflow"]  # one name is a list of one


def _tensorboard_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


@needs
def test_tensorboard_and_mlflow_written_read_back_and_resumed_without_a_step_twice(world, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = tmp_path / "out"
    config = base_config(world, out, max_steps=3, save_steps=1, keep_checkpoints=None, report_to=["tensorboard", "mlflow"],
                         project="ampo-test", run_name="tracked", log_samples_every=1, tensorboard=None)
    cfg = load_train_config(write_config(tmp_path / "train.yaml", config))
    first = train(cfg, until_step=2)  # interrupted after step 2 ...
    shutil.rmtree(out / "checkpoints" / "step-000002")  # ... whose checkpoint never made it to disk
    resumed = train(cfg, resume=out / "checkpoints" / "step-000001")
    assert [m["step"] for m in first.history] == [1, 2] and [m["step"] for m in resumed.history] == [2, 3]

    # TensorBoard: OUTPUT_DIR/<project>, every step once, under our names and TRL's
    events = _tensorboard_scalars(out / "ampo-test")
    tags = set(events.Tags()["scalars"])
    for name in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio",
                 "entropy", "clip_ratio/region_mean", "grad_norm", "learning_rate", "num_tokens", "step_time",
                 "guidance/triggered_frac", "guidance/offpolicy_token_frac", "guidance/injected_per_teacher/alpha",
                 "reward", "guidance/fraction"):
        assert name in tags, name
    assert [e.step for e in events.Scalars("reward")] == [1, 2, 3]
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("reward")] == pytest.approx([m["reward"] for m in history])
    # TRL's num_tokens: every sampled prompt + completion token so far (kept across the resume)
    assert [m["num_tokens"] for m in history] == [sum(h["tokens/sampled"] for h in history[:i + 1]) for i in range(3)]
    assert [m["tokens/trained_total"] for m in history] == [sum(h["tokens/trained"] for h in history[:i + 1])
                                                            for i in range(3)]
    assert all(m["tokens/sampled"] > m["tokens/generated"] for m in history)  # prompts counted too
    assert "samples/text_summary" in events.Tags()["tensors"]  # the sampled completions as a text table

    # MLflow: one run (the resumed run reopened it), every step once, the config as params
    client = MlflowClient()
    experiment = client.get_experiment_by_name("ampo-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == "tracked"
    run_id = runs[0].info.run_id
    assert json.loads((out / "trackers.json").read_text())["run_ids"]["mlflow"] == run_id
    rewards = client.get_metric_history(run_id, "reward")
    assert sorted(m.step for m in rewards) == [1, 2, 3]
    assert {m.step: m.value for m in rewards} == pytest.approx({m["step"]: m["reward"] for m in history})
    assert runs[0].data.params["guidance.mode"] == "adaptive" and runs[0].data.params["lr"] == "0.001"
    artifacts = [a.path for a in client.list_artifacts(run_id, "samples")]
    assert "samples/step-000001.md" in artifacts and "samples/step-000003.md" in artifacts


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install -e '.[wandb]')")
def test_wandb_offline_run_is_resumed_with_its_id(world, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    cfg = load_train_config(write_config(tmp_path / "train.yaml", base_config(
        world, out, max_steps=2, save_steps=1, report_to=["wandb"], project="ampo-test", tensorboard=None)))
    train(cfg, until_step=1)
    run_id = json.loads((out / "trackers.json").read_text())["run_ids"]["wandb"]
    train(cfg, resume=out)
    assert json.loads((out / "trackers.json").read_text())["run_ids"]["wandb"] == run_id
    runs = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert runs, list((out / "wandb").iterdir())


@pytest.mark.skipif(importlib.util.find_spec("trackio") is None, reason="trackio is not installed (pip install -e '.[trackio]')")
def test_trackio_local_run_read_back_after_a_resume(world, tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    from trackio.sqlite_storage import SQLiteStorage

    out = tmp_path / "out"
    cfg = load_train_config(write_config(tmp_path / "train.yaml", base_config(
        world, out, max_steps=2, save_steps=1, report_to=["trackio"], project="ampo-test", run_name="tracked",
        tensorboard=None)))
    train(cfg, until_step=1)
    train(cfg, resume=out)
    logs = SQLiteStorage.get_logs("ampo-test", run="tracked")
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logs] == [1, 2]  # one run, every step once
    assert [entry["reward"] for entry in logs] == pytest.approx([m["reward"] for m in history])
