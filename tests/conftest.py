"""Shared fixtures. The tiny world (small size) is built once per machine and code version, then reused."""

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class TinyWorld:
    root: Path
    summary: dict

    @property
    def teachers_yaml(self) -> Path:
        return self.root / "teachers.yaml"

    @property
    def train_yaml(self) -> Path:
        return self.root / "train.yaml"

    @property
    def train_prompts(self) -> Path:
        return self.root / "prompts" / "train.parquet"

    def test_prompts(self, level: int) -> Path:
        return self.root / "prompts" / f"test_level{level}.parquet"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def student(self) -> Path:
        return self.root / "student"

    @property
    def teachers(self) -> dict[str, Path]:
        return {p.name: p for p in sorted((self.root / "teachers").iterdir())}


def _source_hash(seed: int) -> str:
    digest = hashlib.sha256(str(seed).encode())
    for path in sorted((ROOT / "tinyworld").glob("*.py")):
        if path.name not in ("experiment.py", "diagnose.py"):  # they use a world; they build nothing of it
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


@pytest.fixture(scope="session")
def tiny_world() -> TinyWorld:
    """The small tiny world: real trained models (barely), built by our own code in ~15 s."""
    from tinyworld.build import build_world

    seed = 0
    cache = Path(os.environ.get("AMPO_TEST_CACHE", Path.home() / ".cache" / "ampo-tests"))
    root = cache / f"tiny-world-small-{_source_hash(seed)}"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test processes build it once
        if not (root / "world.json").exists():  # world.json is written last: a complete build
            build_world(root, seed=seed, size_name="small")
    return TinyWorld(root, json.loads((root / "world.json").read_text()))
