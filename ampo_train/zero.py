"""DeepSpeed ZeRO-2 and ZeRO-3 under `accelerate launch`: what DeepSpeed's engine owns, and how the
trainer's own loop maps onto it (``distributed`` calls these; nothing else does).

    check_launch(lora)                  # the launcher's DeepSpeed settings, refused in one line
    enable_on_cpu(accelerator, mp)      # Accelerate's DeepSpeed state on machines without a GPU
    configure(plugin, max_grad_norm)    # the DeepSpeed config values train.yaml owns
    with gathered(engine): ...          # ZeRO-3: every parameter on every process (no-grad passes)
    full_state_dict(module, main)       # ZeRO-3: every weight, for save_pretrained
    optimizer_state / load_optimizer_state   # the optimizer state keyed by parameter name

How the loop (``trainer.apply_update``, ``update.minibatch_backward``) maps onto the engine that
``accelerator.prepare`` returns (Accelerate's ``DeepSpeedEngineWrapper``, ``DeepSpeedOptimizerWrapper``):

- **backward**: ``accelerator.backward(loss)`` is ``engine.backward(loss)``. DeepSpeed divides the
  loss by its ``gradient_accumulation_steps``; ``configure`` sets that to 1, because each
  micro-batch's loss is already normalised by its mini-batch (``update.micro_loss``).
- **accumulation boundaries**: the loop runs a mini-batch's micro-batches but the last inside
  ``accumulating``, which sets Accelerate's ``sync_gradients`` to False, so the wrapper marks them
  as no boundary and does not step; the last micro-batch is the boundary, and ``engine.step()``
  runs inside its ``accelerator.backward``. ZeRO-2 and ZeRO-3 reduce-scatter gradients in every
  backward (no ``no_sync``), and ZeRO-3 gathers parameters in every forward: every process must
  run the same number of micro-batches, which ``update.agreed_count`` ensures, as for FSDP2.
- **clipping**: inside ``engine.step``, with ``gradient_clipping`` = train.yaml's
  ``max_grad_norm`` (0 = off) and torch's formula (scale by max / (norm + 1e-6) when above).
  ``accelerator.clip_grad_norm_`` then returns the global norm that step computed, before clipping.
- **the optimizer step**: ZeRO wraps the trainer's torch AdamW (its param groups now hold flat
  fp32 partitions) and steps it inside ``engine.step``; the wrapper's ``step`` and ``zero_grad``
  are no-ops.
- **non-finite gradient norm**: ZeRO's step computes the global norm first and, when it is not
  finite, skips the update (weights and moments untouched) and reports an infinite norm. So
  ``apply_update`` sees a non-finite norm exactly when the update was skipped and counts it in
  ``skipped_updates``, as under DDP (``update_applied`` checks the two agree).
- **the LR schedule**: the trainer's LambdaLR is not handed to DeepSpeed (Accelerate passes only
  DeepSpeed's own schedulers). It sets ``lr`` in the same param-group dicts ZeRO's AdamW steps
  with, and ``apply_update`` steps it for applied updates only: it counts real updates.
- **batch sizes**: DeepSpeed requires them, but the trainer forms its own micro-batches (rows or a
  token budget) from train.yaml; ``configure`` sets nominal values (1 row per process) that only
  DeepSpeed's throughput counters read.

Checkpoints stay the trainer's own format (``checkpoint.py``): DeepSpeed's ``save_checkpoint``
writes pickles, which resuming would have to unpickle. So the weights are gathered
(``GatheredParameters``) and saved with ``save_pretrained``, and the optimizer state is gathered
to whole tensors keyed by parameter name with DeepSpeed's documented
``safe_get_full_optimizer_state`` (and scattered back with ``safe_set_full_optimizer_state``):
the same file as under DDP and FSDP2, so a checkpoint resumes under any of the layouts.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import warnings

import torch

from ampo_common.errors import InputError

_INSTALL = 'pip install -e ".[deepspeed]" (on a CPU: pip install -c constraints/cpu.txt -e ".[deepspeed]")'
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu")
# Set by train.yaml instead; the second part of each message says where.
_OWNED_SECTIONS = {
    "optimizer": "train.yaml sets the optimizer (AdamW: lr, adam_betas, adam_eps, weight_decay)",
    "scheduler": "train.yaml sets the LR schedule (lr_scheduler, warmup_steps)",
}


def _deepspeed_plugin():
    """Accelerate's DeepSpeedPlugin built from what `accelerate launch` passed (its config
    file or its ``deepspeed_config`` section): config only, no model, no process group."""
    from accelerate.utils import DeepSpeedPlugin

    return DeepSpeedPlugin()


def _source() -> str:
    return os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or "accelerate config (deepspeed_config)"


def check_launch(lora: bool) -> None:
    """Refuse, in one line naming the setting, a DeepSpeed launch this trainer cannot run
    correctly: called before anything is built, from the variables `accelerate launch` set."""
    if importlib.util.find_spec("deepspeed") is None:
        raise InputError("accelerate config", f"distributed_type DEEPSPEED needs deepspeed, which is not installed: "
                         f"{_INSTALL}")
    source = _source()
    try:
        config = _deepspeed_plugin().deepspeed_config
    except (ValueError, OSError) as exc:  # accelerate's own checks of the file and the launcher's fields
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise InputError(source, first) from None
    for section, owner in _OWNED_SECTIONS.items():
        if section in config:
            raise InputError(source, f"{section}: {owner}; remove this section")
    for key in _BATCH_KEYS:
        if config.get(key, "auto") != "auto":
            raise InputError(source, f"{key}: {config[key]}: train.yaml sets the batch (prompts_per_step, "
                             "mini_batch_prompts, micro_batch_size or micro_batch_tokens); write auto or leave it out")
    if config.get("gradient_accumulation_steps", "auto") not in ("auto", 1):
        raise InputError(source, f"gradient_accumulation_steps: {config['gradient_accumulation_steps']}: the trainer "
                         "accumulates its own micro-batches (micro_batch_size or micro_batch_tokens); set 1 or auto")
    if config.get("gradient_clipping", "auto") != "auto":
        raise InputError(source, f"gradient_clipping: {config['gradient_clipping']}: train.yaml's max_grad_norm sets "
                         "it; write auto or leave it out")
    zero = config.get("zero_optimization") or {}
    if zero.get("stage") not in (2, 3):
        raise InputError(source, f"zero_optimization.stage {zero.get('stage')}: ampo-train runs ZeRO stages 2 and 3 "
                         "(examples/accelerate/zero2.yaml, zero3.yaml)")
    for part in ("offload_optimizer", "offload_param"):
        device = (zero.get(part) or {}).get("device", "none")
        if device not in (None, "none"):
            raise InputError(source, f"zero_optimization.{part}.device {device}: offloading is not supported by "
                             "ampo-train run; set none (shard over more processes instead)")
    if lora:
        raise InputError("lora", "LoRA under DeepSpeed is not supported: a LoRA student fits one device, so train it "
                         "with DDP (examples/accelerate/ddp.yaml), or set lora: null to shard a full model")


def enable_on_cpu(accelerator, mixed_precision: str) -> None:
    """Accelerate takes its DeepSpeed path only with ``cpu=False``, and without a GPU that path
    finds no backend and starts every process as a lone rank 0. So the trainer asks for the gloo
    CPU processes Accelerate sets up correctly, then switches the state to DeepSpeed as
    ``AcceleratorState`` does on GPUs (DeepSpeed's own comm wraps the same process group)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    plugin = _deepspeed_plugin()
    plugin.set_mixed_precision(mixed_precision)
    plugin.select(_from_accelerator_state=True)
    state = accelerator.state
    state.deepspeed_plugins = plugin
    state._mixed_precision = "no"  # DeepSpeed runs mixed precision itself, from its config
    # Both singletons: each later AcceleratorState() copies PartialState's value over its own.
    state.distributed_type = PartialState().distributed_type = DistributedType.DEEPSPEED
    accelerator.native_amp = False
    accelerator.deepspeed_engine_wrapped = None  # what Accelerator.__init__ sets under DeepSpeed


def configure(plugin, max_grad_norm: float | None, world: int) -> None:
    """The DeepSpeed config values the trainer's loop owns (see the module docstring), written into
    Accelerate's plugin before ``accelerator.prepare`` builds the engine; ``check_launch`` has
    refused any other value."""
    config = plugin.deepspeed_config
    config["gradient_accumulation_steps"] = 1
    config["train_micro_batch_size_per_gpu"] = 1
    config["train_batch_size"] = world
    config["gradient_clipping"] = float(max_grad_norm or 0.0)
    plugin.gradient_accumulation_steps = 1
    # DeepSpeed calls torch's older collective names; torch 2.13 warns about them on every call.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                            "is deprecated", category=FutureWarning)


@contextlib.contextmanager
def unsharded_loading(plugin):
    """``from_pretrained`` of a whole model (the frozen KL reference) under ZeRO-3: transformers
    partitions every model it loads while a ZeRO-3 config is registered (``deepspeed.zero.Init``;
    Accelerate 1.16 registers it whatever ``zero3_init_flag`` says, so its
    ``zero3_init_context_manager(enable=False)`` does not prevent it), and nothing would gather a
    model that no engine wraps. So the registration is lifted for the load and restored after."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


@contextlib.contextmanager
def accumulating(accelerator):
    """Around a micro-batch's backward that is not the mini-batch's last: no accumulation
    boundary, so ``accelerator.backward`` does not step the engine (Accelerate's own
    ``accumulate()`` sets this flag the same way, counting steps instead)."""
    accelerator.gradient_state._set_sync_gradients(False)
    try:
        yield
    finally:
        accelerator.gradient_state._set_sync_gradients(True)


def update_applied(engine, grad_norm: float) -> bool:
    """Whether the engine's last step changed the weights; it must agree with the norm it
    reported (finite exactly when applied), which the loop's skip counting relies on."""
    applied = engine.was_step_applied()
    if applied != math.isfinite(grad_norm):
        raise RuntimeError(f"DeepSpeed {'applied' if applied else 'skipped'} an update with gradient norm {grad_norm}")
    return applied


# ----------------------------------------------------------------------------- ZeRO-3 parameters


def _zero3_offload(engine):
    return engine.optimizer.parameter_offload


@contextlib.contextmanager
def gathered(engine):
    """ZeRO-3: every parameter gathered on every process for the duration (no-grad passes only).

    ``deepspeed.zero.GatheredParameters`` all-gathers them (every process together) and partitions
    them again afterwards: the gathered copy is never kept across the update. Inside, the forwards
    must not reach ZeRO-3's module hooks: they fetch and release parameters per module and record
    the forward order, with collectives that would wait forever for processes that generate a
    different number of tokens. So the hooks are removed and registered again afterwards, as TRL
    does for generation (DeepSpeed invalidates its recorded order on re-registration).
    """
    import deepspeed
    from deepspeed.runtime.zero import parameter_offload

    module = engine.module
    offload = _zero3_offload(engine)
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params), torch.no_grad():
        offload._remove_module_hooks()
        for param in params:
            param.ds_active_sub_modules.clear()
        try:
            yield module
        finally:
            offload.forward_hooks.clear()
            offload.backward_hooks.clear()
            offload.setup_zero_stage3_hooks()
            # setup pushed the module on DeepSpeed's forward-module stack again; one entry is enough.
            stack = parameter_offload.FWD_MODULE_STACK
            if len(stack) > 1 and stack[-1] is module and stack[-2] is module:
                stack.pop()


