"""Build the tiny world into a folder: prompts, tokenizer, a base model, four teachers, a student.

    DIR/prompts/train.parquet (+ .jsonl)   the RL training prompts, all levels
    DIR/prompts/test_level{1..4}.parquet   held-out problems per level
    DIR/tokenizer/                         character-level HF tokenizer with a chat template
    DIR/teachers/{forward,backward,pairs,largest}/   teachers (model + tokenizer folders)
    DIR/student/                           the student
    DIR/teachers.yaml, DIR/train.yaml      configs for `ampo-cache build` and `ampo-train run`
    DIR/world.json                         sizes, seed and the accuracy table (written last)

How skills are made (one lineage): the student is trained first, on levels 1-2 and a little of
level 3, in every style but mostly its own (forward), so it can read the teachers' styles and is
weak, not at zero, on the long sums; the base continues from the student on every level and
style; each teacher is the base specialised in one style. So the teachers' traces are text the
student can follow, the help is learnable, and its groups on the hard level are mostly (not all)
wrong, which is where teacher guidance pays. docs/tiny-world.md says why each choice.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from transformers.utils import logging as hf_logging

from ampo_common.errors import InputError
from tinyworld.determinism import float_order
from tinyworld.evaluate import score_model
from tinyworld.models import ModelSize, chat_example, new_model, train
from tinyworld.problems import HARD_LEVEL, TERMS_PER_LEVEL, Problem, ProblemSampler, held_out_problems
from tinyworld.styles import STYLES, render
from tinyworld.tokenizer import save_tokenizer

# The student's own training: mostly levels 1-2, a sliver of level 3 (weak there, not at zero, and
# nothing of level 4); all four styles, its own (forward) most, so it can read the others.
STUDENT_LEVELS = {1: 1.0, 2: 3.0, 3: 0.25}
STUDENT_STYLES = {"forward": 0.7, "backward": 0.1, "pairs": 0.1, "largest": 0.1}
# The base and the teachers continue from the student on every level, the long sums most.
TEACHER_LEVELS = {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}
TEACHER_TEMPERATURE = 0.6
STUDENT_TEMPERATURE = 1.0
MAX_TOKENS = 64  # the longest trace (5 terms, largest style: 9+9+9+9+9=...=36+9=\\boxed{45}) is 52 characters


@dataclass(frozen=True)
class WorldSize:
    base_steps: int
    teacher_steps: int
    student_steps: int
    batch: int
    lr: float
    train_prompts: int
    test_per_level: int
    teacher_samples: int  # sampled answers per test problem for a teacher (= samples_per_prompt of the cache)
    student_samples: int  # ... for the student (8 = a GRPO group)


SIZES = {
    "full": WorldSize(base_steps=600, teacher_steps=80, student_steps=900, batch=32, lr=3e-3,
                      train_prompts=1024, test_per_level=64, teacher_samples=2, student_samples=8),
    # For tests: real models that write real (mostly wrong) traces, built in well under a minute.
    "small": WorldSize(base_steps=60, teacher_steps=4, student_steps=20, batch=16, lr=3e-3,
                       train_prompts=48, test_per_level=6, teacher_samples=2, student_samples=2),
}


def write_prompts(folder: Path, train_set: list[Problem], tests: dict[int, list[Problem]]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"train": folder / "train.parquet"}
    pq.write_table(pa.Table.from_pylist([p.row() for p in train_set]), paths["train"])
    (folder / "train.jsonl").write_text("".join(json.dumps(p.row()) + "\n" for p in train_set))
    for level, problems in tests.items():
        paths[f"test_level{level}"] = folder / f"test_level{level}.parquet"
        pq.write_table(pa.Table.from_pylist([p.row() for p in problems]), paths[f"test_level{level}"])
    return paths


def write_configs(root: Path, size: WorldSize, seed: int) -> None:
    teachers_yaml = {
        "prompts": "prompts/train.parquet",
        "store": "store/",
        "samples_per_prompt": size.teacher_samples,
        "shard_rows": 1000,
        "teachers": [
            {"name": style, "model": f"teachers/{style}", "backend": "transformers", "batch_size": 64,
             "sampling": {"temperature": TEACHER_TEMPERATURE, "top_p": 1.0, "max_tokens": MAX_TOKENS, "seed": 0}}
            for style in STYLES
        ],
    }
    # The demo's budget (a few minutes per run on 2 CPU cores): 200 steps of 16 prompts x 8 samples.
    # lr 5e-5 (full fine-tuning): 1e-4 learned the hard levels no faster per step and degraded the
    # easy levels more (docs/results.md).
    train_yaml = {
        "student": "student",
        "prompts": "prompts/train.parquet",
        "store": "store/",
        "output_dir": "runs/ampo",
        "max_steps": 200,
        "prompts_per_step": 16,
        "mini_batch_prompts": 8,  # two optimizer updates per step, as the reference (so the PPO clip acts)
        "group_size": 8,
        "micro_batch_size": 64,
        "lr": 5.0e-5,
        "lora": None,
        "rollout": {"temperature": STUDENT_TEMPERATURE, "max_new_tokens": MAX_TOKENS},
        # k = 1 teacher trace per failed prompt (the reference uses 2): on this 0.87M-parameter student,
        # k = 2 costs level-3 accuracy that k = 1 keeps (docs/results.md).
        "guidance": {"mode": "adaptive", "k": 1, "max_candidates": 4, "rank": "comprehension",
                     "max_target_length": MAX_TOKENS},
        "save_steps": 100,
        "log_every": 10,
        "seed": seed,
        # Held-out accuracy while training (logged as eval/test_levelN/...): every 50 steps, 4 samples.
        "eval": {"files": [f"prompts/test_level{level}.parquet" for level in TERMS_PER_LEVEL], "every": 50, "samples": 4,
                 "k": [1, 4], "temperature": 0.6, "limit": 32},
    }
    header = "# Generated by `ampo-cache tiny-world build`. Relative paths are resolved against this file's folder.\n"
    (root / "teachers.yaml").write_text(header + yaml.safe_dump(teachers_yaml, sort_keys=False))
    (root / "train.yaml").write_text(header + yaml.safe_dump(train_yaml, sort_keys=False))


def _examples(tokenizer, sampler: ProblemSampler, rng: random.Random, levels: dict[int, float] | list[int],
              styles: dict[str, float] | list[str], batch: int) -> Callable[[], list]:
    """Batches of (problem, trace) examples; ``levels`` and ``styles``: lists (uniform) or weights."""
    level_list, level_w = (list(levels), list(levels.values())) if isinstance(levels, dict) else (levels, None)
    style_list, style_w = (list(styles), list(styles.values())) if isinstance(styles, dict) else (styles, None)

    def next_batch():
        out = []
        for _ in range(batch):
            problem = sampler.sample(level_list, level_w)
            out.append(chat_example(tokenizer, problem, render(rng.choices(style_list, style_w)[0], problem.terms)))
        return out

    return next_batch


def _save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_world(root: Path, seed: int = 0, size_name: str = "full",
                on_progress: Callable[[str, int], None] | None = None) -> dict:
    """Build everything under ``root``; returns the summary also written to world.json."""
    size = SIZES[size_name]
    hf_logging.disable_progress_bar()  # our own bar is on screen
    advance = on_progress or (lambda stage, n: None)
    torch.manual_seed(seed)
    started = time.perf_counter()
    if root.exists() and any(root.iterdir()):
        # Only ever replace an earlier tiny world (complete or not), never an unrelated folder.
        if not ((root / "world.json").exists() or (root / "prompts" / "train.parquet").exists()):
            raise InputError(str(root), "exists, is not empty and is not a tiny world; choose another folder")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)

    tests = held_out_problems(seed, size.test_per_level)
    train_set = ProblemSampler(seed, tests, "prompts").distinct(size.train_prompts, list(TERMS_PER_LEVEL))
    paths = write_prompts(root / "prompts", train_set, tests)
    tokenizer = save_tokenizer(root / "tokenizer")

    # One lineage: the student is an early checkpoint (easy levels, every style, forward most);
    # the base continues from it on every level and style; each teacher is the base specialised
    # in one style. Sharing the first stage also pays for the student's training only once.
    student = new_model(tokenizer, ModelSize(), seed + 100)
    train(student, _examples(tokenizer, ProblemSampler(seed, tests, "student"), random.Random(seed + 100),
                             STUDENT_LEVELS, STUDENT_STYLES, size.batch), size.student_steps, size.lr,
          tokenizer.pad_token_id, on_step=lambda loss: advance("student", 1))
    folders = {"student": _save(student, tokenizer, root / "student")}
    base = copy.deepcopy(student)
    train(base, _examples(tokenizer, ProblemSampler(seed, tests, "base"), random.Random(seed), TEACHER_LEVELS, list(STYLES),
                          size.batch), size.base_steps, size.lr, tokenizer.pad_token_id,
          on_step=lambda loss: advance("base", 1))
    for i, style in enumerate(STYLES):
        teacher = copy.deepcopy(base)
        train(teacher, _examples(tokenizer, ProblemSampler(seed + 1 + i, tests, style), random.Random(seed + i),
                                 TEACHER_LEVELS, [style], size.batch), size.teacher_steps, size.lr / 3, tokenizer.pad_token_id,
              on_step=lambda loss: advance(style, 1))
        folders[style] = _save(teacher, tokenizer, root / "teachers" / style)
    folders = {name: folders[name] for name in [*STYLES, "student"]}  # the table's order: teachers, then the student
    write_configs(root, size, seed)
    train_seconds = time.perf_counter() - started

    accuracy = {}
    for name, folder in folders.items():
        is_student = name == "student"
        scores = score_model(folder, tests, STUDENT_TEMPERATURE if is_student else TEACHER_TEMPERATURE,
                             size.student_samples if is_student else size.teacher_samples, MAX_TOKENS, seed)
        accuracy[name] = {level: asdict(s) for level, s in scores.items()}
        advance("eval", 1)
    teachers_solved = [any(accuracy[t][HARD_LEVEL]["solved"][i] for t in STYLES)
                       for i in range(len(tests[HARD_LEVEL]))]
    summary = {
        "seed": seed, "size": size_name, "sizes": asdict(size), "terms_per_level": TERMS_PER_LEVEL,
        "hard_level": HARD_LEVEL, "train_prompts": len(train_set),
        "test_prompts": {level: len(p) for level, p in tests.items()},
        "paths": {k: str(v.relative_to(root)) for k, v in paths.items()},
        "accuracy": {name: {level: {k: v for k, v in s.items() if k != "solved"} for level, s in levels_.items()}
                     for name, levels_ in accuracy.items()},
        "teachers_union_coverage_hard": sum(teachers_solved) / len(teachers_solved),
        "student_all_wrong_groups_hard": accuracy["student"][HARD_LEVEL]["all_wrong"],
        "float_order": float_order(),  # what the weights depend on (tinyworld.published compares them)
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    text = json.dumps(summary, indent=1)
    (root / "world.json").write_text(text)  # last: marks a complete build
    return json.loads(text)  # the same as a later reader sees it (level keys are strings)


def total_units(size_name: str) -> int:
    size = SIZES[size_name]
    return size.base_steps + len(STYLES) * size.teacher_steps + size.student_steps + len(STYLES) + 1
