"""Side by side with TRL's GRPOTrainer: the same student, prompts and settings, step time and memory.

    pip install -c constraints/cpu.txt -e ".[dev,bench]"          # TRL only in the bench extra
    python bench/vs_trl.py --world tiny/                          # a tiny world (built there if absent)
    python bench/vs_trl.py --world tiny/ --full --repeats 3 --out vs_trl.json
    python bench/vs_trl.py --parity-only --world tiny/            # just the loss/gradient check
    python bench/vs_trl.py --update-only --update-vocab 32000      # one update at a real vocabulary size

Each run is its own process, so its peak RSS is its own (``ru_maxrss`` of that child, from
``wait4``), and the two arms alternate (ours, TRL, TRL, ours, ours, TRL, ...) so that a machine
that gets busier or quieter during the benchmark does not favour one side. Both children get the
same ``OMP_NUM_THREADS``/``torch.set_num_threads``.

* **ours**: ``ampo-train run --config WORLD/train.yaml guidance.mode=off ...`` (the CLI's own code
  path, called in-process in the child) with the settings below;
* **TRL**: ``GRPOTrainer`` with a reward function that calls our verifier, generation with
  transformers (no vLLM), a conversational ``prompt`` column (TRL applies the chat template; the
  token ids are the same as ours, see bench/trl_parity.py), the prompts in the order our sampler
  draws them (``shuffle_dataset=False``), so both arms see the same prompts at every step.

Matched: group size = ``num_generations``; prompts per step x G = ``per_device_train_batch_size``
x ``gradient_accumulation_steps`` (TRL counts completions); one generation per optimizer step
(``steps_per_generation`` = gradient accumulation, ``num_iterations=1``; ours: one mini-batch, one
PPO epoch); micro-batch = ``--micro-batch`` completions per forward on both sides;
``max_completion_length`` = ``rollout.max_new_tokens``; temperature 1, top_p 1, top_k 0; learning
rate, AdamW (weight decay 0.1, betas, eps), constant schedule, grad clip 1.0; ``beta=0``;
``epsilon=0.2`` (ours clip 0.2/0.2, dual clip off); ``loss_type`` <-> ``loss.aggregation``
(``--loss-type``); ``scale_rewards="none"`` <-> ``advantage_scale: none``; entropy coefficient 0;
the same LoRA r/alpha/dropout/targets (``--lora``, default) or full fine-tuning (``--full``);
float32, no bf16, no gradient checkpointing; logging every step to a file, no checkpoints, no
TensorBoard/report_to.

Per-step wall time is the whole step, generation included: TRL's from ``on_step_begin`` to
``on_step_end`` (a ``TrainerCallback``: generation, scoring, forward/backward, clip, optimizer
step), ours ``time/step`` from metrics.jsonl (sampling the prompts through the optimizer step and
the step's statistics). Both leave out writing the step's log line. "cycle" is the interval
between two consecutive steps' log calls, which includes everything. The first ``--warmup`` steps
of every run are left out of the medians, and both children warm the verifier's math-verify path
before training (its one-time start, ~0.3 s, would otherwise land in a random timed step). Repeat
i runs both arms with seed + i: the same prompts and initialisation on both sides, a fresh draw of
samples per repeat (generation time depends on whether some rollout runs to max_new_tokens).

The tiny world's vocabulary has 107 tokens, so the log-prob/entropy cost over the vocabulary,
which dominates memory at real sizes, is invisible there; ``--update-vocab V`` adds a probe: one
update (forward + backward of the loss, full parameters, no generation) of a random 2-layer Llama
with V tokens on both sides, with the step's rows and response length.

The loss-equality check (bench/trl_parity.py) runs first unless ``--no-parity``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.update_probe import LOSS_PAIRS  # noqa: E402  (TRL loss_type -> our loss.aggregation)


@dataclass
class Spec:
    world: str
    steps: int
    warmup: int
    prompts_per_step: int
    group_size: int
    micro_batch: int  # completions per forward/backward (both arms)
    max_new_tokens: int
    lr: float
    loss_type: str
    lora: bool
    lora_r: int
    lora_alpha: float
    lora_targets: str
    threads: int
    seed: int
    vocab: int = 0  # update-only probe: vocabulary of the random model

    @property
    def completions(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def accumulation(self) -> int:
        return self.completions // self.micro_batch


# ----------------------------------------------------------------------------- the world


def ensure_world(world: Path | None, size: str, seed: int = 0) -> Path:
    """A complete tiny world: the given folder (built there if it has none), or one built once into
    ``~/.cache/ampo-bench`` (``AMPO_BENCH_CACHE``)."""
    if world is None:
        cache = Path(os.environ.get("AMPO_BENCH_CACHE", Path.home() / ".cache" / "ampo-bench"))
        world = cache / f"tiny-world-{size}-seed{seed}"
    world = world.resolve()
    if (world / "world.json").exists():
        return world
    world.parent.mkdir(parents=True, exist_ok=True)
    with open(world.parent / f".{world.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (world / "world.json").exists():  # written last: a complete build
            from tinyworld.build import build_world

            print(f"building a {size} tiny world into {world} ...", file=sys.stderr)
            build_world(world, seed=seed, size_name=size)
    return world


# ----------------------------------------------------------------------------- the children


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def world_config(world, overrides=()):
    """The world's train.yaml without its store (a fresh world has none until `ampo-cache build`)."""
    from ampo_train.config import load_train_config

    return load_train_config(Path(world) / "train.yaml", ["store=null", "guidance.mode=off", *overrides])


