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

Reasoned from those figures and the models' shapes (parameter counts from a ``meta``-device model),
NOT run on a GPU: the memory of one update at 8,192 tokens per micro-batch (one 8k row, or
``micro_batch_tokens: 8192``), for LoRA (bf16 base + float32 adapter, gradients and AdamW
states) and full fine-tuning (float32 master weights, gradients and AdamW states: 16 bytes per
parameter), with no checkpointing (every layer's saved activations), with
``gradient_checkpointing`` (each layer keeps only its bf16 input; one layer's activations exist
again while it is recomputed), and with ``activation_offload`` on top (the layer inputs wait in
CPU memory). Plus the LM head's chunk (``logit_chunk_size`` 256: about 3 x 256 x vocab x 4
bytes) and 10% for the allocator. vLLM colocated takes ``gpu_memory_utilization`` of the GPU while
it generates; with sleep mode (the default on a GPU) it gives it back for the update.
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
CHUNK = 256
GPUS = (24, 48, 80)


def _config(shape: dict, layers: int):
    from transformers import Qwen2Config

    return Qwen2Config(**{**shape, "num_hidden_layers": layers}, max_position_embeddings=32768,
                       attn_implementation="sdpa", use_cache=False)


def saved_bytes(shape: dict, layers: int, tokens: int, mode: str) -> int:
    """Bytes autograd saves in one forward of ``tokens`` tokens (parameters excluded)."""
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    # a tiny vocabulary: the LM head is measured apart (chunked), the layers are what matter here
    config = _config({**shape, "vocab_size": 64}, layers)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16 if mode == "lora" else torch.float32)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules="all-linear"))
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, 64, (1, tokens))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "full")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        hidden = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states[-1]
    del hidden
    return sum(seen.values())


def per_layer(shape: dict, tokens: int, mode: str) -> tuple[float, float]:
    """(bytes per token, constant bytes) one decoder layer saves for backward: the 2-layer minus
    the 1-layer model's saved bytes, at ``tokens`` and ``tokens // 2``."""
    def layer(t: int) -> int:
        return saved_bytes(shape, 2, t, mode) - saved_bytes(shape, 1, t, mode)

    full, half = layer(tokens), layer(tokens // 2)
    slope = (full - half) / (tokens - tokens // 2)
    return slope, full - slope * tokens


def parameter_counts(shape: dict) -> dict:
    import torch
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(_config(shape, shape["num_hidden_layers"]))
    total = sum(p.numel() for p in model.parameters())
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    # LoRA r on q, k, v, o, gate, up, down: r x (in + out) each
    per_layer = LORA_R * ((h + h) + (h + kv) * 2 + (h + h) + (h + i) * 2 + (i + h))
    return {"total": total, "lora": per_layer * shape["num_hidden_layers"]}


def estimate(shape: dict, counts: dict, act: dict, mode: str, setting: str) -> float:
    """GiB of GPU memory for one update at ``TOKENS`` tokens (see the module docstring)."""
    layers, h = shape["num_hidden_layers"], shape["hidden_size"]
    if mode == "lora":
        states = counts["total"] * 2 + counts["lora"] * 16
    else:
        states = counts["total"] * 16
    slope, constant = act[mode]
    one_layer = slope * TOKENS + constant
    layer_input = 2 * h * TOKENS  # bf16 hidden state entering each layer
    if setting == "none":
        activations = one_layer * layers
    elif setting == "checkpointing":  # (autocast's weight copies are made again per recomputed layer)
        activations = layer_input * layers + one_layer
    else:  # checkpointing + offload: the inputs wait on the CPU; one layer's worth on the GPU
        activations = layer_input + one_layer
    head = 3 * CHUNK * shape["vocab_size"] * 4 + 4 * h * TOKENS  # chunk + the final hidden state and its grad
    return (states + activations + head) * 1.10 / GIB


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256, help="tokens per measured forward (and half as many)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    out: dict = {"tokens_measured": args.tokens, "models": {}}
    for name, shape in SHAPES.items():
        act = {mode: per_layer(shape, args.tokens, mode) for mode in ("lora", "full")}
        counts = parameter_counts(shape)
        table = {f"{mode}/{setting}": round(estimate(shape, counts, act, mode, setting), 1)
                 for mode in ("lora", "full") for setting in ("none", "checkpointing", "offload")}
        out["models"][name] = {"params": counts,
                               "bytes_per_token_per_layer": {k: round(v[0]) for k, v in act.items()},
                               "constant_bytes_per_layer": {k: round(v[1]) for k, v in act.items()},
                               "gib_at_8k_tokens": table}
        if not args.json:
            h = shape["hidden_size"]
            print(f"{name}: {counts['total'] / 1e9:.2f}B parameters, LoRA r={LORA_R} all-linear "
                  f"{counts['lora'] / 1e6:.1f}M; saved for backward per token per layer: LoRA/bf16 "
                  f"{act['lora'][0] / 1024:.1f} KiB ({act['lora'][0] / (2 * h):.1f} x the bf16 hidden state; "
                  f"+{act['lora'][1] / 2 ** 20:.1f} MiB per layer), full/autocast {act['full'][0] / 1024:.1f} KiB "
                  f"(+{act['full'][1] / 2 ** 20:.1f} MiB per layer)")
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
