"""What one training process holds in GPU memory, from a model's shape and train.yaml's settings.

    shape = shape_from_config(transformers_config)          # counts on a meta-device model: no weights
    setup = Setup(shape=shape, lora=lora_count(shape, cfg.lora), precision=..., layout=Layout("fsdp2", 4), ...)
    phases = phase_bytes(setup)                              # {"generate": {...}, "score": {...}, "update": {...}}

The formulas are the ones ``bench/activation_memory.py`` measures and ``docs/memory.md`` reasons
with, written once here (the bench imports them):

* **States**: weights in ``dtype``; LoRA adapters, their gradients and AdamW moments in float32 (peft
  keeps adapters in float32); full fine-tuning: gradients in the weights' dtype, AdamW's two moments
  too. DDP keeps a second copy of the gradients in its reduction buckets (Accelerate's default
  ``gradient_as_bucket_view=False``); FSDP2 shards weights, gradients and moments over the
  processes (float32 master weights when ``mixed_precision`` is set: Accelerate upcasts them);
  DeepSpeed ZeRO-2/3 holds 12 bytes per parameter of optimizer state (two moments and a float32
  master copy) sharded, the model itself in bf16 under mixed precision, whole (ZeRO-2) or sharded
  (ZeRO-3).
* **Activations**: the bytes autograd saves per token per decoder layer are a linear function of
  the layer's widths (hidden h, attention q = heads x head_dim, key/value kv, MLP intermediate i,
  heads), with coefficients per precision regime read off ``saved_tensors_hooks`` measurements
  (``python bench/activation_memory.py --fit`` derives them again; the fit is exact on every shape
  measured, held-out ones included). With ``gradient_checkpointing`` each layer keeps only its
  input (in the weights' dtype: float32 weights keep a float32 residual stream) and one layer's
  activations exist again while it is recomputed.
* **The LM head**: the trainer's chunked head peaks at about 3 x chunk x vocab x 4 bytes
  (``ampo_train/lm_head.py``); under FSDP2 and ZeRO-3 the update runs the model's own head
  (``forward.response_logprobs``) and its ``[rows, response, vocab]`` logits with log-softmax and
  entropy peak at 6x the float32 logits (``bench/lm_head_memory.py``, plain arm: 6.0x).
* **Phases** (``ampo_train/trainer.py``): generation, scoring and old log-probs run under
  ``full_parameters`` (FSDP2/ZeRO-3: the whole model gathered on every process, in the compute
  dtype), with the vLLM engine awake while it generates; the update holds gradients and
  activations, with the vLLM engine asleep (sleep mode, the GPU default) or holding its share.

Checked against measurements in ``tests/test_plan.py``: the per-token figures of
``bench/activation_memory.py`` (Qwen2.5-1.5B and -7B shapes), a fresh measurement on a held-out
shape, and the H200 update figures in ``bench/results/gpu-h200.json`` (Qwen2-0.5B shape, 8 rows of
128 + 1k/4k/8k tokens, gradient checkpointing, bf16 autocast; within 15%).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

GIB = 1024 ** 3
LM_HEAD_CHUNK_FACTOR = 3      # chunk's peak: about 3 x chunk x vocab float32 values (lm_head.py)
PLAIN_HEAD_FACTOR = 6.0       # full logits + log-softmax + entropy, forward and backward (lm_head_memory.py)
ALLOCATOR_MARGIN = 0.10       # PyTorch's caching allocator: reserved beyond allocated (docs/memory.md)


@dataclass(frozen=True)
class Shape:
    """A decoder-only model's shape (its config.json) and its parameter counts."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    max_positions: int | None
    params: int                      # every parameter
    layer_params: int                # one decoder layer's parameters
    layer_linear_weights: int        # one decoder layer's Linear weights (no biases)
    linears: tuple[tuple[str, int, int], ...] = ()   # one decoder layer's Linear modules: (name, in, out)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def edge_params(self) -> int:
        """Embeddings, final norm and LM head: FSDP2's root unit."""
        return self.params - self.layers * self.layer_params


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def shape_from_config(config) -> Shape:
    """Count a transformers config's parameters on a meta-device model (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text = _text_config(config)
    layer = model.get_decoder().layers[0]
    linears = tuple((name.rsplit(".", 1)[-1], m.in_features, m.out_features)
                    for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear))
    heads = text.num_attention_heads
    return Shape(
        model_type=text.model_type, hidden=text.hidden_size, intermediate=text.intermediate_size,
        layers=text.num_hidden_layers, heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, vocab=text.vocab_size,
        tied=bool(getattr(text, "tie_word_embeddings", False)),
        max_positions=getattr(text, "max_position_embeddings", None),
        params=sum(p.numel() for p in model.parameters()),
        layer_params=sum(p.numel() for p in layer.parameters()),
        layer_linear_weights=sum(i * o for _, i, o in linears), linears=linears)


@dataclass(frozen=True)
class LoraCount:
    """What LoRA trains: rank r on the decoder layers' Linear modules it targets."""

    r: int
    adapted: tuple[tuple[str, int, int], ...]   # one layer's adapted modules: (name, in, out)
    trainable: int                               # adapter parameters, all layers