def warm_verifier() -> None:
    """Pay math-verify's one-time start (imports, parser set-up: ~0.3 s) before timing, in both arms
    alike; otherwise it lands in whichever step first meets an answer that is not a plain number."""
    from ampo_cache.verify import Verifier

    Verifier(workers=0).verify([r"\boxed{\frac{1}{2}}", r"\boxed{x+1}", "the answer is 7 or so"], ["0.5"] * 3)


def ours_overrides(spec: Spec, output_dir: Path) -> list[str]:
    """`ampo-train run` KEY=VALUE settings matched to the TRL arm's GRPOConfig."""
    overrides = [
        "guidance.mode=off", "store=null", f"max_steps={spec.steps}", f"prompts_per_step={spec.prompts_per_step}",
        f"group_size={spec.group_size}", f"micro_batch_size={spec.micro_batch}", "mini_batch_prompts=null",
        "ppo_epochs=1", f"lr={spec.lr}", "weight_decay=0.1", "adam_betas=[0.9,0.999]", "adam_eps=1e-8",
        "max_grad_norm=1.0", "lr_scheduler=constant", "warmup_steps=0", "dtype=float32", "mixed_precision='no'",
        "gradient_checkpointing=false", "cpu=true", f"seed={spec.seed}",
        "rollout.temperature=1.0", "rollout.top_p=1.0", "rollout.top_k=0", f"rollout.max_new_tokens={spec.max_new_tokens}",
        "rollout.batch_size=null", "guidance.max_target_length=null",
        f"loss.aggregation={LOSS_PAIRS[spec.loss_type]}", f"loss.max_response_length={spec.max_new_tokens}",
        "loss.advantage_scale=none", "loss.clip_low=0.2", "loss.clip_high=0.2", "loss.dual_clip=null",
        "loss.entropy_coef=0.0", "loss.kl_coef=0.0",
        "reward.format_coef=0.0", "reward.repetition_penalty=false", "reward.verify_workers=0",
        "save_steps=1000000", "tensorboard=false", "log_every=1", f"output_dir={output_dir}",
    ]
    if spec.lora:
        targets = spec.lora_targets if spec.lora_targets == "all-linear" else f"[{spec.lora_targets.strip('[]')}]"
        overrides += [f"lora.r={spec.lora_r}", f"lora.alpha={spec.lora_alpha}", "lora.dropout=0.0",
                      f"lora.target_modules={targets}"]
    else:
        overrides.append("lora=null")
    return overrides


