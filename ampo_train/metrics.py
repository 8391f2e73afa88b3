"""Per-step metrics: gathered from every process, written by the main one.

Each step writes one JSON object per line to ``OUTPUT_DIR/metrics.jsonl`` (every key present every
step; ``null`` where a quantity has no sample, e.g. comprehension scores on a step with no guided
prompt), the same scalars to TensorBoard when it is installed, and a compact line to the console.

Why the loss can read ~0 (and what to watch instead): with one update per step the PPO ratio is
exactly 1, so the surrogate's *value* is -sum(A x mask) / normaliser, and mean-centred advantages
make that sum small (zero for groups of equal length) whatever the model does; its gradient is
not zero. The quantities that move are the reward/accuracy, the guided fraction, clip fractions
(non-zero from the second mini-batch or PPO epoch on), entropy and the gradient norm.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from rich.console import Console

from ampo_common.jsonl import truncate_jsonl

from ampo_train.data import Row
from ampo_train.step_record import StepRecord


class Name:
    """The metric names the phases outside this module write (``stats.mean(Name.ENTROPY, ...)``),
    in one table; the rest are written below (``step_stats``, ``trained_stats``, ``finish_metrics``).
    docs/metrics.md describes every one (a test checks it names each)."""

    # the update (ampo_train/update.py)
    LR = "lr"
    GRAD_NORM = "grad_norm"
    SKIPPED_UPDATES = "skipped_updates"
    UPDATES = "optimizer/updates"  # updates applied this step
    LOSS_POLICY = "loss/policy"
    ENTROPY = "entropy"
    KL = "kl"
    CLIP_FRACTION, CLIP_HIGH, CLIP_LOW, CLIP_DUAL = "clip/fraction", "clip/high", "clip/low", "clip/dual"
    TEACHER_TOKEN_PROB = "teacher_token_prob"
    LOGPROB_DIFF, LOGPROB_DIFF_MAX = "rollout/logprob_diff", "rollout/logprob_diff_max"
    IS_WEIGHT = "rollout/is_weight"
    MICRO_BATCHES, SPLIT, PADDING = "update/micro_batches", "update/split", "update/padding"
    LOSS_TOKENS = "update/loss_tokens"  # tokens the loss trained (summed over updates and processes)
    TOKEN_NORMALISER = "update/token_normaliser"  # what the token means divided by (the same sum, by construction)
    # sampling (ampo_train/sampling.py, trainer.py)
    SYNC_BYTES = "rollout/sync_bytes"
    DYNAMIC_ROUNDS = "dynamic/rounds"
    DYNAMIC_DRAWN, DYNAMIC_KEPT, DYNAMIC_DROPPED = "dynamic/drawn_groups", "dynamic/kept_groups", "dynamic/dropped_groups"
    STEP_TIME = "time/step"


class PhaseTimer:
    """Wall time per phase of a step: ``with timer("generate"): ...``; ``record`` adds them to the
    step's stats as ``time/<phase>`` (the largest over processes once merged)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def record(self, stats: "StepStats") -> None:
        for phase, seconds in self.seconds.items():
            stats.maximum(f"time/{phase}", seconds)


