"""The tiny world: deterministic problems, correct traces in four styles, a working tokenizer, real models."""

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ampo_cache.verify import verify_one
from tinyworld.problems import TERMS_PER_LEVEL, ProblemSampler, held_out_problems
from tinyworld.styles import STYLES, last_expression_value, render
from tinyworld.tokenizer import build_tokenizer


def test_same_seed_same_problems_other_seed_other_problems():
    assert held_out_problems(3, 20) == held_out_problems(3, 20)
    assert held_out_problems(3, 20) != held_out_problems(4, 20)
    a = ProblemSampler(3, held_out_problems(3, 20), "prompts").distinct(50, [1, 2, 3, 4])
    b = ProblemSampler(3, held_out_problems(3, 20), "prompts").distinct(50, [1, 2, 3, 4])
    assert a == b


def test_levels_have_their_term_counts_and_training_never_sees_a_test_problem():
    held_out = held_out_problems(0, 30)
    for level, problems in held_out.items():
        assert all(len(p.terms) == TERMS_PER_LEVEL[level] for p in problems)
        assert len({p.terms for p in problems}) == len(problems)
    assert len(held_out[1]) == 81 // 4  # level 1 has 81 problems; at most a quarter is held out
    banned = {p.terms for ps in held_out.values() for p in ps}
    train = ProblemSampler(0, held_out, "prompts").distinct(500, [1, 2, 3, 4])
    assert not banned & {p.terms for p in train}


def test_answers_are_the_sums_of_the_problem_text():
    for problems in held_out_problems(1, 10).values():
        for p in problems:
            expression = p.text.removeprefix("What is ").removesuffix("?")
            assert int(p.answer) == eval(expression)  # independent of how Problem computes it


@pytest.mark.parametrize("style", list(STYLES))
def test_every_style_reduces_correctly_and_ends_boxed(style):
    terms = (3, 5, 7, 2, 4)
    trace = render(style, terms)
    assert trace.endswith("=\\boxed{21}")  # the last reduction is written into the box, not copied
    steps = trace.removesuffix("=\\boxed{21}").split("=")
    assert steps[0] == "3+5+7+2+4" and "+" in steps[-1]
    for step in steps:  # every line of the reduction is the same sum
        assert eval(step) == 21
    assert last_expression_value(trace) == 21
    assert verify_one(trace, "21").correct


def test_styles_differ_in_their_order_of_steps():
    traces = {render(style, (3, 5, 7, 2)) for style in STYLES}
    assert len(traces) == 4
    assert render("forward", (3, 5, 7, 2)) == "3+5+7+2=8+7+2=15+2=\\boxed{17}"
    assert render("pairs", (3, 5, 7, 2)) == "3+5+7+2=8+9=\\boxed{17}"


