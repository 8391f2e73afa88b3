"""The online AMPO trainer as a recipe: ``setup`` builds a ``Run``, ``run_step`` makes one step,
``train`` loops and saves. One step reads top to bottom:

    1. sample    this process's share of the step's prompts, G rollouts each (the rollout engine,
                 transformers or a colocated vLLM, gets the new weights once, here)
    2. reward    the shared verifier's verdicts, and the shaped rewards: optional format and
                 repetition terms, DAPO's soft overlong penalty (rewards.Rewarder)
    3. guide     the run's guide (chosen once in setup: whole traces, or with guidance.prefix their
                 prefixes continued by the student) asks the trigger rule which prompts get traces
                 and how many (guidance.mode: adaptive = all G wrong, pass_threshold, adaptive_k,
                 always, hybrid, off), ranks their cached traces (guidance.rank: comprehension,
                 trace_likelihood, random) and picks the slots they take (guided_step)
    4. rows      the mixed batch, built once (sampling.build_rows): rewards, verdicts, the loss mask
                 (overlong.filter), A = r - mean(r) over each mixed group; with dynamic_sampling
                 more rounds until the step has its groups with a spread (sampling.fill_step)
    5. old log-probs under no_grad (and the reference's, for KL) when the step makes more than one
                 update; with one update they equal the current ones detached (ratio exactly 1)
    6. update    per mini-batch: micro-batches (gradient accumulation), mixed loss (PPO clip with
                 dual clip on rollout tokens, f(p) = p/(p+gamma) on teacher tokens), clip, step; the
                 LR placed by the step's progress (schedule.py)
    7. log       metrics gathered from every process; evaluation every N steps; a few samples

Every option of train.yaml that changes a step: rollout (engine, sampling, is_correction), reward
(format_coef, repetition_penalty), overlong (filter, soft_penalty_tokens), guidance (mode, pass_num,
k, rank, score, replace, prefix, ...), dynamic_sampling, loss (aggregation, advantage_scale,
clipping, shaping_gamma, entropy_coef, kl_coef), the batch sizes, lr_scheduler; config.py documents
each. ``guidance.mode: off`` is plain GRPO through exactly this code: step 3 then changes nothing.
Multi-process (``accelerate launch``): every process trains on its own slice of the prompts, DDP
averages the gradients, and the main process alone writes metrics and checkpoints. The modules
each step calls are listed in ``ampo_train/__init__.py``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from ampo_common.errors import InputError
from ampo_cache.lookup import TraceIndex
from ampo_cache.prompts import load_prompts
from ampo_cache.store import TraceStore
from ampo_cache.verify import Verifier
from ampo_train.checkpoint import (CheckpointContent, LoadedCheckpoint, find_checkpoint, load_checkpoint, restore_rng,
                                   rng_state, save_checkpoint, save_final)
from ampo_train.config import TrainConfig
from ampo_train.data import PromptSampler, TrainPrompt, prepare_prompts, rank_positions
from ampo_train.distributed import (full_parameters, full_state_dict, layout, load_optimizer_state, local_memory,
                                    make_accelerator, numel, optimizer_state, parameter_digest, shards_parameters)
from ampo_train.evaluation.benchmarks import BenchItem
from ampo_train.guided_step import Guide, open_guide
from ampo_train.loading import load_reference, load_student, load_tokenizer
from ampo_train.metrics import MetricsLogger, Name, PhaseTimer, StepStats, finish_metrics, step_stats, trained_stats
from ampo_train.miss_log import MissLog
from ampo_train.policy import ForwardSettings, Policy
from ampo_train.rewards import Rewarder
from ampo_train.rollout import check_engine, open_engine, student_target
from ampo_train.sampling import RowSettings, build_rows, fill_step
from ampo_train.schedule import UpdateSchedule
from ampo_train.seeds import RoundSeeds
from ampo_train.step_record import StepRecord
from ampo_train.tracking import Trackers, tracker_names
from ampo_train.training_eval import SampleLog, evaluate_during_training, load_eval_benchmarks
from ampo_train.update import Optimization, UpdateSettings, agreed_count, sampling_logprobs, update_policy

# Test hook: when set, every process writes DIR/rank{N}.json (its prompts per step and a hash of
# its final trainable parameters, and its memory), so a multi-process test can check the ranks'
# data and weights, and bench/scale_out.py what each process held.
DEBUG_DIR_ENV = "AMPO_TRAIN_DEBUG_DIR"


@dataclass
class Run:
    """Everything a run holds from one step to the next (``setup`` builds it)."""

    cfg: TrainConfig
    accelerator: Accelerator
    policy: Policy  # the student (wrapped and unwrapped), its rollout engine, its KL reference
    tokenizer: object
    optimization: Optimization  # the wrapped model, optimizer and LR schedule
    prompts: list[TrainPrompt]  # every training prompt, rendered and tokenised
    sampler: PromptSampler  # the prompt order (saved in checkpoints)
    index: TraceIndex | None  # the store's correct traces for the training prompts (None: no guidance)
    verifier: Verifier
    rewarder: Rewarder  # the verifier's verdicts and the shaped rewards (format, repetition, overlong penalty)
    guide: Guide  # whole traces or prefixes (guided_step.open_guide), with the trigger and ranking rules
    benchmarks: dict[str, list[BenchItem]]  # evaluation during training (empty: none)
    trackers: Trackers | None = None  # TensorBoard, W&B, MLflow... through Accelerate (report_to)
    logger: MetricsLogger | None = None  # main process only: metrics.jsonl and the console
    sample_log: SampleLog | None = None  # main process only, with log_samples_every
    miss_log: MissLog | None = None  # main process only: the prompts the store had no trace for
    teachers: list[str] = field(default_factory=list)  # the store's teachers (every step logs each one's count)
    start_step: int = 0  # the checkpoint's step when resuming
    num_tokens: int = 0  # prompt + completion tokens sampled so far (TRL's num_tokens; saved in checkpoints)
    trained_tokens: int = 0  # prompt + response tokens trained on so far (tokens/trained_total; saved too)
    history: list[dict] = field(default_factory=list)  # the metrics logged by this call
    warned_skip: bool = False  # a skipped non-finite update was reported (once per run)
    debug: dict = field(default_factory=dict)  # DEBUG_DIR_ENV's record

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


@dataclass
class TrainResult:
    model: torch.nn.Module  # the trained model, unwrapped (a PeftModel with LoRA)
    tokenizer: object
    output_dir: Path
    final_dir: Path | None  # None when the run stopped early (``until_step``)
    step: int  # the last step completed
    history: list[dict] = field(default_factory=list)  # the metrics logged by this call


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, resume: str | Path | None = None, until_step: int | None = None) -> TrainResult:
    """Run (or continue) training as configured. ``until_step`` stops after that step as an
    interruption would (no final save): for time-boxed runs and the resume test."""
    run = setup(cfg, resume)
    last_step = min(cfg.max_steps, until_step) if until_step is not None else cfg.max_steps
    step = run.start_step
    for step in range(run.start_step + 1, last_step + 1):
        run.history.append(run_step(run, step))
        if step % cfg.save_steps == 0 or step == cfg.max_steps:
            save_run_checkpoint(run, step)
    final_dir = None
    if step == cfg.max_steps and (until_step is None or until_step >= cfg.max_steps):
        final_dir = save_final_model(run)
    close(run)
    return TrainResult(run.policy.module, run.tokenizer, cfg.output_dir, final_dir, step, run.history)


def run_step(run: Run, step: int) -> dict:
    """One training step on this process (every process calls it); returns the step's metrics."""
    cfg, policy = run.cfg, run.policy
    timer, stats = PhaseTimer(), StepStats()
    step_start = time.perf_counter()
    settings = UpdateSettings.from_config(cfg, step)

    # Steps 1-5 are passes without gradients, as many as each process needs: under FSDP2 every
    # process holds the whole model for them (gathered once, freed before the update).
    with policy.full_parameters():
        # 1-4. sample, reward, guide, rows (sample_round); with dynamic sampling, more rounds
        #      until the step has enough groups with a spread, and only those are trained on
        records, rows = fill_step(lambda round_index: sample_round(run, step, round_index, timer, stats),
                                  cfg.dynamic_sampling, cfg.prompts_per_step // run.world, cfg.group_size,
                                  lambda count: agreed_count(count, policy.device, op="min"), stats)

        # 5. old (and reference) log-probs, before the first update
        with timer("logprobs"):
            logprobs = sampling_logprobs(policy, rows, settings, stats)

    # 6. updates: mini-batches of prompts, accumulated over micro-batches
    with timer("update"):
        norms = update_policy(policy, rows, logprobs, settings, stats, run.optimization, step)
    _warn_skipped(run, step, norms)

    # 7. metrics, gathered from every process; evaluation; samples
    for record in records:
        step_stats(stats, record, run.teachers)
    trained_stats(stats, rows)
    timer.record(stats)
    stats.maximum(Name.STEP_TIME, time.perf_counter() - step_start)
    summary = StepStats.merge(gather_object([stats.to_dict()])).summary()
    run.num_tokens += int(summary.get("tokens/sampled", 0))
    run.trained_tokens += int(summary.get("tokens/trained", 0))
    metrics = finish_metrics(summary, step, run.sampler.epochs,
                             {"num_tokens": run.num_tokens, "tokens/trained_total": run.trained_tokens})
    metrics.update(_evaluate(run, step))
    _log(run, step, metrics, records)
    return metrics


