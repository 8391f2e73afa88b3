"""teachers.yaml mistakes fail with one line naming the file, line, key and what was expected."""

import textwrap

import pytest

from tests.helpers import run_cache

VALID = """\
prompts: prompts.jsonl
store: store/
teachers:
  - name: alpha
    model: ./model_a
    sampling: {temperature: 0.6, max_tokens: 32}
  - name: beta
    model: ./model_b
    sampling:
      temperature: 1.0
      top_p: 0.9
"""


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "model_a").mkdir()
    (tmp_path / "model_b").mkdir()
    (tmp_path / "prompts.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n{"question": "2+2", "answer": 4}\n')
    return tmp_path


def rejected(folder, text, *needles):
    path = folder / "teachers.yaml"
    path.write_text(textwrap.dedent(text))
    result = run_cache("build", "--teachers", path, "--dry-run")
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and line.startswith("error:"), line
    for needle in needles:
        assert needle in line, line


def test_valid_config_dry_run_counts_per_teacher(folder):
    (folder / "teachers.yaml").write_text(VALID)
    result = run_cache("build", "--teachers", folder / "teachers.yaml", "--dry-run")
    assert result.exit_code == 0, result.output
    # 2 prompts x 1 sample for each teacher, nothing stored yet, and no store created by a dry run
    assert "│ alpha   │ transformers │" in result.output and "│ 0      │ 2           │" in result.output
    assert not (folder / "store").exists()


def test_unknown_key_names_its_line(folder):
    rejected(folder, VALID.replace("top_p: 0.9", "top_pp: 0.9"),
             "teachers.yaml:11:", "teachers[1].sampling.top_pp: unknown key")


def test_missing_model_folder(folder):
    rejected(folder, VALID.replace("./model_b", "./no_such_model"),
             "teachers.yaml:8:", "teachers[1].model: no model folder at", "no_such_model")


def test_missing_model_key(folder):
    rejected(folder, VALID.replace("    model: ./model_a\n", ""), "teachers[0].model: missing required key")


def test_bad_sampling_value(folder):
    rejected(folder, VALID.replace("temperature: 0.6", "temperature: -1"),
             "teachers.yaml:6:", "teachers[0].sampling.temperature", "greater than or equal to 0")
    rejected(folder, VALID.replace("top_p: 0.9", "top_p: lots"), "teachers[1].sampling.top_p", "valid number")


def test_duplicate_teacher_names(folder):
    rejected(folder, VALID.replace("name: beta", "name: alpha"), "repeated: alpha")


def test_yaml_syntax_error(folder):
    rejected(folder, VALID.replace("sampling: {temperature: 0.6, max_tokens: 32}", "sampling: {temperature: 0.6"),
             "teachers.yaml:", "not valid YAML")


def test_bad_shard_and_missing_prompts_file(folder):
    (folder / "teachers.yaml").write_text(VALID)
    bad = run_cache("build", "--teachers", folder / "teachers.yaml", "--shard", "2/2", "--dry-run")
    assert bad.exit_code == 2 and "--shard: expected 0 <= i < N" in bad.output
    rejected(folder, VALID.replace("prompts.jsonl", "nope.jsonl"), "nope.jsonl: no such file")


def test_hub_ids_are_accepted_without_a_folder(folder):
    (folder / "teachers.yaml").write_text(VALID.replace("./model_b", "Qwen/Qwen2.5-0.5B-Instruct"))
    result = run_cache("build", "--teachers", folder / "teachers.yaml", "--dry-run")
    assert result.exit_code == 0 and "Qwen/Qwen2.5-0.5B-Instruct" in result.output
