"""Is this folder a model we can load? Checked before any weights load.

A half-copied or corrupt model folder otherwise fails deep inside transformers with a long
traceback (or, for a folder that does not exist, with an attempt to download it from the hub).
``check_model_folder`` reads only the small files (JSON configs, the safetensors headers), so it
costs milliseconds, and reports the first defect as one ``InputError`` naming the file.

``model_location`` is the rule every command applies to a "folder or hub id" value: an existing
folder is checked; a value that looks like a path (starts with ``/ . ~`` or is not of the form
``name`` / ``org/name``) must exist; anything else is taken as a hub id, for machines with a hub.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ampo_common.errors import InputError

HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")

# JSON files transformers reads while loading a model or tokenizer: each must parse when present.
JSON_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json",
              "special_tokens_map.json", "added_tokens.json", "vocab.json", "model.safetensors.index.json",
              "pytorch_model.bin.index.json", "adapter_config.json")
# A tokenizer needs at least one of these.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin", "adapter_model.bin")


def looks_like_path(value: str) -> bool:
    """True for values only a local path can mean (``./m``, ``/models/x``, ``a/b/c``), not a hub id."""
    return value.startswith(("/", ".", "~")) or not HUB_ID.match(value)


def _json(path: Path) -> object:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(str(path), "not UTF-8 text: the file is corrupt") from None
    except json.JSONDecodeError as exc:
        raise InputError(str(path), f"corrupt JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except OSError as exc:
        raise InputError(str(path), f"unreadable ({exc.strerror or exc})") from None


def _check_weights(folder: Path) -> None:
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern)})
    if not files:
        raise InputError(str(folder), "no weights (no *.safetensors or *.bin file) in the model folder")
    from safetensors import safe_open

    for path in files:
        if path.suffix != ".safetensors":
            continue  # pickled .bin weights cannot be checked without loading them
        try:
            with safe_open(str(path), framework="numpy"):
                pass
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise InputError(str(path), f"corrupt or truncated weights ({exc})") from None


def check_model_folder(path: str | Path, *, weights: bool = True, tokenizer: bool = True) -> Path:
    """Raise InputError naming the first missing or corrupt file of a model folder; return the folder.

    ``weights``: the folder must hold a model (config.json with a model_type, readable weights);
    ``tokenizer``: it must hold a tokenizer. Whatever JSON file is present must parse either way.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise InputError(str(folder), "no such model folder")
    if not folder.is_dir():
        raise InputError(str(folder), "is a file; expected a model folder (config.json, weights, tokenizer files)")
    parsed = {name: _json(folder / name) for name in JSON_FILES if (folder / name).is_file()}
    for name, value in parsed.items():
        if name != "vocab.json" and not isinstance(value, dict):
            raise InputError(str(folder / name), f"expected a JSON object, got {type(value).__name__}")
    if weights and "adapter_config.json" in parsed and "config.json" not in parsed:
        _check_weights(folder)  # a peft adapter folder: its config parsed above, its weights here
    elif weights:
        if "config.json" not in parsed:
            raise InputError(str(folder), "no config.json: not a model folder")
        if "model_type" not in parsed["config.json"]:
            raise InputError(str(folder / "config.json"), "no 'model_type' key: not a transformers model config")
        _check_weights(folder)
    if tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(str(folder), f"no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return folder


def model_location(value: str, base: Path | None = None, *, weights: bool = True, tokenizer: bool = True) -> str:
    """A checked absolute folder for a local model, or ``value`` itself for a hub id.

    Relative values are looked up under ``base`` (default: the current directory).
    """
    local = Path(value).expanduser()
    if base is not None and not local.is_absolute():
        local = base / local
    if local.exists():
        return str(check_model_folder(local, weights=weights, tokenizer=tokenizer).resolve())
    if looks_like_path(value):
        raise InputError(str(local), f"no model folder here (and {value!r} is not a hub id like org/name)")
    return value  # a hub id: only a machine with hub access can check it
