"""Checkpoints that resume a run exactly, written atomically.

    OUTPUT_DIR/checkpoints/step-000050/
        model/              the LoRA adapter (peft save_pretrained) or the full model (save_pretrained)
        optimizer.pt        optimizer state
        scheduler.pt        LR scheduler state
        rng.pt              per process: python, numpy, torch (CPU and CUDA) and the guidance generator
        trainer_state.json  step, data position, world size, the resolved config; written last

Everything is written into a hidden temporary folder beside the target, fsynced and then renamed
into place (``atomic_dir``), so a checkpoint folder either exists complete or not at all; a kill
mid-write leaves only a ``.step-*.tmp-*`` folder, removed by the next save. The final model is
saved the same way. Only the main process writes (the
other processes' RNG states are gathered to it first).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ampo_cache.errors import InputError
from ampo_cache.store import fsync_dir

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state(guidance_rng: random.Random) -> dict[str, Any]:
    """This process's random generators, as plain picklable objects."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "guidance": guidance_rng.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], guidance_rng: random.Random) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    guidance_rng.setstate(state["guidance"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(root)


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Yield a temporary folder beside ``final``; on success fsync it and rename it to ``final``
    (replacing an older one). On error the temporary folder is removed and ``final`` untouched."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():  # e.g. the same step saved again by a resumed run: replace it
            trash = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
            final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp.rename(final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(
    root: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    rng_states: list[dict],
    trainer_state: dict,
    keep: int | None = None,
) -> Path:
    """Write ``root/step-NNNNNN`` atomically and prune to the newest ``keep``. Main process only.

    ``model`` is the unwrapped model (a ``PeftModel`` saves only its adapter).
    """
    final = root / step_dir_name(step)
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp / "model", safe_serialization=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_states, tmp / "rng.pt")
        # Written last: a folder with this file is a complete checkpoint.
        (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "step": step}, indent=2, default=str))
    if keep is not None:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def find_checkpoint(path: str | Path) -> Path:
    """``--resume`` accepts a checkpoint folder, a run's output folder, or its ``checkpoints/`` folder
    (the newest complete checkpoint is taken)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise InputError(str(path), "no checkpoint here (expected trainer_state.json, or checkpoints/step-*/ inside)")


@dataclass
class LoadedCheckpoint:
    path: Path
    state: dict  # trainer_state.json
    optimizer: dict
    scheduler: dict
    rng_states: list[dict]

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def step(self) -> int:
        return int(self.state["step"])


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    state = json.loads((path / STATE_FILE).read_text())
    # weights_only=False: the RNG states hold numpy arrays and tuples; these are our own files.
    return LoadedCheckpoint(
        path=path,
        state=state,
        optimizer=torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False),
        scheduler=torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False),
        rng_states=torch.load(path / "rng.pt", map_location="cpu", weights_only=False),
    )
