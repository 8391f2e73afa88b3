"""`ampo-train eval` on a validation file in the verl layout, as verl, LUFFY and the AMPO reference ship it.

The file is written here as those projects write theirs (Parquet: a chat-list ``prompt`` with a
system turn asking for ``<answer>`` tags, ``data_source`` per row, ``reward_model`` {ground_truth,
style}, ``extra_info``), with tiny-world problems (so the tiny student reads them) and one prompt
longer than the student's 160 positions. Each rule of issue 33 part 4 is checked on it with the
real student, tokenizer, engine and verifier.
"""

import json
import math

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

from ampo_common.errors import InputError
from ampo_cache.verify import Verifier
from ampo_train.evaluation.benchmarks import load_benchmark
from ampo_train.evaluation.prompts import PromptRenderer, generation_batches
from ampo_train.evaluation.runner import EvalSettings, Sampler, sample_benchmark, summaries, verify_any
from ampo_train.rollout import open_engine
from cli.train import app

SYSTEM = "Think, then put the final answer in <answer> </answer> tags."
SOURCES = ("tiny/level1", "tiny/level2", "tiny/level3")
CONTEXT, MAX_TOKENS = 160, 40  # the tiny student's max_position_embeddings; --max-tokens below
LONG_ROW = 6  # the row whose prompt does not fit CONTEXT - MAX_TOKENS
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
SCHEMA = pa.schema([
    ("data_source", pa.string()), ("prompt", pa.list_(MESSAGE)), ("ability", pa.string()),
    ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
    ("extra_info", pa.struct([("index", pa.int64()), ("split", pa.string())])),
])


def _row(index: int, source: str, problem: str, answer: str) -> dict:
    return {"data_source": source, "ability": "math",
            "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": problem}],
            "reward_model": {"ground_truth": answer, "style": "rule"},
            "extra_info": {"index": index, "split": "test"}}


@pytest.fixture(scope="module")
def verl_file(tiny_world, tmp_path_factory):
    """Two rows per data_source (levels 1-3 of the tiny world), then one prompt too long for the student."""
    rows = []
    for level, source in enumerate(SOURCES, start=1):
        problems = pq.read_table(tiny_world.test_prompts(level)).to_pylist()[:2]
        rows += [_row(len(rows), source, p["problem"], p["answer"]) for p in problems]
    rows.append(_row(len(rows), SOURCES[2], "Think about it slowly. " * 8 + "What is 1 + 2?", "3"))
    assert len(rows) - 1 == LONG_ROW
    path = tmp_path_factory.mktemp("verl") / "valid.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_world):
    return AutoTokenizer.from_pretrained(tiny_world.student)


def run_eval(tiny_world, verl_file, *extra):
    args = ["eval", "--model", tiny_world.student, "--data", verl_file, "--k", "1,2", "--samples", "2",
            "--max-tokens", MAX_TOKENS, *extra]
    return CliRunner().invoke(app, [str(a) for a in args])


