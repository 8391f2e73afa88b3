"""`ampo-train eval` end to end on the small tiny world: real models, real sampling, real verifier."""

import json

from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from cli.train import app


def run_train_cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _eval_args(tiny_world, *extra):
    return ["eval", "--data", tiny_world.test_prompts(1), "--data", tiny_world.test_prompts(4),
            "--k", "1,2", "--samples", "2", "--max-tokens", "40", *extra]


def test_eval_writes_table_json_and_plot(tiny_world, tmp_path):
    # A LoRA adapter with B = 0 (peft's default init) computes exactly the base model's function.
    adapter = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_world.student)
    get_peft_model(base, LoraConfig(r=4, target_modules="all-linear")).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_world.student).save_pretrained(adapter)

    out, png = tmp_path / "r.json", tmp_path / "passk.png"
    result = run_train_cli(*_eval_args(tiny_world, "--model", tiny_world.student, "--model", adapter,
                                       "--label", "base", "--label", "lora", "--greedy", "--out", out, "--plot", png))
    assert result.exit_code == 0, result.output
    assert "pass@2" in result.output and "test_level4" in result.output

    base_report, lora_report = json.loads(out.read_text())
    assert lora_report["adapter"] == str(adapter) and lora_report["path"] == str(tiny_world.student)
    problems = tiny_world.summary["test_prompts"]
    assert base_report["benchmarks"]["test_level1"]["problems"] == problems["1"]
    assert base_report["overall"]["problems"] == problems["1"] + problems["4"]
    for summary in [base_report["overall"], *base_report["benchmarks"].values()]:
        assert 0 <= summary["avg@n"] <= summary["pass@k"]["2"] <= 1
        assert summary["pass@k"]["1"] == summary["avg@n"]
        assert 0 <= summary["greedy"] <= 1
    # same seed, same function: the adapter path reproduces the base model's numbers exactly
    assert lora_report["benchmarks"] == base_report["benchmarks"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_errors_are_one_line(tiny_world, tmp_path):
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"text": "1+1?", "label": 2}) + "\n")
    result = run_train_cli("eval", "--model", tiny_world.student, "--data", odd)
    assert result.exit_code == 2 and "odd.jsonl:1: unknown benchmark layout: columns found: text, label" in result.output

    result = run_train_cli(*_eval_args(tiny_world, "--model", tiny_world.student, "--k", "1,4"))
    assert result.exit_code == 2 and "every k must be <= --samples (2)" in result.output

    result = run_train_cli(*_eval_args(tiny_world, "--model", tiny_world.student, "--adapter", tmp_path))
    assert result.exit_code == 2 and "not a LoRA adapter folder" in result.output
