"""Loading what the trainer and evaluation run: the tokenizer, the student (LoRA-wrapped when
set), and the frozen reference for KL. A location is a local folder or a hub id.

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.student)
    student = load_student(cfg, checkpoint)          # fresh, or the weights of a checkpoint
    reference = load_reference(cfg, accelerator)     # None unless kl_coef > 0 with full fine-tuning
"""

from __future__ import annotations

import torch

from ampo_common.errors import InputError
from ampo_train.checkpoint import LoadedCheckpoint
from ampo_train.config import TrainConfig


def load_tokenizer(location: str, require_eos: bool = False):
    """The tokenizer at ``location``, its pad token set to EOS when it has none. ``require_eos``:
    the trainer appends EOS to teacher traces and ends rollouts with it, so it must exist."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except OSError as exc:  # a hub id the hub (or an offline machine) cannot provide
        raise InputError(location, f"cannot load the tokenizer: {str(exc).strip().splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if require_eos and tokenizer.eos_token_id is None:
        raise InputError(location, "the tokenizer has no EOS token")
    return tokenizer


def load_student(cfg: TrainConfig, checkpoint: LoadedCheckpoint | None) -> torch.nn.Module:
    """The student to train: fresh from ``cfg.student`` or from a checkpoint; LoRA-wrapped when set."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, cfg.dtype)
    full_from_checkpoint = checkpoint is not None and cfg.lora is None
    source = str(checkpoint.model_dir) if full_from_checkpoint else cfg.student
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    if cfg.lora is not None:
        from peft import LoraConfig, PeftModel, get_peft_model

        if checkpoint is not None:
            model = PeftModel.from_pretrained(model, str(checkpoint.model_dir), is_trainable=True)
        else:
            lora = cfg.lora
            model = get_peft_model(model, LoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # training forwards; generate turns the cache on itself
    model.train()
    return model


def load_reference(cfg: TrainConfig, accelerator) -> torch.nn.Module | None:
    """The frozen KL reference, a whole copy of the starting student on every process (never
    partitioned); None when there is no KL term or under LoRA (whose reference is its base: the
    adapter disabled)."""
    if not cfg.loss.kl_coef or cfg.lora is not None:
        return None
    from transformers import AutoModelForCausalLM

    from ampo_train.distributed import unsharded_loading

    with unsharded_loading(accelerator):
        reference = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=getattr(torch, cfg.dtype))
    return reference.to(accelerator.device).eval().requires_grad_(False)