class StepStats:
    """Accumulates one process's numbers for a step; ``merge`` combines processes exactly.

    ``mean``: a sum and a count (the merged value is sum / count over all processes);
    ``total``: summed; ``maximum``: the largest; ``tally``: a Counter flattened to ``name/key``;
    ``replicated``: summed within a process, the same on every process (the updates the processes
    make together, dynamic sampling's rounds), so merged as one process's, not a sum.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)
        self.totals: dict[str, float] = defaultdict(float)
        self.maxima: dict[str, float] = {}
        self.tallies: dict[str, Counter] = defaultdict(Counter)
        self.replicas: dict[str, float] = defaultdict(float)

    def mean(self, name: str, total: float, count: float = 1.0) -> None:
        self.sums[name] += float(total)
        self.counts[name] += float(count)

    def mean_of(self, name: str, values: Iterable[float]) -> None:
        values = [float(v) for v in values]
        self.sums[name] += sum(values)
        self.counts[name] += len(values)

    def total(self, name: str, value: float) -> None:
        self.totals[name] += float(value)

    def maximum(self, name: str, value: float) -> None:
        self.maxima[name] = max(self.maxima.get(name, -math.inf), float(value))

    def replicated(self, name: str, value: float) -> None:
        self.replicas[name] += float(value)

    def tally(self, name: str, counter: Mapping[str, int]) -> None:
        self.tallies[name].update(counter)  # zero counts stay as keys: every step logs every teacher

    def to_dict(self) -> dict:
        return {"sums": dict(self.sums), "counts": dict(self.counts), "totals": dict(self.totals),
                "maxima": dict(self.maxima), "tallies": {k: dict(v) for k, v in self.tallies.items()},
                "replicas": dict(self.replicas)}

    @classmethod
    def merge(cls, parts: Iterable[dict]) -> "StepStats":
        merged = cls()
        for part in parts:
            for k, v in part["sums"].items():
                merged.sums[k] += v
            for k, v in part["counts"].items():
                merged.counts[k] += v
            for k, v in part["totals"].items():
                merged.totals[k] += v
            for k, v in part["maxima"].items():
                merged.maximum(k, v)
            for k, v in part["tallies"].items():
                merged.tallies[k].update(v)
            for k, v in part["replicas"].items():
                merged.replicas[k] = max(merged.replicas.get(k, v), v)
        return merged

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in sorted(set(self.sums) | set(self.counts)):
            count = self.counts.get(name, 0.0)
            out[name] = self.sums[name] / count if count else None
        out.update(self.totals)
        out.update(self.maxima)
        out.update(self.replicas)
        for name, counter in self.tallies.items():
            for key, n in sorted(counter.items()):
                out[f"{name}/{key}"] = n
        return out


def step_stats(stats: StepStats, record: StepRecord, teachers: Sequence[str]) -> None:
    """This process's share of the step's metrics (counts and sums; merged across processes later)."""
    rewards, correct, groups = record.rewards, record.correct, record.groups
    n, prompts = rewards.numel(), len(record.prompts)
    stats.mean("reward", float(rewards.sum()), n)  # on-policy, before injection
    stats.mean("reward_mixed", sum(r.reward for r in record.rows), n)  # the groups the loss saw
    stats.mean("accuracy", int(correct.sum()), n)  # the verifier's verdicts
    stats.mean("groups/all_wrong", int((~correct.any(dim=1)).sum()), prompts)
    stats.mean("groups/all_correct", int(correct.all(dim=1).sum()), prompts)
    spread = rewards.max(dim=1).values - rewards.min(dim=1).values
    stats.mean("frac_reward_zero_std", int((spread == 0).sum()), prompts)  # TRL's: no gradient there
    stats.total("_reward_sq", float((rewards.double() ** 2).sum()))  # for reward_std over every process
    stats.total("_reward_count", n)
    _guidance_stats(stats, record, teachers)
    lengths = [len(r.token_ids) for group in groups for r in group]
    stats.mean_of("response_length/mean", lengths)
    stats.maximum("response_length/max", max(lengths))
    stats.mean("response_length/truncated", sum(r.finish_reason == "length" for g in groups for r in g), len(lengths))
    stats.mean_of("teacher_length/mean", [len(r.response_ids) for r in record.rows if r.is_teacher])
    stats.total("tokens/generated", sum(lengths))
    # what TRL's num_tokens adds up: every sampled sequence's prompt and completion tokens
    continuations = [(i.prompt_index, i.continuation) for i in record.plan.injections if i.continuation is not None]
    prompt_tokens = sum(len(p.token_ids) * len(g) for p, g in zip(record.prompts, groups))
    stats.total("tokens/sampled", prompt_tokens + sum(lengths) + sum(
        len(record.prompts[b].token_ids) + len(c.prefix_ids) + len(c.rollout.token_ids) for b, c in continuations))
    if continuations:  # prefix guidance
        stats.mean_of("guidance/prefix_tokens", record.plan.report.prefix_tokens)
        stats.mean("guidance/prefix_solved", sum(c.correct for _, c in continuations), len(continuations))


def _guidance_stats(stats: StepStats, record: StepRecord, teachers: Sequence[str]) -> None:
    report, injections = record.plan.report, record.plan.injections
    stats.total("guidance/prompts", report.prompts)
    stats.total("guidance/needed", report.needed)
    stats.total("guidance/guided", report.guided)
    stats.tally("guidance/guided_by", report.reasons)
    stats.total("guidance/no_trace", report.no_trace)
    stats.total("guidance/injected", report.injected)
    stats.total("guidance/replaced_correct", sum(i.replaced_correct for i in injections))
    # as the reference counts them: injected texts whose answer is right / wrong (whole traces are
    # verified; a prefix continuation is the student's own answer)
    right = sum(i.continuation is None or i.continuation.correct for i in injections)
    stats.total("guidance/teacher_correct", right)
    stats.total("guidance/teacher_incorrect", len(injections) - right)
    stats.tally("guidance/teacher", {name: 0 for name in teachers})
    stats.tally("guidance/teacher", report.per_teacher)
    stats.mean_of("comprehension/picked", report.picked_scores)
    stats.mean_of("comprehension/unpicked", report.unpicked_scores)
    stats.mean_of("comprehension/gain", report.score_gains)


def trained_stats(stats: StepStats, rows: Sequence[Row]) -> None:
    """What the update trained on (with dynamic sampling, the kept groups only)."""
    teacher_tokens = sum(len(r.response_ids) if r.is_teacher else r.prefix_len * r.prefix_in_loss for r in rows)
    stats.mean("guidance/offpolicy_token_frac", teacher_tokens, sum(len(r.response_ids) for r in rows))
    stats.total("tokens/trained", sum(len(r.prompt_ids) + len(r.response_ids) for r in rows))


# TRL's GRPOTrainer names (what its users watch) -> ours; both are logged. (TRL's `reward` is ours
# too: a tracker that stores metrics as paths, MLflow's file store, cannot hold `reward` beside
# `reward/...`, so no key of ours nests under it.)
TRL_NAMES = {
    "completions/mean_length": "response_length/mean",
    "completions/max_length": "response_length/max",
    "completions/clipped_ratio": "response_length/truncated",
    "clip_ratio/region_mean": "clip/fraction",
    "clip_ratio/low_mean": "clip/low",
    "clip_ratio/high_mean": "clip/high",
    "learning_rate": "lr",
    "step_time": "time/step",
    "sampling/importance_sampling_ratio/mean": "rollout/is_weight",
    "sampling/sampling_logp_difference/mean": "rollout/logprob_diff",
    "sampling/sampling_logp_difference/max": "rollout/logprob_diff_max",
}
# Keys (prefixes) measured in wall time: the same step run twice gives other values for these
# only. Tests of resume and of processes vs one process compare everything else.
WALL_TIME_KEYS = ("time/", "step_time", "tokens_per_second", "generate_tokens_per_second")
# Guidance under one prefix, beside the names the trainer has always logged.
GUIDANCE_NAMES = {
    "guidance/comprehension_picked": "comprehension/picked",
    "guidance/comprehension_left": "comprehension/unpicked",
}


def _ratio(summary: dict, numerator: str, denominator: str) -> float | None:
    total = summary.get(denominator) or 0
    return summary.get(numerator, 0) / total if total else None


def finish_metrics(summary: dict, step: int, epoch: float, totals: dict[str, int] | None = None) -> dict:
    """The merged step summary plus what is derived from it: the guidance fractions, the reward's
    spread, throughput, TRL's names for our numbers, the step and epoch, and ``null`` for the keys
    a step may have no sample of. (docs/metrics.md lists every key.)"""
    summary["guidance/fraction"] = _ratio(summary, "guidance/guided", "guidance/prompts") or 0.0
    summary["guidance/triggered_frac"] = _ratio(summary, "guidance/needed", "guidance/prompts") or 0.0
    summary["guidance/cache_miss_frac"] = _ratio(summary, "guidance/no_trace", "guidance/needed")
    summary["guidance/k_mean"] = _ratio(summary, "guidance/injected", "guidance/guided")
    count, sum_sq, mean = summary.pop("_reward_count", 0), summary.pop("_reward_sq", None), summary.get("reward")
    summary["reward_std"] = None
    if sum_sq is not None and mean is not None and count > 1:
        variance = (sum_sq - count * mean * mean) / (count - 1)  # Bessel's correction, as torch.std (TRL)
        summary["reward_std"] = max(variance, 0.0) ** 0.5
    step_time = summary.get("time/step") or 0.0
    summary["tokens_per_second"] = summary.get("tokens/trained", 0) / step_time if step_time else None
    gen_time = summary.get("time/generate") or 0.0
    summary["generate_tokens_per_second"] = summary.get("tokens/generated", 0) / gen_time if gen_time else None
    summary["step"] = step
    summary["epoch"] = epoch
    summary.update(totals or {})
    for key in ("kl", "entropy", "teacher_token_prob", "rollout/is_weight", "rollout/logprob_diff", "rollout/logprob_diff_max"):
        summary.setdefault(key, None)
    for alias, ours in {**TRL_NAMES, **GUIDANCE_NAMES}.items():
        summary[alias] = summary.get(ours)
    for key in [k for k in summary if k.startswith("guidance/teacher/")]:
        summary["guidance/injected_per_teacher/" + key.rsplit("/", 1)[1]] = summary[key]
    return summary


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def short_status(m: dict[str, Any]) -> str:
    """The progress bar's fields: what moves, in a few characters."""
    return (f"reward {_fmt(m.get('reward'), '.3f')}  guided {_fmt(m.get('guidance/fraction'), '.0%')}"
            f"  {_fmt(m.get('time/step'), '.2f')} s/step")


