"""Benchmark files in the layouts they are published in; unknown layouts fail with the columns found."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ampo_cache.errors import InputError
from ampo_train.evaluation.benchmarks import BenchItem, load_benchmark


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("row,expected", [
    ({"problem": "1+1?", "answer": "2"}, BenchItem("1+1?", "2")),
    ({"question": "1+1?", "final_answer": 2}, BenchItem("1+1?", "2")),
    ({"problem": "1+1?", "gt": " 2 "}, BenchItem("1+1?", "2")),
    ({"question": "1+1?", "answer": "#### 2"}, BenchItem("1+1?", "#### 2")),  # an answer column is taken as is
    ({"question": "Tom has 1+1 apples?", "solution": "He has 1+1=2.\n#### 2"}, BenchItem("Tom has 1+1 apples?", "2")),
    ({"problem": "x?", "solution": "So $x=\\frac{1}{2}$, i.e. \\boxed{\\frac{1}{2}}."}, BenchItem("x?", "\\frac{1}{2}")),
    ({"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "1+1?"}],
      "reward_model": {"ground_truth": "2", "style": "rule"}}, BenchItem("1+1?", "2")),
])
def test_common_layouts(tmp_path, row, expected):
    assert load_benchmark(_jsonl(tmp_path / "b.jsonl", [row, row])) == [expected, expected]


def test_parquet_and_named_columns(tmp_path):
    path = tmp_path / "b.parquet"
    pq.write_table(pa.table({"q": ["1+2?"], "gold": ["3"]}), path)
    assert load_benchmark(path, problem_col="q", answer_col="gold") == [BenchItem("1+2?", "3")]


def test_unknown_layout_lists_the_columns(tmp_path):
    path = _jsonl(tmp_path / "odd.jsonl", [{"text": "1+1?", "label": "2"}])
    with pytest.raises(InputError) as err:
        load_benchmark(path)
    message = str(err.value)
    assert "odd.jsonl:1" in message and "columns found: text, label" in message and "problem" in message


def test_solution_without_a_final_answer_names_the_row(tmp_path):
    path = _jsonl(tmp_path / "s.jsonl", [{"problem": "a", "solution": "#### 1"}, {"problem": "b", "solution": "no answer"}])
    with pytest.raises(InputError, match=r"s\.jsonl:2: column 'solution' has no final answer"):
        load_benchmark(path)


def test_later_row_missing_the_column(tmp_path):
    path = _jsonl(tmp_path / "m.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "b"}])
    with pytest.raises(InputError, match=r"m\.jsonl:2: missing column 'answer'"):
        load_benchmark(path)
