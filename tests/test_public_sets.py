"""Public trace sets as their publishers ship them: OpenR1-Math-220k's rows in a dataset folder of
Parquet shards, per-teacher subsets joined on the problem, and our verifier's agreement with the
publisher's own correctness labels. Every row here is written by the test in the publisher's shape
(OpenR1-Math-220k's dataset card: column names, order and Arrow types)."""

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ampo_cache.agreement import agreement_rows
from ampo_cache.ids import prompt_id
from ampo_cache.importer import import_sources
from ampo_cache.inputs import open_sources
from ampo_cache.store import TraceStore
from ampo_cache.verify import Verifier
from tests.helpers import run_cache, snapshot

OPENR1 = pa.schema([
    ("problem", pa.string()), ("solution", pa.string()), ("answer", pa.string()), ("problem_type", pa.string()),
    ("question_type", pa.string()), ("source", pa.string()), ("uuid", pa.string()),
    ("is_reasoning_complete", pa.list_(pa.bool_())), ("generations", pa.list_(pa.string())),
    ("correctness_math_verify", pa.list_(pa.bool_())), ("correctness_llama", pa.list_(pa.bool_())),
    ("finish_reasons", pa.list_(pa.string())), ("correctness_count", pa.int64()),
    ("messages", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
])

SUM10 = "Find the sum of the first $10$ positive integers."
LINEAR = "Solve for $x$: $2x + 3 = 11$."
LOWEST = "Write $\\frac{6}{8}$ in lowest terms."
POWER = "Compute $3^4$."


def r1(thinking: str, final: str) -> str:
    """A DeepSeek-R1 generation: the reasoning in <think>, then the written answer."""
    return f"<think>\n{thinking}\n</think>\n\n{final}"


SUM10_RIGHT = r1("Okay, so I need to find the sum of the first 10 positive integers. The formula is n(n+1)/2.\n"
                 "For n = 10 that is 10*11/2 = 55. Check by pairing: 1+10, 2+9, ..., five pairs of 11, so 55.",
                 "The sum is $\\frac{10 \\cdot 11}{2} = 55$.\n\n**Final Answer**\n\\boxed{55}")
# Cut off by the token limit mid-thought (finish reason "length"): no final answer.
SUM10_CUT = ("<think>\nOkay, let's see. The first 10 positive integers are 1, 2, 3, up to 10. Adding them one at a "
             "time: 1 + 2 = 3, 3 + 3 = 6, 6 + 4 = 10, 10 + 5 = 15, 15 + 6 = 21, 21 + 7")
LINEAR_RIGHT = r1("We have 2x + 3 = 11. Subtract 3: 2x = 8. Divide by 2: x = 4. Check: 2*4 + 3 = 11. Yes.",
                  "Subtracting $3$ and dividing by $2$ gives $x = 4$.\n\n**Final Answer**\n\\boxed{4}")
LINEAR_WRONG = r1("Move the 3 over: 2x = 11 + 3 = 14, so x = 7.",
                  "So $x = 7$.\n\n**Final Answer**\n\\boxed{7}")
LOWEST_FRAC = r1("6 and 8 share the factor 2, so 6/8 = 3/4.", "**Final Answer**\n\\boxed{\\dfrac{3}{4}}")
LOWEST_DEC = r1("6 divided by 8 is 0.75.", "**Final Answer**\n\\boxed{0.75}")
POWER_RIGHT = r1("3^2 = 9 and 9^2 = 81.", "**Final Answer**\n\\boxed{81}")


def openr1_row(problem, answer, generations, math_verify, llama, finish, source="olympiads"):
    """A row as OpenR1-Math-220k ships it (the fields we do not read filled in realistically)."""
    return {
        "problem": problem, "solution": f"The answer is ${answer}$.", "answer": answer, "problem_type": "Algebra",
        "question_type": "math-word-problem", "source": source, "uuid": f"{abs(hash(problem)) % 10**8:08d}-r1",
        "is_reasoning_complete": [r != "length" for r in (finish or ["stop"] * len(generations))],
        "generations": generations, "correctness_math_verify": math_verify, "correctness_llama": llama,
        "finish_reasons": finish, "correctness_count": sum(math_verify),
        "messages": [{"content": problem, "role": "user"}, {"content": generations[0], "role": "assistant"}],
    }


DEFAULT_ROWS = [
    openr1_row(SUM10, "55", [SUM10_RIGHT, SUM10_CUT], [True, False], None, ["stop", "length"]),
    openr1_row(LINEAR, "4", [LINEAR_RIGHT, LINEAR_WRONG], [True, False], [True, True], ["stop", "stop"]),
    openr1_row(LOWEST, "\\frac{3}{4}", [LOWEST_FRAC, LOWEST_DEC], [True, False], [True, None], None, source="cn_k12"),
]


def write_shards(folder, rows, count, split="train", suffix=""):
    """``rows`` spread over ``count`` shards named as the Hub names them."""
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(rows) // count)
    for i in range(count):
        table = pa.Table.from_pylist(rows[i * per:(i + 1) * per], schema=OPENR1)
        pq.write_table(table, folder / f"{split}-{i:05d}-of-{count:05d}{suffix}.parquet")


@pytest.fixture
def openr1(tmp_path):
    """A dataset folder shaped like the OpenR1-Math-220k repository: README, data/ and extended/."""
    root = tmp_path / "OpenR1-Math-220k"
    write_shards(root / "data", DEFAULT_ROWS, 2)  # rows 1-2 in shard 0, row 3 in shard 1
    write_shards(root / "extended", [openr1_row(POWER, "81", [POWER_RIGHT], [True], None, ["stop"])], 1)
    (root / "README.md").write_text("---\nlicense: apache-2.0\nconfigs:\n- config_name: default\n")
    return root


def import_ok(store, *args):
    result = run_cache("import", *args, "--store", store, "--workers", "0")
    assert result.exit_code == 0, result.output
    return result.output


def rejected(store, *args):
    result = run_cache("import", *args, "--store", store, "--workers", "0")
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and line.startswith("error:"), line
    return line


def query(store, sql):
    with TraceStore.open(store).connect() as con:
        return con.execute(sql).fetchall()


def agreement_table(out: str, teacher: str) -> dict[str, dict[str, str]]:
    """The printed agreement table of ``teacher``: {label column: {measure: value}}."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{teacher}: our verifier vs the publisher's"))
    cells = []
    for line in lines[start + 1:]:
        if not line.strip() or line.startswith("└"):
            break
        if "┃" in line or "│" in line:
            cells.append([c.strip() for c in re.split("[┃│]", line)[1:-1]])
    header, *rows = cells
    return {label: {row[0]: row[i] for row in rows} for i, label in enumerate(header) if i}


def counts(a):
    return (a.teacher, a.label, a.compared, a.publisher_correct, a.verifier_correct, a.agreed, a.publisher_only,
            a.verifier_only, a.unlabelled)


def test_openr1_dataset_folder_stores_each_generation_with_its_labels(tmp_path, openr1):
    store = tmp_path / "store"
    out = import_ok(store, openr1)
    assert ("layout: generations (one row per problem, a list of generations; teacher: 'deepseek-r1' (default; "
            "--teacher NAME or NAME=PATH); publisher labels: correctness_math_verify, correctness_llama) "
            "(detected) (2 shards)") in " ".join(out.split())
    rows = query(store, """
        SELECT p.problem, t.teacher, t.sample_idx, t.finish_reason, t.verify_status, t.correctness_math_verify,
               t.correctness_llama, t.data_source, t.origin, t.text = ? FROM traces t JOIN prompts p USING (prompt_id)
        ORDER BY p.problem, t.sample_idx""".replace("?", "'" + SUM10_RIGHT.replace("'", "''") + "'"))
    origin = "import:OpenR1-Math-220k/data/train"
    assert rows == [
        (SUM10, "deepseek-r1", 0, "stop", "correct", True, None, "olympiads", origin, True),
        (SUM10, "deepseek-r1", 1, "length", "wrong", False, None, "olympiads", origin, False),
        (LINEAR, "deepseek-r1", 0, "stop", "correct", True, True, "olympiads", origin, False),
        (LINEAR, "deepseek-r1", 1, "stop", "wrong", False, True, "olympiads", origin, False),
        (LOWEST, "deepseek-r1", 0, None, "correct", True, True, "cn_k12", origin, False),
        (LOWEST, "deepseek-r1", 1, None, "correct", False, None, "cn_k12", origin, False),
    ]
    assert query(store, "SELECT count(*), min(source) FROM prompts") == [(3, "OpenR1-Math-220k/data/train")]
    # the agreement table, printed at the end: math-verify labels 6 traces (they 3 correct, we 4: the 0.75 one),
    # the Llama judge 3 (it passed x = 7); 3 traces it never judged
    assert agreement_table(out, "deepseek-r1") == {
        "correctness_math_verify": {"labelled traces": "6", "they: correct": "3", "we: correct": "4",
                                    "agree": "5 (83.3%)", "they yes, we no": "0", "they no, we yes": "1",
                                    "not labelled": "0"},
        "correctness_llama": {"labelled traces": "3", "they: correct": "3", "we: correct": "2", "agree": "2 (66.7%)",
                              "they yes, we no": "1", "they no, we yes": "0", "not labelled": "3"},
    }


def test_agreement_comes_back_as_data(tmp_path, openr1):
    sources = open_sources([str(openr1)])
    with Verifier(workers=0) as verifier:
        summary = import_sources(sources, tmp_path / "store", verifier)
    assert (summary.rows, summary.traces_added, summary.prompts_added) == (6, 6, 3)
    assert [counts(a) for a in agreement_rows(summary.agreement)] == [
        # teacher, label, compared, they correct, we correct, agreed, they yes/we no, they no/we yes, no label
        ("deepseek-r1", "correctness_math_verify", 6, 3, 4, 5, 0, 1, 0),
        ("deepseek-r1", "correctness_llama", 3, 3, 2, 2, 1, 0, 3),
    ]
    assert agreement_rows(summary.agreement)[0].rate == pytest.approx(5 / 6)
    # the labels stay in the store: the same numbers from SQL, any time later
    assert query(tmp_path / "store", """
        SELECT count(*) FILTER (WHERE correctness_math_verify IS NOT NULL),
               count(*) FILTER (WHERE correctness_math_verify = correct),
               count(*) FILTER (WHERE correctness_llama AND NOT correct)
        FROM traces WHERE teacher = 'deepseek-r1'""") == [(6, 5, 1)]
    # a second import adds nothing and has verified nothing to compare
    with Verifier(workers=0) as verifier:
        again = import_sources(open_sources([str(openr1)]), tmp_path / "store", verifier)
    assert (again.traces_added, again.duplicates, again.agreement) == (0, 6, {})


def test_subset_split_and_shard_names(tmp_path, openr1):
    store = tmp_path / "store"
    out = import_ok(store, openr1, "--subset", "extended", "--teacher", "r1")
    assert "teacher: 'r1';" in out and "(1 shard)" in out
    assert query(store, "SELECT teacher, origin FROM traces") == [("r1", "import:OpenR1-Math-220k/extended/train")]
    line = rejected(store, openr1, "--split", "test")
    assert f"{openr1 / 'data'}: no Parquet shards of split 'test'" in line and "splits found: train" in line
    line = rejected(store, openr1, "--subset", "all")
    assert "no subset folder 'all' (folders with Parquet files: data, extended)" in line
    # shard names with the hash older `datasets` versions add, and the data/ folder given directly
    write_shards(tmp_path / "hashed", DEFAULT_ROWS, 3, suffix="-3f9a1c2b")
    import_ok(tmp_path / "store2", tmp_path / "hashed")
    import_ok(tmp_path / "store3", openr1 / "data")
    expected = query(tmp_path / "store2", "SELECT prompt_id, sample_idx, text, correct FROM traces ORDER BY ALL")
    assert len(expected) == 6
    same = query(tmp_path / "store3", "SELECT prompt_id, sample_idx, text, correct FROM traces ORDER BY ALL")
    assert same == expected


def test_missing_shard_is_one_line(tmp_path):
    root = tmp_path / "set"
    write_shards(root / "data", DEFAULT_ROWS, 3)
    (root / "data" / "train-00001-of-00003.parquet").unlink()
    line = rejected(tmp_path / "store", root)
    assert line == f"error: {root / 'data'}: 1 of 3 train shard(s) missing: train-00001-of-00003.parquet"
    assert not (tmp_path / "store").exists()
    stray = root / "data" / "train-00001-of-00004.parquet"
    pq.write_table(pa.Table.from_pylist(DEFAULT_ROWS[:1], schema=OPENR1), stray)
    line = rejected(tmp_path / "store", root)
    assert "the train shards disagree on how many there are (-of-00003 vs -of-00004)" in line


def simple_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_per_teacher_subsets_join_on_the_problem(tmp_path, openr1):
    qwen = tmp_path / "qwen3-traces"
    write_shards(qwen / "data", [
        # the same problems, spaced differently: one prompt each all the same
        openr1_row("Find the sum of the first  $10$ positive integers.", "55", [SUM10_RIGHT.replace("55.", "55!")],
                   [True], [False], ["stop"]),
        openr1_row(LINEAR + "\n", "4", [LINEAR_WRONG, LINEAR_RIGHT], [False, True], None, ["stop", "stop"]),
    ], 1)
    phi = simple_rows(tmp_path / "phi.jsonl", [  # one row per trace: problem, answer, generation
        {"problem": LINEAR, "answer": "4", "generation": LINEAR_RIGHT},
        {"problem": POWER, "answer": "81", "generation": POWER_RIGHT},
    ])
    store = tmp_path / "store"
    out = import_ok(store, f"r1={openr1}", f"qwen3={qwen}", f"phi={phi}")
    flat = " ".join(out.split())
    assert "qwen3=qwen3-traces/data/train: layout: generations" in flat and "teacher: 'qwen3';" in flat
    assert "phi=phi.jsonl: layout: long (one row per trace: problem, answer, trace; teacher: 'phi'" in flat
    assert query(store, "SELECT count(*) FROM prompts") == [(4,)]
    by_problem = query(store, """
        SELECT p.problem, list(t.teacher || ':' || t.sample_idx || ':' || t.correct ORDER BY t.teacher, t.sample_idx)
        FROM prompts p JOIN traces t USING (prompt_id) GROUP BY p.problem ORDER BY p.problem""")
    assert by_problem == [
        (POWER, ["phi:0:true"]),
        (SUM10, ["qwen3:0:true", "r1:0:true", "r1:1:false"]),
        (LINEAR, ["phi:0:true", "qwen3:0:false", "qwen3:1:true", "r1:0:true", "r1:1:false"]),
        (LOWEST, ["r1:0:true", "r1:1:true"]),
    ]
    assert "│ problems in the inputs │ 4 " in out and "│   in every input       │ 1 " in out
    # agreement per teacher: r1 as above; qwen3's Llama judge said its right sum was wrong
    assert agreement_table(out, "r1")["correctness_math_verify"]["agree"] == "5 (83.3%)"
    qwen_table = agreement_table(out, "qwen3")
    assert [qwen_table["correctness_math_verify"][k] for k in ("labelled traces", "agree", "not labelled")] == \
        ["3", "3 (100.0%)", "0"]
    assert qwen_table["correctness_llama"] == {"labelled traces": "1", "they: correct": "0", "we: correct": "1",
                                               "agree": "0 (0.0%)", "they yes, we no": "0", "they no, we yes": "1",
                                               "not labelled": "2"}
    assert "phi: our verifier" not in out  # phi.jsonl carries no labels


def test_per_teacher_subsets_disagreeing_on_an_answer(tmp_path, openr1):
    phi = simple_rows(tmp_path / "phi.jsonl", [{"problem": LINEAR + " ", "answer": "5", "generation": LINEAR_RIGHT}])
    line = rejected(tmp_path / "store", f"r1={openr1}", f"phi={phi}")
    assert f"{phi}:1: answer '5' differs from '4' given for the same problem" in line
    assert "train-00000-of-00002.parquet: row 1 generations[0])" in line  # where '4' came from
    assert not (tmp_path / "store").exists()
    line = rejected(tmp_path / "store", "=x.jsonl")
    assert "expected TEACHER=PATH" in line


def bad_row(**changes):
    return {**openr1_row(LINEAR, "4", [LINEAR_RIGHT, LINEAR_WRONG], [True, False], None, ["stop", "stop"]), **changes}


@pytest.mark.parametrize("changes, needle", [
    ({"correctness_math_verify": [True]}, "row 1: column 'correctness_math_verify' has 1 entries for 2 generations"),
    ({"finish_reasons": ["stop", "stop", "length"]}, "row 1: column 'finish_reasons' has 3 entries for 2 generations"),
    ({"correctness_llama": [True, "maybe"]}, "row 1: column 'correctness_llama[1]' should be a correctness label"),
    ({"generations": "\\boxed{4}"}, "row 1: column 'generations' should be a list of texts, got str"),
    ({"generations": [LINEAR_RIGHT, 4]}, "row 1: generations[1] should be text, got int"),
    ({"finish_reasons": ["stop", 7]}, "row 1: finish_reasons[1] should be a finish reason"),
])
def test_bad_rows_name_the_file_row_and_key(tmp_path, openr1, changes, needle):
    store = tmp_path / "store"
    import_ok(store, openr1)
    before = snapshot(store)
    root = tmp_path / "bad"
    (root / "data").mkdir(parents=True)
    rows = [DEFAULT_ROWS[0], bad_row(**changes)]
    shard = root / "data" / "train-00000-of-00001.parquet"
    try:  # in Parquet when Arrow can hold the bad value, else in JSONL (what a hand-made file may hold)
        pq.write_table(pa.Table.from_pylist(rows), shard)
        where = f"{shard}: {needle}"
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        root = simple_rows(tmp_path / "bad.jsonl", rows)
        where = f"{root}:2: " + needle.removeprefix("row 1: ")
    line = rejected(store, root)
    assert where in line, line
    assert snapshot(store) == before


def test_missing_generations_column_and_reserved_label_names(tmp_path, openr1):
    path = simple_rows(tmp_path / "x.jsonl", [{"problem": LINEAR, "answer": "4", "outputs": [LINEAR_RIGHT]}])
    line = rejected(tmp_path / "store", path, "--layout", "generations")
    assert "no 'generations' column (a list of one teacher's texts per problem)" in line
    assert "columns found: problem, answer, outputs" in line
    line = rejected(tmp_path / "store", openr1, "--label-col", "is_reasoning_complete,uuid_typo")
    assert "--label-col: no column 'uuid_typo'" in line
    assert prompt_id(LINEAR) == prompt_id(LINEAR + "\n")