def lora_count(shape: Shape, r: int, targets: list[str] | str) -> LoraCount:
    """peft's rule: ``all-linear`` is every Linear but the LM head; a list matches module names."""
    adapted = tuple(m for m in shape.linears if targets == "all-linear" or m[0] in targets)
    per_layer = sum(r * (i + o) for _, i, o in adapted)
    return LoraCount(r=r, adapted=adapted, trainable=per_layer * shape.layers)


# ----------------------------------------------------------------------------- activations

@dataclass(frozen=True)
class Coefficients:
    """Bytes autograd saves per token in one decoder layer: h x hidden + q x (heads x head_dim) +
    i x intermediate + kv x (kv heads x head_dim) + heads x heads + one."""

    h: float
    q: float
    i: float
    kv: float
    heads: float
    one: float

    def per_token(self, shape: Shape) -> float:
        return (self.h * shape.hidden + self.q * shape.q_dim + self.i * shape.intermediate
                + self.kv * shape.kv_dim + self.heads * shape.heads + self.one)


# Measured (CPU, sdpa attention, transformers' Qwen2 layer; `bench/activation_memory.py --fit`).
# LoRA regimes: the frozen layer's own part; each adapted module adds ADAPTER_BYTES (per input
# feature, per rank): its input cast to the adapters' float32 (or bf16 under autocast) and lora_A's output.
SAVED_PER_TOKEN = {
    "lora_bf16": Coefficients(h=8, q=4, i=6, kv=4, heads=4, one=8),
    "lora_fp32_autocast": Coefficients(h=8, q=4, i=6, kv=4, heads=4, one=8),
    "lora_fp32": Coefficients(h=-4, q=4, i=12, kv=8, heads=4, one=8),
    "full_fp32_autocast": Coefficients(h=26, q=4, i=8, kv=4, heads=4, one=8),
    "full_bf16": Coefficients(h=16, q=4, i=8, kv=4, heads=4, one=8),
    "full_fp32": Coefficients(h=24, q=8, i=16, kv=8, heads=4, one=8),
}
ADAPTER_BYTES = {"lora_bf16": (4, 4), "lora_fp32_autocast": (2, 2), "lora_fp32": (4, 4)}


