"""What the trainer reports besides its step metrics: held-out evaluation every N steps, and a few
sampled rows in ``samples.jsonl``.

    benchmarks = load_eval_benchmarks(cfg.eval)                      # at start: a bad file fails early
    values = evaluate_during_training(policy, tokenizer, benchmarks, cfg, verifier, rank, world)
    # -> {"eval/<file stem>/avg@4": ..., "eval/<file stem>/pass@4": ..., ...} on the main process

Evaluation is ``ampo-train eval``'s own loop (``evaluation.runner``) run on the weights in memory.
Every process answers its share of the problems (problem i goes to process i mod N) with the run's
rollout engine, and the main process pools the answers and summarises them, so no process idles
and a vLLM engine is used by the process that owns it. The transformers engine samples from a
generator of its own, seeded per call: evaluating does not change the training run's random stream.
"""

from __future__ import annotations

import json
from pathlib import Path

from accelerate.utils import gather_object

from ampo_train.config import EvalDuringTraining, TrainConfig
from ampo_train.evaluation.benchmarks import BenchItem, load_benchmark
from ampo_train.evaluation.runner import EvalSettings, Sampler, check_settings, metric_values, sample_benchmarks, summaries
from ampo_common.jsonl import truncate_jsonl
from ampo_train.step_record import StepRecord


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


def evaluate_during_training(policy, tokenizer, benchmarks: dict[str, list[BenchItem]], cfg: TrainConfig, verifier,
                             rank: int, world: int) -> dict[str, float]:
    """This process's share of the evaluation; on the main process (rank 0) the pooled metrics."""
    settings = eval_settings(cfg)
    mine = {name: items[rank::world] for name, items in benchmarks.items()}
    # Through the policy, which pushes the current weights to its engine first (vLLM); every call
    # samples from its own seeded stream, so the training run's draws are untouched.
    sampler = Sampler(policy, tokenizer, settings, rollout=cfg.rollout, name=policy.engine.name,
                      context=getattr(policy.module.config, "max_position_embeddings", None))
    records = sample_benchmarks(sampler, mine, settings, verifier)
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
        truncate_jsonl(self.path, step)

    def write(self, step: int, record: StepRecord, tokenizer) -> list[dict]:
        """Guided prompts first (their groups show the injected traces), then the others; returns
        the rows written (the trackers' sample table)."""
        batch, rows, texts, plan, group_size = record.prompts, record.rows, record.texts, record.plan, record.group_size
        scores = {(inj.prompt_index, inj.slot): inj.score for inj in plan.injections}
        guided = sorted({inj.prompt_index for inj in plan.injections})
        order = guided + [b for b in range(len(batch)) if b not in guided]
        written = []
        with open(self.path, "a", encoding="utf-8") as out:
            for b in order[:self.groups]:
                for g in range(group_size):
                    row = rows[b * group_size + g]
                    replaced = row.is_teacher or row.prefix_len > 0  # the rollout's text is not the row's
                    text = tokenizer.decode(row.response_ids, skip_special_tokens=True) if replaced \
                        else texts[b * group_size + g]
                    written.append({
                        "step": step, "prompt_id": batch[b].prompt_id, "prompt": batch[b].prompt.problem,
                        "answer": batch[b].answer, "sample": g, "response": text, "reward": row.reward,
                        "advantage": row.advantage,
                        "correct": row.correct,  # the verifier's verdict (a whole teacher trace: verified)
                        "finished": row.finished, "injected": row.is_teacher, "teacher": row.teacher,
                        "prefix_tokens": row.prefix_len,
                        "comprehension": scores.get((b, g)),
                    })
                    out.write(json.dumps(written[-1]) + "\n")
        return written
