"""`ampo-train plan` on every recipe (offline, shapes from the recipes' config.json files), its
verdicts and advice, the store's coverage, planning-mode config loading, and its memory model
against measured figures: a fresh saved-tensors measurement, bench/activation_memory.py's real-shape
figures, bench/memory.py's CPU figures and the H200 figures in bench/results/gpu-h200.json."""

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ampo_common.errors import InputError
from ampo_train import memory_model as mm
from ampo_train.config import load_train_config
from cli.train import app

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SEVEN_B = RECIPES / "ampo-qwen2.5-7b-instruct"
LORA_24GB = RECIPES / "ampo-qwen2.5-1.5b-lora-24gb"
# How each recipe is meant to be launched (its README): the Accelerate configs or the GPU size.
LAUNCHES = {
    "ampo-qwen2.5-7b-instruct": [["--accelerate-config", SEVEN_B / "accelerate-4gpu.yaml"],
                                 ["--accelerate-config", SEVEN_B / "accelerate-8gpu.yaml"]],
    "ampo-qwen2.5-1.5b-lora-24gb": [["--gpu-memory", "24"]],
}


@pytest.fixture(autouse=True)
def no_accelerate_default(monkeypatch, tmp_path):
    """A developer's own Accelerate default config must not change what a bare `plan` plans."""
    import accelerate.commands.config.config_args as config_args

    monkeypatch.setattr(config_args, "default_config_file", str(tmp_path / "no-default.yaml"))


def plan(*args):
    result = CliRunner().invoke(app, ["plan", *[str(a) for a in args]], env={"COLUMNS": "200"})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def table_rows(output: str) -> dict[str, str]:
    """The plan table's (what, value) rows (a section's title row has no value)."""
    rows = {}
    for line in output.splitlines():
        match = re.match(r"^ {4}(\S.*?) {2,}(\S.*?)\s*$", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def test_every_recipe_is_listed():
    assert sorted(p.name for p in RECIPES.iterdir() if (p / "train.yaml").is_file()) == sorted(LAUNCHES)
    for name in LAUNCHES:
        assert (RECIPES / name / "README.md").is_file()


@pytest.mark.parametrize("recipe,launch", [(r, launch) for r, launches in LAUNCHES.items() for launch in launches])
@pytest.mark.parametrize("guidance", ["adaptive_k", "off"])
def test_plan_fits_every_recipe_offline(recipe, launch, guidance):
    result = plan("--config", RECIPES / recipe / "train.yaml", *launch, f"guidance.mode={guidance}")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "qwen2: 28 layers" in out and "config.json" in out     # shapes from the recipe's own config.json
    assert "config.json only: download the weights" in out       # no weights here, said as a row
    assert re.search(r"openr1_math_4longcots\.parquet: missing", out)
    assert "weights" in out and "optimizer state" in out and "activations" in out and "vLLM share" in out
    assert re.search(r"fits: peak [\d.]+ GiB per process", out)
    assert "128 prompts x G=8 = 1,024" in out if recipe == SEVEN_B.name else "32 prompts x G=8 = 256" in out


def test_bare_plan_of_the_7b_recipe_names_the_launch_that_fits():
    """The issue's command, without a launch config: one process cannot hold 7B full fine-tuning,
    and the one change it names (FSDP2 on 4 processes) then fits."""
    result = plan("--config", SEVEN_B / "train.yaml")
    assert result.exit_code == 1
    assert "7.62B" in result.output and "architecture" in result.output   # the table was printed
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "does not fit" in error[0]
    n = int(re.search(r"launch (\d+) processes with FSDP2", error[0]).group(1))
    assert n == 4
    assert plan("--config", SEVEN_B / "train.yaml", "--processes", n, "--layout", "fsdp2").exit_code == 0


@pytest.mark.parametrize("args,expected", [
    ((LORA_24GB / "train.yaml", "--gpu-memory", "16", "gradient_checkpointing=false"), "gradient_checkpointing=true"),
    ((SEVEN_B / "train.yaml", "--accelerate-config", SEVEN_B / "accelerate-4gpu.yaml",
      "rollout.vllm.gpu_memory_utilization=0.1"), "rollout.vllm.gpu_memory_utilization=0.2"),
    ((LORA_24GB / "train.yaml", "--gpu-memory", "24", "micro_batch_tokens=147456"), "micro_batch_tokens="),
])
def test_the_advised_setting_makes_it_fit(args, expected):
    config, *rest = args
    result = plan("--config", config, *rest)
    assert result.exit_code == 1, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: does not fit") and expected in line
    change = re.search(r"set (\S+=\S+?):", line).group(1)
    kept = [a for a in rest if not str(a).startswith(change.split("=")[0] + "=")]
    assert plan("--config", config, *kept, change).exit_code == 0


@pytest.mark.parametrize("args,message", [
    (("--processes", "3", "--layout", "fsdp2"), "prompts_per_step (128) must be a multiple of the number of processes (3)"),
    (("--processes", "4", "--layout", "fsdp2", "lora.r=8"), "LoRA under fsdp2 is not supported"),
])
def test_launches_the_trainer_refuses_are_refused(args, message):
    result = plan("--config", SEVEN_B / "train.yaml", *args)
    assert result.exit_code == 1 and f"error: cannot run: {message}" in result.output


def test_bad_inputs_are_one_line(tmp_path):
    fsdp1 = tmp_path / "fsdp1.yaml"
    fsdp1.write_text(yaml.safe_dump({"distributed_type": "FSDP", "num_processes": 2, "fsdp_config": {"fsdp_version": 1}}))
    result = plan("--config", SEVEN_B / "train.yaml", "--accelerate-config", fsdp1)
    assert result.exit_code == 2 and "fsdp_version: 1: only FSDP2" in result.output
    result = plan("--config", SEVEN_B / "train.yaml", "--processes", "2", "--layout", "fsdp9")
    assert result.exit_code == 2 and "--layout: expected one of single, ddp, fsdp2, zero2, zero3" in result.output
    result = plan("--config", SEVEN_B / "train.yaml", "guidance.kk=2")
    assert result.exit_code == 2 and "unknown key" in result.output
    assert "Traceback" not in result.output


def test_a_hub_id_without_a_hub_is_one_line():
    result = plan("--config", SEVEN_B / "train.yaml", "student=Qwen/Qwen2.5-7B-Instruct")
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].startswith("memory not checked: no shapes for Qwen/Qwen2.5-7B-Instruct")
    assert "hub id (downloaded by the run)" in result.output


