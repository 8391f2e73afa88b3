"""How the student is spread over processes, and what sharding changes for the trainer.

    accelerator = make_accelerator(cpu, mixed_precision, lora, max_grad_norm)   # from `accelerate launch`
    layout(accelerator)                            # "single" | "ddp" | "fsdp2" | "zero2" | "zero3"
    with full_parameters(accelerator, module):     # generation, scoring, old log-probs, evaluation
        ...
    with accumulating(accelerator, model): ...     # a micro-batch's backward that is not the last
    full_state_dict(accelerator, module)           # main process: every weight, for save_pretrained
    optimizer_state(module, optimizer)             # main process: the optimizer state keyed by name

Under DDP every process holds every parameter and nothing changes. Under FSDP2 each process holds a
shard of every parameter, gradient and optimizer state; a forward pass gathers the parameters it
needs from all processes, so every process must run the same forward passes in the same order. The
update does (the processes agree on their micro-batch count, ``update.agreed_count``); generation,
comprehension scoring and the no-grad log-probs do not (each process stops generating when its own
responses end, scores its own guided prompts). ``full_parameters`` therefore gathers the whole
model once per phase on every process, runs those passes locally, and frees the gathered copy
afterwards (it is never kept across the update). DeepSpeed ZeRO-2 shards gradients and optimizer
state but keeps whole parameters; ZeRO-3 shards parameters too and is handled as FSDP2 is
(``zero.gathered``); how DeepSpeed's engine, which owns the backward, clipping and the optimizer
step, maps onto the trainer's loop is in ``ampo_train/zero.py``.

Accelerate enables FSDP only on GPUs: on a machine without one, `accelerate launch --config_file
fsdp2.yaml` starts gloo processes that would silently train as DDP. ``make_accelerator`` then
switches the state to what the launcher asked for, so the same code path runs (and is tested) on
CPUs; on GPUs Accelerate does this itself and the switch never happens. DeepSpeed the same way
(``zero.enable_on_cpu``: without a GPU Accelerate's DeepSpeed path would start lone rank-0 processes).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from ampo_common.errors import InputError
from ampo_train import zero


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def check_launch(lora: bool) -> None:
    """Refuse, in one line naming the setting, a launch this trainer cannot run: read from the
    variables `accelerate launch` sets, so before anything (the Accelerator included) is built."""
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        zero.check_launch(lora)
    if _env_flag("ACCELERATE_USE_FSDP"):
        if os.environ.get("FSDP_VERSION", "1") != "2":
            raise InputError("accelerate config", f"fsdp_version {os.environ.get('FSDP_VERSION', '1')} is not supported: "
                             "set fsdp_config.fsdp_version: 2 (examples/accelerate/fsdp2.yaml)")
        if lora:
            raise InputError("lora", "LoRA under FSDP2 is not supported: a LoRA student fits one device, so train it "
                             "with DDP (examples/accelerate/ddp.yaml), or set lora: null to shard a full model")


def make_accelerator(cpu: bool, mixed_precision: str, lora: bool, max_grad_norm: float | None = None,
                     log_with: list[str] | None = None, project_dir: str | None = None) -> Accelerator:
    """The run's Accelerator, after ``check_launch``. ``max_grad_norm``: train.yaml's, which
    DeepSpeed's engine applies itself (``zero.configure``). ``log_with``: Accelerate's trackers
    (``tracking.tracker_names``), logging under ``project_dir``."""
    check_launch(lora)
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision, log_with=log_with or None,
                              project_dir=project_dir)
    if accelerator.distributed_type == DistributedType.MULTI_CPU and _env_flag("ACCELERATE_USE_FSDP"):
        from accelerate.state import PartialState
        from accelerate.utils import FullyShardedDataParallelPlugin

        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* variables
        # Both singletons: each later AcceleratorState() copies PartialState's value over its own.
        accelerator.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    if accelerator.distributed_type == DistributedType.MULTI_CPU and _env_flag("ACCELERATE_USE_DEEPSPEED"):
        zero.enable_on_cpu(accelerator, mixed_precision)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        zero.configure(accelerator.state.deepspeed_plugin, max_grad_norm, accelerator.num_processes)
    return accelerator


def layout(accelerator: Accelerator) -> str:
    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp2"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return f"zero{accelerator.state.deepspeed_plugin.zero_stage}"
    return "ddp" if accelerator.num_processes > 1 else "single"


def shards_parameters(accelerator: Accelerator) -> bool:
    """Whether each process holds only a shard of every parameter (FSDP2, ZeRO-3): then a forward
    pass gathers parameters, so the update runs the model's own LM head inside its forward
    (``forward.response_logprobs``) and the no-grad phases run on gathered weights."""
    return layout(accelerator) in ("fsdp2", "zero3")


def unsharded_loading(accelerator: Accelerator):
    """Around a ``from_pretrained`` whose model must stay whole on every process (the frozen KL
    reference); see ``zero.unsharded_loading``."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return zero.unsharded_loading(accelerator.state.deepspeed_plugin)
    return contextlib.nullcontext()


def _engine(accelerator: Accelerator):
    return accelerator.deepspeed_engine_wrapped.engine


def accumulating(accelerator: Accelerator, model):
    """Around the backward of a micro-batch that is not its mini-batch's last: DDP's ``no_sync``
    (gradients are all-reduced once, on the last), or under DeepSpeed no accumulation boundary
    (``zero.accumulating``: the engine steps after the last)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return zero.accumulating(accelerator)
    return accelerator.no_sync(model)


def update_applied(accelerator: Accelerator, grad_norm: float) -> bool:
    """Whether this update should change (DDP, FSDP2: the loop steps the optimizer when the norm
    is finite) or did change (DeepSpeed: its engine already stepped, or skipped) the weights."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return zero.update_applied(_engine(accelerator), grad_norm)
    return math.isfinite(grad_norm)


