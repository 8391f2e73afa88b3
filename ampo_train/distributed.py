"""How the student is spread over processes, and the three things sharding changes for the trainer.

    accelerator = make_accelerator(cfg)           # DDP, FSDP2 or DeepSpeed ZeRO, from `accelerate launch`
    layout = Layout.of(accelerator)               # "single" | "ddp" | "fsdp2" | "zero2" | "zero3"
    with full_parameters(accelerator, module):    # generation, scoring, old log-probs, engine sync
        ...
    state = full_state_dict(accelerator, module)  # rank 0: every weight, for save_pretrained

Under DDP and ZeRO-2 every process holds every parameter and nothing changes. Under FSDP2 and ZeRO-3
each process holds a shard; a forward pass gathers the parameters it needs from all processes, so
every process must run the same forward passes in the same order. The update does (equal
micro-batches on every process); generation, comprehension scoring and the no-grad log-probs do
not (each process stops generating when its own responses end, scores its own guided prompts).
``full_parameters`` therefore gathers the whole model once per step on every process, runs those
passes locally, and frees the gathered copy afterwards (it is never kept across the update).

Accelerate enables FSDP and DeepSpeed only on GPUs: on a machine without one, `accelerate launch
--config_file fsdp2.yaml` starts gloo processes that would silently train as DDP. ``make_accelerator``
then switches the state to what the launcher asked for, so the same code path runs (and is tested)
on CPUs; on GPUs Accelerate does this itself and the switch never happens.
"""

from __future__ import annotations

import contextlib
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from ampo_cache.errors import InputError


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def make_accelerator(cpu: bool, mixed_precision: str) -> Accelerator:
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision)
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return accelerator
    state = accelerator.state
    if _env_flag("ACCELERATE_USE_FSDP"):
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables the launcher set
        if plugin.fsdp_version != 2:
            raise InputError("accelerate config", "fsdp_version 1 is not supported: use fsdp_version: 2 "
                             "(examples/accelerate/fsdp2.yaml)")
        state.fsdp_plugin = plugin
        state.distributed_type = DistributedType.FSDP
    elif _env_flag("ACCELERATE_USE_DEEPSPEED"):
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin()  # reads the ACCELERATE_DEEPSPEED_* variables the launcher set
        plugin.set_mixed_precision(mixed_precision)
        plugin.select(_from_accelerator_state=True)
        state.deepspeed_plugins = plugin
        state.distributed_type = DistributedType.DEEPSPEED
    return accelerator


def layout(accelerator: Accelerator) -> str:
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp2"
    if kind == DistributedType.DEEPSPEED:
        return f"zero{accelerator.state.deepspeed_plugin.zero_stage}"
    return "ddp" if accelerator.num_processes > 1 else "single"


def sharded(accelerator: Accelerator) -> bool:
    """Parameters split across processes (a forward pass needs every process)."""
    return layout(accelerator) in ("fsdp2", "zero3")


def _fsdp_modules(module: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def full_parameters(accelerator: Accelerator, module: torch.nn.Module):
    """Every parameter gathered on every process for the duration (no-grad passes only).

    FSDP2: each FSDP unit is unsharded and told not to reshard after its forward, so generation's
    many forwards run without communication; afterwards each is resharded (the gathered memory is
    freed) and its setting restored. ZeRO-3: ``GatheredParameters`` with DeepSpeed's fetch hooks
    lifted, as TRL does for generation. Otherwise nothing to do.
    """
    kind = layout(accelerator)
    if kind == "fsdp2":
        units = _fsdp_modules(module)
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield module
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(True, recurse=False)
    elif kind == "zero3":
        import deepspeed

        engine = accelerator.deepspeed_engine_wrapped.engine
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            optimizer = engine.optimizer
            optimizer.parameter_offload.remove_module_hooks()
            try:
                yield module
            finally:
                optimizer.parameter_offload.setup_zero_stage3_hooks()
    else:
        yield module


def full_state_dict(accelerator: Accelerator, module: torch.nn.Module) -> dict | None:
    """Every weight as one CPU tensor each, on the main process (None elsewhere). All processes
    must call it (it gathers)."""
    kind = layout(accelerator)
    if kind == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if accelerator.is_main_process else None
    if kind == "zero3":
        state = accelerator.get_state_dict(accelerator.deepspeed_engine_wrapped.engine)
        return state if accelerator.is_main_process else None
    return module.state_dict() if accelerator.is_main_process else None