def test_accelerate_configs_and_flags_give_the_layout(tmp_path):
    from ampo_train.plan import PlanRequest, launch_layout

    assert launch_layout(PlanRequest(SEVEN_B / "train.yaml", accelerate_config=SEVEN_B / "accelerate-8gpu.yaml"))[0] == \
        mm.Layout("fsdp2", 8)
    examples = ROOT / "examples" / "accelerate"
    expected = {"ddp": mm.Layout("ddp", 2), "fsdp2": mm.Layout("fsdp2", 2), "zero2": mm.Layout("zero2", 2),
                "zero3": mm.Layout("zero3", 2)}
    for name, layout in expected.items():
        assert launch_layout(PlanRequest(SEVEN_B / "train.yaml", accelerate_config=examples / f"{name}.yaml"))[0] == layout
    assert launch_layout(PlanRequest(SEVEN_B / "train.yaml", launch=(8, None)))[0] == mm.Layout("ddp", 8)
    assert launch_layout(PlanRequest(SEVEN_B / "train.yaml"))[0] == mm.Layout("single", 1)


# ----------------------------------------------------------------------------- config in planning mode

def test_planning_mode_loads_a_config_whose_files_are_elsewhere():
    with pytest.raises(InputError, match="Qwen2.5-7B-Instruct: no weights"):   # `ampo-train run` needs the weights
        load_train_config(SEVEN_B / "train.yaml")
    with pytest.raises(InputError, match="no prompts file at .*openr1_math_4longcots.parquet"):
        load_train_config(SEVEN_B / "train.yaml", ["student=Qwen/Qwen2.5-7B-Instruct"])
    cfg = load_train_config(SEVEN_B / "train.yaml", ["student=./models/not-here"], planning=True)
    assert cfg.student.endswith("models/not-here") and not cfg.prompts.is_file()
    assert cfg.guidance.mode == "adaptive_k" and cfg.loss.aggregation == "seq_mean_token_sum_norm"
    with pytest.raises(InputError, match="guidance.k"):  # everything else is still validated
        load_train_config(SEVEN_B / "train.yaml", ["guidance.k=9"], planning=True)


def test_recipe_settings_are_the_references():
    cfg = load_train_config(SEVEN_B / "train.yaml", planning=True)
    assert (cfg.group_size, cfg.prompts_per_step, cfg.mini_batch_prompts, cfg.lr, cfg.warmup_steps) == (8, 128, 64, 1e-6, 0)
    assert (cfg.loss.entropy_coef, cfg.loss.kl_coef, cfg.loss.clip_low, cfg.loss.clip_high, cfg.loss.shaping_gamma) == \
        (0.001, 0.0, 0.2, 0.2, 0.1)
    assert (cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.engine) == (8192, 1.0, "vllm")
    assert cfg.lora is None and cfg.gradient_checkpointing and cfg.mixed_precision == "bf16"
    assert (cfg.guidance.max_candidates, cfg.guidance.rank) == (4, "comprehension")
    small = load_train_config(LORA_24GB / "train.yaml", planning=True)
    assert (small.prompts_per_step, small.mini_batch_prompts, small.lora.r) == (32, 8, 16)
    from ampo_cache.teachers import load_build_config

    teachers = load_build_config(SEVEN_B / "teachers.yaml")
    assert [t.model for t in teachers.teachers] == ["nvidia/AceReason-Nemotron-1.1-7B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
                                                     "open-r1/OpenR1-Qwen-7B", "Qwen/Qwen3-8B"]
    assert all(t.backend == "vllm" and t.sampling.temperature == 0.6 for t in teachers.teachers)


