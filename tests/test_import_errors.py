import json

import pytest

from tests.helpers import EXAMPLE, run_cache, snapshot

GOOD = {"problem": "What is 1 + 1?", "answer": "2", "teacher": "t", "trace": "\\boxed{2}"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "store"
    assert run_cache("import", EXAMPLE, "--store", root, "--workers", "0").exit_code == 0
    return root


def assert_rejected(store, path, *needles, extra=()):
    before = snapshot(store)
    result = run_cache("import", path, "--store", store, "--workers", "0", *extra)
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and line.startswith("error:"), line
    for needle in needles:
        assert needle in line, line
    assert snapshot(store) == before  # nothing written, not even the good rows before the bad one


def test_missing_column(tmp_path, store):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD, {k: v for k, v in GOOD.items() if k != "teacher"}])
    assert_rejected(store, path, f"{path}:2", "missing column 'teacher'", "columns found: problem, answer, trace")


def test_malformed_json_line(tmp_path, store):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + '{"problem": "2+2", "answer": 4,\n')
    assert_rejected(store, path, f"{path}:2", "malformed JSON")


def test_empty_answer(tmp_path, store):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD, GOOD, {**GOOD, "problem": "3+3", "answer": "  "}])
    assert_rejected(store, path, f"{path}:3", "empty 'answer'")


def test_not_utf8(tmp_path, store):
    path = tmp_path / "x.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"problem": "caf\xe9", "answer": "1"}\n')
    assert_rejected(store, path, f"{path}:2", "not valid UTF-8")


def test_csv_with_a_short_row(tmp_path, store):
    path = tmp_path / "x.csv"
    path.write_text("problem,answer,teacher,trace\n\"1+1\",2,t,\\boxed{2}\n\"2+2\",4,t\n")
    assert_rejected(store, path, f"{path}:3", "expected 4 fields")


def test_conflicting_answers_for_one_problem(tmp_path, store):
    path = write_jsonl(tmp_path / "x.jsonl", [{**GOOD, "problem": "What is 17 + 25?", "answer": "43"}])
    assert_rejected(store, path, f"{path}:1", "'43' differs from '42'")


def test_bad_label(tmp_path, store):
    path = write_jsonl(tmp_path / "x.jsonl", [{**GOOD, "ok": "maybe"}])
    assert_rejected(store, path, f"{path}:1", "correctness label", extra=("--label-col", "ok"))


def test_trust_labels_needs_a_label_column(tmp_path, store):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD])
    assert_rejected(store, path, "--trust-labels", extra=("--trust-labels",))


def test_unknown_file_type(tmp_path, store):
    path = tmp_path / "x.txt"
    path.write_text("hello")
    assert_rejected(store, path, "unknown file type '.txt'")


def test_csv_parquet_question_column_and_labels(tmp_path, store):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": "What is 5 * 5?", "answer": "25", "teacher": "t", "trace": "\\boxed{25}", "ok": True},
            {"question": "What is 5 * 5?", "answer": "25", "teacher": "u", "trace": "\\boxed{24}", "ok": True}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    result = run_cache("import", tmp_path / "x.parquet", "--store", store, "--workers", "0", "--label-col", "ok")
    assert result.exit_code == 0, result.output
    out = run_cache("sql", "--store", store, "--format", "csv",
                    "SELECT teacher, correct, source_label FROM traces WHERE teacher IN ('t','u') ORDER BY teacher").output
    assert out.splitlines() == ["teacher,correct,source_label", "t,True,True", "u,False,True"]
    # --trust-labels takes the source's word instead of verifying
    csv_path = tmp_path / "y.csv"
    csv_path.write_text("problem,answer,teacher,trace,ok\nWhat is 6 * 6?,36,v,\\boxed{35},1\n")
    result = run_cache("import", csv_path, "--store", store, "--label-col", "ok", "--trust-labels")
    assert result.exit_code == 0, result.output
    out = run_cache("sql", "--store", store, "--format", "csv",
                    "SELECT correct, verify_status FROM traces WHERE teacher = 'v'").output
    assert out.splitlines() == ["correct,verify_status", "True,trusted"]


def test_bad_input_does_not_create_a_store(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{**GOOD, "answer": ""}])
    result = run_cache("import", path, "--store", tmp_path / "new", "--workers", "0")
    assert result.exit_code == 2 and not (tmp_path / "new").exists()