def child_ours(spec: Spec, work: Path) -> dict:
    _set_threads(spec.threads)
    import torch

    from ampo_train.metrics import MetricsLogger
    from ampo_train.rollout import TransformersRollout

    record = {"log_times": [], "history": [], "rss_first_step_kib": None}
    original_log, original_generate = MetricsLogger.log, TransformersRollout.generate

    def log(self, metrics):
        record["log_times"].append(time.perf_counter())
        record["history"].append(metrics)
        return original_log(self, metrics)

    def generate(self, prompts, n, **kwargs):  # kwargs: the per-step seed, greedy, settings
        if record["rss_first_step_kib"] is None:
            record["rss_first_step_kib"] = _rss_kib()  # set-up done: model, optimizer, data
        return original_generate(self, prompts, n, **kwargs)

    MetricsLogger.log, TransformersRollout.generate = log, generate
    warm_verifier()
    from cli.train import app

    started = time.perf_counter()
    app(["run", "--config", str(Path(spec.world) / "train.yaml"), *ours_overrides(spec, work / "out")],
        standalone_mode=False)
    wall = time.perf_counter() - started
    history = record["history"]
    if len(history) != spec.steps:
        raise SystemExit(f"ampo-train run logged {len(history)} of {spec.steps} steps")
    return {
        "arm": "ours", "wall_s": wall, "threads": torch.get_num_threads(),
        "step_s": [m["time/step"] for m in history],
        "generate_s": [m["time/generate"] for m in history],
        "reward_s": [m["time/reward"] for m in history],
        "cycle_s": _diffs(record["log_times"]),
        "completion_len": [m["response_length/mean"] for m in history],
        "reward": [m["reward"] for m in history],
        "rss_first_step_kib": record["rss_first_step_kib"], "hwm_kib": _hwm_kib(),
    }