def sample_round(run: Run, step: int, round_index: int, timer: PhaseTimer, stats: StepStats) -> StepRecord:
    """Steps 1-4 for this process's share of a step's worth of prompts: the mixed rows with their
    advantages, and everything the metrics read."""
    cfg, policy, tokenizer, G = run.cfg, run.policy, run.tokenizer, run.cfg.group_size
    # 1. sample: this process's slice of the step's prompts, G rollouts each, from the current
    #    weights (pushed to the engine once here if the last step changed them)
    order = run.sampler.next_batch(cfg.prompts_per_step)
    positions = rank_positions(len(order), run.rank, run.world, cfg.prompts_per_update)
    batch = [run.prompts[order[i]] for i in positions]
    run.debug["prompt_ids"].append([p.prompt_id for p in batch])
    seeds = RoundSeeds(cfg.seed, step, round_index, tuple(positions), chunk=cfg.rollout.batch_size or len(batch))
    with timer("sync"):
        stats.total(Name.SYNC_BYTES, policy.sync())
    with timer("generate"):  # one call per chunk of prompts, each from its own seeded stream (seeds.py)
        groups = [group for start, end, seed in seeds.chunks()
                  for group in policy.generate([p.token_ids for p in batch[start:end]], G, seed=seed)]

    # 2. reward: the verifier's verdicts (what accuracy and the guidance rules read) and the shaped
    #    rewards (what the advantages are computed from)
    with timer("reward"):
        texts = [tokenizer.decode(r.token_ids, skip_special_tokens=True) for group in groups for r in group]
        scored = run.rewarder(texts, [p.answer for p in batch for _ in range(G)],
                              [len(r.token_ids) for group in groups for r in group])

    # 3. guide: cached teacher traces (or their prefixes, continued by the student) for the prompts
    #    the trigger rule selects
    correct = scored.correct.view(len(batch), G)
    with timer("guidance"):
        plan = run.guide.plan(batch, correct, step, seeds)

    # 4. the mixed batch, built once: rewards, verdicts, loss mask, advantages over each mixed group
    rows = build_rows(batch, groups, scored, plan, tokenizer, RowSettings.from_config(cfg))
    return StepRecord(batch, groups, texts, correct, scored.rewards.view(len(batch), G), plan, rows)