def test_tokenizer_round_trips_and_renders_its_chat_template(tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "3+5+7+2=8+7+2=15+2=17 \\boxed{17}"
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and loaded.decode(ids) == text
    chat = [{"role": "system", "content": "Add."}, {"role": "user", "content": "What is 1 + 2?"}]
    assert loaded.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
        "<|system|>Add.<|user|>What is 1 + 2?<|assistant|>"
    offsets = loaded(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert offsets[-3] == (len(text) - 3, len(text) - 2)  # one character per token


def test_world_files_models_and_generation(tiny_world):
    train = pq.read_table(tiny_world.train_prompts).to_pylist()
    assert {"problem", "answer", "level", "source"} <= set(train[0])
    assert {r["level"] for r in train} == set(TERMS_PER_LEVEL)
    test_hard = {r["problem"] for r in pq.read_table(tiny_world.test_prompts(4)).to_pylist()}
    assert not test_hard & {r["problem"] for r in train}
    assert set(tiny_world.teachers) == set(STYLES)
    for folder in [*tiny_world.teachers.values(), tiny_world.student]:
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                               add_generation_prompt=True, tokenize=False)
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert out.shape[1] > inputs["input_ids"].shape[1]
        assert model.config.hidden_size // model.config.num_attention_heads >= 32  # vLLM CPU needs heads >= 32
    summary = tiny_world.summary
    assert set(summary["accuracy"]) == set(STYLES) | {"student"}
    assert 0.0 <= summary["teachers_union_coverage_hard"] <= 1.0


def test_build_refuses_to_replace_an_unrelated_folder(tmp_path):
    from tests.helpers import run_cache

    (tmp_path / "precious.txt").write_text("keep me")
    result = run_cache("tiny-world", "build", tmp_path, "--size", "small")
    assert result.exit_code == 2 and "is not a tiny world" in result.output
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def _pins_apply() -> bool:
    from tinyworld.determinism import applies

    return applies()


def _build_small(folder, **env) -> dict[str, str]:
    """`ampo-cache tiny-world build --size small` in a subprocess with ``env`` on top of ours; the
    weight hashes of its models."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tinyworld.published import world_hashes

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "cli.cache", "tiny-world", "build", str(folder), "--size", "small"],
                          cwd=repo, env={**os.environ, "PYTHONPATH": str(repo), **env}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return world_hashes(folder)


@pytest.mark.skipif(not _pins_apply(), reason="the float pins apply on x86-64 only")
def test_builds_under_other_thread_counts_and_instruction_sets_are_the_published_world(tmp_path):
    """`ampo-cache tiny-world build` pins its float order (tinyworld.determinism): a build whose
    parent environment asks for 1 thread, ATen's default kernels, MKL's AVX2 branch capped to AVX2
    and dynamic threads, and one with 3 threads, write the same weights to the bit, and they are
    the published small world's (tinyworld/published_world.json): this machine builds what the
    README's machine built. The third build, unpinned with 1 thread, shows the check can fail."""
    from tinyworld.published import load_published

    one_thread = _build_small(tmp_path / "one", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", ATEN_CPU_CAPABILITY="default",
                              MKL_CBWR="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2", MKL_DYNAMIC="TRUE",
                              ONEDNN_MAX_CPU_ISA="AVX512_CORE")
    assert _build_small(tmp_path / "three", OMP_NUM_THREADS="3") == one_thread
    [small] = [w for w in load_published()["worlds"] if w["size"] == "small" and w["seed"] == 0]
    assert one_thread == small["weights_sha256"], (
        "this machine builds another small world than tinyworld/published_world.json records: its float order "
        "differs (`python -m tinyworld.fingerprint` says more), or the world's recipe or torch changed on purpose "
        "(then re-record it: tinyworld/published.py)")
    unpinned = _build_small(tmp_path / "native", OMP_NUM_THREADS="1", AMPO_NATIVE_FLOATS="1")
    assert unpinned["student"] != one_thread["student"]


@pytest.mark.skipif(not _pins_apply(), reason="the float pins apply on x86-64 only")
def test_this_machine_has_the_published_fingerprint():
    """In seconds, whether this machine builds the published world (tinyworld/fingerprint.py)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "tinyworld.fingerprint"], cwd=repo, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "matches published_world.json" in done.stdout, done.stdout + done.stderr[-2000:]


def test_the_demo_line_compares_the_weights_with_the_record(tiny_world):
    """`reproduction_line`/`check_world` on a real built world: yes against a record of its own
    hashes, no (naming a model) when one hash differs, not comparable for another seed."""
    from tinyworld.published import check_world, world_hashes

    hashes = world_hashes(tiny_world.root)
    assert set(hashes) == {"student"} | {f"teachers/{style}" for style in STYLES}
    record = {"torch": tiny_world.summary["float_order"]["torch"], "pins": tiny_world.summary["float_order"]["env"],
              "worlds": [{"seed": 0, "size": "small", "weights_sha256": hashes}]}
    assert check_world(tiny_world.root, record) == (True, "the weights of all 5 models match published_world.json")
    record["worlds"][0]["weights_sha256"] = {**hashes, "teachers/pairs": "0" * 64}
    verdict, why = check_world(tiny_world.root, record)
    assert verdict is False and why.startswith("1 of 5 models' weights differ (teachers/pairs, ...)")
    record["worlds"][0]["seed"] = 1
    verdict, why = check_world(tiny_world.root, record)
    assert verdict is None and "seed 0 small" in why