# ----------------------------------------------------------------------------- coverage on a real store

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from trainer_fixtures import base_config, make_world, write_config

    root = tmp_path_factory.mktemp("plan-world")
    w = make_world(root, num_prompts=12, covered=0.75)
    write_config(root / "train.yaml", base_config(w, root / "out"))
    teachers = {"prompts": str(w["prompts"]), "store": str(w["store"]),
                "teachers": [{"name": n, "model": str(w["student"]), "backend": "transformers"}
                             for n in ("alpha", "beta", "gamma", "omega")]}
    (root / "teachers.yaml").write_text(yaml.safe_dump(teachers))
    return root


def test_coverage_of_the_training_prompts_per_teacher(world):
    result = plan("--config", world / "train.yaml", "--teachers", world / "teachers.yaml")
    assert result.exit_code == 0, result.output
    rows = table_rows(result.output)
    # make_world: 9 of 12 prompts have traces; alpha and beta solved all 9, gamma every other one,
    # delta's only trace is wrong (verified out), omega (in teachers.yaml) has none.
    assert rows["training prompts"] == "12"
    assert rows["with a verified trace"].startswith("9 (75%); 3 without")
    assert rows["with >= 2 teachers (guidance.k)"].startswith("9 ")
    assert rows["teacher alpha"].startswith("9 prompts") and rows["teacher gamma"].startswith("5 prompts")
    assert rows["teacher omega"] == "0 prompts (0%): no traces" and "teacher delta" not in rows
    assert "longest of 12 rendered prompts" in result.output      # measured with the student's tokenizer


# ----------------------------------------------------------------------------- the memory model vs measurements

def test_per_token_coefficients_match_a_fresh_measurement():
    """bench/activation_memory.py's saved-tensor count on a shape no coefficient was fitted on."""
    from bench.activation_memory import _config, per_layer

    shape = dict(hidden_size=96, intermediate_size=320, num_attention_heads=3, num_key_value_heads=1, head_dim=32,
                 num_hidden_layers=2, vocab_size=64, tie_word_embeddings=False)
    s = mm.shape_from_config(_config(shape, 2))
    for name in ("lora_bf16", "lora_fp32_autocast", "full_fp32_autocast", "full_bf16"):
        lora = mm.lora_count(s, 8, ["q_proj", "v_proj", "down_proj"]) if name.startswith("lora") else None
        measured = per_layer(shape, 32, name, lora_r=8, targets=["q_proj", "v_proj", "down_proj"]) if lora else \
            per_layer(shape, 32, name)
        assert mm.layer_bytes_per_token(s, name, lora) == pytest.approx(measured[0], rel=0.03), name
        if lora is not None:   # a frozen float32 base's bf16 copies, saved with each layer
            assert mm.layer_constant_bytes(s, name, lora) == pytest.approx(max(measured[1], 0), rel=0.03, abs=1), name
        elif name == "full_fp32_autocast":   # trainable weights' copies: counted once for all layers (autocast_cache)
            assert measured[1] == pytest.approx(2 * s.layer_linear_weights, rel=0.03)


def test_per_token_coefficients_match_bench_real_shape_figures():
    """bench/activation_memory.py measured at Qwen2.5-1.5B and -7B shapes (bench/PERFORMANCE.md):
    143.0 / 116.1 KiB and 313.6 / 255.1 KiB per token per layer (LoRA bf16 / full under autocast)."""
    from bench.activation_memory import SHAPES, model_shape

    for name, (lora_kib, full_kib) in {"Qwen2.5-1.5B": (143.0, 116.1), "Qwen2.5-7B": (313.6, 255.1)}.items():
        s = model_shape(SHAPES[name])
        lora = mm.lora_count(s, 16, "all-linear")
        assert mm.layer_bytes_per_token(s, "lora_bf16", lora) / 1024 == pytest.approx(lora_kib, abs=0.1)
        assert mm.layer_bytes_per_token(s, "full_fp32_autocast", None) / 1024 == pytest.approx(full_kib, abs=0.1)
    assert mm.shape_from_config(_qwen_config(SEVEN_B)).params == 7_615_616_512   # Qwen2.5-7B-Instruct's count
    assert mm.lora_count(mm.shape_from_config(_qwen_config(LORA_24GB)), 16, "all-linear").trainable == 18_464_768