def _log(run: Run, step: int, metrics: dict, records: Sequence[StepRecord]) -> None:
    """The step to metrics.jsonl, the console and the trackers; its sampled rows (of its first
    round) and cache misses (gathered from every process) to their files; the main process writes."""
    record = records[0]
    missed = [{"prompt_id": r.prompts[b].prompt_id, "problem": r.prompts[b].prompt.problem,
               "answer": r.prompts[b].answer} for r in records for b in r.plan.report.missed]
    missed = [miss for share in gather_object([missed]) for miss in share]
    if run.logger is None:
        return
    run.logger.log(metrics)
    run.trackers.log(metrics, step)
    run.miss_log.record(step, missed)
    if run.sample_log is not None and step % run.cfg.log_samples_every == 0:
        rows = run.sample_log.write(step, record, run.tokenizer)
        if rows:
            run.trackers.log_samples(step, list(rows[0]), [list(r.values()) for r in rows])


def _evaluate(run: Run, step: int) -> dict:
    """Held-out evaluation every ``eval.every`` steps and after the last (every process takes part)."""
    cfg = run.cfg
    if not run.benchmarks or (step % cfg.eval.every and step != cfg.max_steps):
        return {}
    started = time.perf_counter()
    with run.policy.full_parameters():
        metrics = evaluate_during_training(run.policy, run.tokenizer, run.benchmarks, cfg, run.verifier, run.rank,
                                           run.world)
    return {**metrics, "time/eval": time.perf_counter() - started}