def child_trl(spec: Spec, work: Path) -> dict:
    _set_threads(spec.threads)
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    from ampo_cache.generation import conversation
    from ampo_cache.prompts import load_prompts
    from ampo_cache.verify import Verifier
    from ampo_train.config import RewardSettings
    from ampo_train.data import PromptSampler
    from ampo_train.rewards import score_responses

    hf_logging.disable_progress_bar()
    cfg = world_config(spec.world)  # the same student, tokenizer and prompts as ours
    prompts = load_prompts(cfg.prompts, cfg.problem_col, cfg.answer_col)
    # Our sampler's order, so both arms train on the same prompts at every step.
    order = PromptSampler(len(prompts), spec.seed).next_batch(spec.steps * spec.prompts_per_step)
    dataset = Dataset.from_list([{"prompt": conversation(prompts[i].problem, cfg.system_prompt),
                                  "answer": prompts[i].answer} for i in order])
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.student)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    verifier = Verifier(timeout=5.0, workers=0)
    reward_settings = RewardSettings()

    def verifier_reward(prompts, completions, answer, **kwargs):
        texts = [c[-1]["content"] for c in completions]
        return score_responses(verifier, texts, answer, reward_settings).rewards.tolist()

    args = GRPOConfig(
        output_dir=str(work / "trl"), max_steps=spec.steps, seed=spec.seed,
        per_device_train_batch_size=spec.micro_batch, gradient_accumulation_steps=spec.accumulation,
        num_generations=spec.group_size, num_iterations=1, max_completion_length=spec.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0, learning_rate=spec.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch",
        max_grad_norm=1.0, beta=0.0, epsilon=0.2, loss_type=spec.loss_type, scale_rewards="none",
        entropy_coef=0.0, mask_truncated_completions=False, shuffle_dataset=False,
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, model_init_kwargs={"dtype": "float32"},
        report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True, log_completions=False,
        dataloader_num_workers=0,
    )
    peft_config = None
    if spec.lora:
        from peft import LoraConfig

        targets = spec.lora_targets if spec.lora_targets == "all-linear" else spec.lora_targets.strip("[]").split(",")
        peft_config = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=0.0,
                                 target_modules=targets, task_type="CAUSAL_LM")

    record = {"begin": None, "step_s": [], "end_times": [], "generate_s": [], "reward_s": [], "rss_first_step_kib": None}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if record["rss_first_step_kib"] is None:
                record["rss_first_step_kib"] = _rss_kib()
            record["begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            record["step_s"].append(now - record["begin"])
            record["end_times"].append(now)

    trainer = GRPOTrainer(model=cfg.student, reward_funcs=verifier_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config, callbacks=[StepTimer()])
    def timed(fn, key):  # wrap one of TRL's phases, recording its seconds under `key`
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                record[key].append(time.perf_counter() - start)
        return wrapper

    trainer._generate_single_turn = timed(trainer._generate_single_turn, "generate_s")
    # the verifier call (ours' time/reward also holds the decoding, ~ms)
    trainer._calculate_rewards = timed(trainer._calculate_rewards, "reward_s")
    warm_verifier()
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    logs = [entry for entry in trainer.state.log_history if "completions/mean_length" in entry]
    # TRL logs after on_step_end: "cycle" = from one step's end to the next's (its logging included)
    return {
        "arm": "trl", "wall_s": wall, "threads": torch.get_num_threads(),
        "step_s": record["step_s"], "generate_s": record["generate_s"], "reward_s": record["reward_s"],
        "cycle_s": _diffs(record["end_times"]),
        "completion_len": [entry["completions/mean_length"] for entry in logs],
        "reward": [entry["reward"] for entry in logs],
        "rss_first_step_kib": record["rss_first_step_kib"], "hwm_kib": _hwm_kib(),
    }


def child_update(spec: Spec, work: Path, arm: str) -> dict:
    """One update (forward + backward of the loss, no generation) on a random 2-layer Llama with
    ``spec.vocab`` tokens: what the per-token log-probs cost at a real vocabulary size, which the
    tiny world (107 tokens) cannot show. Same rows, advantages and loss_type on both sides
    (``bench/update_probe.py``, shared with ``bench/memory.py``); full parameters."""
    _set_threads(spec.threads)
    from bench.update_probe import UpdateProbe, make_update, measure

    probe = UpdateProbe(vocab=spec.vocab, rows=spec.completions, response_tokens=spec.max_new_tokens,
                        micro_batch=spec.micro_batch, loss_type=spec.loss_type, seed=spec.seed)
    result = measure(make_update(arm, probe, work), probe, updates=3)
    return {"arm": arm, "update_s": result["seconds"], "rss_before_kib": result["rss_before_kib"],
            "hwm_kib": result["hwm_kib"], "threads": result["threads"]}


def _diffs(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


# ----------------------------------------------------------------------------- the parent


def run_child(arm: str, spec: Spec, work: Path, env: dict, log_path: Path) -> dict:
    spec_path, result_path = work / "spec.json", work / "result.json"
    work.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(asdict(spec)))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", arm, "--spec", str(spec_path),
           "--result", str(result_path)]
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(work))
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log_path.read_text().splitlines()[-30:]
        raise SystemExit(f"the {arm} run failed (exit {proc.returncode}); its log ({log_path}) ends:\n" + "\n".join(tail))
    result = json.loads(result_path.read_text())
    result["peak_rss_kib"] = usage.ru_maxrss  # this child's own peak (Linux: KiB)
    result["process_wall_s"] = time.perf_counter() - started  # imports, set-up, the steps, exit
    return result


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(runs: list[dict], warmup: int) -> dict:
    steps = [s for r in runs for s in r["step_s"][warmup:]]
    generate = [s for r in runs for s in r["generate_s"][warmup:]]
    rest = [s - g for r in runs for s, g in zip(r["step_s"][warmup:], r["generate_s"][warmup:])]
    reward = [s for r in runs for s in r["reward_s"][warmup:]]
    cycles = [s for r in runs for s in r["cycle_s"][max(warmup - 1, 0):]]
    return {
        "runs": len(runs),
        "step_median_s": _median(steps),
        "step_run_medians_s": [_median(r["step_s"][warmup:]) for r in runs],
        "generate_median_s": _median(generate),
        "rest_median_s": _median(rest),
        "reward_median_s": _median(reward),
        "reward_max_s": max(reward) if reward else None,
        "cycle_median_s": _median(cycles),
        "peak_rss_mib": statistics.median(r["peak_rss_kib"] for r in runs) / 1024,
        "peak_rss_max_mib": max(r["peak_rss_kib"] for r in runs) / 1024,
        "rss_first_step_mib": statistics.median(r["rss_first_step_kib"] for r in runs) / 1024,
        "completion_len_mean": statistics.fmean(x for r in runs for x in r["completion_len"][warmup:]),
        "wall_median_s": _median([r["process_wall_s"] for r in runs]),
        "threads": sorted({r["threads"] for r in runs}),
    }


