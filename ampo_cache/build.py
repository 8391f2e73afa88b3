"""The cache build: every teacher writes `samples_per_prompt` traces per prompt; each is verified and
appended to the store.

Resumable by construction: the plan lists, per teacher, the (prompt, sample_idx) keys the store
does not hold yet, so a killed build re-run generates only what is missing. Traces reach the store
in shards of `shard_rows` (or every `flush_seconds`), so a kill loses at most that much work.
`--shard i/N` keeps the prompts whose id hashes to i modulo N: N builders fill one store with
disjoint keys, and the slices do not depend on the order of the prompts file.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pyarrow as pa

from ampo_common.errors import InputError
from ampo_cache.generation import Backend, conversation, open_backend, resolve_backend
from ampo_cache.ids import text_hash
from ampo_cache.prompts import Prompt, load_prompts
from ampo_cache.schema import PROMPTS, TRACES
from ampo_cache.store import TraceStore
from ampo_cache.teachers import BuildConfig, Teacher
from ampo_cache.verify import Verifier


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'i/N' -> (i, N), with 0 <= i < N."""
    if text is None:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise InputError("--shard", f"expected i/N such as 0/4, got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise InputError("--shard", f"expected 0 <= i < N, got {text!r}")
    return index, count


def select_shard(prompts: Sequence[Prompt], shard: tuple[int, int] | None) -> list[Prompt]:
    if shard is None:
        return list(prompts)
    index, count = shard
    return [p for p in prompts if int(p.prompt_id, 16) % count == index]


@dataclass
class TeacherPlan:
    teacher: Teacher
    backend: str
    todo: list[tuple[Prompt, list[int]]]  # each prompt with the sample indices still missing
    stored: int  # traces of this teacher for these prompts already in the store

    @property
    def traces(self) -> int:
        return sum(len(missing) for _, missing in self.todo)


@dataclass
class TeacherResult:
    teacher: str
    traces: int = 0
    correct: int = 0
    tokens: int = 0
    truncated: int = 0
    seconds: float = 0.0
    statuses: dict = field(default_factory=dict)


def stored_keys(store_root: Path) -> set[tuple[str, str, int]]:
    if not TraceStore.exists(store_root):
        return set()
    keys = TraceStore.open(store_root).trace_keys()
    return set(zip(*(keys.column(name).to_pylist() for name in ("prompt_id", "teacher", "sample_idx"))))


def plan_build(config: BuildConfig, prompts: Sequence[Prompt]) -> list[TeacherPlan]:
    keys = stored_keys(config.store)
    plans = []
    for teacher in config.teachers:
        todo, stored = [], 0
        for prompt in prompts:
            missing = [i for i in range(config.samples_per_prompt) if (prompt.prompt_id, teacher.name, i) not in keys]
            stored += config.samples_per_prompt - len(missing)
            if missing:
                todo.append((prompt, missing))
        plans.append(TeacherPlan(teacher, resolve_backend(teacher), todo, stored))
    return plans


def load_build_prompts(config: BuildConfig, shard: tuple[int, int] | None, limit: int | None = None) -> list[Prompt]:
    prompts = load_prompts(config.prompts, config.problem_col, config.answer_col)
    return select_shard(prompts[:limit] if limit else prompts, shard)


def write_missing_prompts(store: TraceStore, prompts: Sequence[Prompt], source: str) -> int:
    known = store.prompt_ids()
    now = datetime.now(timezone.utc)
    rows = [dict(p.extra, prompt_id=p.prompt_id, problem=p.problem, answer=p.answer,
                 source=str(p.extra.get("source", source)), created_at=now)
            for p in prompts if p.prompt_id not in known]
    if rows:
        extra_names = sorted({k for row in rows for k in row} - set(PROMPTS.names))
        table = pa.Table.from_pylist(rows)
        store.append("prompts", table.select(PROMPTS.names + extra_names))
    return len(rows)


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _batch_seed(teacher: Teacher, first_prompt_id: str) -> int:
    """Same batch, same seed: a re-run regenerates what a killed run would have written."""
    key = f"{teacher.sampling.seed or 0}:{teacher.name}:{first_prompt_id}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little") & 0x7FFFFFFF