def _qwen_config(recipe: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(next((recipe / "models").iterdir()) / "config.json"))


def _one_update(shape, rows, response, prompt, micro, lora, checkpointing, autocast):
    """Growth of one update (forward + backward, gradients accumulated, no optimizer step) as the
    benches measure it: gradients, autocast copies and one micro-batch's activations."""
    setup = mm.Setup(shape=shape, batch=mm.Batch(micro * (prompt + response), micro * response),
                     precision=mm.Precision("float32", "bf16" if autocast else "no"),
                     lora=mm.lora_count(shape, 16, "all-linear") if lora else None, checkpointing=checkpointing)
    return mm.states(setup)["gradients"] + mm.autocast_cache(setup) + sum(mm.activations(setup).values())


def test_update_memory_matches_the_h200_figures():
    """bench/gpu_check.py on one H200 (bench/results/gpu-h200.json): a Qwen2-0.5B-shaped student,
    8 rows of 128 + N tokens in micro-batches of 2, checkpointing, bf16 autocast, LoRA and full;
    torch.cuda.max_memory_allocated growth. The model sums the head's and a layer's peaks, which do
    not coincide, so it may read up to 15% high; it must not read low by more than 10%."""
    from transformers import Qwen2Config

    from bench.update_probe import QWEN2_05B

    shape = mm.shape_from_config(Qwen2Config(**QWEN2_05B))
    report = json.loads((ROOT / "bench" / "results" / "gpu-h200.json").read_text())
    cost = report["runs"][0]["parts"]["cost"]
    assert cost["settings"] == {"rows": 8, "micro_batch_rows": 2, "prompt_tokens": 128, "gradient_checkpointing": True,
                                "bf16_autocast": True, "loss_type": "dr_grpo"}
    for row in cost["rows"]:
        predicted = _one_update(shape, 8, row["response_tokens"], 128, 2, row["mode"] == "lora", True, True)
        ratio = predicted / 2 ** 20 / row["ours"]["peak_growth_mib"]
        assert 0.9 <= ratio <= 1.15, (row["mode"], row["response_tokens"], ratio)


def test_update_memory_matches_bench_memory_cpu_figures():
    """bench/memory.py (docs/performance.md, 2026-12-02): a random 2-layer hidden-128 Llama at
    vocabulary 151,936, 8 rows of 25 + N tokens in one micro-batch, float32, peak RSS growth of one
    update. RSS on a CPU also holds the backward's transient buffers and glibc's heap, which the
    GPU model does not count, so the band is wider; it still fails if the LM head's logits or the
    activations went unmodelled (the full float32 logits alone are 4,748 and 18,992 MiB)."""
    from transformers import LlamaConfig

    shape = mm.shape_from_config(LlamaConfig(vocab_size=151936, hidden_size=128, intermediate_size=384,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4))
    measured = {("lora", 1024): 806, ("lora", 4096): 1673, ("full", 1024): 669, ("full", 4096): 1421}
    for (mode, tokens), mib in measured.items():
        predicted = _one_update(shape, 8, tokens, 25, 8, mode == "lora", False, False) / 2 ** 20
        assert 0.6 <= predicted / mib <= 1.4, (mode, tokens, predicted, mib)


def test_sharding_divides_the_states_and_gathers_for_the_no_grad_phases():
    shape = mm.shape_from_config(_qwen_config(SEVEN_B))
    base = mm.Setup(shape=shape, batch=mm.Batch(9216, 8192), precision=mm.Precision("float32", "bf16"),
                    checkpointing=True)
    one, four = mm.states(base), mm.states(base.but(layout=mm.Layout("fsdp2", 4)))
    assert four["weights"] == pytest.approx(one["weights"] / 4) and four["optimizer"] == pytest.approx(one["optimizer"] / 4)
    assert mm.gathered(base.but(layout=mm.Layout("fsdp2", 4)), "generate") == shape.params * 2   # bf16, whole
    zero2 = mm.states(base.but(layout=mm.Layout("zero2", 4)))
    assert zero2["weights"] == shape.params * 2 and zero2["optimizer"] == pytest.approx(shape.params * 12 / 4)
    ddp = mm.states(base.but(layout=mm.Layout("ddp", 2)))
    assert ddp["gradients"] == 2 * one["gradients"]        # DDP's bucket copy
    sharded_head = mm.activations(base.but(layout=mm.Layout("fsdp2", 4)))["head"]
    assert sharded_head == pytest.approx(6 * 8192 * shape.vocab * 4) and mm.activations(base)["head"] < sharded_head / 50
