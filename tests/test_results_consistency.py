"""The committed result tables come from the committed data: each docs/results/REPORT.md, and every
results table quoted in the README and docs/results.md, is what `tinyworld.experiment.markdown_table`
(the function the experiment writes REPORT.md with) renders from docs/results/REPORT.json. So the
figures a reader sees and the data beside them are one run's (issue 31)."""

import json
from pathlib import Path

import pytest

from tinyworld.experiment import markdown_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
QUOTING = [ROOT / "README.md", ROOT / "docs" / "results.md"]  # pages that quote results tables
REPORTS = sorted(p.stem for p in RESULTS.glob("*.json"))
# Reports known not to match their tables (none: each entry is an xfail that must still fail).
STALE: dict[str, str] = {}


def _report(stem: str) -> dict:
    return json.loads((RESULTS / f"{stem}.json").read_text())


def _heading_line() -> str:
    return markdown_table(_report(REPORTS[0])).splitlines()[0]


def quoted_tables(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every results table in a markdown page: the lines from a row equal to
    the results table's heading to the last row of that table."""
    lines = path.read_text().splitlines()
    heading = _heading_line()
    tables = []
    for i, line in enumerate(lines):
        if line.strip() == heading:
            end = i
            while end + 1 < len(lines) and lines[end + 1].startswith("|"):
                end += 1
            tables.append((i + 1, "\n".join(l.strip() for l in lines[i : end + 1]) + "\n"))
    return tables


def _labels(table: str) -> set[str]:
    return {row.split("|")[1].strip() for row in table.splitlines()[2:]}


def _marks(stem: str):
    return [pytest.mark.xfail(strict=True, reason=STALE[stem])] if stem in STALE else []


def test_there_is_data_and_the_pages_quote_tables():
    assert {"results", "ablation", "beyond"} <= set(REPORTS)
    assert quoted_tables(ROOT / "README.md") and quoted_tables(ROOT / "docs" / "results.md")


@pytest.mark.parametrize("stem", [pytest.param(s, marks=_marks(s)) for s in REPORTS])
def test_report_table_is_rendered_from_its_json(stem):
    assert (RESULTS / f"{stem}.md").read_text() == markdown_table(_report(stem)), \
        f"docs/results/{stem}.md is not what markdown_table renders from docs/results/{stem}.json"


@pytest.mark.parametrize("stem", [pytest.param(s, marks=_marks(s)) for s in REPORTS])
def test_tables_quoted_in_the_docs_are_rendered_from_the_json(stem):
    expected = markdown_table(_report(stem))
    quoted = [(path, line, table) for path in QUOTING for line, table in quoted_tables(path)
              if _labels(table) == _labels(expected)]
    for path, line, table in quoted:
        assert table == expected, f"{path.relative_to(ROOT)}:{line}: the table differs from docs/results/{stem}.json's"


def test_every_quoted_table_has_its_json():
    """A quoted results table whose rows are no report's is a table without committed data."""
    known = {frozenset(_labels(markdown_table(_report(stem)))): stem for stem in REPORTS}
    for path in QUOTING:
        for line, table in quoted_tables(path):
            assert frozenset(_labels(table)) in known, \
                f"{path.relative_to(ROOT)}:{line}: rows {sorted(_labels(table))} match no docs/results/*.json"


def test_a_changed_figure_is_caught(tmp_path):
    """The comparison can fail: one figure changed in a rendered table is a different table."""
    table = markdown_table(_report("ablation"))
    page = tmp_path / "page.md"
    page.write_text("text\n\n" + table.replace("0.494", "0.495", 1) + "\nmore text\n")
    [(line, quoted)] = quoted_tables(page)
    assert line == 3 and _labels(quoted) == _labels(table) and quoted != table
