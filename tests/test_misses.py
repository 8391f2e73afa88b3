"""The cache-miss loop: a run writes the prompts it needed guidance for and found no trace of
(misses.parquet), `ampo-cache build --prompts-from-misses RUN` generates for exactly those,
`ampo-cache coverage --misses RUN` counts what the store now covers, and a second run misses less."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from ampo_cache.ids import prompt_id
from ampo_cache.store import TraceStore
from ampo_train.config import load_train_config
from ampo_train.miss_log import MissLog
from ampo_train.trainer import train
from tests.trainer_fixtures import base_config, make_world, write_config


def _miss(problem: str, answer: str = "1") -> dict:
    return {"prompt_id": prompt_id(problem), "problem": problem, "answer": answer}


def test_miss_log_counts_per_prompt_and_a_resume_drops_the_interrupted_tail(tmp_path):
    log = MissLog(tmp_path)
    log.record(1, [_miss("a"), _miss("b")])
    log.record(2, [])
    log.record(3, [_miss("a")])
    rows = {r["problem"]: r for r in pq.read_table(tmp_path / "misses.parquet").to_pylist()}
    assert rows["a"] == {**_miss("a"), "first_step": 1, "last_step": 3, "times": 2}
    assert rows["b"]["times"] == 1 and len(rows) == 2
    resumed = MissLog(tmp_path, resumed_step=2)  # the checkpoint was at step 2: step 3 is done again
    rows = {r["problem"]: r for r in pq.read_table(tmp_path / "misses.parquet").to_pylist()}
    assert rows["a"]["times"] == 1 and rows["a"]["last_step"] == 1
    resumed.record(3, [_miss("c")])
    assert sorted(r["problem"] for r in pq.read_table(tmp_path / "misses.parquet").to_pylist()) == ["a", "b", "c"]
    assert [json.loads(line)["step"] for line in (tmp_path / "misses.jsonl").read_text().splitlines()] == [1, 1, 3]


def test_a_run_writes_its_misses(tmp_path):
    """Half the prompts have traces; the random student fails nearly everything: the other half
    (those drawn) are misses, each counted once per step it was drawn, and logged as a fraction."""
    world = make_world(tmp_path / "world", num_prompts=8, covered=0.5)
    cfg = load_train_config(write_config(tmp_path / "train.yaml", base_config(world, tmp_path / "out", max_steps=3)))
    result = train(cfg)
    misses = pq.read_table(tmp_path / "out" / "misses.parquet").to_pylist()
    covered = {prompt_id(json.loads(line)["problem"]) for line in world["traces"].read_text().splitlines()}
    assert misses and not {m["prompt_id"] for m in misses} & covered  # only prompts without a trace
    drawn = sum(m["guidance/no_trace"] for m in result.history)
    assert sum(m["times"] for m in misses) == drawn
    for m in result.history:
        assert m["guidance/cache_miss_frac"] == pytest.approx(m["guidance/no_trace"] / m["guidance/needed"])


def test_the_miss_loop_on_the_tiny_world(tiny_world, tmp_path):
    """Train with a store covering half the training prompts, build traces for the run's misses
    (exactly those prompts), and train again from the same start: the misses that got a correct
    trace are misses no more, and the miss fraction falls."""
    from cli.cache import app as cache

    store = tmp_path / "store"
    train_prompts = pq.read_table(tiny_world.train_prompts)
    half = tmp_path / "half.parquet"
    pq.write_table(train_prompts.slice(0, train_prompts.num_rows // 2), half)
    teachers = yaml.safe_load(tiny_world.teachers_yaml.read_text())
    teachers["samples_per_prompt"] = 8  # the small world's teachers are weak: more tries per missed prompt
    teachers_yaml = tiny_world.root / f"teachers-misses-{os.getpid()}.yaml"  # beside the world: its paths are relative
    teachers_yaml.write_text(yaml.safe_dump(teachers))
    try:
        runner = CliRunner()
        done = runner.invoke(cache, ["build", "--teachers", str(teachers_yaml), "--store", str(store), "--prompts", str(half)])
        assert done.exit_code == 0, done.output
        overrides = [f"store={store}", "max_steps=4", "eval=null", "tensorboard=false", "prompts_per_step=8",
                     "mini_batch_prompts=4", "group_size=4", "log_every=100"]
        first = train(load_train_config(tiny_world.train_yaml, overrides + [f"output_dir={tmp_path / 'first'}"]))
        missed = {m["prompt_id"] for m in pq.read_table(tmp_path / "first" / "misses.parquet").to_pylist()}
        assert missed

        plan = runner.invoke(cache, ["build", "--teachers", str(teachers_yaml), "--store", str(store),
                                     "--prompts-from-misses", str(tmp_path / "first"), "--dry-run"])
        assert plan.exit_code == 0 and f"plan: {len(missed)} prompts" in plan.output, plan.output
        done = runner.invoke(cache, ["build", "--teachers", str(teachers_yaml), "--store", str(store),
                                     "--prompts-from-misses", str(tmp_path / "first")])
        assert done.exit_code == 0, done.output
        report = json.loads(runner.invoke(cache, ["coverage", "--store", str(store), "--misses", str(tmp_path / "first"),
                                                  "--json"]).output)
        assert report["prompts"] == len(missed) and report["covered"] + report["uncovered"] == len(missed)
        assert report["covered"] > 0, report  # the build really generated for the missed prompts
        with TraceStore.open(store).connect() as con:
            built = {pid: extra for pid, extra in con.execute("SELECT prompt_id, source FROM prompts").fetchall()}
            columns = [row[0] for row in con.execute("DESCRIBE prompts").fetchall()]
        first_half = {prompt_id(r["problem"]) for r in pq.read_table(half).to_pylist()}
        assert missed <= set(built) and all(built[pid].startswith("misses:") for pid in missed - first_half)
        assert "times" not in columns and "first_step" not in columns  # the miss counts stay out of the store

        second = train(load_train_config(tiny_world.train_yaml, overrides + [f"output_dir={tmp_path / 'second'}"]))
        with TraceStore.open(store).connect() as con:
            covered = {pid for (pid,) in con.execute("SELECT DISTINCT prompt_id FROM traces WHERE correct").fetchall()}
        again = {m["prompt_id"] for m in pq.read_table(tmp_path / "second" / "misses.parquet").to_pylist()} \
            if (tmp_path / "second" / "misses.parquet").exists() else set()
        assert not again & covered  # a prompt with a correct trace is never a miss
        fraction = lambda run: sum(m["guidance/no_trace"] for m in run.history) / max(  # noqa: E731
            sum(m["guidance/needed"] for m in run.history), 1)
        assert fraction(second) < fraction(first)
    finally:
        teachers_yaml.unlink(missing_ok=True)
