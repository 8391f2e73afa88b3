"""`ampo-train eval` end to end on the small tiny world: real models, real sampling, real verifier."""

import json
from pathlib import Path

import pytest
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


# The README's query (the problems a model never solves), with the file name filled in.
NEVER_SOLVED = """
SELECT model, benchmark, problem_idx, problem, answers
FROM '{log}'
WHERE NOT greedy
GROUP BY ALL
HAVING NOT bool_or(correct)
ORDER BY model, benchmark, problem_idx;
"""


def test_log_samples_writes_one_row_per_answer_queryable_with_duckdb(tiny_world, tmp_path):
    import duckdb

    log, out = tmp_path / "logs" / "samples.parquet", tmp_path / "r.json"
    result = run_train_cli(*_eval_args(tiny_world, "--model", tiny_world.student, "--greedy", "--out", out,
                                       "--log-samples", log))
    assert result.exit_code == 0, result.output
    assert [p.name for p in log.parent.iterdir()] == ["samples.parquet"]  # written atomically: no temporary left
    [report] = json.loads(out.read_text())
    problems = tiny_world.summary["test_prompts"]
    con = duckdb.connect()
    rows = con.sql(f"SELECT benchmark, greedy, count(*), count(DISTINCT problem_idx), avg(correct::INT), "
                   f"bool_and(correct = (verify_status = 'correct')), bool_and(len(answers) = 1), "
                   f"bool_and(sample_idx < 2), bool_and(temperature = CASE WHEN greedy THEN 0 ELSE 0.6 END) "
                   f"FROM '{log}' GROUP BY ALL ORDER BY ALL").fetchall()
    for benchmark, greedy, count, distinct, accuracy, consistent, one_answer, indices, temperature in rows:
        level = benchmark.removeprefix("test_level")
        assert distinct == problems[level] and count == problems[level] * (1 if greedy else 2)
        summary = report["benchmarks"][benchmark]
        assert accuracy == pytest.approx(summary["greedy"] if greedy else summary["avg@n"])
        assert consistent and one_answer and indices and temperature
    assert len(rows) == 4  # two benchmarks x (samples, greedy)
    # the README's query: problems the model never solves = problems minus those pass@n counts as solved
    never = con.sql(NEVER_SOLVED.format(log=log)).fetchall()
    solved = sum(round(s["pass@k"]["2"] * s["problems"]) for s in report["benchmarks"].values())
    assert len(never) == sum(problems[lv] for lv in ("1", "4")) - solved
    assert all(model == "student" and isinstance(answers, list) for model, _, _, _, answers in never)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert NEVER_SOLVED.format(log="samples.parquet").strip() in readme  # the documented query is this one


def test_log_samples_needs_a_parquet_name_before_any_sampling(tiny_world, tmp_path):
    result = run_train_cli(*_eval_args(tiny_world, "--model", tiny_world.student, "--log-samples", tmp_path / "s.csv"))
    assert result.exit_code == 2 and "s.csv: the sample log is a Parquet file" in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_hub_id_is_taken_on_trust_and_an_unreachable_hub_is_one_line(tiny_world, tmp_path):
    from ampo_train.evaluation.runner import ModelSpec

    assert ModelSpec.parse("Qwen/Qwen2.5-1.5B-Instruct").model == "Qwen/Qwen2.5-1.5B-Instruct"  # not checked locally
    # HF_HUB_OFFLINE=1 (conftest): the hub cannot provide it, which is one line, not a traceback
    result = run_train_cli("eval", "--model", "ampo-no-such-org/no-such-model", "--data", tiny_world.test_prompts(1))
    assert result.exit_code == 2 and "Traceback" not in result.output
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("error: ampo-no-such-org/no-such-model: cannot load the tokenizer")
