"""Training-time evaluation (`evaluate_loaded`): a model already in memory, the same loop and numbers as
`evaluate` on the saved model, and nothing about the model or the random state changed."""

import io
import re

import pyarrow.parquet as pq
import torch
from peft import LoraConfig, get_peft_model
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from ampo_cache.verify import Verifier
from ampo_train.evaluation.benchmarks import load_benchmark
from ampo_train.evaluation.runner import EvalSettings, ModelSpec, evaluate, evaluate_loaded, metric_values

SETTINGS = dict(samples=2, ks=[1, 2], max_tokens=40, greedy=True, seed=3, verify_workers=0)


def _benchmarks(tiny_world):
    return {f"test_level{lv}": load_benchmark(tiny_world.test_prompts(lv)) for lv in (1, 2)}


def test_loaded_peft_model_in_train_mode_matches_evaluate_on_the_saved_model(tiny_world, tmp_path):
    settings = EvalSettings(**SETTINGS)
    benchmarks = _benchmarks(tiny_world)
    [saved] = evaluate([ModelSpec.parse(str(tiny_world.student))], benchmarks, settings,
                       console=Console(file=io.StringIO()), log_samples=tmp_path / "saved.parquet")

    # A LoRA with B = 0 computes the base model's function, but only in eval mode: lora_dropout 0.5
    # in train mode would perturb the input of B, and the base's own dropout is on in train mode.
    base = AutoModelForCausalLM.from_pretrained(tiny_world.student, attention_dropout=0.3)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules="all-linear"))
    model.train()
    model.base_model.model.lm_head.eval()  # a submodule in its own mode must get that mode back
    modes = {name: m.training for name, m in model.named_modules()}
    pointers = [p.data_ptr() for p in model.parameters()]
    rng = torch.get_rng_state()
    tokenizer = AutoTokenizer.from_pretrained(tiny_world.student)

    with Verifier(workers=0) as verifier:
        loaded = evaluate_loaded(model, tokenizer, benchmarks, settings, verifier, label="student",
                                 log_samples=tmp_path / "loaded.parquet")

    assert loaded["benchmarks"] == saved["benchmarks"] and loaded["overall"] == saved["overall"]
    # the same answers, text for text (the summaries alone are too coarse to tell sampling modes apart)
    assert pq.read_table(tmp_path / "loaded.parquet").equals(pq.read_table(tmp_path / "saved.parquet"))
    assert {name: m.training for name, m in model.named_modules()} == modes  # train mode, per module, restored
    assert [p.data_ptr() for p in model.parameters()] == pointers  # same tensors: nothing merged or copied
    assert model.peft_config and any("lora_A" in n for n, _ in model.named_parameters())  # still a live adapter
    assert torch.equal(torch.get_rng_state(), rng)  # the trainer's random stream is untouched


def _oracle_engine(tokenizer, calls):
    """A stand-in engine (like a vLLM one) that reads each prompt's sum and answers it in a box."""
    def generate(prompt_token_ids, n, temperature, *, top_p, max_tokens, seed):
        calls.append((len(prompt_token_ids), n, temperature, max_tokens))
        answers = []
        for ids in prompt_token_ids:
            terms = re.search(r"What is ([\d +]+)\?", tokenizer.decode(ids)).group(1)
            answers.append([f"so \\boxed{{{sum(int(t) for t in terms.split('+'))}}}"] * n)
        return answers
    return generate


def test_a_plugged_in_engine_generates_and_metrics_are_flat(tiny_world):
    settings = EvalSettings(**SETTINGS)
    benchmarks = _benchmarks(tiny_world)
    tokenizer = AutoTokenizer.from_pretrained(tiny_world.student)
    calls = []
    with Verifier(workers=0) as verifier:
        report = evaluate_loaded(None, tokenizer, benchmarks, settings, verifier, generate=_oracle_engine(tokenizer, calls))
    problems = sum(len(items) for items in benchmarks.values())
    assert sum(c[0] for c in calls if c[2] == 0.6) == problems and {c[1] for c in calls if c[2] == 0.6} == {2}
    assert sum(c[0] for c in calls if c[2] == 0.0) == problems and {c[1] for c in calls if c[2] == 0.0} == {1}
    assert {c[3] for c in calls} == {40}
    metrics = metric_values(report)
    assert metrics == {f"eval/{name}/{key}": 1.0 for name in [*benchmarks, "overall"]
                       for key in ("avg@2", "pass@1", "pass@2", "greedy")}