def full_state_dict(module, main: bool) -> dict | None:
    """ZeRO-3: every weight as one CPU tensor each, on the main process (None elsewhere); every
    process must call it (it gathers)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        if not main:
            return None
        return {name: value.detach().cpu().clone() for name, value in module.state_dict().items()}


def full_tensor(param) -> torch.Tensor:
    """One ZeRO-3 parameter's whole value (every process must call it)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([param]):
        return param.detach().clone()


# ----------------------------------------------------------------------------- the optimizer state


def is_deepspeed(optimizer) -> bool:
    """Whether ``accelerator.prepare`` handed this optimizer to DeepSpeed's engine."""
    return type(optimizer).__name__ == "DeepSpeedOptimizerWrapper"


def _inner(optimizer):
    """(ZeRO's optimizer, the torch AdamW it steps) under Accelerate's wrapper."""
    zero = optimizer.optimizer
    return zero, zero.optimizer


def _flat_partitions(zero) -> list[torch.Tensor]:
    """The fp32 tensors ZeRO's AdamW steps on this process, one per (sub)group."""
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3
        return list(zero.fp32_partitioned_groups_flat)
    return list(zero.single_partition_of_fp32_groups)  # ZeRO-1/2


def moment_keys(entry: dict) -> list[str]:
    """The keys of one parameter's optimizer state that hold tensors (AdamW: exp_avg, exp_avg_sq),
    not the scalar ``step``."""
    return [k for k, v in entry.items() if k != "step" and torch.is_tensor(v) and v.dim() > 0]


