"""One update (forward + backward of the GRPO loss, no generation) of a random 2-layer Llama at a
real vocabulary (or a Qwen2-0.5B-shaped model on a GPU), through our trainer's code or through TRL
1.16's ``GRPOTrainer``: the piece that ``bench/vs_trl.py --update-only``, ``bench/memory.py`` and
``bench/gpu_check.py`` share.

    probe = UpdateProbe(vocab=151936, rows=8, response_tokens=1024, lora=True)
    update = make_update("ours", probe, work_dir)      # or "ours-chunked", "ours-fused", "trl"
    update(probe_batch(probe))                         # one forward + backward, gradients accumulated
    result = measure(update, probe)                    # warm-up, then the timed update, its RSS peak

Both sides get the same model (same seed), rows (``prompt_tokens`` + ``response_tokens`` random
ids each), advantages and micro-batching (``micro_batch`` rows per forward): ours is
``update.minibatch_backward`` with a ``TrainConfig`` validated like ``ampo-train run``'s, TRL's is
its ``_compute_loss`` + backward per micro-batch, as its ``training_step`` runs them. Matched:
TRL ``loss_type`` <-> our ``loss.aggregation`` (``bench/vs_trl.py``'s ``LOSS_PAIRS``, checked by
``bench/trl_parity.py``), ``beta=0``, clip 0.2/0.2 (no dual clip), entropy coefficient 0,
temperature 1, float32 (``autocast``: bf16 autocast around both); LoRA (peft, the same
r/alpha/targets; dropout 0) or full parameters; optional gradient checkpointing on both.
"""

from __future__ import annotations

import gc
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

# TRL loss_type -> our loss.aggregation (bench/trl_parity.py checks each pair on one batch)
LOSS_PAIRS = {
    "dr_grpo": "seq_mean_token_sum_norm",
    "grpo": "seq_mean_token_mean",
    "bnpo": "token_mean",
    "dapo": "token_mean",
}

MIB = 1024 * 1024


@dataclass(frozen=True)
class UpdateProbe:
    vocab: int
    rows: int
    response_tokens: int
    prompt_tokens: int = 25
    micro_batch: int = 0  # rows per forward/backward on both sides; 0 = all rows at once
    loss_type: str = "dr_grpo"
    lora: bool = False
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_targets: str = "all-linear"
    seed: int = 0
    hidden: int = 128
    layers: int = 2
    shape: str = "llama"  # llama: random_llama's 2-layer model; qwen2: Qwen2-0.5B's shape (QWEN2_05B)
    qwen2: dict = field(default_factory=dict)  # overrides of QWEN2_05B (a toy size for smoke runs)
    device: str = "cpu"
    autocast: bool = False  # bf16 autocast around each update (fp32 weights), on both sides
    gradient_checkpointing: bool = False
    logit_chunk_size: int = 256  # ours: train.yaml's logit_chunk_size
    logprob_kernel: str = "auto"  # ours: train.yaml's logprob_kernel (arms ours-chunked / ours-fused set it)

    @property
    def micro(self) -> int:
        return self.micro_batch or self.rows

    @property
    def logits_mib(self) -> float:
        """Full float32 logits of the response tokens: rows x tokens x vocab x 4 bytes."""
        return self.rows * self.response_tokens * self.vocab * 4 / MIB


# Qwen2.5-0.5B-Instruct's shape (its config.json): 494M parameters, the head tied to the embeddings.
QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                 max_position_embeddings=32768)


def random_qwen2(probe: UpdateProbe, **shape):
    """A random Qwen2 of QWEN2_05B's shape with ``probe.qwen2`` and then ``shape`` overriding it,
    built directly on ``probe.device`` (pad id 0, EOS id 2, as ``probe_tokenizer``)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(probe.seed)
    config = Qwen2Config(**{**QWEN2_05B, "vocab_size": probe.vocab, **probe.qwen2, **shape, "pad_token_id": 0,
                            "eos_token_id": 2})
    with torch.device(probe.device):
        model = Qwen2ForCausalLM(config)
    model.config.use_cache = False
    model.train()
    return model


def probe_model(probe: UpdateProbe):
    model = random_qwen2(probe) if probe.shape == "qwen2" else random_llama(probe).to(probe.device)
    if probe.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def random_llama(probe: UpdateProbe):
    """A random Llama with the probe's vocabulary (untied head, like Qwen2.5 >= 3B and Llama)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(probe.seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=probe.vocab, hidden_size=probe.hidden, intermediate_size=3 * probe.hidden,
        num_hidden_layers=probe.layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=probe.prompt_tokens + probe.response_tokens + 8, pad_token_id=0, eos_token_id=2,
        tie_word_embeddings=False))
    model.config.use_cache = False
    model.train()
    return model


