"""A SIGKILL in the middle of an import loses at most the shard in flight; a re-run completes it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ampo_cache.store import TraceStore

ROOT = Path(__file__).resolve().parents[1]
PROBLEMS, TEACHERS, SHARD_ROWS = 300, 4, 50


def write_input(path: Path) -> set:
    keys = set()
    with open(path, "w") as out:
        for i in range(PROBLEMS):
            for t in range(TEACHERS):
                # fraction answers vs decimal traces go through math-verify: slow enough to interrupt
                trace = f"step {t}: so the value is \\boxed{{{(i + 1) / 4 if t else i + 7}}}"
                out.write(json.dumps({"problem": f"Compute ({i} + 1) / 4.", "answer": f"\\frac{{{i + 1}}}{{4}}",
                                      "teacher": f"t{t}", "trace": trace}) + "\n")
                keys.add((f"t{t}", trace))
    return keys


def import_cmd(src: Path, store: Path) -> list[str]:
    return [sys.executable, "-m", "cli.cache", "import", str(src), "--store", str(store),
            "--shard-rows", str(SHARD_ROWS), "--workers", "0"]


def data_shards(store: Path) -> list[Path]:
    return [p for p in (store / "traces").glob("part-*.parquet") if not p.name.endswith("-schema.parquet")]


def stored(store: Path):
    with TraceStore.open(store).connect() as con:
        rows = con.execute("SELECT teacher, text, prompt_id, sample_idx FROM traces").fetchall()
    return rows


def test_sigkill_mid_import_then_resume(tmp_path):
    src, store = tmp_path / "traces.jsonl", tmp_path / "store"
    expected = write_input(src)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(import_cmd(src, store), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (store / "traces").is_dir() and len(data_shards(store)) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "import finished before it could be killed: " + proc.stderr.read().decode()[-500:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    rows = stored(store)  # opens and reads: every visible shard is whole
    total = PROBLEMS * TEACHERS
    assert 3 * SHARD_ROWS <= len(rows) < total
    assert len(rows) % SHARD_ROWS == 0  # whole shards only, nothing partial
    assert len({(r[2], r[0], r[3]) for r in rows}) == len(rows)  # no duplicate keys

    rerun = subprocess.run(import_cmd(src, store), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    rows = stored(store)
    assert len(rows) == total
    assert {(r[0], r[1]) for r in rows} == expected
    assert len({(r[2], r[0], r[3]) for r in rows}) == total
