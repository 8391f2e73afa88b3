"""Per-token training memory of Qwen2.5-1.5B and -7B shaped layers, and what fits which GPU at 8k tokens.

    python bench/activation_memory.py [--tokens 256] [--json]

Measured here (on the CPU, one real-shaped decoder layer at a time; no weights are downloaded):
the bytes autograd saves for the backward pass per decoder layer, counted with
``torch.autograd.graph.saved_tensors_hooks`` during the forward (each storage once; parameters
not counted), as the difference between a 2-layer and a 1-layer model of the real hidden size,
heads and MLP width, at two lengths: the slope is the per-token cost, the rest a per-layer
constant (autocast's bfloat16 copies of the weights). Two set-ups, as a GPU run would use them:

* ``lora``: weights in bfloat16 (``dtype: bfloat16``), peft LoRA r=16 on every linear layer
  (peft keeps the adapters in float32);
* ``full``: float32 weights under bfloat16 autocast (``mixed_precision: bf16``).

Attention is PyTorch's sdpa (flash kernel: it saves O(T) statistics, not the T x T scores, so
the cost is linear in T). CPU autocast keeps a few ops in other dtypes than CUDA's does,
so read the figures as +-15% for a GPU.

Reasoned by ``ampo_train.memory_model`` (the formulas ``ampo-train plan`` uses, which this script
checks: its per-token coefficients reproduce the measured figures printed beside them), NOT run
on a GPU: the memory of one update at 8,192 tokens per micro-batch (one 8k row, or
``micro_batch_tokens: 8192``), for LoRA (bf16 base + float32 adapter, gradients and AdamW
states) and full fine-tuning (float32 master weights, gradients and AdamW states: 16 bytes per
parameter, and autocast's bf16 copies of the weights), with no checkpointing (every layer's saved
activations), with ``gradient_checkpointing`` (each layer keeps only its input, float32 with
float32 weights; one layer's activations exist again while it is recomputed), and with
``activation_offload`` on top (the layer inputs wait in CPU memory). Plus the LM head's chunk
(``logit_chunk_size`` 256: about 3 x 256 x vocab x 4 bytes) and 10% for the allocator. vLLM
colocated takes ``gpu_memory_utilization`` of the GPU while it generates; with sleep mode (the
default on a GPU) it gives it back for the update.

    python bench/activation_memory.py --fit     # memory_model.SAVED_PER_TOKEN, derived again (~30 s)

``--fit`` measures six small probe shapes (each varies one width: hidden, heads x head_dim,
intermediate, key/value heads x head_dim, heads) in every precision regime, solves the per-token
coefficients, takes the LoRA adapters' part out, and checks them on a held-out shape.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 1024 ** 3
SHAPES = {
    "Qwen2.5-1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Qwen2.5-7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
LORA_R = 16
TOKENS = 8192
# memory_model's regimes: (LoRA or full, weights' dtype, bf16 autocast); "lora" and "full" name the two above
REGIMES = {"lora_bf16": ("lora", "bfloat16", False), "lora_fp32_autocast": ("lora", "float32", True),
           "lora_fp32": ("lora", "float32", False), "full_fp32_autocast": ("full", "float32", True),
           "full_bf16": ("full", "bfloat16", False), "full_fp32": ("full", "float32", False)}
MODES = {"lora": "lora_bf16", "full": "full_fp32_autocast"}
CHUNK = 256
GPUS = (24, 48, 80)


def _config(shape: dict, layers: int):
    from transformers import Qwen2Config

    return Qwen2Config(**{**shape, "num_hidden_layers": layers}, max_position_embeddings=32768,
                       attn_implementation="sdpa", use_cache=False)


def saved_bytes(shape: dict, layers: int, tokens: int, mode: str, lora_r: int = LORA_R,
                targets: str | list[str] = "all-linear") -> int:
    """Bytes autograd saves in one forward of ``tokens`` tokens (parameters excluded). ``mode``: one
    of ``memory_model.SAVED_PER_TOKEN``'s regimes, or ``lora`` / ``full`` (lora_bf16 / full_fp32_autocast)."""
    import torch
    from transformers import Qwen2ForCausalLM

    mode = MODES.get(mode, mode)
    kind, dtype, autocast_on = REGIMES[mode]
    torch.manual_seed(0)
    # a tiny vocabulary: the LM head is measured apart (chunked), the layers are what matter here
    config = _config({**shape, "vocab_size": 64}, layers)
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=targets))
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, 64, (1, tokens))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_on)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        hidden = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states[-1]
    del hidden
    return sum(seen.values())


