"""Load a YAML file into a pydantic model, with errors that point at the key and its line.

Shared by teachers.yaml (the cache build) and train.yaml (the trainer): a typo in either reads
`teachers.yaml:14: teachers[1].sampling.temprature: unknown key`, not a pydantic dump. Relative
paths inside a YAML file are resolved against the file's folder (``resolve_path``), so a config
travels with its data.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError, ValidationInfo

from ampo_common.errors import InputError

Model = TypeVar("Model", bound=BaseModel)


def resolve_path(value: str | Path, info: ValidationInfo) -> Path:
    """A path from a YAML file, relative to that file's folder (the ``base_dir`` that
    ``load_yaml_model`` passes to validators); absolute paths and a missing context stay as they are."""
    path = Path(value).expanduser()
    base = (info.context or {}).get("base_dir")
    return path if path.is_absolute() or base is None else (base / path)


def _place(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _line_of(node, loc: tuple) -> int | None:
    """Line (1-based) of the YAML node at ``loc``, or of its nearest existing parent."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        node = _child(node, part)
        if node is None:
            break
        line = node.start_mark.line + 1
    return line


def _unknown_key_line(node, loc: tuple) -> int | None:
    """An unknown key's own line: its parent mapping holds it as a key, not a value."""
    parent = node
    for part in loc[:-1]:
        parent = _child(parent, part)
        if parent is None:
            return None
    if isinstance(parent, yaml.MappingNode):
        for key, _ in parent.value:
            if key.value == loc[-1]:
                return key.start_mark.line + 1
    return None


def _child(node, part):
    if isinstance(node, yaml.MappingNode):
        return next((value for key, value in node.value if key.value == part), None)
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
        return node.value[part]
    return None


def load_yaml_model(path: str | Path, model: type[Model], **context) -> Model:
    """Parse ``path`` as ``model``; ``context`` reaches validators (e.g. the file's folder)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), "no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(str(path), f"not UTF-8 text (byte {exc.start}); expected a YAML file") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else "?"
        raise InputError(f"{path}:{line}", f"not valid YAML ({exc.problem})") from None
    if not isinstance(data, dict):
        raise InputError(str(path), "expected a mapping of keys at the top level")
    try:
        return model.model_validate(data, context={"base_dir": path.parent.resolve(), **context})
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = tuple(error["loc"])
        if error["type"] == "extra_forbidden":
            line, problem = _unknown_key_line(node, loc), "unknown key"
        elif error["type"] == "missing":
            line, problem = _line_of(node, loc[:-1]), "missing required key"
        else:
            line, problem = _line_of(node, loc), error["msg"].removeprefix("Value error, ")
        where = f"{path}:{line}" if line else str(path)
        raise InputError(where, f"{_place(loc)}: {problem}") from None