def _warn_skipped(run: Run, step: int, norms: Sequence[float]) -> None:
    skipped = [n for n in norms if not math.isfinite(n)]
    if skipped and run.logger is not None and not run.warned_skip:
        run.logger.message(f"warning: step {step}: non-finite gradient norm ({skipped[0]}): update skipped, "
                           "weights untouched (counted in skipped_updates; shown once)")
        run.warned_skip = True


# ----------------------------------------------------------------------------- setup


def setup(cfg: TrainConfig, resume: str | Path | None = None) -> Run:
    """Everything the loop needs, in an order that keeps runs reproducible: bad settings and files
    fail first (before any model loads), then the seeded loads, then the resumed state."""
    trackers = tracker_names(cfg.report_to, cfg.tensorboard)  # a missing tracker package fails here, first
    accelerator = make_accelerator(cfg.cpu if cfg.cpu is not None else not torch.cuda.is_available(),
                                   cfg.mixed_precision, lora=cfg.lora is not None, max_grad_norm=cfg.max_grad_norm,
                                   log_with=trackers, project_dir=str(cfg.output_dir))
    _check_world(cfg, accelerator.num_processes)
    engine_name = check_engine(cfg.rollout)
    benchmarks = load_eval_benchmarks(cfg.eval)  # a bad benchmark file fails before anything loads
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    checkpoint = load_checkpoint(find_checkpoint(resume)) if resume is not None else None

    # Same seed everywhere for the model's initialisation (LoRA's A matrices), then one stream per
    # process for sampling and guidance draws.
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.student, require_eos=True)
    student = load_student(cfg, checkpoint)
    prompts = prepare_prompts(load_prompts(cfg.prompts, cfg.problem_col, cfg.answer_col), tokenizer, cfg.system_prompt)
    index = open_trace_index(cfg, prompts)
    optimization = _optimization(cfg, accelerator, student)
    policy = _policy(cfg, optimization, tokenizer, engine_name, prompts, checkpoint)
    verifier = Verifier(timeout=cfg.reward.verify_timeout, workers=cfg.reward.verify_workers)
    rewarder = Rewarder(verifier, cfg.reward, cfg.overlong, cfg.rollout.max_new_tokens)
    guide = open_guide(cfg, index.lookup if index is not None else None, policy, tokenizer, rewarder)
    run = Run(cfg, accelerator, policy, tokenizer, optimization, prompts, PromptSampler(len(prompts), cfg.seed),
              index, verifier, rewarder, guide, benchmarks,
              teachers=sorted(set(index.table.column("teacher").to_pylist())) if index is not None else [],
              debug={"rank": accelerator.process_index, "prompt_ids": []})
    set_seed(cfg.seed + run.rank)
    if checkpoint is not None:
        _restore(run, checkpoint)
    if accelerator.is_main_process:
        _open_logs(run, checkpoint)
    run.trackers = Trackers(accelerator, cfg, trackers, None if checkpoint is None else checkpoint.step)
    return run


