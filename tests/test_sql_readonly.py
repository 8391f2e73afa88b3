"""`ampo-cache sql` is an inspection command: queries read the store; writing needs --allow-writes."""

import hashlib
import json

import pytest

from tests.helpers import EXAMPLE, run_cache


def _tree(root):
    """Every file under ``root`` with a hash of its bytes (the catalog included)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = tmp_path_factory.mktemp("sql") / "store"
    assert run_cache("import", EXAMPLE, "--store", store, "--workers", "0").exit_code == 0
    return store


def _refused(result, *needles):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert all(n in lines[0] for n in needles), lines[0]


@pytest.mark.parametrize("statement,kind", [
    ("COPY (SELECT * FROM traces) TO '{target}'", "COPY"),
    ("COPY (SELECT * FROM traces) TO '{store}/traces/part-injected.parquet'", "COPY"),  # into the store itself
    ("CREATE TABLE t AS SELECT * FROM prompts", "CREATE"),
    ("CREATE OR REPLACE VIEW traces AS SELECT 1 AS x", "CREATE"),
    ("EXPORT DATABASE '{target}'", "EXPORT"),
    ("ATTACH '{target}' AS other", "ATTACH"),
    ("SELECT 1; DROP VIEW traces", "DROP"),
])
def test_statements_that_write_are_refused_in_one_line(store, tmp_path, statement, kind):
    target = tmp_path / "out.csv"
    before = _tree(store)
    result = run_cache("sql", "--store", store, statement.format(target=target, store=store))
    _refused(result, f"sql: {kind} statements are not run", "--allow-writes")
    assert not target.exists() and _tree(store) == before


def test_reading_files_outside_the_store_is_refused(store, tmp_path):
    result = run_cache("sql", "--store", store, f"SELECT * FROM read_json_auto('{EXAMPLE}')")
    _refused(result, "Permission Error", str(EXAMPLE), "reads only the store's files")


def test_queries_still_read_the_store_through_the_views(store):
    result = run_cache("sql", "--store", store, "--format", "json",
                       "WITH t AS (SELECT teacher FROM traces) SELECT teacher, count(*) AS n FROM t GROUP BY 1 ORDER BY 1")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == [{"teacher": t, "n": 5} for t in ("alpha", "beta", "gamma")]
    described = run_cache("sql", "--store", store, "--format", "json", "DESCRIBE prompt_coverage")
    assert described.exit_code == 0 and "teachers_solved" in described.output


def test_allow_writes_runs_copy_to(store, tmp_path):
    target = tmp_path / "coverage.csv"
    before = _tree(store)
    result = run_cache("sql", "--store", store, "--allow-writes", f"COPY (SELECT * FROM coverage ORDER BY 1) TO '{target}'")
    assert result.exit_code == 0, result.output
    assert target.read_text().splitlines() == ["teacher,traces,correct,pass_rate,prompts_covered",
                                               "alpha,5,5,1.0,5", "beta,5,3,0.6,3", "gamma,5,4,0.8,4"]
    assert _tree(store) == before