def probe_tokenizer():
    """A small tokenizer for both sides' bookkeeping (pad and EOS ids): the rows are token ids
    already, so its vocabulary need not match the model's."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, "x": 3}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    return tok


def probe_batch(probe: UpdateProbe, prompt_tokens: int | None = None, response_tokens: int | None = None) -> dict:
    """Random prompt and response ids (``[rows, tokens]``) and advantages with every sign."""
    gen = torch.Generator().manual_seed(probe.seed)
    high = min(probe.vocab, 1 << 20)
    prompt = torch.randint(10, high, (probe.rows, prompt_tokens or probe.prompt_tokens), generator=gen)
    response = torch.randint(10, high, (probe.rows, response_tokens or probe.response_tokens), generator=gen)
    advantages = torch.tensor([float(i % 3 == 0) - 1 / 3 for i in range(probe.rows)])
    return {"prompt": prompt, "response": response, "advantages": advantages}


def lora_config(probe: UpdateProbe):
    from peft import LoraConfig

    targets = probe.lora_targets if probe.lora_targets == "all-linear" else probe.lora_targets.strip("[]").split(",")
    return LoraConfig(r=probe.lora_r, lora_alpha=probe.lora_alpha, lora_dropout=0.0, target_modules=targets,
                      task_type="CAUSAL_LM")


def ours_config(probe: UpdateProbe, work: Path):
    """Our ``TrainConfig`` for the update, validated as ``ampo-train run`` validates it."""
    from ampo_train.config import load_train_config

    work.mkdir(parents=True, exist_ok=True)
    prompts = work / "prompts.jsonl"
    prompts.write_text(json.dumps({"problem": "x", "answer": "1"}) + "\n")
    return load_train_config(None, [], base={
        "student": "probe/random-llama", "prompts": str(prompts), "output_dir": str(work / "out"), "store": None,
        "guidance": {"mode": "off"}, "prompts_per_step": 1, "group_size": max(probe.rows, 2),
        "micro_batch_size": probe.micro, "rollout": {"temperature": 1.0, "max_new_tokens": probe.response_tokens},
        "loss": {"aggregation": LOSS_PAIRS[probe.loss_type], "max_response_length": probe.response_tokens,
                 "advantage_scale": "none", "clip_low": 0.2, "clip_high": 0.2, "dual_clip": None,
                 "entropy_coef": 0.0, "kl_coef": 0.0},
        "lora": ({"r": probe.lora_r, "alpha": probe.lora_alpha, "dropout": 0.0,
                  "target_modules": lora_config(probe).target_modules} if probe.lora else None),
        "tensorboard": False, "logit_chunk_size": probe.logit_chunk_size, "logprob_kernel": probe.logprob_kernel,
    })


ARMS = ("ours", "ours-chunked", "ours-fused", "trl")  # ours-*: ours with logprob_kernel chunked / fused


def what_ran(model, head=None, kernel: str | None = None) -> dict:
    """What an arm's model actually runs with: gradient checkpointing, the attention implementation
    and, for ours, the log-prob path ``kernel`` resolves to for ``head`` on this device."""
    inner = getattr(model, "get_base_model", lambda: model)()
    info = {"gradient_checkpointing": bool(getattr(inner, "is_gradient_checkpointing", False)),
            "attn_implementation": getattr(inner.config, "_attn_implementation", None)}
    if head is not None and kernel is not None:
        from ampo_train.lm_head import select_logprob_kernel

        try:
            choice = select_logprob_kernel(kernel, head, next(inner.parameters()).device)
            info.update(logprob_kernel=choice.kernel, logprob_kernel_reason=choice.reason)
        except ValueError as exc:
            info.update(logprob_kernel="error", logprob_kernel_reason=str(exc))
    return info


def make_update(arm: str, probe: UpdateProbe, work: Path):
    """``update(batch)``: one forward + backward of ``batch`` (``probe_batch``) on ``arm``'s side,
    gradients accumulated into the model's parameters (the caller zeroes them). ``update.ran`` says
    what actually runs (``what_ran``)."""
    from transformers.utils import logging as hf_logging

    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r} (one of {', '.join(ARMS)})")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = probe_model(probe)
    tokenizer = probe_tokenizer()
    autocast = torch.autocast(probe.device.split(":")[0], dtype=torch.bfloat16, enabled=probe.autocast)
    if arm.startswith("ours"):
        if arm != "ours":
            from dataclasses import replace

            probe = replace(probe, logprob_kernel=arm.split("-", 1)[1])
        from ampo_train.data import Row
        from ampo_train.metrics import StepStats
        from ampo_train.policy import ForwardSettings, Policy
        from ampo_train.update import UpdateSettings, minibatch_backward

        cfg = ours_config(probe, work)
        if probe.lora:
            from peft import get_peft_model

            model = get_peft_model(model, lora_config(probe))
        policy = Policy(model, None, tokenizer.pad_token_id,
                        ForwardSettings(cfg.rollout.temperature, cfg.logit_chunk_size,
                                        logprob_kernel=cfg.logprob_kernel))

        def update(batch):
            rows = [Row(p.tolist(), r.tolist(), 0.0, advantage=float(a))
                    for p, r, a in zip(batch["prompt"], batch["response"], batch["advantages"])]
            with autocast:
                minibatch_backward(policy, rows, UpdateSettings.from_config(cfg), StepStats())
            model.zero_grad(set_to_none=True)

        update.ran = what_ran(model, model.get_output_embeddings(), cfg.logprob_kernel)
        return update
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    if probe.rows % probe.micro:
        raise ValueError(f"micro_batch ({probe.micro}) must divide rows ({probe.rows})")
    accumulation = probe.rows // probe.micro
    args = GRPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=probe.micro,
        gradient_accumulation_steps=accumulation, num_generations=probe.micro if probe.micro > 1 else 2,
        max_completion_length=probe.response_tokens, beta=0.0, epsilon=0.2, loss_type=probe.loss_type,
        scale_rewards="none", entropy_coef=0.0, temperature=1.0, bf16=False, fp16=False,
        gradient_checkpointing=False, use_cpu=probe.device == "cpu", report_to="none", save_strategy="no",
        disable_tqdm=True,
        max_steps=1, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
                          args=args, train_dataset=Dataset.from_list([{"prompt": "x"}]), processing_class=tokenizer,
                          peft_config=lora_config(probe) if probe.lora else None)
    trainer.current_gradient_accumulation_steps = accumulation

    def update(batch):
        batch = {key: value.to(probe.device) for key, value in batch.items()}
        prompt, response = batch["prompt"], batch["response"]
        ones = torch.ones_like
        full = {"prompt_ids": prompt, "prompt_mask": ones(prompt), "completion_ids": response,
                "completion_mask": ones(response), "advantages": batch["advantages"],
                "num_items_in_batch": torch.tensor(response.numel())}
        for k in range(accumulation):  # TRL's micro-batches of one optimizer step
            part = {key: (value[k * probe.micro:(k + 1) * probe.micro] if value.dim() else value)
                    for key, value in full.items()}
            with autocast:
                loss = trainer._compute_loss(trainer.model, part)
            loss.backward()
        trainer.model.zero_grad(set_to_none=True)

    update.ran = what_ran(trainer.model)
    return update


# ----------------------------------------------------------------------------- measuring RSS


def rss_kib() -> int:
    return _status_kib("VmRSS")


def hwm_kib() -> int:
    """The process's peak RSS since it started or since ``reset_hwm``."""
    return _status_kib("VmHWM")


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def reset_hwm() -> bool:
    """Reset the peak-RSS mark to the current RSS (Linux ``clear_refs`` 5), so that a peak reached
    while building the model does not hide the update's own. False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(update, probe: UpdateProbe, updates: int = 1) -> dict:
    """A warm-up update at 8 tokens per row (pages in the kernels' code and thread pools, tens of
    MiB that do not grow with the size), then ``updates`` timed updates of the probe's rows. The
    RSS growth is the peak during the timed updates minus the RSS just before them."""
    update(probe_batch(probe, prompt_tokens=4, response_tokens=4))
    batch = probe_batch(probe)
    gc.collect()
    before = rss_kib()
    exact = reset_hwm()
    seconds = []
    for _ in range(updates):
        started = time.perf_counter()
        update(batch)
        seconds.append(time.perf_counter() - started)
    peak = hwm_kib()
    return {"seconds": seconds, "rss_before_kib": before, "hwm_kib": peak, "hwm_reset": exact,
            "peak_growth_mib": (peak - before) / 1024, "peak_rss_mib": peak / 1024,
            "threads": torch.get_num_threads(), "pid": os.getpid()}
