"""Export (verl, long) round trips, export filters, and merging stores built apart."""

import json

import pyarrow.parquet as pq
import pytest

from ampo_cache.export import VERL_SCHEMA
from ampo_cache.ids import prompt_id
from ampo_cache.schema import TRACES
from ampo_cache.store import TraceStore
from tests.helpers import EXAMPLE, run_cache

EXAMPLES = EXAMPLE.parent
SUM = prompt_id("What is 17 + 25?")


def trace_set(store) -> set:
    with TraceStore.open(store).connect() as con:
        return set(con.execute("SELECT prompt_id, teacher, text, correct FROM traces").fetchall())


def ok(*args):
    result = run_cache(*args)
    assert result.exit_code == 0, result.output
    return result.output


def failed(*args):
    result = run_cache(*args)
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and line.startswith("error:"), line
    return line


def imported(root, path=EXAMPLE, *extra):
    ok("import", path, "--store", root, "--workers", "0", *extra)
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return imported(tmp_path_factory.mktemp("src") / "store")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------ export


@pytest.mark.parametrize("fmt, name", [("verl", "out.parquet"), ("long", "out.parquet"), ("long", "out.jsonl"),
                                       ("long", "out.csv")])
def test_round_trip(tmp_path, store, fmt, name):
    out = tmp_path / name
    ok("export", "--store", store, "--out", out, "--format", fmt)
    again = imported(tmp_path / "again", out)
    assert trace_set(again) == trace_set(store)
    assert len(trace_set(store)) == 15


@pytest.mark.parametrize("name", ["out.csv", "out.jsonl", "verl.parquet"])
def test_round_trip_keeps_the_source_fields(tmp_path, name):
    source = imported(tmp_path / "src", EXAMPLES / "nested_ampo.parquet")
    out = tmp_path / name
    ok("export", "--store", source, "--out", out, "--format", "verl" if name.startswith("verl") else "long")
    again = imported(tmp_path / "again", out)
    query = "SELECT prompt_id, teacher, text, correct, data_source, index, quality_score FROM traces"
    with TraceStore.open(source).connect() as a, TraceStore.open(again).connect() as b:
        before, after = set(a.execute(query).fetchall()), set(b.execute(query).fetchall())
    if name.startswith("verl"):  # verl carries our own quality_score and index, and data_source = prompts.source
        strip = lambda rows: {r[:4] for r in rows}  # noqa: E731
        assert strip(before) == strip(after)
    else:
        assert before == after and len(after) == 15


def test_verl_layout_and_quality_score(tmp_path, store):
    out = tmp_path / "verl.parquet"
    ok("export", "--store", store, "--out", out)
    table = pq.read_table(out)
    assert table.schema.equals(VERL_SCHEMA)
    rows = {r["prompt"][0]["content"]: r for r in table.to_pylist()}
    assert len(rows) == 5 and sorted(r["extra_info"]["index"] for r in rows.values()) == [0, 1, 2, 3, 4]
    row = rows["Simplify 6/8."]
    assert row["prompt"] == [{"role": "user", "content": "Simplify 6/8."}]
    assert row["reward_model"] == {"ground_truth": "\\frac{3}{4}", "style": "rule"}
    assert row["ability"] == "math" and row["data_source"] == "long.jsonl"
    assert row["extra_info"]["num_teacher_models"] == 3
    # alpha and beta are correct (beta's is the shorter), gamma gave no answer: 0.0, last
    alpha, beta, gamma = (len(t) for t in ("Divide both by 2: \\frac{3}{4}. \\boxed{\\frac{3}{4}}",
                                          "6/8 = 0.75, so \\boxed{0.75}", "I am not sure."))
    assert [(t["source"], t["quality_score"]) for t in row["target_lst"]] == [
        ("beta", 1.0), ("alpha", round(beta / alpha, 4)), ("gamma", 0.0)]
    for r in rows.values():
        scores = [t["quality_score"] for t in r["target_lst"]]
        assert scores == sorted(scores, reverse=True) and scores[0] == 1.0


def test_export_filters(tmp_path, store):
    out = tmp_path / "v.parquet"
    ok("export", "--store", store, "--out", out, "--only-correct", "--max-per-prompt", "1")
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 5 and all(len(r["target_lst"]) == 1 and r["target_lst"][0]["quality_score"] == 1.0
                                  for r in rows)
    ok("export", "--store", store, "--out", out, "--teachers", "beta,gamma", "--only-correct")
    rows = pq.read_table(out).to_pylist()
    # beta solves 3, gamma 4 of the 5; every prompt is solved by one of them
    assert sum(len(r["target_lst"]) for r in rows) == 7 and len(rows) == 5
    assert {t["source"] for r in rows for t in r["target_lst"]} == {"beta", "gamma"}
    out_long = tmp_path / "l.jsonl"
    ok("export", "--store", store, "--out", out_long, "--format", "long", "--where", "num_chars < 20 AND NOT correct")
    rows = [json.loads(line) for line in out_long.read_text().splitlines()]
    assert [(r["teacher"], r["text"]) for r in rows] == [("gamma", "I am not sure.")]
    assert set(TRACES.names) | {"problem", "answer", "prompt_source"} == set(rows[0])
    ok("export", "--store", store, "--out", out_long, "--format", "long", "--max-per-prompt", "2")
    rows = [json.loads(line) for line in out_long.read_text().splitlines()]
    assert len(rows) == 10 and sum(r["prompt_id"] == SUM for r in rows) == 2


