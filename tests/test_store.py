import json
import multiprocessing

import duckdb
import pyarrow.dataset as ds

from ampo_cache.coverage import coverage_report
from ampo_cache.ids import prompt_id
from ampo_cache.store import TraceStore
from tests.helpers import EXAMPLE, run_cache, snapshot

# data/examples/long.jsonl: 5 problems x 3 teachers. Worked out by reading the file:
#   alpha solves all 5; beta misses 1,250*4 (says 4000) and the set (says {2}); gamma gives no
#   answer on 6/8 and solves the other 4. So 12 correct, 2 wrong, 1 no_answer.
#   Prompts solved by 3 teachers: 17+25, 3x-5=10 -> 2; by 2 teachers: 6/8, 1250*4, n^2=4 -> 3.


def imported(tmp_path):
    store = tmp_path / "store"
    result = run_cache("import", EXAMPLE, "--store", store, "--workers", "0")
    assert result.exit_code == 0, result.output
    return store


def test_import_verifies_every_trace(tmp_path):
    store = imported(tmp_path)
    result = run_cache("sql", "--store", store, "--format", "json",
                       "SELECT verify_status, count(*) AS n FROM traces GROUP BY 1 ORDER BY 1")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == [
        {"verify_status": "correct", "n": 12}, {"verify_status": "no_answer", "n": 1}, {"verify_status": "wrong", "n": 2}]


def test_importing_the_same_file_twice_adds_nothing(tmp_path):
    store = imported(tmp_path)
    before = snapshot(store)
    again = run_cache("import", EXAMPLE, "--store", store, "--workers", "0")
    assert again.exit_code == 0 and "duplicates skipped │ 15" in again.output
    assert snapshot(store) == before


def test_coverage_numbers(tmp_path):
    store = imported(tmp_path)
    result = run_cache("coverage", "--store", store, "--json")
    report = json.loads(result.output)
    assert report["teachers"] == [
        {"teacher": "alpha", "traces": 5, "correct": 5, "pass_rate": 1.0, "prompts_covered": 5},
        {"teacher": "beta", "traces": 5, "correct": 3, "pass_rate": 0.6, "prompts_covered": 3},
        {"teacher": "gamma", "traces": 5, "correct": 4, "pass_rate": 0.8, "prompts_covered": 4},
    ]
    assert (report["prompts"], report["prompts_covered"], report["prompts_uncovered"]) == (5, 5, 0)
    assert report["solved_by"] == {"0": 0, "1": 0, "2": 3, "3": 2}
    table = run_cache("coverage", "--store", store)
    assert table.exit_code == 0 and "alpha" in table.output and "60.0%" in table.output


def test_sql_formats(tmp_path):
    store = imported(tmp_path)
    query = "SELECT teacher, correct FROM coverage ORDER BY teacher"
    csv_out = run_cache("sql", "--store", store, "--format", "csv", query).output
    assert csv_out.splitlines() == ["teacher,correct", "alpha,5", "beta,3", "gamma,4"]
    table_out = run_cache("sql", "--store", store, query).output
    assert "beta" in table_out and "3" in table_out
    bad = run_cache("sql", "--store", store, "SELECT nope FROM traces")
    assert bad.exit_code == 2 and "error:" in bad.output


def test_plain_duckdb_and_pyarrow_read_the_store_without_our_code(tmp_path):
    store = imported(tmp_path)
    con = duckdb.connect(str(store / "catalog.duckdb"), read_only=True)
    assert con.execute("SELECT sum(traces) FROM coverage").fetchone()[0] == 15
    assert con.execute("SELECT count(*) FROM prompt_coverage WHERE teachers_solved = 3").fetchone()[0] == 2
    con.close()
    traces = ds.dataset(store / "traces", format="parquet").to_table()
    assert traces.num_rows == 15 and traces.column("correct").to_pylist().count(True) == 12


def test_lookup_returns_correct_traces_by_teacher_shortest_first(tmp_path):
    store = TraceStore.open(imported(tmp_path))
    index = store.index()
    sum_id, frac_id, set_id = (prompt_id(p) for p in ("What is 17 + 25?", "Simplify 6/8.", "Which integers n satisfy n^2 = 4? Give the set."))
    found = index.lookup([sum_id, frac_id, set_id, "0000000000000000"])
    assert [t.teacher for t in found[sum_id]] == ["alpha", "beta", "gamma"]
    assert [t.teacher for t in found[frac_id]] == ["alpha", "beta"]  # gamma gave no answer
    assert [t.teacher for t in found[set_id]] == ["alpha", "gamma"]  # beta was wrong
    assert found["0000000000000000"] == []
    assert found[frac_id][1].text.endswith("\\boxed{0.75}")
    # limiting the index to some prompts keeps only those
    assert len(store.index(prompt_ids=[sum_id])) == 1 and sum_id in store.index(prompt_ids=[sum_id])


def _lookup_in_child(root, pid, queue):
    found = TraceStore.open(root).index().lookup([pid])[pid]
    queue.put(sorted(t.teacher for t in found))


def test_lookup_from_several_processes_at_once(tmp_path):
    root = imported(tmp_path)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    pid = prompt_id("What is 17 + 25?")
    children = [ctx.Process(target=_lookup_in_child, args=(root, pid, queue)) for _ in range(3)]
    for child in children:
        child.start()
    results = [queue.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert results == [["alpha", "beta", "gamma"]] * 3
    assert len(list((root / "index").glob("correct-*.arrow"))) == 1


def test_index_is_rebuilt_when_the_store_grows(tmp_path):
    root = imported(tmp_path)
    TraceStore.open(root).index()
    extra = tmp_path / "more.jsonl"
    extra.write_text(json.dumps({"problem": "What is 2 + 2?", "answer": "4", "teacher": "delta", "trace": "\\boxed{4}"}) + "\n")
    assert run_cache("import", extra, "--store", root, "--workers", "0").exit_code == 0
    pid = prompt_id("What is 2 + 2?")
    assert [t.teacher for t in TraceStore.open(root).index().lookup([pid])[pid]] == ["delta"]
    assert coverage_report(TraceStore.open(root))["prompts"] == 6


def test_corrupt_shard_is_reported_with_its_path(tmp_path):
    root = imported(tmp_path)
    shard = sorted((root / "traces").glob("part-2*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    result = run_cache("coverage", "--store", root)
    assert result.exit_code == 2
    assert str(shard) in result.output and "corrupt or truncated" in result.output


def _create_in_child(root, barrier):
    barrier.wait()
    TraceStore.create_or_open(root)


def test_builders_creating_one_new_store_at_once_all_succeed(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    children = [ctx.Process(target=_create_in_child, args=(tmp_path / "new", barrier)) for _ in range(4)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=60)
    assert [c.exitcode for c in children] == [0, 0, 0, 0]
    assert len(list((tmp_path / "new" / "traces").glob("part-*.parquet"))) == 1  # one layout, not four
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no drafts left behind
