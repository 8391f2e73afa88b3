"""The cache build on the tiny world's teachers: end to end, resume after SIGKILL, parallel shards."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ampo_cache.store import TraceStore
from tests.helpers import run_cache

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = 24


@pytest.fixture
def teachers_yaml(tmp_path, tiny_world):
    """A teachers.yaml over the tiny world's teachers and the first PROMPTS training prompts."""
    import pyarrow.parquet as pq

    rows = pq.read_table(tiny_world.train_prompts).slice(0, PROMPTS).to_pylist()
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = yaml.safe_load(Path(tiny_world.teachers_yaml).read_text())
    config.update(prompts="prompts.jsonl", store="store", shard_rows=8, samples_per_prompt=2)
    for teacher in config["teachers"]:
        teacher["model"] = str((Path(tiny_world.teachers_yaml).parent / teacher["model"]).resolve())
        teacher["batch_size"] = 4
    path = tmp_path / "teachers.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def keys(store: Path) -> list[tuple]:
    with TraceStore.open(store).connect() as con:
        return con.execute("SELECT prompt_id, teacher, sample_idx FROM traces").fetchall()


def build_cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cli.cache", "build", "--teachers", str(config), *extra]


def test_build_end_to_end_then_nothing_left_to_do(teachers_yaml):
    result = run_cache("build", "--teachers", teachers_yaml)
    assert result.exit_code == 0, result.output
    store = teachers_yaml.parent / "store"
    n_teachers = len(yaml.safe_load(teachers_yaml.read_text())["teachers"])
    got = keys(store)
    assert len(got) == len(set(got)) == PROMPTS * 2 * n_teachers
    with TraceStore.open(store).connect() as con:
        rows = con.execute("SELECT num_tokens, finish_reason, gen_params, verify_status, correct FROM traces").fetchall()
        assert con.execute("SELECT count(*) FROM prompts").fetchone()[0] == PROMPTS
    for num_tokens, finish_reason, gen_params, status, correct in rows:
        assert num_tokens > 0 and finish_reason in ("stop", "length")
        assert json.loads(gen_params)["backend"] == "transformers"
        assert correct == (status == "correct")
    assert sum(r[4] for r in rows) > 0, "trained teachers should solve some tiny-world prompts"
    assert "pass rate" in result.output and "prompts covered" in result.output  # the closing coverage table

    shards_before = sorted((store / "traces").glob("part-*.parquet"))
    again = run_cache("build", "--teachers", teachers_yaml)
    assert again.exit_code == 0
    assert sorted((store / "traces").glob("part-*.parquet")) == shards_before


def test_sigkill_mid_build_then_resume(teachers_yaml):
    store = teachers_yaml.parent / "store"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(build_cmd(teachers_yaml), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    shards = []
    while time.time() < deadline and proc.poll() is None:
        shards = [p for p in (store / "traces").glob("part-*.parquet") if "schema" not in p.name] if store.exists() else []
        if len(shards) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "build finished before it could be killed: " + proc.stderr.read().decode()[-800:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = keys(store)  # the store opens and reads after the kill
    assert len(partial) == len(set(partial)) and len(partial) % 8 == 0  # whole shards of shard_rows=8

    rerun = subprocess.run(build_cmd(teachers_yaml), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    done = keys(store)
    n_teachers = len(yaml.safe_load(teachers_yaml.read_text())["teachers"])
    assert len(done) == len(set(done)) == PROMPTS * 2 * n_teachers
    assert set(partial) <= set(done)


def test_two_shards_in_parallel_equal_one_build(teachers_yaml, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    shards = [subprocess.Popen(build_cmd(teachers_yaml, "--shard", f"{i}/2"), cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(2)]
    for proc in shards:
        assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-2000:]
    single = tmp_path / "single"
    result = run_cache("build", "--teachers", teachers_yaml, "--store", single)
    assert result.exit_code == 0, result.output
    together = keys(teachers_yaml.parent / "store")
    assert len(together) == len(set(together))
    assert set(together) == set(keys(single))