def test_verl_file_per_source_results_system_turn_cut_and_token_budget(tiny_world, verl_file, tokenizer, tmp_path):
    out, log, budget = tmp_path / "r.json", tmp_path / "s.parquet", 600
    result = run_eval(tiny_world, verl_file, "--truncate-prompts", "left", "--batch-tokens", budget, "--greedy",
                      "--out", out, "--log-samples", log)
    assert result.exit_code == 0, result.output
    [report] = json.loads(out.read_text())

    # results per data_source as well as per file, in the JSON and in the printed table
    whole = report["benchmarks"]["valid"]
    assert whole["problems"] == 7 and list(report["sources"]) == list(SOURCES)
    assert [s["problems"] for s in report["sources"].values()] == [2, 2, 3]
    for key in ("avg@n", "greedy"):  # the sources add up to the file
        pooled = sum(s[key] * s["problems"] for s in report["sources"].values()) / whole["problems"]
        assert pooled == pytest.approx(whole[key])
    assert sum(s["pass@k"]["2"] * s["problems"] for s in report["sources"].values()) == \
        pytest.approx(whole["pass@k"]["2"] * whole["problems"])
    assert all(f"source: {s}" in result.output for s in SOURCES)
    # the long prompt was cut (left) and counted
    assert whole["prompts_cut"] == 1 and report["sources"][SOURCES[2]]["prompts_cut"] == 1
    assert report["settings"]["truncate"] == "left" and report["settings"]["batch_tokens"] == budget
    assert "1 of 7 prompts of valid cut from the left" in result.output

    con = duckdb.connect()
    rows = con.sql(f"SELECT problem_idx, any_value(prompt), any_value(prompt_tokens), any_value(prompt_cut), "
                   f"any_value(data_source), count(DISTINCT batch) FROM '{log}' GROUP BY ALL ORDER BY 1").fetchall()
    messages = [r["prompt"] for r in pq.read_table(verl_file).to_pylist()]
    for idx, prompt, tokens, cut, source, batches in rows:
        assert batches == 1  # a problem's samples (and its greedy decode) share one generate call
        assert source == SOURCES[min(idx // 2, 2)]
        if idx == LONG_ROW:  # cut from the left to the room the context leaves; the end (question) is kept
            assert tokens == CONTEXT - MAX_TOKENS and cut > 0 and prompt.endswith("What is 1 + 2?<|assistant|>")
        else:  # the file's chat, system turn included, rendered by the student's template as given
            assert cut == 0 and prompt == tokenizer.apply_chat_template(messages[idx], add_generation_prompt=True,
                                                                        tokenize=False)
            assert prompt.startswith(f"<|system|>{SYSTEM}<|user|>")
    # every generate call within the token budget: sequences x (longest prompt + max new tokens)
    calls = con.sql(f"SELECT batch, count(*), max(prompt_tokens) FROM '{log}' WHERE NOT greedy GROUP BY 1").fetchall()
    assert len(calls) > 1 and all(count * (longest + MAX_TOKENS) <= budget for _, count, longest in calls)


def test_a_prompt_longer_than_the_context_is_one_line_before_any_generation(tiny_world, verl_file, tmp_path):
    out, log = tmp_path / "r.json", tmp_path / "s.parquet"
    result = run_eval(tiny_world, verl_file, "--out", out, "--log-samples", log)
    assert result.exit_code == 2 and "Traceback" not in result.output
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith(f"error: {verl_file}: row {LONG_ROW}: the prompt is ")
    length = int(line.split("the prompt is ")[1].split()[0])
    assert length > CONTEXT - MAX_TOKENS
    assert f"holds {CONTEXT} positions and --max-tokens {MAX_TOKENS} leaves {CONTEXT - MAX_TOKENS}" in line
    assert "--truncate-prompts left" in line
    assert not out.exists() and not log.exists()

    # --max-tokens that leaves no room at all is one line too
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_world.student), "--data", str(verl_file)])
    assert result.exit_code == 2 and "--max-tokens: 1024 new tokens leave no room for a prompt" in result.stderr


def test_system_prompt_flag_replaces_the_turn_and_limit_takes_the_first_rows(tiny_world, verl_file, tmp_path):
    out, log = tmp_path / "r.json", tmp_path / "s.parquet"
    result = run_eval(tiny_world, verl_file, "--system-prompt", "Box it.", "--limit", "3", "--out", out,
                      "--log-samples", log)  # --limit 3: the long row 6 is never read
    assert result.exit_code == 0, result.output
    [report] = json.loads(out.read_text())
    assert report["benchmarks"]["valid"]["problems"] == 3
    assert {s: v["problems"] for s, v in report["sources"].items()} == {SOURCES[0]: 2, SOURCES[1]: 1}
    prompts = duckdb.sql(f"SELECT DISTINCT problem_idx, prompt FROM '{log}' ORDER BY 1").fetchall()
    assert [idx for idx, _ in prompts] == [0, 1, 2]
    assert all(p.startswith("<|system|>Box it.<|user|>What is ") and SYSTEM not in p for _, p in prompts)


def test_renderer_keeps_replaces_or_removes_the_system_turn(verl_file, tokenizer):
    item = load_benchmark(verl_file)[0]
    assert item.messages[0] == ("system", SYSTEM) and item.source == SOURCES[0] and item.where.endswith("row 0")
    given, replaced, removed = (PromptRenderer(tokenizer, system, MAX_TOKENS).text(item) for system in (None, "S.", ""))
    assert given == f"<|system|>{SYSTEM}<|user|>{item.problem}<|assistant|>"
    assert replaced == f"<|system|>S.<|user|>{item.problem}<|assistant|>"
    assert removed == f"<|user|>{item.problem}<|assistant|>"
    # a plain-text problem keeps today's behaviour: a system turn only when one is given
    assert PromptRenderer(tokenizer, None, MAX_TOKENS).text("1+1?") == "<|user|>1+1?<|assistant|>"
    assert PromptRenderer(tokenizer, "S.", MAX_TOKENS).text("1+1?") == "<|system|>S.<|user|>1+1?<|assistant|>"