def print_report(spec: Spec, summary: dict, load: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    ours, trl = summary["ours"], summary["trl"]

    def ratio(key):
        return f"{ours[key] / trl[key]:.2f}x" if ours.get(key) and trl.get(key) else "-"

    table = Table(title=f"ampo-train run (guidance off) vs TRL GRPOTrainer: median over {ours['runs']} + {trl['runs']} "
                        f"runs x {spec.steps - spec.warmup} timed steps")
    for col in ("", "step (s)", "generate (s)", "rest of step (s)", "cycle (s)", "peak RSS (MiB)",
                "RSS at step 1 (MiB)", "completion len", "process wall (s)"):
        table.add_column(col, justify="left" if not col else "right", no_wrap=True)
    for name, s in (("ours", ours), ("TRL", trl)):
        table.add_row(name, f"{s['step_median_s']:.3f}", f"{s['generate_median_s']:.3f}", f"{s['rest_median_s']:.3f}",
                      f"{s['cycle_median_s']:.3f}", f"{s['peak_rss_mib']:.0f}", f"{s['rss_first_step_mib']:.0f}",
                      f"{s['completion_len_mean']:.1f}", f"{s['wall_median_s']:.1f}")
    table.add_row("ours/TRL", ratio("step_median_s"), ratio("generate_median_s"), ratio("rest_median_s"),
                  ratio("cycle_median_s"), ratio("peak_rss_mib"), ratio("rss_first_step_mib"),
                  ratio("completion_len_mean"), ratio("wall_median_s"), style="bold")
    console = Console(width=max(Console().width, 150))
    console.print(table)
    mode = f"LoRA r={spec.lora_r} alpha={spec.lora_alpha:g} {spec.lora_targets}" if spec.lora else "full fine-tuning"
    console.print(
        f"settings: {spec.prompts_per_step} prompts x G={spec.group_size} = {spec.completions} completions/step, "
        f"micro-batch {spec.micro_batch} (accumulation {spec.accumulation}), max_new_tokens {spec.max_new_tokens}, "
        f"lr {spec.lr:g}, TRL loss_type={spec.loss_type} <-> loss.aggregation={LOSS_PAIRS[spec.loss_type]}, {mode}, "
        f"torch threads {spec.threads} (children report {ours['threads']} / {trl['threads']}), {spec.steps} steps "
        f"({spec.warmup} warm-up) per run, seeds {spec.seed}..{spec.seed + max(ours['runs'], trl['runs']) - 1}; world {spec.world}")
    console.print(f"per-run step medians (s): ours {', '.join(f'{x:.3f}' for x in ours['step_run_medians_s'])}; "
                  f"TRL {', '.join(f'{x:.3f}' for x in trl['step_run_medians_s'])}")
    console.print(f"reward (verifier) median {ours['reward_median_s']:.4f} s / {trl['reward_median_s']:.4f} s, slowest "
                  f"{ours['reward_max_s']:.2f} s / {trl['reward_max_s']:.2f} s (ours / TRL; math-verify's slow path)")
    console.print(f"machine: {load['cpus']} CPUs, load average {load['before']:.2f} before, {load['after']:.2f} after")


def summarise_probe(runs: list[dict]) -> dict:
    return {
        "runs": len(runs),
        "update_median_s": statistics.median(t for r in runs for t in r["update_s"][1:]),  # the first warms up
        "rss_growth_mib": statistics.median((r["hwm_kib"] - r["rss_before_kib"]) / 1024 for r in runs),
        "peak_rss_mib": statistics.median(r["peak_rss_kib"] for r in runs) / 1024,
    }


def print_probe(spec: Spec, vocab: int, summary: dict, load: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    ours, trl = summary["ours"], summary["trl"]
    table = Table(title=f"one update, no generation: random 2-layer Llama, vocabulary {vocab}, {spec.completions} rows x "
                        f"{spec.max_new_tokens} response tokens, micro-batch {spec.micro_batch}")
    for col in ("", "forward+backward (s)", "RSS growth (MiB)", "peak RSS (MiB)"):
        table.add_column(col, justify="left" if not col else "right", no_wrap=True)
    for name, s in (("ours", ours), ("TRL", trl)):
        table.add_row(name, f"{s['update_median_s']:.2f}", f"{s['rss_growth_mib']:.0f}", f"{s['peak_rss_mib']:.0f}")
    table.add_row("ours/TRL", f"{ours['update_median_s'] / trl['update_median_s']:.2f}x",
                  f"{ours['rss_growth_mib'] / trl['rss_growth_mib']:.2f}x",
                  f"{ours['peak_rss_mib'] / trl['peak_rss_mib']:.2f}x", style="bold")
    Console(width=max(Console().width, 150)).print(table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=Path, help="tiny world folder (built there when absent); default: one built "
                        "once into ~/.cache/ampo-bench")
    parser.add_argument("--world-size", choices=["small", "full"], default="small",
                        help="size when the world has to be built (the student's architecture is the same)")
    parser.add_argument("--steps", type=int, default=10, help="steps per run (the first --warmup are not timed)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="runs per arm, alternating")
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, help="completions per forward/backward (default: the whole step)")
    parser.add_argument("--max-new-tokens", type=int, help="default: the world's rollout.max_new_tokens")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--loss-type", choices=sorted(LOSS_PAIRS), default="dr_grpo")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--lora", dest="lora", action="store_true", default=True, help="LoRA on both sides (default)")
    mode.add_argument("--full", dest="lora", action="store_false", help="full fine-tuning on both sides")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=32)
    parser.add_argument("--lora-targets", default="all-linear", help="all-linear or a comma list: q_proj,v_proj")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in both arms")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--logs", type=Path, help="keep the runs' logs here (default: a temporary folder)")
    parser.add_argument("--no-parity", action="store_true", help="skip the loss/gradient check against TRL")
    parser.add_argument("--parity-only", action="store_true", help="only the loss/gradient check")
    parser.add_argument("--update-vocab", type=int, default=0, metavar="V",
                        help="also time one update (no generation) on a random model with V tokens, e.g. 32000")
    parser.add_argument("--update-only", action="store_true", help="only the --update-vocab probe")
    parser.add_argument("--child", choices=["ours", "trl", "ours-update", "trl-update"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        spec = Spec(**json.loads(args.spec.read_text()))
        if args.child.endswith("-update"):
            result = child_update(spec, args.result.parent, args.child.split("-")[0])
        else:
            result = (child_ours if args.child == "ours" else child_trl)(spec, args.result.parent)
        args.result.write_text(json.dumps(result))
        return 0

    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit('TRL is not installed: pip install -c constraints/cpu.txt -e ".[bench]"')
    world = ensure_world(args.world, args.world_size, args.seed)
    parity, parity_ok = None, True
    if not args.no_parity:
        from bench.trl_parity import check_parity, print_results

        parity = check_parity(world / "student", world / "tokenizer")
        print_results(parity)
        matched = [r for r in parity if r.case != "group_std"]  # group_std: a measured, explained difference
        parity_ok = all(r.loss_diff <= 1e-6 and r.grad_max_abs_diff <= 1e-6 + 1e-5 * r.grad_max_abs for r in matched)
        if not parity_ok:
            print("PARITY FAILED: a matched case differs from TRL beyond 1e-6", file=sys.stderr)
        if args.parity_only:
            return 0 if parity_ok else 1

    cfg = world_config(world)
    completions = args.prompts_per_step * args.group_size
    micro = args.micro_batch or completions
    if completions % micro or micro % args.group_size:
        parser.error(f"--micro-batch ({micro}) must divide {completions} completions and be a multiple of G")
    spec = Spec(world=str(world), steps=args.steps, warmup=args.warmup, prompts_per_step=args.prompts_per_step,
                group_size=args.group_size, micro_batch=micro,
                max_new_tokens=args.max_new_tokens or cfg.rollout.max_new_tokens, lr=args.lr, loss_type=args.loss_type,
                lora=args.lora, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_targets=args.lora_targets,
                threads=args.threads, seed=args.seed)
    if spec.steps <= spec.warmup + 1:
        parser.error("--steps must exceed --warmup + 1")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    order = []
    for i in range(args.repeats):  # ABBA: ours, TRL, TRL, ours, ...
        order += [("ours", i), ("trl", i)] if i % 2 == 0 else [("trl", i), ("ours", i)]
    if args.update_only and not args.update_vocab:
        parser.error("--update-only needs --update-vocab V")
    load_before = os.getloadavg()[0]
    runs = {"ours": [], "trl": []}
    probe = {"ours": [], "trl": []}
    with tempfile.TemporaryDirectory(prefix="ampo-vs-trl-") as tmp:
        logs = args.logs or Path(tmp) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for arm, i in order if args.update_vocab else []:
            result = run_child(f"{arm}-update", replace(spec, vocab=args.update_vocab, seed=spec.seed + i),
                               Path(tmp) / f"{arm}-update{i}", env, logs / f"{arm}-update{i}.log")
            probe[arm].append(result)
            print(f"{arm} update probe {i + 1}/{args.repeats}: {statistics.median(result['update_s'][1:]):.2f} s, "
                  f"peak RSS {result['peak_rss_kib'] / 1024:.0f} MiB", file=sys.stderr)
        for arm, i in order if not args.update_only else []:
            started = time.perf_counter()
            # repeat i runs both arms with seed + i: the same prompts and initialisation for both, a fresh
            # draw of samples each repeat (which rollouts run to max_new_tokens is luck; it evens out)
            result = run_child(arm, replace(spec, seed=spec.seed + i), Path(tmp) / f"{arm}{i}", env,
                               logs / f"{arm}{i}.log")
            runs[arm].append(result)
            print(f"{arm} run {i + 1}/{args.repeats}: median step {_median(result['step_s'][spec.warmup:]):.3f} s, "
                  f"peak RSS {result['peak_rss_kib'] / 1024:.0f} MiB ({time.perf_counter() - started:.0f} s)",
                  file=sys.stderr)
    load = {"cpus": os.cpu_count(), "before": load_before, "after": os.getloadavg()[0]}
    summary, ratio, probe_summary = None, {}, None
    if runs["ours"]:
        summary = {arm: summarise(r, spec.warmup) for arm, r in runs.items()}
        print_report(spec, summary, load)
        ratio = {"step": summary["ours"]["step_median_s"] / summary["trl"]["step_median_s"],
                 "peak_rss": summary["ours"]["peak_rss_mib"] / summary["trl"]["peak_rss_mib"]}
    if args.update_vocab:
        probe_summary = {arm: summarise_probe(r) for arm, r in probe.items()}
        print_probe(spec, args.update_vocab, probe_summary, load)
        ratio["update_probe"] = probe_summary["ours"]["update_median_s"] / probe_summary["trl"]["update_median_s"]
        ratio["update_probe_rss_growth"] = (probe_summary["ours"]["rss_growth_mib"]
                                            / probe_summary["trl"]["rss_growth_mib"])
    if args.out:
        payload = {"spec": asdict(spec), "summary": summary, "runs": runs, "load": load, "ratio": ratio,
                   "update_probe": {"vocab": args.update_vocab, "summary": probe_summary, "runs": probe},
                   "parity": [asdict(r) for r in parity] if parity else None}
        args.out.write_text(json.dumps(payload, indent=1))
    return 0 if parity_ok else 1


if __name__ == "__main__":
    sys.exit(main())
