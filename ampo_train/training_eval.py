"""What the trainer reports besides its step metrics: held-out evaluation every N steps, and a few
sampled rows in ``samples.jsonl``.

    benchmarks = load_eval_benchmarks(cfg.eval)                      # at start: a bad file fails early
    values = evaluate_during_training(policy, benchmarks, cfg, verifier, step, rank, world)
    # -> {"eval/<file stem>/avg@4": ..., "eval/<file stem>/pass@4": ..., ...} on the main process

Evaluation is ``ampo-train eval``'s own loop (``evaluation.runner``) run on the weights in memory.
Every process answers its share of the problems (problem i goes to process i mod N) with the run's
rollout engine, and the main process pools the answers and summarises them, so no process idles
and a vLLM engine is used by the process that owns it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from accelerate.utils import gather_object

from ampo_train.config import EvalDuringTraining, TrainConfig
from ampo_train.data import Row, TrainPrompt
from ampo_train.evaluation.benchmarks import BenchItem, load_benchmark
from ampo_train.evaluation.runner import (Answer, EvalSettings, Sampler, check_settings, metric_values,
                                          sample_benchmarks, summaries)
from ampo_train.guided_step import GuidancePlan


def load_eval_benchmarks(settings: EvalDuringTraining | None) -> dict[str, list[BenchItem]]:
    if settings is None:
        return {}
    benchmarks = {}
    for path in settings.files:
        items = load_benchmark(path)
        benchmarks[path.stem] = items[:settings.limit] if settings.limit else items
    return benchmarks


def eval_settings(cfg: TrainConfig) -> EvalSettings:
    e = cfg.eval
    settings = EvalSettings(samples=e.samples, ks=list(e.k), temperature=e.temperature, top_p=e.top_p,
                            max_tokens=e.max_tokens or cfg.rollout.max_new_tokens, greedy=e.greedy, seed=cfg.seed,
                            system_prompt=cfg.system_prompt, verify_timeout=cfg.reward.verify_timeout)
    check_settings(settings)
    return settings


def engine_generate(policy):
    """The run's rollout engine as the evaluation's ``generate``: token ids in, answers out."""
    def generate(prompt_token_ids, n, temperature, *, top_p=1.0, max_tokens, seed):
        greedy = temperature == 0
        sampling = policy.settings.model_copy(update={"temperature": temperature if not greedy else 1.0,
                                                       "top_p": top_p, "top_k": 0, "max_new_tokens": max_tokens})
        groups = policy.generate(prompt_token_ids, n, seed=seed, greedy=greedy, settings=sampling)
        return [[Answer(policy.tokenizer.decode(r.token_ids, skip_special_tokens=True), len(r.token_ids),
                        r.finish_reason) for r in group] for group in groups]
    return generate


def evaluate_during_training(policy, benchmarks: dict[str, list[BenchItem]], cfg: TrainConfig, verifier,
                             rank: int, world: int) -> dict[str, float]:
    """This process's share of the evaluation; on the main process (rank 0) the pooled metrics."""
    settings = eval_settings(cfg)
    mine = {name: items[rank::world] for name, items in benchmarks.items()}
    # transformers: the evaluation's own generate on the unwrapped model (forked RNG, eval mode);
    # another engine (vLLM) is asked through the policy, which pushes the current weights first.
    generate = None if policy.engine.name == "transformers" else engine_generate(policy)
    sampler = Sampler.from_loaded(policy.module, policy.tokenizer, settings, generate)
    try:
        records = sample_benchmarks(sampler, mine, settings, verifier)
    finally:
        sampler.close()
    shares = gather_object([records]) if world > 1 else [records]
    if rank != 0:
        return {}
    pooled = {name: [record for share in shares for record in share[name]] for name in benchmarks}
    return metric_values(summaries(pooled, settings), prefix="eval")


class SampleLog:
    """``samples.jsonl``: what the model wrote, a few groups every N steps (TRL's completion table,
    as a file you can grep or load with DuckDB)."""

    def __init__(self, output_dir: Path, groups: int):
        self.path, self.groups = output_dir / "samples.jsonl", groups

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows of steps after the checkpoint, so each step is logged once."""
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, batch: Sequence[TrainPrompt], rows: Sequence[Row], texts: Sequence[str],
              correct: Sequence[bool], plan: GuidancePlan, tokenizer, group_size: int) -> None:
        """Guided prompts first (their groups show the injected traces), then the others."""
        scores = {(inj.prompt_index, inj.slot): inj.score for inj in plan.injections}
        guided = sorted({inj.prompt_index for inj in plan.injections})
        order = guided + [b for b in range(len(batch)) if b not in guided]
        with open(self.path, "a", encoding="utf-8") as out:
            for b in order[:self.groups]:
                for g in range(group_size):
                    row = rows[b * group_size + g]
                    text = tokenizer.decode(row.response_ids, skip_special_tokens=True) if row.is_teacher \
                        else texts[b * group_size + g]
                    out.write(json.dumps({
                        "step": step, "prompt_id": batch[b].prompt_id, "prompt": batch[b].prompt.problem,
                        "answer": batch[b].answer, "sample": g, "response": text, "reward": row.reward,
                        "advantage": row.advantage,
                        "correct": None if row.is_teacher else bool(correct[b * group_size + g]),
                        "finished": row.finished, "injected": row.is_teacher, "teacher": row.teacher,
                        "comprehension": scores.get((b, g)),
                    }) + "\n")
