"""Write the example files under data/examples/ in every layout ``import`` reads.

All of them hold the problems and traces of ``long.jsonl`` (5 problems x 3 teachers), so a test
can import each and expect the same traces:

    long.jsonl            one row per trace (hand-written; the source of the others)
    nested_ampo.parquet   one row per prompt, ``target_lst`` [{content, quality_score, role, source}],
                          chat-list ``prompt``, ``reward_model``, ``extra_info``: the AMPO reference's shape
    nested_luffy.parquet  LUFFY's shape: ``target`` [{role, content}] without teacher names; it holds
                          teacher alpha's traces (import with ``--teacher alpha``)
    wide.jsonl            one row per prompt, columns trace_alpha, trace_beta, trace_gamma
    verl.parquet          what ``ampo-cache export --format verl`` writes for a store of long.jsonl

    python -m ampo_cache.examples            # rewrite them (deterministic)
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

FOLDER = Path(__file__).resolve().parents[1] / "data" / "examples"
SOURCE = "ampo-examples"


def _by_problem(rows: list[dict]) -> list[tuple[str, str, list[dict]]]:
    problems: dict[str, tuple[str, list[dict]]] = {}
    for row in rows:
        problems.setdefault(row["problem"], (row["answer"], []))[1].append(row)
    return [(problem, answer, traces) for problem, (answer, traces) in problems.items()]


def _chat(problem: str) -> list[dict]:
    return [{"role": "user", "content": problem}]


def write_examples(folder: Path = FOLDER) -> list[Path]:
    rows = [json.loads(line) for line in (folder / "long.jsonl").read_text().splitlines() if line.strip()]
    grouped = _by_problem(rows)
    written = []

    ampo = []
    for i, (problem, answer, traces) in enumerate(grouped):
        shortest = min(len(t["trace"]) for t in traces)
        ampo.append({
            "data_source": SOURCE, "prompt": _chat(problem), "ability": "math",
            "reward_model": {"ground_truth": answer, "style": "rule"},
            "extra_info": {"index": i, "num_teacher_models": len({t["teacher"] for t in traces})},
            "target_lst": [{"content": t["trace"], "quality_score": round(shortest / max(len(t["trace"]), 1), 4),
                            "role": "assistant", "source": t["teacher"]} for t in traces],
        })
    written.append(folder / "nested_ampo.parquet")
    pq.write_table(pa.Table.from_pylist(ampo), written[-1])

    luffy = [{"data_source": SOURCE, "prompt": _chat(problem), "ability": "math",
              "reward_model": {"ground_truth": answer, "style": "rule"}, "extra_info": {"index": i},
              "target": [{"role": "assistant", "content": t["trace"]} for t in traces if t["teacher"] == "alpha"]}
             for i, (problem, answer, traces) in enumerate(grouped)]
    written.append(folder / "nested_luffy.parquet")
    pq.write_table(pa.Table.from_pylist(luffy), written[-1])

    written.append(folder / "wide.jsonl")
    with open(written[-1], "w") as out:
        for problem, answer, traces in grouped:
            row = {"problem": problem, "answer": answer}
            row.update({f"trace_{t['teacher']}": t["trace"] for t in traces})
            out.write(json.dumps(row) + "\n")

    written.append(folder / "verl.parquet")
    _write_verl(folder / "long.jsonl", written[-1])
    return written


def _write_verl(long_file: Path, out: Path) -> None:
    from ampo_cache.export import export
    from ampo_cache.importer import import_traces
    from ampo_cache.layouts import LongLayout
    from ampo_cache.verify import Verifier

    with tempfile.TemporaryDirectory() as tmp, Verifier(workers=0) as verifier:
        import_traces(long_file, Path(tmp) / "store", LongLayout(), verifier, source=SOURCE)
        export(Path(tmp) / "store", out, "verl")


if __name__ == "__main__":
    for path in write_examples():
        print(path)