def per_layer(shape: dict, tokens: int, mode: str, **lora) -> tuple[float, float]:
    """(bytes per token, constant bytes) one decoder layer saves for backward: the 2-layer minus
    the 1-layer model's saved bytes, at ``tokens`` and ``tokens // 2``."""
    def layer(t: int) -> int:
        return saved_bytes(shape, 2, t, mode, **lora) - saved_bytes(shape, 1, t, mode, **lora)

    full, half = layer(tokens), layer(tokens // 2)
    slope = (full - half) / (tokens - tokens // 2)
    return slope, full - slope * tokens


def model_shape(shape: dict):
    """``memory_model.Shape`` of a SHAPES entry (parameter counts from a meta-device model)."""
    from ampo_train.memory_model import shape_from_config

    return shape_from_config(_config(shape, shape["num_hidden_layers"]))


def estimate(shape: dict, mode: str, setting: str) -> float:
    """GiB of GPU memory for one update at ``TOKENS`` tokens, by ``ampo_train.memory_model`` (the
    formulas `ampo-train plan` uses): weights, gradients, AdamW state, autocast copies and
    activations with the chunked LM head, plus 10% for the allocator. ``mode``: lora (bf16 base,
    float32 adapter r=16 all-linear) or full (float32 weights, bf16 autocast)."""
    from ampo_train import memory_model as mm

    s = model_shape(shape)
    lora = mm.lora_count(s, LORA_R, "all-linear") if mode == "lora" else None
    precision = mm.Precision("bfloat16" if mode == "lora" else "float32", "bf16")
    setup = mm.Setup(shape=s, batch=mm.Batch(TOKENS, TOKENS), precision=precision, lora=lora,
                     checkpointing=setting != "none", offload=setting == "offload", chunk=CHUNK)
    st = mm.states(setup)
    total = st["weights"] + st["gradients"] + st["optimizer"] + mm.autocast_cache(setup) + sum(mm.activations(setup).values())
    return total * (1 + mm.ALLOCATOR_MARGIN) / GIB


# Probe shapes for --fit: each varies one width of the first; FIT_CHECK is held out.
_FIT_BASE = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 num_hidden_layers=2, vocab_size=64, tie_word_embeddings=False)
FIT_SHAPES = [_FIT_BASE, {**_FIT_BASE, "hidden_size": 512}, {**_FIT_BASE, "intermediate_size": 2048},
              {**_FIT_BASE, "num_key_value_heads": 4}, {**_FIT_BASE, "head_dim": 128},
              {**_FIT_BASE, "num_attention_heads": 8, "head_dim": 32}]
FIT_CHECK = {**_FIT_BASE, "hidden_size": 384, "intermediate_size": 1408, "num_attention_heads": 6}


def _widths(shape: dict) -> list[int]:
    head_dim = shape["head_dim"]
    return [shape["hidden_size"], shape["num_attention_heads"] * head_dim, shape["intermediate_size"],
            shape["num_key_value_heads"] * head_dim, shape["num_attention_heads"], 1]


def fit(tokens: int = 64) -> dict:
    """Each regime's per-token coefficients (h, q, i, kv, heads, one) solved from FIT_SHAPES, the
    LoRA regimes' frozen part with the all-linear adapters (r=16) taken out, and the held-out
    shape's measured vs predicted bytes. Prints what ``memory_model.SAVED_PER_TOKEN`` holds."""
    import numpy as np

    from ampo_train import memory_model as mm

    widths = np.array([_widths(s) for s in FIT_SHAPES], dtype=float)
    out = {}
    for mode in REGIMES:
        slopes = np.array([per_layer(s, tokens, mode)[0] for s in FIT_SHAPES])
        coef = np.linalg.solve(widths, slopes)
        if mode in mm.ADAPTER_BYTES:  # all-linear: inputs 5h + q + i over 7 modules
            per_input, per_rank = mm.ADAPTER_BYTES[mode]
            coef = coef - np.array([5 * per_input, per_input, per_input, 0, 0, 7 * per_rank * LORA_R])
        s = model_shape({**FIT_CHECK, "vocab_size": 64})
        lora = mm.lora_count(s, LORA_R, "all-linear") if mode.startswith("lora") else None
        out[mode] = {"coefficients": [round(float(c), 2) for c in coef],
                     "held_out_measured": per_layer(FIT_CHECK, tokens, mode)[0],
                     "held_out_model": mm.layer_bytes_per_token(s, mode, lora)}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256, help="tokens per measured forward (and half as many)")
    ap.add_argument("--fit", action="store_true", help="derive memory_model's per-token coefficients from small "
                    "probe shapes (and check them on a held-out shape) instead")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import torch

    from ampo_train import memory_model as mm

    torch.set_num_threads(1)
    if args.fit:
        out = fit()
        print(json.dumps(out) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))
        return out
    out: dict = {"tokens_measured": args.tokens, "models": {}}
    for name, shape in SHAPES.items():
        s = model_shape(shape)
        lora = mm.lora_count(s, LORA_R, "all-linear")
        act = {mode: per_layer(shape, args.tokens, mode) for mode in ("lora", "full")}
        model = {"lora": mm.layer_bytes_per_token(s, MODES["lora"], lora),
                 "full": mm.layer_bytes_per_token(s, MODES["full"], None)}
        table = {f"{mode}/{setting}": round(estimate(shape, mode, setting), 1)
                 for mode in ("lora", "full") for setting in ("none", "checkpointing", "offload")}
        out["models"][name] = {"params": {"total": s.params, "lora": lora.trainable},
                               "bytes_per_token_per_layer": {k: round(v[0]) for k, v in act.items()},
                               "model_bytes_per_token_per_layer": {k: round(v) for k, v in model.items()},
                               "constant_bytes_per_layer": {k: round(v[1]) for k, v in act.items()},
                               "gib_at_8k_tokens": table}
        if not args.json:
            print(f"{name}: {s.params / 1e9:.2f}B parameters, LoRA r={LORA_R} all-linear {lora.trainable / 1e6:.1f}M; "
                  f"saved for backward per token per layer: LoRA/bf16 {act['lora'][0] / 1024:.1f} KiB (memory_model "
                  f"{model['lora'] / 1024:.1f}), full/autocast {act['full'][0] / 1024:.1f} KiB (memory_model "
                  f"{model['full'] / 1024:.1f}; +{act['full'][1] / 2 ** 20:.1f} MiB per layer of bf16 weight copies)")
            print(f"  reasoned GiB for one update of {TOKENS} tokens: "
                  + ", ".join(f"{k} {v}" for k, v in table.items()))
    if args.json:
        print(json.dumps(out))
    else:
        print(f"fits (<= 90% of the GPU) at {TOKENS} tokens per micro-batch, reasoned not run:")
        for name in SHAPES:
            for gpu in GPUS:
                table = out["models"][name]["gib_at_8k_tokens"]
                fits = [k for k, v in table.items() if v <= 0.9 * gpu]
                print(f"  {name} on {gpu} GB: {', '.join(fits) or 'nothing'}")
    return out


if __name__ == "__main__":
    main()