def _check_world(cfg: TrainConfig, world: int) -> None:
    for name, value in (("prompts_per_step", cfg.prompts_per_step), ("mini_batch_prompts", cfg.prompts_per_update)):
        if value % world:
            raise InputError("config", f"{name} ({value}) must be a multiple of the number of processes ({world})")


def open_trace_index(cfg: TrainConfig, prompts: Sequence[TrainPrompt]) -> TraceIndex | None:
    """The store's correct traces for the training prompts (None when guidance is off or no store)."""
    if cfg.guidance.mode == "off" or cfg.store is None:
        return None
    if not TraceStore.exists(cfg.store):
        raise InputError(str(cfg.store), "not a trace store (build one with `ampo-cache build`)")
    index = TraceStore.open(cfg.store).index(prompt_ids=[p.prompt_id for p in prompts])
    index.prefetch()  # page the index in once now, not as first-touch faults inside timed steps
    return index


def _optimization(cfg: TrainConfig, accelerator: Accelerator, student: torch.nn.Module) -> Optimization:
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr,
                                  betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                                  fused=cfg.adam_fused)
    # The schedule stays unprepared: it is placed by the step's progress, whatever the process count.
    scheduler = UpdateSchedule(optimizer, cfg.lr_scheduler, cfg.warmup_steps, cfg.updates_per_step, cfg.max_steps)
    model, optimizer = accelerator.prepare(student, optimizer)
    return Optimization(accelerator, model, optimizer, scheduler, cfg.max_grad_norm)


def _policy(cfg: TrainConfig, optimization: Optimization, tokenizer, engine_name: str,
            prompts: Sequence[TrainPrompt], checkpoint: LoadedCheckpoint | None) -> Policy:
    """The student and its engine. Generation, scoring and the no-grad passes run on the unwrapped
    module (no DDP; FSDP2 and ZeRO-3: inside ``full_parameters``)."""
    accelerator = optimization.accelerator
    module = accelerator.unwrap_model(optimization.model)
    reference = load_reference(cfg, accelerator)
    # Every generate call samples from a stream seeded for it (private_rng; seeds.RoundSeeds)
    engine = open_engine(engine_name, cfg.rollout, module, tokenizer, lambda: student_target(
        cfg, module, tokenizer, max(len(p.token_ids) for p in prompts),
        None if checkpoint is None else str(checkpoint.model_dir), accelerator.num_processes), private_rng=True)
    forward = ForwardSettings(cfg.rollout.temperature, cfg.logit_chunk_size, shards_parameters(accelerator),
                              logprob_kernel=cfg.logprob_kernel)
    return Policy(optimization.model, engine, tokenizer.pad_token_id, forward, module=module, ref_model=reference,
                  full_parameters=lambda: full_parameters(accelerator, module))


def _restore(run: Run, checkpoint: LoadedCheckpoint) -> None:
    """A checkpoint's optimizer, schedule, data position and RNG streams into the run."""
    load_optimizer_state(run.policy.module, run.optimization.optimizer, checkpoint.optimizer)
    run.optimization.scheduler.load_state_dict(checkpoint.scheduler)
    run.sampler.load_state_dict(checkpoint.state["data"])
    run.num_tokens = int(checkpoint.state.get("num_tokens", 0))
    run.trained_tokens = int(checkpoint.state.get("trained_tokens", 0))
    if len(checkpoint.rng_states) == run.world:
        restore_rng(checkpoint.rng_states[run.rank])
    elif run.accelerator.is_main_process:
        print(f"note: checkpoint has RNG states for {len(checkpoint.rng_states)} processes, this run has "
              f"{run.world}: sampling continues from fresh seeds")
    run.start_step = checkpoint.step