def progress_line(m: dict[str, Any], max_steps: int) -> str:
    """The console's one line per step: what moves, and where the time goes."""
    guided = f"{_fmt(m.get('guidance/fraction'), '.2f')} ({int(m.get('guidance/guided', 0))}/{int(m.get('guidance/prompts', 0))}"
    if m.get("guidance/no_trace"):
        guided += f", no trace {int(m['guidance/no_trace'])}"
    guided += ")"
    return (
        f"step {m['step']}/{max_steps} | reward {_fmt(m.get('reward'), '.3f')} acc {_fmt(m.get('accuracy'), '.3f')}"
        f" | guided {guided}"
        f" | len {_fmt(m.get('response_length/mean'), '.0f')} ent {_fmt(m.get('entropy'), '.2f')}"
        f" clip {_fmt(m.get('clip/fraction'), '.3f')} gnorm {_fmt(m.get('grad_norm'), '.3f')}"
        f" | gen {_fmt(m.get('time/generate'), '.2f')}s guide {_fmt(m.get('time/guidance'), '.2f')}s"
        f" upd {_fmt(m.get('time/update'), '.2f')}s | {_fmt(m.get('tokens_per_second'), '.0f')} tok/s"
    )


class MetricsLogger:
    """metrics.jsonl and the console (main process only; the trackers are ``ampo_train.tracking``).

    On a terminal a progress bar over the steps shows the ETA, the last step's reward, guided
    fraction and step time, and the full line every ``log_every`` steps above it; elsewhere (CI,
    a log file) only that line, every ``log_every`` steps, so logs stay readable.
    """

    def __init__(self, output_dir: Path, max_steps: int, log_every: int = 1, start_step: int = 0,
                 console: Console | None = None):
        self.path = output_dir / "metrics.jsonl"
        self.max_steps, self.log_every = max_steps, log_every
        self.console = console or Console(highlight=False)
        output_dir.mkdir(parents=True, exist_ok=True)
        self._file = None
        self.progress = None
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                     TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                                     console=self.console)
            self.task = self.progress.add_task("train", total=max_steps, completed=start_step, status="")
            self.progress.start()

    def truncate_after(self, step: int) -> None:
        """On resume: drop the interrupted run's lines after the checkpoint (``truncate_jsonl``)."""
        if truncate_jsonl(self.path, step):
            self.message(f"note: {self.path} ended with a torn line (the run was killed while writing it): dropped")

    def log(self, metrics: dict[str, Any]) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(metrics, sort_keys=True) + "\n")
        self._file.flush()
        step = metrics["step"]
        if self.progress is not None:
            self.progress.update(self.task, completed=step, status=short_status(metrics))
        if step % self.log_every == 0 or step == self.max_steps:
            self.console.print(progress_line(metrics, self.max_steps), soft_wrap=True)

    def message(self, text: str) -> None:
        self.console.print(text, soft_wrap=True)  # above the bar when there is one

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