def build_teacher(
    plan: TeacherPlan,
    config: BuildConfig,
    store: TraceStore,
    backend: Backend,
    verifier: Verifier,
    origin: str,
    on_batch: Callable[[int, int, int], None] | None = None,
    flush_seconds: float = 60.0,
) -> TeacherResult:
    """Generate, verify and store every missing trace of one teacher. on_batch(prompts, traces, correct)."""
    teacher = plan.teacher
    result = TeacherResult(teacher.name)
    gen_params = json.dumps({"backend": backend.name, "model": teacher.model, "system_prompt": teacher.system_prompt,
                             **teacher.sampling.model_dump()})
    buffer: list[dict] = []
    last_flush = start = time.perf_counter()

    def flush() -> None:
        nonlocal buffer, last_flush
        store.append("traces", pa.Table.from_pylist(buffer, schema=TRACES))
        buffer, last_flush = [], time.perf_counter()

    for batch in _batches(plan.todo, teacher.batch_size):
        conversations = [conversation(prompt.problem, teacher.system_prompt) for prompt, _ in batch]
        generations = backend.generate(conversations, n=config.samples_per_prompt,
                                       seed=_batch_seed(teacher, batch[0][0].prompt_id))
        now = datetime.now(timezone.utc)
        rows, answers = [], []
        for (prompt, missing), samples in zip(batch, generations):
            for idx in missing:
                g = samples[idx]
                rows.append(dict(prompt_id=prompt.prompt_id, teacher=teacher.name, sample_idx=idx, text=g.text,
                                 text_hash=text_hash(g.text), num_chars=len(g.text), num_tokens=g.num_tokens,
                                 finish_reason=g.finish_reason, gen_params=gen_params, origin=origin, created_at=now))
                answers.append(prompt.answer)
        for row, verdict in zip(rows, verifier.verify([r["text"] for r in rows], answers)):
            row.update(correct=verdict.correct, verify_status=verdict.status, extracted_answer=verdict.extracted)
            result.statuses[verdict.status] = result.statuses.get(verdict.status, 0) + 1
        correct = sum(r["correct"] for r in rows)
        result.traces += len(rows)
        result.correct += correct
        result.tokens += sum(r["num_tokens"] for r in rows)
        result.truncated += sum(r["finish_reason"] == "length" for r in rows)
        buffer.extend(rows)
        if len(buffer) >= config.shard_rows or time.perf_counter() - last_flush > flush_seconds:
            flush()
        if on_batch:
            on_batch(len(batch), len(rows), correct)
    if buffer:
        flush()
    result.seconds = time.perf_counter() - start
    return result


def run_build(
    config: BuildConfig,
    plans: list[TeacherPlan],
    prompts: Sequence[Prompt],
    config_path: Path,
    on_teacher_start: Callable[[TeacherPlan], None] | None = None,
    on_batch: Callable[[int, int, int], None] | None = None,
) -> list[TeacherResult]:
    """Each teacher in turn: load once, generate what is missing, free it before the next."""
    store = TraceStore.create_or_open(config.store)
    write_missing_prompts(store, prompts, source=config.prompts.name)
    results = []
    with Verifier(timeout=config.verify_timeout) as verifier:
        for plan in plans:
            if on_teacher_start:
                on_teacher_start(plan)
            if not plan.todo:
                results.append(TeacherResult(plan.teacher.name))
                continue
            backend = open_backend(plan.teacher)
            try:
                results.append(build_teacher(plan, config, store, backend, verifier,
                                             origin=f"build:{config_path.name}", on_batch=on_batch))
            finally:
                backend.close()
    return results