def _open_logs(run: Run, checkpoint: LoadedCheckpoint | None) -> None:
    """The main process's outputs: the resolved config, metrics.jsonl (and TensorBoard), samples.jsonl;
    a resumed run first drops what the interrupted one logged after its checkpoint."""
    cfg = run.cfg
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    (cfg.output_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    run.logger = MetricsLogger(cfg.output_dir, cfg.max_steps, cfg.log_every, start_step=run.start_step)
    if cfg.log_samples_every:
        run.sample_log = SampleLog(cfg.output_dir, cfg.log_samples_groups)
    if checkpoint is not None:
        run.logger.truncate_after(run.start_step)
        if run.sample_log is not None:
            run.sample_log.truncate_after(run.start_step)
    run.miss_log = MissLog(cfg.output_dir, None if checkpoint is None else run.start_step)
    _announce(run, checkpoint)


def _announce(run: Run, checkpoint: LoadedCheckpoint | None) -> None:
    cfg, module = run.cfg, run.policy.module
    trainable = sum(numel(p) for p in module.parameters() if p.requires_grad)
    total = sum(numel(p) for p in module.parameters())
    what = f"LoRA r={cfg.lora.r}" if cfg.lora else "full fine-tuning"
    run.logger.message(f"student {cfg.student} ({what}: {trainable:,} of {total:,} parameters trained), "
                       f"{run.world} process{'es' if run.world > 1 else ''}, rollouts by {run.policy.engine.name}, "
                       f"guidance {cfg.guidance.mode}")
    if run.index is not None:
        run.logger.message(f"store {cfg.store}: {len(run.index)} of {len(run.prompts)} training prompts have correct "
                           f"traces (teachers: {', '.join(run.teachers) or 'none'})")
    if checkpoint is not None:
        run.logger.message(f"resumed from {checkpoint.path} at step {checkpoint.step}")


# ----------------------------------------------------------------------------- saving and closing


def save_run_checkpoint(run: Run, step: int) -> None:
    """Checkpoint: every process's RNG state, and under FSDP2 and ZeRO every shard of the weights
    and the optimizer state, are gathered; the main process writes."""
    cfg, module, accelerator = run.cfg, run.policy.module, run.accelerator
    rng_states = gather_object([rng_state()])
    weights = full_state_dict(accelerator, module)
    optimizer_dict = optimizer_state(module, run.optimization.optimizer)
    if accelerator.is_main_process:
        state = {"data": run.sampler.state_dict(), "world_size": run.world, "layout": layout(accelerator),
                 "max_steps": cfg.max_steps, "num_tokens": run.num_tokens,
                 "trained_tokens": run.trained_tokens, "config": json.loads(cfg.model_dump_json())}
        content = CheckpointContent(module, weights, optimizer_dict, run.optimization.scheduler.state_dict(),
                                    rng_states, state)
        save_checkpoint(cfg.output_dir / "checkpoints", step, content, keep=cfg.keep_checkpoints)
    accelerator.wait_for_everyone()


def save_final_model(run: Run) -> Path:
    """OUTPUT_DIR/final: the adapter or full model with its tokenizer (FSDP2, ZeRO-3: gathered first)."""
    final_dir = run.cfg.output_dir / "final"
    weights = full_state_dict(run.accelerator, run.policy.module)  # every process gathers
    if run.accelerator.is_main_process:
        save_final(run.policy.module, run.tokenizer, final_dir, run.cfg.save_merged, weights)
        run.logger.message(f"saved {'adapter' if run.cfg.lora else 'model'} and tokenizer to {final_dir}")
    run.accelerator.wait_for_everyone()
    return final_dir


def close(run: Run) -> None:
    debug_dir = os.environ.get(DEBUG_DIR_ENV)
    if debug_dir:
        run.debug["param_sha256"] = parameter_digest(run.policy.module)
        run.debug.update(local_memory(run.policy.module, run.optimization.optimizer))
        Path(debug_dir).mkdir(parents=True, exist_ok=True)
        (Path(debug_dir) / f"rank{run.rank}.json").write_text(json.dumps(run.debug))
    run.verifier.close()
    run.policy.close()
    run.trackers.finish()
    if run.logger is not None:
        run.logger.close()
