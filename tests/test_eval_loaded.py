"""Training-time evaluation (a ``Sampler`` over the weights in memory, as ``evaluate_during_training``
builds it): the same loop and numbers as `evaluate` on the saved model, and nothing about the model or
the random state changed."""

import io
import re

import pyarrow.parquet as pq
import torch
from peft import LoraConfig, get_peft_model
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from ampo_cache.verify import Verifier
from ampo_train.evaluation.benchmarks import load_benchmark
from ampo_train.evaluation.runner import (EvalSettings, ModelSpec, Sampler, evaluate, metric_values, sample_benchmarks,
                                          summaries)
from ampo_train.evaluation.sample_log import sample_rows, write_sample_log
from ampo_train.rollout import Rollout, open_engine

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
        engine = open_engine("transformers", settings.rollout_settings(), model, tokenizer, private_rng=True)
        per_file = sample_benchmarks(Sampler(engine, tokenizer, settings), benchmarks, settings, verifier)
    loaded = summaries(per_file, settings)
    write_sample_log(sample_rows("student", per_file, settings), tmp_path / "loaded.parquet")

    assert loaded["benchmarks"] == saved["benchmarks"] and loaded["overall"] == saved["overall"]
    # the same answers, text for text (the summaries alone are too coarse to tell sampling modes apart)
    assert pq.read_table(tmp_path / "loaded.parquet").equals(pq.read_table(tmp_path / "saved.parquet"))
    assert {name: m.training for name, m in model.named_modules()} == modes  # train mode, per module, restored
    assert [p.data_ptr() for p in model.parameters()] == pointers  # same tensors: nothing merged or copied
    assert model.peft_config and any("lora_A" in n for n, _ in model.named_parameters())  # still a live adapter
    assert torch.equal(torch.get_rng_state(), rng)  # the trainer's random stream is untouched


class _OracleEngine:
    """A stand-in engine (like a vLLM one) that reads each prompt's sum and answers it in a box."""

    name = "oracle"

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def generate(self, prompts, n, seed=None, greedy=False, settings=None):
        self.calls.append((len(prompts), n, greedy, settings.temperature, settings.max_new_tokens))
        groups = []
        for ids in prompts:
            terms = re.search(r"What is ([\d +]+)\?", self.tokenizer.decode(ids)).group(1)
            answer = self.tokenizer(f"so \\boxed{{{sum(int(t) for t in terms.split('+'))}}}",
                                    add_special_tokens=False)["input_ids"]
            groups.append([Rollout(answer + [self.tokenizer.eos_token_id], "stop")] * n)
        return groups


def test_a_plugged_in_engine_generates_and_metrics_are_flat(tiny_world):
    settings = EvalSettings(**SETTINGS)
    benchmarks = _benchmarks(tiny_world)
    tokenizer = AutoTokenizer.from_pretrained(tiny_world.student)
    engine = _OracleEngine(tokenizer)
    with Verifier(workers=0) as verifier:
        report = summaries(sample_benchmarks(Sampler(engine, tokenizer, settings), benchmarks, settings, verifier),
                           settings)
    problems = sum(len(items) for items in benchmarks.values())
    sampled = [c for c in engine.calls if not c[2]]
    greedy = [c for c in engine.calls if c[2]]
    assert sum(c[0] for c in sampled) == problems and {c[1] for c in sampled} == {2} and {c[3] for c in sampled} == {0.6}
    assert sum(c[0] for c in greedy) == problems and {c[1] for c in greedy} == {1}
    assert {c[4] for c in engine.calls} == {40}
    metrics = metric_values(report)
    assert metrics == {f"eval/{name}/{key}": 1.0 for name in [*benchmarks, "overall"]
                       for key in ("avg@2", "pass@1", "pass@2", "greedy")}