@dataclass(frozen=True)
class Precision:
    """train.yaml's ``dtype`` and ``mixed_precision`` as bytes."""

    dtype: str = "float32"
    mixed_precision: str = "no"

    @property
    def weight_bytes(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @property
    def autocast(self) -> bool:
        return self.mixed_precision in ("bf16", "fp16")


def regime(lora: bool, precision: Precision, sharded_compute: bool = False) -> str:
    """The precision regime of the layers' forward. ``sharded_compute``: FSDP2 or DeepSpeed under
    mixed precision, where the layers compute with bf16 parameters (no autocast copies)."""
    kind = "lora" if lora else "full"
    if precision.weight_bytes == 2 or (sharded_compute and precision.autocast and not lora):
        return f"{kind}_bf16"
    return f"{kind}_fp32_autocast" if precision.autocast else f"{kind}_fp32"


def layer_bytes_per_token(shape: Shape, name: str, lora: LoraCount | None) -> float:
    total = SAVED_PER_TOKEN[name].per_token(shape)
    if lora is not None:
        per_input, per_rank = ADAPTER_BYTES[name]
        total += sum(per_input * i + per_rank * lora.r for _, i, _ in lora.adapted)
    return total


def layer_constant_bytes(shape: Shape, name: str, lora: LoraCount | None) -> float:
    """Per-layer bytes that do not grow with tokens: autocast's bf16 copies of a frozen LoRA base's
    weights (and of its adapters), saved with the layer. (Trainable weights' copies are cached by
    autocast for the whole pass: ``Setup.autocast_cache``.)"""
    if name != "lora_fp32_autocast" or lora is None:
        return 0.0
    adapter = sum(lora.r * (i + o) for _, i, o in lora.adapted)
    return 2.0 * (shape.layer_linear_weights + adapter)


# ----------------------------------------------------------------------------- one process

LAYOUTS = ("single", "ddp", "fsdp2", "zero2", "zero3")


@dataclass(frozen=True)
class Layout:
    name: str = "single"
    processes: int = 1

    @property
    def shards_parameters(self) -> bool:
        return self.name in ("fsdp2", "zero3")

    @property
    def zero(self) -> bool:
        return self.name in ("zero2", "zero3")


@dataclass(frozen=True)
class Batch:
    """One micro-batch of the update: ``tokens`` = rows x (prompt + response width) on one process;
    ``response_tokens`` = rows x response width (what the LM head scores)."""

    tokens: int
    response_tokens: int


@dataclass(frozen=True)
class Engine:
    """The rollout engine's share of the GPU. vLLM: ``fraction`` of ``gpu_bytes`` while awake (its
    weights, activations and KV cache); asleep during the update with ``sleep``. transformers:
    ``kv_bytes`` of KV cache and logits while generating."""

    kind: str = "transformers"
    fraction: float = 0.0
    gpu_bytes: float = 0.0
    sleep: bool = True
    kv_bytes: float = 0.0

    @property
    def awake_bytes(self) -> float:
        return self.fraction * self.gpu_bytes if self.kind == "vllm" else self.kv_bytes


@dataclass(frozen=True)
class Setup:
    shape: Shape
    batch: Batch
    precision: Precision = field(default_factory=Precision)
    layout: Layout = field(default_factory=Layout)
    lora: LoraCount | None = None
    checkpointing: bool = False
    offload: bool = False
    chunk: int = 256
    kl_reference: bool = False
    engine: Engine = field(default_factory=Engine)

    def but(self, **changes) -> "Setup":
        return replace(self, **changes)


def _master_bytes(setup: Setup) -> int:
    """Bytes per trainable full-model parameter that the optimizer updates (FSDP2 upcasts to
    float32 under mixed precision)."""
    p = setup.precision
    return 4 if p.weight_bytes == 4 or (setup.layout.name == "fsdp2" and p.autocast) else p.weight_bytes


def _compute_bytes(setup: Setup) -> int:
    """Bytes per parameter of a gathered (FSDP2/ZeRO-3) or DeepSpeed model copy."""
    return 2 if setup.precision.autocast else setup.precision.weight_bytes


def states(setup: Setup) -> dict[str, float]:
    """Weights, gradients (during the update only), optimizer state and the frozen KL reference."""
    s, layout, n = setup.shape, setup.layout, setup.layout.processes
    if setup.lora is not None:
        trainable = setup.lora.trainable
        weights = s.params * setup.precision.weight_bytes + trainable * 4
        grads = trainable * 4 * (2 if layout.name == "ddp" else 1)
        return {"weights": weights, "gradients": grads, "optimizer": trainable * 8, "reference": 0.0}
    if layout.zero:
        model = s.params * _compute_bytes(setup) / (n if layout.name == "zero3" else 1)
        return {"weights": model, "gradients": s.params * 4 / n, "optimizer": s.params * 12 / n,
                "reference": _reference(setup)}
    shard = n if layout.name == "fsdp2" else 1
    master = _master_bytes(setup)
    grads = s.params * master / shard * (2 if layout.name == "ddp" else 1)
    return {"weights": s.params * master / shard, "gradients": grads, "optimizer": 2 * s.params * master / shard,
            "reference": _reference(setup)}


def _reference(setup: Setup) -> float:
    # The KL reference is a whole copy of the starting student on every process (loading.load_reference).
    return setup.shape.params * setup.precision.weight_bytes if setup.kl_reference else 0.0


def autocast_cache(setup: Setup) -> float:
    """Full fine-tuning of float32 weights under autocast (DDP or one process): autocast keeps a
    bf16 copy of every trainable decoder weight for the whole forward and backward."""
    p = setup.precision
    if setup.lora is not None or setup.layout.name not in ("single", "ddp") or not p.autocast or p.weight_bytes != 4:
        return 0.0
    return 2.0 * setup.shape.layers * setup.shape.layer_linear_weights


def gathered(setup: Setup, phase: str) -> float:
    """FSDP2/ZeRO-3: the whole model on every process during the no-grad phases; during the update
    the root unit (embeddings, head, final norm) and two decoder layers (the one running and the
    one prefetched)."""
    if not setup.layout.shards_parameters:
        return 0.0
    s, b = setup.shape, _compute_bytes(setup)
    if phase != "update":
        return s.params * b
    return (s.edge_params + 2 * s.layer_params) * b


def activations(setup: Setup) -> dict[str, float]:
    """The update's activations for one micro-batch: layer inputs kept by checkpointing, the
    layers' saved tensors, the LM head's peak, and the final hidden states with their gradient."""
    s, b = setup.shape, setup.batch
    name = regime(setup.lora is not None, setup.precision, sharded_compute=setup.layout.name != "single"
                  and setup.layout.name != "ddp")
    one_layer = (layer_bytes_per_token(s, name, setup.lora) * b.tokens
                 + layer_constant_bytes(s, name, setup.lora))
    stream = 4 if name.endswith(("fp32", "fp32_autocast")) else 2
    if setup.layout.shards_parameters:
        head = PLAIN_HEAD_FACTOR * b.response_tokens * s.vocab * 4
    else:
        head = LM_HEAD_CHUNK_FACTOR * min(setup.chunk, b.response_tokens) * s.vocab * 4
    hidden = 2 * 4 * s.hidden * b.tokens
    if not setup.checkpointing:
        return {"layers": s.layers * one_layer, "inputs": 0.0, "head": head, "hidden": hidden}
    inputs = (1 if setup.offload else s.layers) * s.hidden * b.tokens * stream
    # Summed although the head's backward and a layer's recomputation do not overlap in time: on the
    # H200 figures the sum is 0-10% above the measured peak, a margin a plan should keep.
    return {"layers": one_layer, "inputs": inputs, "head": head, "hidden": hidden}


def no_grad_forward(setup: Setup) -> float:
    """A scoring / old log-prob pass of one micro-batch: the chunked head (no backward) and a
    layer's transient activations."""
    s, b = setup.shape, setup.batch
    return 2 * min(setup.chunk, b.response_tokens) * s.vocab * 4 + 4 * b.tokens * (2 * s.hidden + 2 * s.intermediate)


def phase_bytes(setup: Setup) -> dict[str, dict[str, float]]:
    """Bytes one process holds at the peak of each phase, by component."""
    st = states(setup)
    resident = {"weights": st["weights"], "optimizer": st["optimizer"], "reference": st["reference"]}
    engine_awake = setup.engine.awake_bytes
    engine_update = 0.0 if setup.engine.kind != "vllm" or setup.engine.sleep else engine_awake
    acts = activations(setup)
    return {
        "generate": {**resident, "gathered": gathered(setup, "generate"), "engine": engine_awake},
        "score": {**resident, "gathered": gathered(setup, "score"), "activations": no_grad_forward(setup),
                  "engine": engine_update},
        "update": {**resident, "gradients": st["gradients"], "autocast": autocast_cache(setup),
                   "gathered": gathered(setup, "update"), "activations": sum(acts.values()), "engine": engine_update},
    }


def phase_total(parts: dict[str, float], engine_fixed: bool) -> float:
    """A phase's bytes with the allocator's margin on what PyTorch allocates (not on vLLM's fixed share)."""
    engine = parts.get("engine", 0.0) if engine_fixed else 0.0
    return (sum(parts.values()) - engine) * (1 + ALLOCATOR_MARGIN) + engine


def peak(setup: Setup) -> tuple[str, float]:
    """(phase, bytes) of the largest phase."""
    totals = {name: phase_total(parts, setup.engine.kind == "vllm") for name, parts in phase_bytes(setup).items()}
    name = max(totals, key=totals.get)
    return name, totals[name]


def kv_bytes_per_token(shape: Shape, dtype_bytes: int = 2) -> int:
    """Key and value of one token in every layer (vLLM's KV cache, or generate's)."""
    return 2 * shape.layers * shape.kv_dim * dtype_bytes
