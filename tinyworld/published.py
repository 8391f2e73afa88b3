"""The published tiny world: its weight hashes, and whether a world built here reproduces it.

``tinyworld/published_world.json`` records, for the seed-0 world that ``ampo-cache tiny-world
build`` makes (and the small one the tests build), the SHA-256 of every model's weights, plus the
fingerprint (``tinyworld/fingerprint.py``) of the float order they were built in, the torch release
and the pins (``tinyworld.determinism``). The README's tables come from that world; a machine whose
build has the same hashes prints the same numbers. The demo says so in one line
(``reproduction_line``); ``python -m tinyworld.fingerprint`` tells in seconds, before any build.

A weight hash covers each tensor's name, dtype, shape and bytes, in name order, not the
safetensors file, so a new file header from another safetensors release changes nothing.

Re-record after a deliberate change (a new torch release in constraints/cpu.txt, other pins, another
world recipe): build both worlds with ``ampo-cache tiny-world build``, then
``python -m tinyworld.published WORLD_DIR SMALL_WORLD_DIR`` (then regenerate the results).
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Mapping

from tinyworld.determinism import OPT_OUT, PINNED, applies

PUBLISHED = Path(__file__).with_name("published_world.json")
QUESTION = "this machine reproduces the published world"


def load_published(path: Path = PUBLISHED) -> dict:
    return json.loads(path.read_text())


def tensors_digest(named: Iterable[tuple[str, object]]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of torch tensors, in name order."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(named, key=lambda item: item[0]):
        tensor = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def weights_hash(folder: Path) -> str:
    """The weights of a saved model folder (model.safetensors), hashed by ``tensors_digest``."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
        return tensors_digest((name, weights.get_tensor(name)) for name in weights.keys())


def world_hashes(root: Path) -> dict[str, str]:
    """Every model of a built world: ``student`` and ``teachers/<style>``."""
    folders = [root / "student", *sorted((root / "teachers").glob("*"))]
    return {str(f.relative_to(root)): weights_hash(f) for f in folders if (f / "model.safetensors").is_file()}


def _published_entry(summary: Mapping, published: Mapping) -> dict | None:
    return next((w for w in published["worlds"] if w["seed"] == summary["seed"] and w["size"] == summary["size"]), None)


def check_world(root: Path, published: Mapping | None = None) -> tuple[bool | None, str]:
    """(reproduces?, why): None where the world has no published twin (another seed or size)."""
    published = load_published() if published is None else published
    summary = json.loads((root / "world.json").read_text())
    entry = _published_entry(summary, published)
    if entry is None:
        known = ", ".join(f"seed {w['seed']} {w['size']}" for w in published["worlds"])
        return None, f"not comparable: this world is seed {summary['seed']} {summary['size']}; published: {known}"
    hashes = world_hashes(root)
    differ = [name for name, digest in entry["weights_sha256"].items() if hashes.get(name) != digest]
    if not differ:
        return True, f"the weights of all {len(hashes)} models match {PUBLISHED.name}"
    return False, f"{len(differ)} of {len(entry['weights_sha256'])} models' weights differ ({differ[0]}, ...); " + \
        _why_not(summary.get("float_order"), published)


def _why_not(order: Mapping | None, published: Mapping) -> str:
    """The likeliest reason a world's weights differ from the published ones."""
    if order is None:
        return "world.json does not say how it was built (an earlier build?): rebuild it"
    if order.get("torch") != published["torch"]:
        return f"built with torch {order.get('torch')}, published with {published['torch']}"
    if not order.get("pinned"):
        if order.get("machine", "").lower() not in ("x86_64", "amd64"):
            return f"{order.get('machine')}: not x86-64, its own float order"
        return f"built unpinned ({OPT_OUT}=1 or in-process): this machine's own float order"
    if order.get("env") != dict(published["pins"]):
        return "built under other pins (an earlier release's?): rebuild it"
    return "same pins, other float order: run `python -m tinyworld.fingerprint` and see docs/tiny-world.md"


def reproduction_line(root: Path) -> str:
    """The demo's line: 'this machine reproduces the published world: yes/no (why)'."""
    verdict, why = check_world(root)
    if verdict is None:
        return f"{QUESTION}: - ({why})"
    if not verdict and not applies():
        why = (f"{OPT_OUT} is set" if platform.machine().lower() in ("x86_64", "amd64")
               else f"{platform.machine()} is not x86-64") + f", so this machine's own float order; {why}"
    return f"{QUESTION}: {'yes' if verdict else 'no'} ({why})"


def record(world: Path, small_world: Path, path: Path = PUBLISHED) -> dict:
    """Rewrite the record from two built worlds (keeping its ``verified`` notes); returns it."""
    import torch

    old = load_published(path) if path.is_file() else {}
    fingerprint = subprocess.run([sys.executable, "-m", "tinyworld.fingerprint", "--print"], check=True,
                                 capture_output=True, text=True).stdout.strip()
    worlds = []
    for root in (world, small_world):
        summary = json.loads((root / "world.json").read_text())
        if not (summary.get("float_order") or {}).get("pinned"):
            raise SystemExit(f"error: {root} was not built pinned; build it with `ampo-cache tiny-world build`")
        worlds.append({"seed": summary["seed"], "size": summary["size"], "weights_sha256": world_hashes(root),
                       **{key: summary[key] for key in ("accuracy", "teachers_union_coverage_hard",
                                                        "student_all_wrong_groups_hard")}})
    data = {"about": old.get("about", ""), "torch": torch.__version__, "pins": PINNED, "fingerprint": fingerprint,
            "worlds": worlds, "verified": old.get("verified", [])}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return data


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m tinyworld.published WORLD_DIR SMALL_WORLD_DIR")
    print(json.dumps(record(Path(sys.argv[1]), Path(sys.argv[2])), indent=1))
