"""Every command against a table of bad inputs: exit code 2, one line naming the file or key, no
traceback, and nothing created or changed on disk.

The model folders here hold a config, a tokenizer and a valid safetensors file that is NOT a loadable
model: a command that got as far as loading weights would crash (exit 1, a traceback) and fail its
row, so every row also proves the input is rejected before any model loads. The whole work folder
(the good store included) is hashed before and after each row.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

from cli.cache import app as cache_app
from cli.train import app as train_app
from tests.helpers import EXAMPLE

APPS = {"ampo-cache": cache_app, "ampo-train": train_app}


def _model(folder: Path, **broken: bytes) -> Path:
    """A model folder's files (config, weights, tokenizer), with ``broken`` files replaced or removed (None)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8}))
    save_file({"w": np.zeros(2, dtype=np.float32)}, str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "WordLevel"}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    for name, content in broken.items():
        name = name.replace("__", ".")
        if content is None:
            (folder / name).unlink()
        else:
            (folder / name).write_bytes(content)
    return folder


def _yaml(path: Path, data: dict) -> Path:
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in data.items()))  # JSON values are YAML
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    p = {"root": root, "missing": root / "missing.jsonl", "missing_dir": root / "no-such-folder", "dir": root / "adir",
         "dir_jsonl": root / "dir.jsonl", "file": root / "afile", "empty_jsonl": root / "empty.jsonl",
         "empty_yaml": root / "empty.yaml", "corrupt_parquet": root / "corrupt.parquet",
         "not_utf8": root / "latin1.jsonl", "malformed": root / "malformed.jsonl", "bad_yaml": root / "bad.yaml",
         "binary_yaml": root / "binary.yaml", "odd": root / "odd.jsonl", "new": root / "new-store",
         "nonempty": root / "notastore", "store": root / "store", "broken_store": root / "broken-store",
         "out": root / "outputs", "bench": root / "bench.jsonl", "example": EXAMPLE}
    p["dir"].mkdir()
    p["out"].mkdir()  # an existing output folder: a rejected export or eval must leave it empty
    p["dir_jsonl"].mkdir()
    p["file"].write_text("a file\n")
    p["empty_jsonl"].write_bytes(b"")
    p["empty_yaml"].write_bytes(b"")
    p["corrupt_parquet"].write_bytes(b"PAR1" + bytes(range(256)) * 4)
    p["not_utf8"].write_bytes('{"problem": "caf\u00e9?", "answer": "1"}\n'.encode("latin-1"))
    p["malformed"].write_text('{"problem": "1+1?", "answer": "2"\n')
    p["bad_yaml"].write_text("teachers: [a, b\n")
    p["binary_yaml"].write_bytes(b"\xff\xfe\x00\x01PK\x03\x04")
    p["odd"].write_text(json.dumps({"text": "1+1?", "label": 2}) + "\n")
    p["bench"].write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    (p["nonempty"]).mkdir()
    (p["nonempty"] / "notes.txt").write_text("mine\n")
    models = root / "models"
    p["model"] = _model(models / "ok")
    p["model_no_config"] = _model(models / "no-config", config__json=None)
    p["model_bad_config"] = _model(models / "bad-config", config__json=b'{"model_type": "llama",')
    p["model_not_model"] = _model(models / "not-a-model", config__json=b"{}")
    p["model_bad_tokenizer"] = _model(models / "bad-tokenizer", tokenizer__json=b"\x00\x01 not json")
    p["model_bad_tok_config"] = _model(models / "bad-tokenizer-config", tokenizer_config__json=b"[unclosed")
    p["model_no_tokenizer"] = _model(models / "no-tokenizer", tokenizer__json=None)
    p["model_truncated"] = _model(models / "truncated", model__safetensors=b"\x10\x00\x00\x00\x00\x00\x00\x00{\"w\":")
    p["model_no_weights"] = _model(models / "no-weights", model__safetensors=None)
    p["adapter_bad"] = models / "bad-adapter"
    p["adapter_bad"].mkdir()
    (p["adapter_bad"] / "adapter_config.json").write_text('{"base_model_name_or_path": ')
    p["adapter_truncated"] = models / "truncated-adapter"
    p["adapter_truncated"].mkdir()
    (p["adapter_truncated"] / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(p["model"])}))
    (p["adapter_truncated"] / "adapter_model.safetensors").write_bytes(b"\xff" * 8)
    p["adapter_orphan"] = models / "orphan-adapter"
    p["adapter_orphan"].mkdir()
    (p["adapter_orphan"] / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/gone/base"}))
    save_file({"w": np.zeros(2, dtype=np.float32)}, str(p["adapter_orphan"] / "adapter_model.safetensors"))

    runner = CliRunner()
    assert runner.invoke(cache_app, ["import", str(EXAMPLE), "--store", str(p["store"]), "--workers", "0"]).exit_code == 0
    shutil.copytree(p["store"], p["broken_store"])
    shard = next((p["broken_store"] / "traces").glob("part-2*.parquet"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    p["teachers_store_file"] = _yaml(root / "t-store-file.yaml", {
        "prompts": str(EXAMPLE), "store": str(p["file"]),
        "teachers": [{"name": "a", "model": str(p["model"]), "backend": "transformers"}]})
    p["teachers_bad_model"] = _yaml(root / "t-bad-model.yaml", {
        "prompts": str(EXAMPLE), "store": str(p["new"]),
        "teachers": [{"name": "a", "model": str(p["missing_dir"]), "backend": "transformers"}]})
    p["teachers_ok"] = _yaml(root / "t-ok.yaml", {
        "prompts": str(EXAMPLE), "store": str(p["new"]),
        "teachers": [{"name": "a", "model": str(p["model"]), "backend": "transformers"}]})
    p["teachers_missing_prompts"] = _yaml(root / "t-missing-prompts.yaml", {
        "prompts": str(p["missing"]), "store": str(p["new"]),
        "teachers": [{"name": "a", "model": str(p["model"]), "backend": "transformers"}]})
    train = {"student": str(p["model"]), "prompts": str(EXAMPLE), "store": None, "output_dir": str(root / "run"),
             "guidance": {"mode": "off"}, "max_steps": 1}
    for name, change in {
        "student_missing": {"student": str(p["missing_dir"])}, "student_file": {"student": str(p["file"])},
        "student_bad_config": {"student": str(p["model_bad_config"])},
        "student_no_config": {"student": str(p["model_no_config"])},
        "student_not_model": {"student": str(p["model_not_model"])},
        "student_bad_tokenizer": {"student": str(p["model_bad_tokenizer"])},
        "student_truncated": {"student": str(p["model_truncated"])},
        "tokenizer_none": {"tokenizer": str(p["model_no_tokenizer"])},
        "tokenizer_bad_config": {"tokenizer": str(p["model_bad_tok_config"])},
        "prompts_missing": {"prompts": str(p["missing"])}, "prompts_dir": {"prompts": str(p["dir"])},
        "unknown_key": {"guidance": {"mode": "off", "kk": 2}},
        "store_missing": {"store": str(p["missing_dir"]), "guidance": {"mode": "adaptive"}},
    }.items():
        p[f"train_{name}"] = _yaml(root / f"train-{name}.yaml", {**train, **change})
    return p


# (command, arguments, what the one error line must name). Placeholders are the `work` paths.
EVAL = "eval --data {bench} --samples 2 --k 1,2 --max-tokens 8"
ROWS = [
    # ampo-cache import
    ("ampo-cache", "import {missing} --store {new}", "{missing}: no such file"),
    ("ampo-cache", "import {dir_jsonl} --store {new}", "{dir_jsonl}: no such file"),
    ("ampo-cache", "import {empty_jsonl} --store {new}", "{empty_jsonl}: no traces in the file"),
    ("ampo-cache", "import {corrupt_parquet} --store {new}", "{corrupt_parquet}"),
    ("ampo-cache", "import {not_utf8} --store {new}", "{not_utf8}:1: not valid UTF-8"),
    ("ampo-cache", "import {malformed} --store {new}", "{malformed}:1: malformed JSON"),
    ("ampo-cache", "import {odd} --store {new}", "cannot recognise the layout"),
    ("ampo-cache", "import {example} --store {file}", "{file}: is a file; expected a store directory"),
    ("ampo-cache", "import {example} --store {file}/store", "{file} is a file, not a folder"),
    ("ampo-cache", "import {example} --store {nonempty}", "{nonempty}: exists, is not empty and is not a trace store"),
    ("ampo-cache", "import {example} --store {broken_store}", "corrupt or truncated Parquet shard"),
    ("ampo-cache", "import {example} --store {new} --layout diagonal", "diagonal"),
    # ampo-cache build
    ("ampo-cache", "build --teachers {missing}", "{missing}: no such file"),
    ("ampo-cache", "build --teachers {dir}", "{dir}: no such file"),
    ("ampo-cache", "build --teachers {empty_yaml}", "{empty_yaml}: expected a mapping"),
    ("ampo-cache", "build --teachers {bad_yaml}", "{bad_yaml}:2: not valid YAML"),
    ("ampo-cache", "build --teachers {binary_yaml}", "{binary_yaml}: not UTF-8 text"),
    ("ampo-cache", "build --teachers {teachers_bad_model}", "teachers[0].model: no model folder"),
    ("ampo-cache", "build --teachers {teachers_missing_prompts}", "{missing}"),
    ("ampo-cache", "build --teachers {teachers_store_file}", "{file}: is a file; expected a store directory"),
    ("ampo-cache", "build --teachers {teachers_ok} --shard 3/2", "--shard"),
    # ampo-cache coverage
    ("ampo-cache", "coverage --store {missing_dir}", "{missing_dir}: not a trace store"),
    ("ampo-cache", "coverage --store {file}", "{file}: not a trace store"),
    ("ampo-cache", "coverage --store {broken_store}", "{broken_store}/traces/part-"),
    # ampo-cache sql
    ("ampo-cache", "sql --store {missing_dir} 'SELECT 1'", "{missing_dir}: not a trace store"),
    ("ampo-cache", "sql --store {broken_store} 'SELECT 1'", "corrupt or truncated Parquet shard"),
    ("ampo-cache", "sql --store {store} \"COPY (SELECT 1) TO '{out}/x.csv'\"", "sql: COPY statements are not run"),
    ("ampo-cache", "sql --store {store} 'CREATE TABLE t AS SELECT 1'", "sql: CREATE statements are not run"),
    ("ampo-cache", "sql --store {store} 'SELEC 1'", "Parser Error"),
    ("ampo-cache", "sql --store {store} 'SELECT * FROM no_such_view'", "no_such_view"),
    ("ampo-cache", "sql --store {store} --format xml 'SELECT 1'", "--format"),
    # ampo-cache export
    ("ampo-cache", "export --store {missing_dir} --out {out}/x.parquet", "{missing_dir}: not a trace store"),
    ("ampo-cache", "export --store {store} --out {dir}", "--out {dir}: is a directory"),
    ("ampo-cache", "export --store {store} --out {file}/x.parquet", "{file} is a file, not a folder"),
    ("ampo-cache", "export --store {store} --out {out}/x.txt --format long", "{out}/x.txt: unknown file type"),
    ("ampo-cache", "export --store {store} --out {out}/x.parquet --where 'no_such_column > 1'", "no_such_column"),
    ("ampo-cache", "export --store {broken_store} --out {out}/x.parquet", "corrupt or truncated Parquet shard"),
    # ampo-cache merge
    ("ampo-cache", "merge {missing_dir} --into {new}", "{missing_dir}: not a trace store"),
    ("ampo-cache", "merge {file} --into {new}", "{file}: not a trace store"),
    ("ampo-cache", "merge {store} --into {file}", "{file}: exists and is not empty"),
    ("ampo-cache", "merge {store} --into {nonempty}", "{nonempty}: exists and is not empty"),
    ("ampo-cache", "merge {broken_store} {store} --into {new}", "corrupt or truncated Parquet shard"),
    # ampo-cache tiny-world build
    ("ampo-cache", "tiny-world build {file}", "{file}: is a file"),
    ("ampo-cache", "tiny-world build {nonempty}", "{nonempty}: exists, is not empty and is not a tiny world"),
    ("ampo-cache", "tiny-world build {new} --size huge", "--size"),
    # ampo-train run
    ("ampo-train", "run --config {missing}", "{missing}: no such file"),
    ("ampo-train", "run --config {dir}", "{dir}: no such file"),
    ("ampo-train", "run --config {empty_yaml}", "{empty_yaml}: expected a mapping"),
    ("ampo-train", "run --config {bad_yaml}", "{bad_yaml}:2: not valid YAML"),
    ("ampo-train", "run --config {binary_yaml}", "{binary_yaml}: not UTF-8 text"),
    ("ampo-train", "run --config {train_student_missing}", "student: no model folder"),
    ("ampo-train", "run --config {train_student_file}", "student: {file}: is a file"),
    ("ampo-train", "run --config {train_student_bad_config}", "student: {model_bad_config}/config.json: corrupt JSON"),
    ("ampo-train", "run --config {train_student_no_config}", "student: {model_no_config}: no config.json"),
    ("ampo-train", "run --config {train_student_not_model}", "student: {model_not_model}/config.json: no 'model_type'"),
    ("ampo-train", "run --config {train_student_bad_tokenizer}", "student: {model_bad_tokenizer}/tokenizer.json: corrupt JSON"),
    ("ampo-train", "run --config {train_student_truncated}", "student: {model_truncated}/model.safetensors: corrupt"),
    ("ampo-train", "run --config {train_tokenizer_none}", "tokenizer: {model_no_tokenizer}: no tokenizer files"),
    ("ampo-train", "run --config {train_tokenizer_bad_config}", "tokenizer: {model_bad_tok_config}/tokenizer_config.json"),
    ("ampo-train", "run --config {train_prompts_missing}", "prompts: no prompts file"),
    ("ampo-train", "run --config {train_prompts_dir}", "prompts: no prompts file"),
    ("ampo-train", "run --config {train_unknown_key}", "guidance.kk: unknown key"),
    ("ampo-train", "run --config {train_store_missing}", "no trace store"),
    ("ampo-train", "run --config {train_student_missing} student={model_bad_config}", "student={model_bad_config}"),
    ("ampo-train", "run --resume {missing_dir}", "{missing_dir}"),
    # ampo-train eval
    ("ampo-train", "eval --model {missing_dir} --data {bench}", "{missing_dir}: no model folder"),
    ("ampo-train", "eval --model {file} --data {bench}", "{file}: is a file"),
    ("ampo-train", "eval --model {model_bad_config} --data {bench}", "{model_bad_config}/config.json: corrupt JSON"),
    ("ampo-train", "eval --model {model_no_config} --data {bench}", "{model_no_config}: no config.json"),
    ("ampo-train", "eval --model {model_bad_tokenizer} --data {bench}", "{model_bad_tokenizer}/tokenizer.json"),
    ("ampo-train", "eval --model {model_no_tokenizer} --data {bench}", "{model_no_tokenizer}: no tokenizer files"),
    ("ampo-train", "eval --model {model_truncated} --data {bench}", "{model_truncated}/model.safetensors"),
    ("ampo-train", "eval --model {model_no_weights} --data {bench}", "{model_no_weights}: no weights"),
    ("ampo-train", "eval --model {adapter_bad} --data {bench}", "{adapter_bad}/adapter_config.json: corrupt JSON"),
    ("ampo-train", "eval --model {adapter_truncated} --data {bench}", "{adapter_truncated}/adapter_model.safetensors"),
    ("ampo-train", "eval --model {adapter_orphan} --data {bench}", "{adapter_orphan}: its base model /gone/base"),
    ("ampo-train", "eval --model {model} --adapter {dir} --data {bench}", "{dir}: not a LoRA adapter folder"),
    ("ampo-train", "eval --model {model} --data {missing}", "{missing}: no such file"),
    ("ampo-train", "eval --model {model} --data {dir_jsonl}", "{dir_jsonl}: no such file"),
    ("ampo-train", "eval --model {model} --data {empty_jsonl}", "{empty_jsonl}: no problems in the file"),
    ("ampo-train", "eval --model {model} --data {corrupt_parquet}", "{corrupt_parquet}: not a readable Parquet file"),
    ("ampo-train", "eval --model {model} --data {malformed}", "{malformed}:1: malformed JSON"),
    ("ampo-train", "eval --model {model} --data {odd}", "{odd}:1: unknown benchmark layout"),
    ("ampo-train", "eval --model {model} --data {dir}", "{dir}: unknown file type"),
    ("ampo-train", EVAL + " --model {model} --log-samples {dir}", "--log-samples {dir}: is a directory"),
    ("ampo-train", EVAL + " --model {model} --log-samples {out}/s.csv", "{out}/s.csv: the sample log is a Parquet file"),
    ("ampo-train", EVAL + " --model {model} --log-samples {file}/s.parquet", "{file} is a file, not a folder"),
    ("ampo-train", EVAL + " --model {model} --out {dir}", "--out {dir}: is a directory"),
    ("ampo-train", EVAL + " --model {model} --k 1,4", "--k: every k must be <= --samples (2)"),
    ("ampo-train", EVAL + " --model {model} --backend tpu", "--engine: expected transformers, vllm or auto"),
    ("ampo-train", EVAL + " --model {model} --engine tpu", "--engine: expected transformers, vllm or auto"),
]


def _tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` (folders too) with a hash of each file's bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("command,args,needle", ROWS, ids=[f"{c.split('-')[1]} {a.split()[0]} {i}" for i, (c, a, _)
                                                           in enumerate(ROWS)])
def test_bad_input_is_one_line_and_exit_2(work, command, args, needle):
    paths = {k: str(v) for k, v in work.items()}
    argv = shlex.split(args.format(**paths))
    before = _tree(work["root"])
    result = CliRunner().invoke(APPS[command], argv)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and needle.format(**paths) in lines[0], lines[0]
    assert _tree(work["root"]) == before  # no store, run folder or output created or changed


def test_the_table_covers_every_command():
    commands = {f"{c} {a.split()[0]}" for c, a, _ in ROWS}
    assert commands == {"ampo-cache import", "ampo-cache build", "ampo-cache coverage", "ampo-cache sql",
                        "ampo-cache export", "ampo-cache merge", "ampo-cache tiny-world", "ampo-train run",
                        "ampo-train eval"}
