"""Small helpers shared by the store tests: run the CLI in-process, snapshot a store's files."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from cli.cache import app

EXAMPLE = Path(__file__).resolve().parents[1] / "data" / "examples" / "long.jsonl"


def run_cache(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def snapshot(root: Path) -> dict[str, bytes]:
    """Every data file of a store with its bytes (the lookup index and catalog are derived)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}
