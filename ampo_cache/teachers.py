"""teachers.yaml: which prompts, which store, and the teachers that write traces for them.

Relative paths (prompts, store, a teacher's model folder) are resolved against the folder of the
YAML file, so a config travels with its data. A teacher's ``model`` is a local folder or a hub id
(``org/name``); a value that looks like a path (starts with / . ~, or has two slashes) must exist.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ampo_common.yamlconfig import load_yaml_model, resolve_path

_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


class Sampling(BaseModel):
    """Sampling parameters of one teacher (vLLM's names; the transformers backend maps them)."""

    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(0.6, ge=0, description="0 = greedy.")
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 = no top-k cut.")
    max_tokens: int = Field(1024, gt=0, description="Most tokens generated per trace.")
    seed: Optional[int] = Field(None, description="Base seed; each batch derives its own from it.")


class Teacher(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1, pattern=r"^[\w.@+-]+$", description="Stored in traces.teacher.")
    model: str = Field(..., description="Local folder or hub id.")
    backend: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="auto = vllm when importable and a GPU is present, else transformers.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM only: GPUs per teacher.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = Field(32, ge=1, description="Prompts per generate call (transformers backend).")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vLLM only.")
    sampling: Sampling = Field(default_factory=Sampling)
    system_prompt: Optional[str] = Field(None, description="Sent as the system turn, when set.")

    @field_validator("model")
    @classmethod
    def _model_exists(cls, value: str, info: ValidationInfo) -> str:
        local = resolve_path(value, info)
        if local.is_dir():
            return str(local.resolve())
        if value.startswith(("/", ".", "~")) or not _HUB_ID.match(value):
            raise ValueError(f"no model folder at {local} (and {value!r} is not a hub id like org/name)")
        return value  # a hub id: only a machine with hub access can check it


class BuildConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: Path = Field(..., description="Prompts file (Parquet, JSONL or CSV).")
    store: Path = Field(..., description="Store directory (created when missing).")
    problem_col: str = "problem"
    answer_col: str = "answer"
    samples_per_prompt: int = Field(1, ge=1, description="Traces per teacher per prompt.")
    shard_rows: int = Field(1000, ge=1, description="Traces per shard written: the most a kill can lose.")
    verify_timeout: float = Field(5.0, gt=0, description="Seconds allowed to verify one trace.")
    teachers: list[Teacher] = Field(..., min_length=1)

    @field_validator("prompts", "store", mode="before")
    @classmethod
    def _resolve(cls, value, info: ValidationInfo) -> Path:
        return resolve_path(value, info)

    @model_validator(mode="after")
    def _unique_names(self) -> "BuildConfig":
        names = [t.name for t in self.teachers]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"teacher names must be unique; repeated: {', '.join(duplicated)}")
        return self


def load_build_config(path: str | Path) -> BuildConfig:
    return load_yaml_model(path, BuildConfig)
