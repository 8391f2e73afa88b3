"""Benchmark files in the layouts they are published in; unknown layouts fail with the columns found.

The publication-style tests use rows shaped exactly as their publishers write them (GSM8K,
OlympiadBench, AI-MO/aimo-validation-amc, MATH-500) and judge responses with the real verifier.
"""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ampo_common.errors import InputError
from ampo_cache.verify import Verifier
from ampo_train.evaluation.benchmarks import BenchItem, load_benchmark
from ampo_train.evaluation.runner import verify_any


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("row,expected", [
    ({"problem": "1+1?", "answer": "2"}, BenchItem("1+1?", "2")),
    ({"question": "1+1?", "final_answer": 2}, BenchItem("1+1?", "2")),
    ({"problem": "1+1?", "gt": " 2 "}, BenchItem("1+1?", "2")),
    ({"question": "1+1?", "answer": "#### 2"}, BenchItem("1+1?", "2")),
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


@pytest.fixture(scope="module")
def verifier():
    with Verifier(workers=0) as v:  # the real verifier, in-process (math-verify included)
        yield v


def _judge(verifier, item: BenchItem, responses: list[str]) -> list[bool]:
    return [v.correct for v in verify_any(verifier, responses, [item.answers] * len(responses))]


GSM8K_ROW = {
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                "How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
              "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
}


def test_gsm8k_worked_solution_yields_the_number_after_hashes(tmp_path, verifier):
    [item] = load_benchmark(_jsonl(tmp_path / "gsm8k.jsonl", [GSM8K_ROW]))
    assert item.problem == GSM8K_ROW["question"] and item.answers == ("72",)
    assert _judge(verifier, item, ["48/2 = 24, 48 + 24 = 72. \\boxed{72}", "\\boxed{24}"]) == [True, False]


OLYMPIAD_ROW = {
    "id": 2231, "subfield": "Combinatorics", "context": None,
    "question": "Let $n$ be a positive integer. Find the smallest $k$ such that ...",
    "solution": ["Consider the graph ... so the answer is $k=2$."],
    "final_answer": ["$2$"], "is_multiple_answer": False, "unit": None, "answer_type": "Numerical", "error": None,
}


def test_olympiadbench_list_answer_yields_its_element_without_dollars(tmp_path, verifier):
    [item] = load_benchmark(_jsonl(tmp_path / "olympiad.jsonl", [OLYMPIAD_ROW]))
    assert item.answers == ("2",)  # the list's one element, $...$ stripped
    assert _judge(verifier, item, ["so $k=2$: \\boxed{2}", "\\boxed{3}"]) == [True, False]


def test_olympiadbench_several_accepted_answers_match_any(tmp_path, verifier):
    row = dict(OLYMPIAD_ROW, id=2498, question="Find all real $x$ with $x^2 = 9$ ... (give one)",
               final_answer=["$3$", "$-3$"], answer_type="Numerical")
    path = tmp_path / "olympiad.parquet"
    pq.write_table(pa.Table.from_pylist([row]), path)  # a list<string> column, as the publisher's Parquet
    [item] = load_benchmark(path)
    assert item.answers == ("3", "-3")
    assert _judge(verifier, item, ["\\boxed{3}", "\\boxed{-3}", "\\boxed{9}", "no answer here"]) == [True, True, False, False]
    verdicts = verify_any(verifier, ["\\boxed{-3}", "\\boxed{9}"], [item.answers] * 2)
    assert [(v.status, v.extracted) for v in verdicts] == [("correct", "-3"), ("wrong", "9")]


AMC_ROW = {"id": 0, "problem": "What is the value of $3^3$? ...", "answer": 27.0,
           "url": "https://artofproblemsolving.com/wiki/index.php/2022_AMC_12A_Problems/Problem_1"}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_amc_number_answer_becomes_text_without_point_zero(tmp_path, verifier, fmt):
    path = tmp_path / f"amc.{fmt}"
    if fmt == "jsonl":
        path.write_text('{"id": 0, "problem": "What is the value of $3^3$? ...", "answer": 27.0, "url": "u"}\n')
    else:
        pq.write_table(pa.Table.from_pylist([AMC_ROW]), path)  # a float64 column
    [item] = load_benchmark(path)
    assert item.answers == ("27",)
    assert _judge(verifier, item, ["$3^3 = 27$, so \\boxed{27}", "\\boxed{27.0}", "\\boxed{26}"]) == [True, True, False]


def test_verifier_compares_a_point_zero_ground_truth_as_a_number(verifier):
    # Even a ground truth kept as "27.0" matches \boxed{27}: plain numbers are compared as decimals.
    assert [v.status for v in verifier.verify(["\\boxed{27}", "\\boxed{28}"], ["27.0", "27.0"])] == ["correct", "wrong"]


MATH500_ROW = {
    "problem": "If $3x + 2 = 16$, what is $x$?",
    "solution": "Subtract 2 and divide by 3: $x = \\boxed{\\frac{14}{3}}$.",
    "answer": "\\frac{14}{3}", "subject": "Algebra", "level": 2, "unique_id": "test/algebra/0.json",
}


def test_math500_answer_column_is_taken_as_written(tmp_path, verifier):
    [item] = load_benchmark(_jsonl(tmp_path / "math500.jsonl", [MATH500_ROW]))
    assert item.answers == ("\\frac{14}{3}",)
    assert _judge(verifier, item, ["\\boxed{\\frac{14}{3}}", "\\boxed{\\dfrac{14}{3}}", "\\boxed{\\frac{3}{14}}"]) == \
        [True, True, False]


def test_dollar_delimiters_are_stripped_from_a_text_answer(tmp_path):
    rows = [{"problem": "half?", "answer": "$\\frac{1}{2}$"}, {"problem": "x?", "answer": "$$x^2$$"},
            {"problem": "money?", "answer": "$5"}]  # a lone leading $ is currency, kept
    assert [i.answers for i in load_benchmark(_jsonl(tmp_path / "d.jsonl", rows))] == \
        [("\\frac{1}{2}",), ("x^2",), ("$5",)]


@pytest.mark.parametrize("row,message", [
    ({"question": "q", "final_answer": []}, r"l\.jsonl:1: column 'final_answer' is an empty list"),
    ({"question": "q", "final_answer": ["$$"]}, r"l\.jsonl:1: empty 'final_answer\[0\]'"),
    ({"question": "q", "answer": "worked but no number\n####"}, r"l\.jsonl:1: empty 'answer'"),
    ({"question": "q", "final_answer": [{"x": 1}]}, r"l\.jsonl:1: column 'final_answer\[0\]' should be text, got dict"),
])
def test_unusable_answers_name_the_row(tmp_path, row, message):
    with pytest.raises(InputError, match=message):
        load_benchmark(_jsonl(tmp_path / "l.jsonl", [row]))
