"""Checkpoints that resume a run exactly, written atomically, and that never run code when loaded.

    OUTPUT_DIR/checkpoints/step-000050/
        model/              the LoRA adapter (peft save_pretrained) or the full model (save_pretrained):
                            safetensors weights and JSON configs
        optimizer.pt        the optimizer's whole state keyed by parameter name (torch's
                            get_optimizer_state_dict, gathered from every process under FSDP2;
                            the same layout from DeepSpeed's ZeRO partitions, ampo_train/zero.py):
                            tensors, numbers, lists and dicts (torch.save), read back with
                            torch.load(weights_only=True); the same file under every layout
        scheduler.json      the LR schedule's state_dict (JSON: the updates applied)
        rng.json            per process (JSON): python, numpy, torch (CPU and CUDA) generators
        trainer_state.json  checkpoint_format, step, data position, world size, the resolved config;
                            written last

Why these formats: checkpoint folders get shared (a colleague's run, a downloaded one), and
unpickling runs whatever code the pickle names. So resuming unpickles nothing except through
torch's weights-only loader, which builds only tensors and plain containers and refuses every other
class; no class is allow-listed (AdamW's state needs none). The rest is JSON, which cannot name code:
- scheduler.json: ``schedule.UpdateSchedule``'s state_dict: the updates applied and the base
  learning rates (an older checkpoint's ``LambdaLR`` state is read too: its ``last_epoch``).
- rng.json: Python's Mersenne Twister state (``random.getstate()``: version, 625 ints, the cached
  gauss value; older checkpoints also hold a guidance ``random.Random``, now unused), NumPy's (``np.random.get_state()``:
  624 uint32 keys, position, cached gaussian), and torch's generator states (byte tensors) as hex
  strings. Ints are exact in JSON and Python writes floats with ``repr``, so every state comes back
  bit for bit. (Rollouts and guidance draw from streams seeded by step and prompt, ``seeds.RoundSeeds``,
so a resumed run draws what the uninterrupted one would whatever these hold.)
- model/ must hold no pickled weight file (``*.bin``, ``*.pt``...): ``save_pretrained`` writes
  safetensors here, so such a file can only come from someone else and is refused.
``rng_state`` returns this JSON-ready form (it travels through accelerate's ``gather_object``) and
``restore_rng`` takes it.

Format versions, ``checkpoint_format`` in trainer_state.json: absent = the first release's layout,
whose optimizer.pt, scheduler.pt and rng.pt were pickles of numpy arrays and tuples; it is refused
with one line saying how to continue from its weights, and never unpickled. 2 = this layout.

Everything is written into a hidden temporary folder beside the target, fsynced and then renamed
into place (``atomic_dir``), so a checkpoint folder either exists complete or not at all; a kill
mid-write leaves only a ``.step-*.tmp-*`` folder, removed by the next save. The final model is
saved the same way. Only the main process writes (the
other processes' RNG states are gathered to it first).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import re
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ampo_common.errors import InputError
from ampo_common.files import fsync_dir

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.json"
RNG_FILE = "rng.json"
FORMAT_KEY = "checkpoint_format"
FORMAT = 2  # bump on any change to the files above; load_checkpoint refuses formats it does not know
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Pickle-based weight formats. transformers and peft read them with weights-only loaders today, but
# a checkpoint written here never holds one, so there is no reason to trust their loaders with it.
_PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# ----------------------------------------------------------------------------- RNG states as JSON


def _twister_to_json(state: tuple) -> dict:
    """``random.Random.getstate()``: (version, 625 ints, gauss_next)."""
    version, internal, gauss_next = state
    return {"version": version, "internal": list(internal), "gauss_next": gauss_next}


def _twister_from_json(data: dict) -> tuple:
    return data["version"], tuple(data["internal"]), data["gauss_next"]


def _numpy_to_json(state: tuple) -> dict:
    """``np.random.get_state()``: (algorithm, 624 uint32 keys, pos, has_gauss, cached_gaussian)."""
    algorithm, keys, pos, has_gauss, cached_gaussian = state
    return {"algorithm": algorithm, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian)}


def _numpy_from_json(data: dict) -> tuple:
    keys = data["keys"]
    if not isinstance(keys, list) or not all(type(k) is int for k in keys):
        raise ValueError("numpy keys: expected a list of integers")
    return data["algorithm"], np.array(keys, dtype=np.uint32), data["pos"], data["has_gauss"], data["cached_gaussian"]


def _bytes_to_hex(state: torch.Tensor) -> str:
    return state.cpu().numpy().tobytes().hex()


def _hex_to_bytes(text: str) -> torch.Tensor:
    if not isinstance(text, str) or not text:
        raise ValueError("torch state: expected a non-empty hex string")
    return torch.frombuffer(bytearray.fromhex(text), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    """This process's random generators as JSON-ready plain data (see the module docstring)."""
    state = {
        "python": _twister_to_json(random.getstate()),
        "numpy": _numpy_to_json(np.random.get_state()),
        "torch": _bytes_to_hex(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_bytes_to_hex(s) for s in torch.cuda.get_rng_state_all()]
    return state


def _decode_rng(state: dict[str, Any]) -> dict[str, Any]:
    """``rng_state``'s JSON form back to what the generators' ``setstate`` functions take."""
    native = {
        "python": _twister_from_json(state["python"]),
        "numpy": _numpy_from_json(state["numpy"]),
        "torch": _hex_to_bytes(state["torch"]),
    }
    if "guidance" in state:  # written by versions whose guidance drew from one stream per process
        native["guidance"] = _twister_from_json(state["guidance"])
    if "cuda" in state:
        if not isinstance(state["cuda"], list):
            raise ValueError("cuda: expected a list of hex strings")
        native["cuda"] = [_hex_to_bytes(s) for s in state["cuda"]]
    return native


def restore_rng(state: dict[str, Any]) -> None:
    """Set this process's generators to ``state`` (one entry of ``LoadedCheckpoint.rng_states``).
    Rollouts and guidance draw from streams seeded per step (``seeds.RoundSeeds``), so these only
    matter to code that uses the global generators."""
    native = _decode_rng(state)
    random.setstate(native["python"])
    np.random.set_state(native["numpy"])
    torch.set_rng_state(native["torch"])
    if "cuda" in native and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(native["cuda"])


def _check_rng_states(states: Any, where: Path) -> None:
    """Validate every process's state on throwaway generators now, so a damaged rng.json is one
    line before training starts rather than a traceback after the model has loaded."""
    if not isinstance(states, list) or not states:
        raise InputError(str(where), "expected a list with one RNG state per process")
    for rank, state in enumerate(states):
        try:
            if not isinstance(state, dict):
                raise TypeError("expected an object with python, numpy and torch states")
            native = _decode_rng(state)
            random.Random().setstate(native["python"])
            if "guidance" in native:
                random.Random().setstate(native["guidance"])
            np.random.RandomState().set_state(native["numpy"])
            torch.Generator().set_state(native["torch"])
        except KeyError as exc:
            raise InputError(str(where), f"process {rank}: missing {exc.args[0]!r} (expected python, numpy "
                             "and torch states)") from None
        except (TypeError, ValueError, OverflowError, RuntimeError) as exc:
            raise InputError(str(where), f"process {rank}: not a valid RNG state ({_first_line(exc)})") from None


# ----------------------------------------------------------------------------- writing

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


def _require_plain(value: Any, where: str, tensors: bool) -> None:
    """Fail at save time, naming the culprit, if a state holds anything but plain values (and
    tensors where ``tensors``): such a checkpoint could not be read back without unpickling."""
    if value is None or isinstance(value, (bool, int, float, str)) or (tensors and isinstance(value, torch.Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _require_plain(item, f"{where}[{i}]", tensors)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not (isinstance(key, str) or (tensors and isinstance(key, int) and not isinstance(key, bool))):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; checkpoints store plain keys")
            _require_plain(item, f"{where}[{key!r}]", tensors)
        return
    raise TypeError(f"{where} is a {type(value).__name__}: checkpoints store only tensors and plain values, "
                    "so that resuming never unpickles an object")


def save_weights(model, folder: Path, weights: dict | None = None) -> None:
    """``model.save_pretrained(folder)`` as safetensors (a ``PeftModel``: its adapter only).
    ``weights``: the full state dict of a sharded model (``distributed.full_state_dict``), saved
    instead of the model's own (sharded) tensors."""
    if weights is None:
        model.save_pretrained(folder, safe_serialization=True)
    else:
        model.save_pretrained(folder, state_dict=weights, safe_serialization=True)


@dataclass
class CheckpointContent:
    """What one checkpoint holds (gathered by the trainer; written by the main process)."""

    model: Any  # the unwrapped model (a PeftModel saves only its adapter)
    weights: dict | None  # its full state dict when it is sharded (distributed.full_state_dict), else None
    optimizer_state: dict  # distributed.optimizer_state: keyed by parameter name
    scheduler_state: dict
    rng_states: list[dict]  # every process's rng_state
    trainer_state: dict  # data position, world size, layout, max_steps, the resolved config


def save_checkpoint(root: Path, step: int, content: CheckpointContent, keep: int | None = None) -> Path:
    """Write ``root/step-NNNNNN`` atomically and prune to the newest ``keep``. Main process only."""
    _require_plain(content.optimizer_state, "optimizer state", tensors=True)
    _require_plain(content.scheduler_state, "scheduler state", tensors=False)
    _require_plain(content.rng_states, "RNG states", tensors=False)
    final = root / step_dir_name(step)
    with atomic_dir(final) as tmp:
        save_weights(content.model, tmp / "model", content.weights)
        torch.save(content.optimizer_state, tmp / OPTIMIZER_FILE)
        (tmp / SCHEDULER_FILE).write_text(json.dumps(content.scheduler_state, indent=1))
        (tmp / RNG_FILE).write_text(json.dumps(content.rng_states))
        # Written last: a folder with this file is a complete checkpoint.
        state = {**content.trainer_state, "step": step, FORMAT_KEY: FORMAT}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, default=str))
    if keep is not None:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_final(module, tokenizer, final_dir: Path, merged: bool = False, weights: dict | None = None) -> None:
    """The trained adapter (``PeftModel.from_pretrained(base, final_dir)``) or full model
    (``AutoModelForCausalLM.from_pretrained(final_dir)``), with the tokenizer beside it; atomically.
    ``weights``: the full state dict of a sharded module (``distributed.full_state_dict``)."""
    with atomic_dir(final_dir) as tmp:
        save_weights(module, tmp, weights)
        tokenizer.save_pretrained(tmp)
        if merged and hasattr(module, "merge_and_unload"):
            full = copy.deepcopy(module).merge_and_unload()
            full.save_pretrained(tmp / "merged", safe_serialization=True)
            tokenizer.save_pretrained(tmp / "merged")


# ----------------------------------------------------------------------------- finding and reading


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
    optimizer: dict  # for optimizer.load_state_dict
    scheduler: dict  # for scheduler.load_state_dict
    rng_states: list[dict]  # one per process, for restore_rng

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def step(self) -> int:
        return int(self.state["step"])


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


def _why_refused(exc: BaseException) -> str:
    """torch's weights-only refusal is a paragraph; keep the part that says what the file wanted."""
    text = _ANSI.sub("", str(exc))
    named = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if named:
        return f"it names {named.group(1)}, which is neither a tensor nor plain data"
    return _first_line(exc)


def _read_json(path: Path, expected: str) -> Any:
    if not path.is_file():
        raise InputError(str(path), f"missing (expected {expected})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError(str(path), f"not JSON text (expected {expected})") from None
    except json.JSONDecodeError as exc:
        raise InputError(str(path), f"not JSON: line {exc.lineno} column {exc.colno}: {exc.msg} "
                         f"(expected {expected})") from None


def _load_tensors(path: Path, expected: str) -> Any:
    """torch.load with weights_only=True: tensors and plain containers or a refusal, never code."""
    if not path.is_file():
        raise InputError(str(path), f"missing (expected {expected})")
    try:
        with warnings.catch_warnings():  # a foreign pickle protocol is refused below anyway: keep one line
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # whatever breaks on an untrusted file is a refusal in one line
        raise InputError(str(path), f"refused, nothing in it was run: not {expected} ({_why_refused(exc)})") from None


def read_trainer_state(path: Path) -> dict:
    """trainer_state.json of checkpoint folder ``path``, or a one-line error."""
    state = _read_json(path / STATE_FILE, "the checkpoint's step, data position and config")
    if not isinstance(state, dict):
        raise InputError(str(path / STATE_FILE), "expected a JSON object (step, data position, config)")
    return state


def _older_version(path: Path, state: dict) -> InputError:
    """The one line for a first-release checkpoint: what it is and how to go on from its weights."""
    config = state.get("config") if isinstance(state.get("config"), dict) else {}
    base = config.get("tokenizer") or config.get("student") or "BASE_MODEL"
    model = path / "model"
    if (model / "adapter_config.json").is_file():
        how = ("its model/ is a LoRA adapter: merge it into its base with python -c \"from peft import "
               f"AutoPeftModelForCausalLM as M; M.from_pretrained('{model}').merge_and_unload()"
               ".save_pretrained('MERGED')\" and start a new run from that: ampo-train run --config CONFIG "
               f"student=MERGED tokenizer={base}")
    else:
        how = f"start a new run from its weights: ampo-train run --config CONFIG student={model} tokenizer={base}"
    return InputError(str(path), "written by an older version of ampo-train, whose optimizer, scheduler and RNG "
                      "files are pickles that this version never loads (unpickling can run code), so it cannot be "
                      f"resumed; {how} (fresh optimizer, LR schedule and step count; CONFIG: your train.yaml), "
                      "or resume it with the release that wrote it if you trust where it came from")


def _check_model_dir(model: Path) -> None:
    """Weights as safetensors only, each with a readable header (read here, so a damaged file is one
    line now rather than a traceback from from_pretrained later); no pickled weight file at all."""
    from safetensors import safe_open

    weights = sorted(model.rglob("*.safetensors")) if model.is_dir() else []
    if not weights:
        raise InputError(str(model), "expected the model's or LoRA adapter's weights as *.safetensors")
    pickled = sorted(p for p in model.rglob("*") if p.suffix.lower() in _PICKLE_SUFFIXES)
    if pickled:
        raise InputError(str(pickled[0]), "a pickled weight file, refused: checkpoints hold weights as safetensors "
                         "only (unpickling can run code)")
    for path in weights:
        try:
            with safe_open(path, framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # whatever breaks on an untrusted file is a refusal in one line
            raise InputError(str(path), f"not a safetensors file ({_first_line(exc)})") from None


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """Read a checkpoint for resuming: JSON, safetensors (read later by the trainer) and one
    weights-only torch file. Anything else, or any older or newer format, is a one-line InputError."""
    path = Path(path)
    state = read_trainer_state(path)
    version = state.get(FORMAT_KEY)
    if version is None:
        raise _older_version(path, state)
    if version != FORMAT:
        raise InputError(str(path / STATE_FILE), f"{FORMAT_KEY} {version!r}: written by a newer version of "
                         f"ampo-train (this one reads format {FORMAT}); resume it with that version")
    if not isinstance(state.get("step"), int) or not isinstance(state.get("data"), dict):
        raise InputError(str(path / STATE_FILE), "expected an integer 'step' and a 'data' position object")
    _check_model_dir(path / "model")
    optimizer = _load_tensors(path / OPTIMIZER_FILE, "an optimizer state_dict of tensors and numbers")
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)):
        raise InputError(str(path / OPTIMIZER_FILE), "expected an optimizer state_dict ('state' and 'param_groups')")
    scheduler = _read_json(path / SCHEDULER_FILE, "the LR scheduler's state_dict")
    if not isinstance(scheduler, dict):
        raise InputError(str(path / SCHEDULER_FILE), "expected a JSON object (the LR scheduler's state_dict)")
    rng_states = _read_json(path / RNG_FILE, "one RNG state per process")
    _check_rng_states(rng_states, path / RNG_FILE)
    return LoadedCheckpoint(path=path, state=state, optimizer=optimizer, scheduler=scheduler, rng_states=rng_states)