def test_export_errors(tmp_path, store):
    assert "--where" in failed("export", "--store", store, "--out", tmp_path / "v.parquet", "--where", "nope > 1")
    assert "name the file *.parquet" in failed("export", "--store", store, "--out", tmp_path / "v.jsonl")
    assert "unknown format 'csv'" in failed("export", "--store", store, "--out", tmp_path / "v.csv", "--format", "csv")
    assert "not a trace store" in failed("export", "--store", tmp_path / "none", "--out", tmp_path / "v.parquet")
    assert list(tmp_path.iterdir()) == []  # nothing left behind, not even temporaries


# ------------------------------------------------------------------ merge


EXTRA = {"problem": "What is 2 + 2?", "answer": "4", "teacher": "delta", "trace": "\\boxed{4}"}


def test_merge_drops_and_reports_duplicates(tmp_path, store):
    other = imported(tmp_path / "b", EXAMPLE)
    imported(other, write_jsonl(tmp_path / "more.jsonl", [EXTRA]))
    imported(other, EXAMPLES / "nested_ampo.parquet")  # same traces again: nothing added, no new keys
    out = ok("merge", store, other, "--into", tmp_path / "merged")
    table = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in out.splitlines() if line.count("│") == 3}
    assert table["traces read"] == "31" and table["traces written"] == "16"
    assert table["trace duplicates dropped"] == "15" and table["prompt duplicates dropped"] == "5"
    merged = tmp_path / "merged"
    assert trace_set(merged) == trace_set(store) | trace_set(other)
    report = json.loads(ok("coverage", "--store", merged, "--json"))
    assert report["prompts"] == 6 and sum(t["traces"] for t in report["teachers"]) == 16
    # the catalog points at the merged store's own files, and no temporary is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "merged", "more.jsonl"]
    ok("sql", "--store", merged, "SELECT count(*) FROM traces")


def test_merge_keeps_extra_columns(tmp_path):
    a = imported(tmp_path / "a", EXAMPLES / "nested_ampo.parquet")
    b = imported(tmp_path / "b", write_jsonl(tmp_path / "more.jsonl", [EXTRA]))
    ok("merge", b, a, "--into", tmp_path / "m")
    out = ok("sql", "--store", tmp_path / "m", "--format", "csv",
             "SELECT count(quality_score), count(index), count(*) FROM traces")
    assert out.splitlines()[1] == "15,15,16"


def test_conflicting_verdicts_fail_unless_prefer_newest(tmp_path, store):
    # the same key (17 + 25, alpha, sample 0) with the same text, but labelled wrong and trusted
    trace = "17 + 25: 7 + 5 = 12, write 2 carry 1; 1 + 2 + 1 = 4. \\boxed{42}"
    src = write_jsonl(tmp_path / "t.jsonl", [{"problem": "What is 17 + 25?", "answer": "42", "teacher": "alpha",
                                             "trace": trace, "ok": False}])
    newer = imported(tmp_path / "newer", src, "--label-col", "ok", "--trust-labels")
    line = failed("merge", store, newer, "--into", tmp_path / "m")
    assert f"trace (prompt {SUM}, teacher alpha, sample 0)" in line
    assert f"{store}: correct" in line and f"{newer}: trusted" in line and "--prefer newest" in line
    assert not (tmp_path / "m").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["newer", "t.jsonl"]
    out = ok("merge", store, newer, "--into", tmp_path / "m", "--prefer", "newest")
    assert "trace conflicts (newest kept)" in out
    with TraceStore.open(tmp_path / "m").connect() as con:
        assert con.execute(f"SELECT correct, verify_status FROM traces WHERE prompt_id = '{SUM}' AND teacher = 'alpha'"
                           ).fetchall() == [(False, "trusted")]
        assert con.execute("SELECT count(*) FROM traces").fetchall() == [(15,)]


def test_conflicting_texts_and_answers(tmp_path, store):
    other_text = write_jsonl(tmp_path / "t.jsonl", [{"problem": "What is 17 + 25?", "answer": "42",
                                                     "teacher": "alpha", "trace": "\\boxed{42}"}])
    b = imported(tmp_path / "b", other_text)
    line = failed("merge", store, b, "--into", tmp_path / "m")
    assert "teacher alpha, sample 0): differs between stores" in line and "1 trace key(s) conflict" in line
    other_answer = write_jsonl(tmp_path / "a.jsonl", [{"problem": "What is 17 + 25?", "answer": "43",
                                                       "teacher": "x", "trace": "\\boxed{43}"}])
    c = imported(tmp_path / "c", other_answer)
    line = failed("merge", store, c, "--into", tmp_path / "m")
    assert f"prompt {SUM}: answers differ between stores ({store}: '42'; {c}: '43')" in line
    ok("merge", store, c, "--into", tmp_path / "m", "--prefer", "newest")
    with TraceStore.open(tmp_path / "m").connect() as con:
        assert con.execute(f"SELECT answer FROM prompts WHERE prompt_id = '{SUM}'").fetchall() == [("43",)]


def test_merge_refuses_an_existing_store(tmp_path, store):
    assert "exists and is not empty" in failed("merge", store, "--into", store)
    assert "not a trace store" in failed("merge", tmp_path / "nothing", "--into", tmp_path / "m")