def moments(torch_optimizer) -> list[torch.Tensor]:
    """Every state tensor a torch optimizer holds (its moments), over all its parameters."""
    return [entry[k] for entry in torch_optimizer.state.values() for k in moment_keys(entry)]


def optimizer_tensors(optimizer) -> list[torch.Tensor]:
    """What ZeRO's optimizer holds on this process: AdamW's moments and its fp32 master partitions."""
    zero, inner = _inner(optimizer)
    return moments(inner) + _flat_partitions(zero)


def _trainable(module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


def _groups(inner, names: list[str]) -> list[dict]:
    """The param groups as torch's full optimizer state dict writes them: hyperparameters, and
    ``params`` as parameter names (the trainer builds one group of every trainable parameter)."""
    if len(inner.param_groups) != 1:
        raise NotImplementedError("optimizer state under DeepSpeed: expected one param group")
    return [{**{k: v for k, v in inner.param_groups[0].items() if k != "params"}, "params": names}]


def optimizer_state(module, optimizer) -> dict:
    """The optimizer's whole state keyed by parameter name, in the layout of torch's
    ``get_optimizer_state_dict(full_state_dict=True)`` (the DDP and FSDP2 file): every process
    calls it (each tensor is gathered from all of them); the main process (rank 0) keeps them."""
    from deepspeed.utils import safe_get_full_optimizer_state

    main = torch.distributed.get_rank() == 0

    zero, inner = _inner(optimizer)
    trainable = _trainable(module)
    state: dict = {}
    if inner.state:  # ZeRO's AdamW creates its state at the first applied update
        first = next(iter(inner.state.values()))
        step = first["step"]  # every group is stepped together: one count for all
        keys = moment_keys(first)
        for name, param in trainable:
            entry = {"step": step.detach().cpu().clone()}
            for key in keys:
                value = safe_get_full_optimizer_state(param, key)
                entry[key] = value.detach().cpu().clone()
            if main:
                state[name] = entry
    return {"state": state, "param_groups": _groups(inner, [name for name, _ in trainable])}


def load_optimizer_state(module, optimizer, saved: dict) -> None:
    """``optimizer_state``'s dict (from any layout) back into ZeRO's optimizer: each process keeps
    its partition. ZeRO creates AdamW's state lazily at the first update, so it is created here
    first (zeros, the saved step), then filled with ``safe_set_full_optimizer_state``."""
    from deepspeed.utils import safe_set_full_optimizer_state

    zero, inner = _inner(optimizer)
    trainable = _trainable(module)
    for group, saved_group in zip(inner.param_groups, saved["param_groups"]):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    if not saved["state"]:
        return
    first = next(iter(saved["state"].values()))
    keys = moment_keys(first)
    for flat in _flat_partitions(zero):
        inner.state[flat] = {"step": first["step"].clone().float(), **{k: torch.zeros_like(flat) for k in keys}}
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2: link each parameter to its fragment
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    for name, param in trainable:
        for key in keys:
            safe_set_full_optimizer_state(param, saved["state"][name][key].to(param.device), key)
