"""Import in every layout: the example files all hold long.jsonl's traces, so each must store the same."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ampo_cache.ids import prompt_id
from ampo_cache.prompts import load_prompts
from ampo_cache.store import TraceStore
from tests.helpers import EXAMPLE, run_cache, snapshot

EXAMPLES = EXAMPLE.parent


def trace_set(store) -> set:
    with TraceStore.open(store).connect() as con:
        return set(con.execute("SELECT prompt_id, teacher, text, correct FROM traces").fetchall())


def import_ok(store, path, *extra):
    result = run_cache("import", path, "--store", store, "--workers", "0", *extra)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def long_set(tmp_path_factory):
    store = tmp_path_factory.mktemp("long") / "store"
    out = import_ok(store, EXAMPLE)
    assert "layout: long" in out and "(detected)" in out
    found = trace_set(store)
    assert len(found) == 15
    return found


@pytest.mark.parametrize("name, detected", [
    ("nested_ampo.parquet", "nested (one row per prompt, traces in 'target_lst'"),
    ("wide.jsonl", "wide (one row per prompt, teacher columns: trace_alpha -> alpha"),
    ("verl.parquet", "nested (one row per prompt, traces in 'target_lst'"),
])
def test_each_layout_stores_the_same_traces_as_long(tmp_path, long_set, name, detected):
    out = import_ok(tmp_path / "store", EXAMPLES / name)
    assert f"layout: {detected}" in out and "(detected)" in out
    assert trace_set(tmp_path / "store") == long_set


def test_luffy_target_needs_a_teacher_name(tmp_path, long_set):
    path = EXAMPLES / "nested_luffy.parquet"
    refused = run_cache("import", path, "--store", tmp_path / "store", "--workers", "0")
    assert refused.exit_code == 2 and refused.output.strip().count("\n") == 0
    assert "name no teacher" in refused.output and "--teacher NAME" in refused.output
    assert not (tmp_path / "store").exists()
    out = import_ok(tmp_path / "store", path, "--teacher", "alpha")
    assert "traces in 'target'; teacher: 'alpha' (--teacher)" in out
    assert trace_set(tmp_path / "store") == {t for t in long_set if t[1] == "alpha"}


def test_source_fields_are_kept_as_columns(tmp_path):
    store = tmp_path / "store"
    import_ok(store, EXAMPLES / "nested_ampo.parquet")
    result = run_cache("sql", "--store", store, "--format", "json",
                       "SELECT data_source, index, teacher, quality_score FROM traces "
                       "WHERE prompt_id = '" + prompt_id("What is 17 + 25?") + "' ORDER BY teacher")
    assert json.loads(result.output) == [
        {"data_source": "ampo-examples", "index": 0, "teacher": "alpha", "quality_score": 0.5079},
        {"data_source": "ampo-examples", "index": 0, "teacher": "beta", "quality_score": 1.0},
        {"data_source": "ampo-examples", "index": 0, "teacher": "gamma", "quality_score": 0.5246},
    ]
    # a long file after it, without those fields, reads as one table (nulls there)
    import_ok(store, EXAMPLE)
    result = run_cache("sql", "--store", store, "--format", "csv",
                       "SELECT count(*) FILTER (WHERE quality_score IS NULL), count(*) FROM traces")
    assert result.output.splitlines()[1] == "0,15"  # the same traces: all duplicates, nothing added


def test_wide_with_named_columns_struct_cells_and_gaps(tmp_path):
    rows = [
        {"question": "What is 2 + 3?", "reward_model": {"ground_truth": "5", "style": "rule"},
         "m1": {"text": "\\boxed{5}", "quality_score": 0.9}, "m2": "it is 6", "extra_info": {"index": 7}},
        {"question": "What is 4 + 4?", "reward_model": {"ground_truth": "8", "style": "rule"},
         "m1": None, "m2": "so \\boxed{8}", "extra_info": {"index": 8}},
    ]
    path = tmp_path / "wide.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    store = tmp_path / "store"
    out = import_ok(store, path, "--teacher-cols", "m1,m2")
    assert "layout: wide (one row per prompt, teacher columns: m1, m2) (detected)" in out
    result = run_cache("sql", "--store", store, "--format", "csv",
                       "SELECT teacher, correct, quality_score, index FROM traces ORDER BY index, teacher")
    assert result.output.splitlines() == ["teacher,correct,quality_score,index", "m1,True,0.9,7", "m2,False,,7",
                                          "m2,True,,8"]


def test_glob_names_teachers_by_the_star(tmp_path, long_set):
    path = tmp_path / "w.jsonl"
    rows = [json.loads(line) for line in (EXAMPLES / "wide.jsonl").read_text().splitlines()]
    path.write_text("".join(json.dumps({k.replace("trace_", "out-"): v for k, v in r.items()}) + "\n" for r in rows))
    out = import_ok(tmp_path / "store", path, "--layout", "wide", "--teacher-cols", "out-*")
    assert "out-beta -> beta" in out and "(detected)" not in out
    assert trace_set(tmp_path / "store") == long_set


def test_chat_prompt_takes_the_last_user_turn(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "Think step by step."},
                        {"role": "user", "content": "What is 17 + 25?"}],
             "reward_model": {"ground_truth": "42"}, "target_lst": [{"content": "\\boxed{42}", "source": "s"}]}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    import_ok(tmp_path / "store", path)
    assert trace_set(tmp_path / "store") == {(prompt_id("What is 17 + 25?"), "s", "\\boxed{42}", True)}


def test_unrecognised_layout_fails_with_one_line(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"foo": 1, "bar": "x"}) + "\n")
    result = run_cache("import", path, "--store", tmp_path / "store", "--workers", "0")
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line and line.startswith("error:"), line
    assert "cannot recognise the layout (columns found: foo, bar)" in line
    for expected in ("long (problem, answer, teacher, trace)", "nested (", "wide ("):
        assert expected in line
    assert not (tmp_path / "store").exists()


def test_forced_layout_that_does_not_fit(tmp_path):
    store = tmp_path / "store"
    import_ok(store, EXAMPLE)
    before = snapshot(store)
    for args, needle in [(("--layout", "long"), "row 0: missing column 'problem'"),
                         (("--layout", "wide"), "no teacher columns match 'trace_*'"),
                         (("--layout", "sideways"), "unknown layout 'sideways'")]:
        result = run_cache("import", EXAMPLES / "nested_ampo.parquet", "--store", store, "--workers", "0", *args)
        assert result.exit_code == 2 and needle in result.output, result.output
        assert result.output.strip().count("\n") == 0
    result = run_cache("import", EXAMPLE, "--store", store, "--workers", "0", "--layout", "nested")
    assert result.exit_code == 2 and "no list of traces (target_lst or target)" in result.output
    assert snapshot(store) == before


def test_bad_nested_item_is_located(tmp_path):
    path = tmp_path / "x.jsonl"
    rows = [{"problem": "1+1", "answer": "2", "target_lst": [{"content": "\\boxed{2}", "source": "a"}]},
            {"problem": "2+2", "answer": "4", "target_lst": [{"content": "4", "source": "a"}, {"source": "b"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_cache("import", path, "--store", tmp_path / "store", "--workers", "0")
    assert result.exit_code == 2
    assert f"{path}:2: target_lst[1] has no trace text" in result.output
    assert not (tmp_path / "store").exists()


def test_load_prompts_reads_the_verl_layout():
    ours = load_prompts(EXAMPLE)
    for name in ("verl.parquet", "nested_ampo.parquet", "wide.jsonl"):
        theirs = load_prompts(EXAMPLES / name)
        assert {(p.prompt_id, p.problem, p.answer) for p in theirs} == {(p.prompt_id, p.problem, p.answer) for p in ours}
    verl = load_prompts(EXAMPLES / "verl.parquet")
    assert all(p.extra.get("ability") == "math" and p.extra.get("data_source") == "ampo-examples" for p in verl)
    assert "prompt" not in verl[0].extra and "reward_model" not in verl[0].extra