def _fsdp_modules(module: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def _forget_forward_order(units: list) -> None:
    """FSDP2 records the order of forwards to prefetch parameters in the backward. Generation and
    scoring run a different number of forwards on each process, so a record of them would make
    the processes prefetch different units in the next backward and wait on each other forever.
    These passes have no backward: drop what they recorded (private FSDP2 state of torch 2.13)."""
    for unit in units:
        state = unit._get_fsdp_state()
        for group in state._fsdp_param_groups:
            group._post_forward_indices.clear()
            group.comm_ctx.post_forward_order.clear()


@contextlib.contextmanager
def full_parameters(accelerator: Accelerator, module: torch.nn.Module):
    """Every parameter gathered on every process for the duration (no-grad passes only).

    FSDP2: each FSDP unit is unsharded (one all-gather per unit, all processes together) and told
    not to reshard after its forwards, so generation's many forwards run locally, as many as each
    process needs; afterwards each unit is resharded (the gathered copy is freed: it is never kept
    across the update) and the forwards' prefetch record dropped. ZeRO-3: ``zero.gathered``.
    Otherwise nothing to do.
    """
    if layout(accelerator) == "zero3":
        with zero.gathered(_engine(accelerator)):
            yield module
        return
    if layout(accelerator) != "fsdp2":
        yield module
        return
    units = _fsdp_modules(module)
    # FSDP2 initialises itself lazily at the root's first forward, and that initialisation resets
    # every parameter to its shard: it must not happen while the units are unsharded (private
    # FSDP2 state, as below; idempotent).
    units[0]._get_fsdp_state()._lazy_init()
    # Each unit's own setting comes back afterwards: the root does not reshard after its forward
    # (FSDP2 keeps it gathered for the backward that follows), the decoder layers do.
    reshards = [any(g.post_forward_mesh_info is not None for g in unit._get_fsdp_state()._fsdp_param_groups)
                for unit in units]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    try:
        with torch.no_grad():
            yield module
    finally:
        for unit, reshard in zip(units, reshards):
            unit.reshard()
            unit.set_reshard_after_forward(reshard, recurse=False)
        _forget_forward_order(units)


def full_state_dict(accelerator: Accelerator, module: torch.nn.Module) -> dict | None:
    """Under FSDP2 and ZeRO-3, every weight as one CPU tensor each, on the main process; all
    processes must call it (it gathers). None elsewhere, and when parameters are whole (DDP,
    ZeRO-2: the module saves its own)."""
    if layout(accelerator) == "zero3":
        return zero.full_state_dict(module, accelerator.is_main_process)
    if layout(accelerator) != "fsdp2":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if accelerator.is_main_process else None


def optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """The optimizer's whole state keyed by parameter name (torch's ``get_optimizer_state_dict``
    with ``full_state_dict``; under DeepSpeed the same layout from ``zero.optimizer_state``): the
    same file whatever the layout and process count, so a run can resume under another one. Under
    FSDP2 and DeepSpeed every process calls it and the main process gets it all."""
    if zero.is_deepspeed(optimizer):
        return zero.optimizer_state(model, optimizer)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    return get_optimizer_state_dict(model, inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict) -> None:
    """``optimizer_state``'s dict back into this run's optimizer (each process keeps its shard)."""
    if zero.is_deepspeed(optimizer):
        zero.load_optimizer_state(model, optimizer, state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    set_optimizer_state_dict(model, inner, state, options=StateDictOptions(full_state_dict=True))


def local_memory(module: torch.nn.Module, optimizer) -> dict[str, float]:
    """MiB this process holds of the parameters and of the optimizer state (its shards under
    FSDP2 and ZeRO; under ZeRO the optimizer state includes its fp32 master partitions), and its
    peak RSS: what sharding saves, for the multi-process tests and the bench."""
    import resource

    def mib(tensors) -> float:
        total, seen = 0, set()
        for t in tensors:
            local = getattr(t, "ds_tensor", t)  # a ZeRO-3 parameter's partition
            local = local.to_local() if hasattr(local, "to_local") else local
            if local.data_ptr() not in seen:  # a tensor counted once, whatever holds it
                seen.add(local.data_ptr())
                total += local.numel() * local.element_size()
        return total / 2**20

    held = (zero.optimizer_tensors(optimizer) if zero.is_deepspeed(optimizer)
            else zero.moments(getattr(optimizer, "optimizer", optimizer)))  # under accelerate's wrapper
    return {"parameters_mib": mib(module.parameters()), "optimizer_mib": mib(held),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def numel(param: torch.Tensor) -> int:
    """A parameter's full size (a ZeRO-3 parameter is empty outside a gather)."""
    return getattr(param, "ds_numel", param.numel())


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value, gathered when sharded (every process must call it then)."""
    if hasattr(param, "full_tensor"):  # FSDP2's DTensor
        return param.detach().full_tensor()
    if hasattr(param, "ds_id"):  # a ZeRO-3 parameter
        return zero.full_tensor(param)
    return param.detach()


def parameter_digest(model) -> str:
    """SHA-256 of the trainable parameters' bytes, in order (identical weights <=> identical digest).
    A sharded parameter is gathered first (every process must call this then)."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            value = full_tensor(p)
            digest.update(name.encode())
            digest.update(value.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def shutdown() -> None:
    """Leave the process group together at the end of a run: every process waits for the others,
    then the group is destroyed. A process that simply exits while another still runs collectives
    can abort in its C++ teardown ("terminate called without an active exception": DeepSpeed's
    shared-memory communication and gloo keep threads alive), which fails the whole launch."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