def test_limit_as_lm_eval_has_it(verl_file):
    assert len(load_benchmark(verl_file, limit=2)) == 2
    assert len(load_benchmark(verl_file, limit=100)) == 7  # more than the file holds: all of it
    assert len(load_benchmark(verl_file, limit=0.5)) == math.ceil(7 * 0.5)  # a fraction: that share, rounded up
    for bad in (0, -1, 2.5):
        with pytest.raises(InputError, match="--limit"):
            load_benchmark(verl_file, limit=bad)


def test_answer_tags_asked_for_by_the_system_turn_are_verified(verl_file):
    item = load_benchmark(verl_file)[0]
    truth = item.answers[0]
    responses = [f"<think>adding up, maybe \\boxed{{{int(truth) + 1}}}</think> <answer>{truth}</answer>",
                 f"<think>...</think>\n<answer>The answer is \\boxed{{{truth}}}</answer>",
                 f"<answer>{int(truth) + 1}</answer>",
                 f"so \\boxed{{{truth}}}"]  # no tags: judged as before
    with Verifier(workers=0) as verifier:
        verdicts = verify_any(verifier, responses, [item.answers] * len(responses))
    assert [v.correct for v in verdicts] == [True, True, False, True]


class RecordingEngine:
    """The real transformers engine, with each call's prompts written down (what reached the model)."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, prompts, n, seed=None, greedy=False, settings=None):
        self.calls.append(([list(p) for p in prompts], n))
        return self.engine.generate(prompts, n, seed=seed, greedy=greedy, settings=settings)


def test_generate_calls_stay_within_the_token_budget_and_keep_a_problems_samples_together(tiny_world, verl_file,
                                                                                          tokenizer):
    from transformers import AutoModelForCausalLM

    items = load_benchmark(verl_file, limit=LONG_ROW)  # the six prompts that fit
    settings = EvalSettings(samples=3, ks=[1, 3], max_tokens=MAX_TOKENS, batch_tokens=800, verify_workers=0)
    model = AutoModelForCausalLM.from_pretrained(tiny_world.student)
    engine = RecordingEngine(open_engine("transformers", settings.rollout_settings(), model, tokenizer,
                                         private_rng=True))
    with Verifier(workers=0) as verifier:
        records = sample_benchmark(Sampler(engine, tokenizer, settings, context=CONTEXT), items, settings, verifier)
    assert len(engine.calls) > 1
    for prompts, n in engine.calls:
        assert n == 3 and n * len(prompts) * (max(map(len, prompts)) + MAX_TOKENS) <= settings.batch_tokens
        assert all(tokenizer.decode(p).startswith(f"<|system|>{SYSTEM}") for p in prompts)  # the system turn arrived
    sent = sorted(tokenizer.decode(p) for prompts, _ in engine.calls for p in prompts)
    assert sent == sorted(r.prompt.text for r in records)  # each problem sent once, all n samples in that call
    assert [r.item for r in records] == items and all(len(r.answers) == 3 for r in records)  # file order kept
    report = summaries({"valid": records}, settings)
    assert sum(s["problems"] for s in report["sources"].values()) == report["benchmarks"]["valid"]["problems"] == 6


def test_generation_batches_bound_every_call():
    lengths = [5, 90, 30, 30, 60, 10, 120]
    for samples, budget in ((1, 200), (4, 1000), (16, 100_000), (8, 50)):
        batches = generation_batches(lengths, samples, 40, budget)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for batch in batches:  # one problem alone may exceed a budget too small for its samples
            assert len(batch) == 1 or samples * len(batch) * (max(lengths[i] for i in batch) + 40) <= budget
    assert len(generation_batches(lengths, 16, 40, 10**9)) == 1


def test_a_malformed_chat_turn_is_one_line_naming_the_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "1+1?"}],
            "reward_model": {"ground_truth": "2"}, "data_source": "x"}
    bad = dict(good, prompt=[{"content": SYSTEM}, {"role": "user", "content": "1+1?"}])  # a turn without a role
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(InputError, match=r"bad\.jsonl:2: column 'prompt': turn 0 is not a \{role, content\} message"):
        load_benchmark(path)
