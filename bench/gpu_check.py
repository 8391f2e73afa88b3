"""What ampo costs on a CUDA GPU, next to TRL, in one command that fits one 8-minute device call.

    bash bench/gpu_wheels.sh                      # here: the wheels the device lacks, into .whl/
    python bench/gpu_check.py --world .gpu/tiny   # on the GPU: writes $OUT (or --out) gpu-check.json
    python bench/gpu_check.py --smoke             # any machine, toy sizes, under a minute (CI runs it)

Parts, in this order (each one skipped with its reason when a package, CUDA or the time budget
is missing; a part that fails is recorded and the next one runs):

1. correctness
   - ``lm_head``: our chunked log-probs and entropy against the model's own full logits (values and
     gradients), float32 and bf16 autocast, on a random Qwen2-shaped model (vocabulary 151,936);
   - ``fp16_scaler``: Accelerate's fp16 GradScaler path with an overflowing update, then finite
     ones: the overflow is skipped, the scale backs off, nothing crashes;
   - ``tiny_run``: ``ampo-train run`` for 3 steps on a tiny world (``--world``): bf16, LoRA,
     guidance on, on the GPU.
2. cost: one update of a random Qwen2-0.5B-shaped student (LoRA and full) on 8 rows of 1k/4k/8k
   response tokens (micro-batches of 2 rows, gradient checkpointing and bf16 autocast on both
   sides), ours vs TRL's GRPOTrainer loss path (``bench/update_probe.py``): peak memory (CUDA:
   ``torch.cuda.max_memory_allocated``; CPU: peak RSS growth) and seconds; ratios ours / TRL.
3. generation: transformers rollouts of that student (bf16 weights) at batch 64 and 8, 256 tokens
   (tokens/s, seconds per decoding step, after a first pass of the same size); the guidance cost per guided prompt at
   LongCoT lengths (4 candidates of 2k/4k/8k tokens scored by ``score_candidates``) as a fraction
   of a plain GRPO step's cost for that prompt (8 rollouts of that length, estimated from the
   measured per-step decode time, plus the measured LoRA update of 8 such rows).

Each part runs in a child process of its own (a CUDA error or an Accelerate state in one cannot
reach the next, and memory peaks are the part's own). The JSON holds every figure; the table on
the console is its summary.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = ("lm_head", "fp16_scaler", "tiny_run", "cost", "generation")
# Not run by default (--parts): what the LM head's chunking costs on this device, and the decode
# loop's own overhead; the evidence behind the GPU defaults of ampo_train.lm_head.
EXTRA_PARTS = ("chunk_sweep", "decode_overhead")
# Sizes per mode: the GPU run and the CPU smoke run (the same code at toy sizes).
SIZES = {
    "full": dict(vocab=151936, tokens=[1024, 4096, 8192], rows=8, micro=2, gen_batch=64, gen_tokens=256,
                 gen_small=(8, 256), score_lengths=[2048, 4096, 8192], lm_rows=4, lm_tokens=1024, lm_layers=2),
    "smoke": dict(vocab=1000, tokens=[32, 64], rows=4, micro=2, gen_batch=4, gen_tokens=16, gen_small=(2, 8),
                  score_lengths=[64, 128], lm_rows=2, lm_tokens=48, lm_layers=2),
}
SMOKE_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, max_position_embeddings=1024)


def _child_env() -> dict:
    """This environment with the repository first on PYTHONPATH (what is already there, e.g. a
    folder of carried wheels, stays after it)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _toy(smoke: bool) -> dict:
    """The probe model's shape overrides: the toy shape in smoke runs, Qwen2-0.5B's otherwise."""
    return dict(SMOKE_SHAPE) if smoke else {}


# ----------------------------------------------------------------------------- 1. correctness


def part_lm_head(smoke: bool, size: dict, work: Path) -> dict:
    """Chunked vs full-logits log-probs and entropy, values and gradients, fp32 and bf16 autocast."""
    import torch

    from ampo_train.data import Row, collate
    from ampo_train.forward import response_logprobs
    from bench.update_probe import UpdateProbe, random_qwen2

    device = _device()
    probe = UpdateProbe(vocab=size["vocab"], rows=size["lm_rows"], response_tokens=size["lm_tokens"],
                        shape="qwen2", qwen2=_toy(smoke), device=device)
    model = random_qwen2(probe, num_hidden_layers=size["lm_layers"])
    gen = torch.Generator().manual_seed(0)
    rows = [Row(torch.randint(10, size["vocab"], (32,), generator=gen).tolist(),
                torch.randint(10, size["vocab"], (size["lm_tokens"] - 37 * i,), generator=gen).tolist(), 0.0)
            for i in range(size["lm_rows"])]
    mb = collate(rows, 0).to(device)
    weights = torch.randn(mb.response_ids.shape, generator=gen).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    for name, autocast in (("fp32", False), ("bf16", True)):
        results = {}
        for path, chunk in (("chunked", 256), ("full_logits", None)):
            model.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                lp, ent = response_logprobs(model, mb, 1.0, chunk, with_entropy=True)
            ((lp * weights).sum() + (ent * weights).sum() * 0.1).backward()
            grads = torch.cat([p.grad.float().flatten() for p in params if p.grad is not None])
            results[path] = (lp.detach().float(), ent.detach().float(), grads)
        (a_lp, a_ent, a_g), (b_lp, b_ent, b_g) = results["chunked"], results["full_logits"]
        mask = mb.response_mask
        out[name] = {"logprob_max_abs_diff": float((a_lp - b_lp).abs()[mask].max()),
                     "entropy_max_abs_diff": float((a_ent - b_ent).abs()[mask].max()),
                     "grad_rel_diff": float((a_g - b_g).norm() / b_g.norm()),
                     "tokens": int(mask.sum())}
    ok = out["fp32"]["logprob_max_abs_diff"] < 1e-3 and out["fp32"]["grad_rel_diff"] < 1e-3 and \
        out["bf16"]["grad_rel_diff"] < 5e-2
    return {"ok": ok, "vocab": size["vocab"], **out}


def part_fp16_scaler(smoke: bool, size: dict, work: Path) -> dict:
    """An overflowing fp16 update, then finite ones, through the trainer's Optimization.apply."""
    import torch
    from accelerate import Accelerator

    from ampo_train.metrics import StepStats
    from ampo_train.policy import Policy
    from ampo_train.update import Optimization
    from bench.update_probe import UpdateProbe, random_qwen2

    device = _device()
    if device == "cuda":
        accelerator = Accelerator(mixed_precision="fp16")  # Accelerate builds its GradScaler itself
    else:  # what Accelerate builds on a GPU, with a CPU GradScaler (as tests/test_training_extras.py)
        accelerator = Accelerator(cpu=True)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
        accelerator.native_amp = True
        accelerator.state._mixed_precision = "fp16"
    probe = UpdateProbe(vocab=size["vocab"], rows=1, response_tokens=8, shape="qwen2", qwen2=_toy(smoke), device=device)
    model = random_qwen2(probe, **SMOKE_SHAPE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    optimization = Optimization(accelerator, model, optimizer, scheduler, max_grad_norm=1.0)
    policy = Policy(model, None, 0)
    stats = StepStats()
    ids = torch.randint(10, size["vocab"], (2, 16), device=accelerator.device)
    seen = []
    for poison in (True, False, False):
        with accelerator.autocast():
            loss = model(input_ids=ids).logits.float().pow(2).mean()
        accelerator.backward(loss * float("inf") if poison else loss)
        norm = optimization.apply(policy, stats)
        seen.append({"poisoned": poison, "grad_norm": norm if norm == norm and abs(norm) != float("inf") else str(norm),
                     "scale": float(accelerator.scaler.get_scale()),
                     "skipped_so_far": stats.summary()["skipped_updates"]})
    ok = seen[0]["skipped_so_far"] == 1 and seen[2]["skipped_so_far"] == 1 and seen[1]["scale"] < 2.0 ** 16
    return {"ok": ok, "scaler": type(accelerator.scaler).__name__, "device": str(accelerator.device), "updates": seen}


def part_tiny_run(smoke: bool, size: dict, work: Path, world: Path | None) -> dict:
    """``ampo-train run`` on a tiny world: 3 steps, bf16 (on a GPU), LoRA, adaptive guidance."""
    import torch

    if world is None and smoke:
        world = _fixture_world(work / "world")
    if world is None or not (world / "train.yaml").is_file():
        return {"skipped": f"no tiny world at {world} (--world DIR: a folder built by `ampo-cache tiny-world build` "
                           "with its store built by `ampo-cache build`)"}
    out_dir = work / "tiny-run"
    overrides = ["max_steps=3", "save_steps=100", "log_every=1", f"output_dir={out_dir}", "eval=null",
                 "lora={r: 8, alpha: 16}", "lr=1e-4", "tensorboard=false",
                 f"mixed_precision={'bf16' if torch.cuda.is_available() else 'no'}"]
    if smoke:
        overrides += ["prompts_per_step=4", "mini_batch_prompts=2", "group_size=4", "rollout.max_new_tokens=16"]
    env = _child_env()
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cli.train", "run", "--config", str(world / "train.yaml"), *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    result = {"seconds": round(time.perf_counter() - started, 1), "returncode": done.returncode}
    if done.returncode != 0:
        return {**result, "ok": False, "stderr": done.stderr[-2000:]}
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    keys = ("reward", "guidance/fraction", "guidance/injected", "grad_norm", "entropy", "time/step",
            "time/generate", "time/update")
    steps = [{k: m.get(k) for k in ("step", *keys)} for m in lines]
    ok = [m["step"] for m in lines] == [1, 2, 3] and all(m.get("grad_norm") is not None for m in lines)
    return {**result, "ok": ok, "device": "cuda" if torch.cuda.is_available() else "cpu", "steps": steps}


def _fixture_world(root: Path) -> Path:
    """The tests' one-second world (a random student, a store of three teachers' traces) with a
    train.yaml: what a smoke run trains when no tiny world is given."""
    from tests.trainer_fixtures import base_config, make_world, write_config

    world = make_world(root, num_prompts=8, covered=0.75)
    write_config(root / "train.yaml", base_config(world, root / "out"))
    return root


# ----------------------------------------------------------------------------- 2. cost


def _measure_update(update, batch, device: str, repeats: int = 2) -> dict:
    """A warm-up at a few tokens, then ``repeats`` timed updates: the fastest one's seconds (the
    first update of a new shape also pays one-time kernel selection) and the peak memory."""
    runs = [_timed_update(update, batch, device) for _ in range(repeats)]
    best = min(runs, key=lambda r: r["seconds"])
    return {**best, "peak_mib": max(r["peak_mib"] for r in runs),
            "peak_growth_mib": max(r["peak_growth_mib"] for r in runs), "seconds_runs": [r["seconds"] for r in runs]}


def _timed_update(update, batch, device: str) -> dict:
    import gc

    import torch

    from bench.update_probe import hwm_kib, reset_hwm, rss_kib

    small = {k: (v[:, :8] if v.dim() == 2 else v) for k, v in batch.items()}
    update(small)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_kib() * 1024
        reset_hwm()
    started = time.perf_counter()
    update(batch)
    _sync()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else hwm_kib() * 1024
    return {"seconds": round(seconds, 3), "peak_mib": round(peak / 2 ** 20, 1),
            "peak_growth_mib": round((peak - before) / 2 ** 20, 1)}


def _arm_update(arm: str, probe, work: Path) -> dict:
    """One arm's measured update (``_measure_update``), or the error it raised (out of memory is a
    result too); its model is freed before the next arm builds one."""
    import gc

    import torch

    from bench.update_probe import make_update, probe_batch

    update = None
    try:
        update = make_update(arm, probe, work)
        return _measure_update(update, probe_batch(probe), probe.device)
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
    finally:
        del update
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def part_cost(smoke: bool, size: dict, work: Path) -> dict:
    """Ours vs TRL: one update of 8 rows per (mode, length)."""


    from bench.update_probe import UpdateProbe

    device = _device()
    arms = ["ours"] + (["trl"] if importlib.util.find_spec("trl") else [])
    rows = []
    for mode in ("lora", "full"):
        for tokens in size["tokens"]:
            probe = UpdateProbe(vocab=size["vocab"], rows=size["rows"], response_tokens=tokens, prompt_tokens=128,
                                micro_batch=size["micro"], lora=mode == "lora", shape="qwen2", qwen2=_toy(smoke), device=device,
                                autocast=device == "cuda", gradient_checkpointing=True)
            row = {"mode": mode, "response_tokens": tokens}
            for arm in arms:
                row[arm] = _arm_update(arm, probe, work / f"{arm}-{mode}-{tokens}")
            if "seconds" in row.get("ours", {}) and "seconds" in row.get("trl", {}):
                row["seconds_ours_vs_trl"] = round(row["ours"]["seconds"] / row["trl"]["seconds"], 3)
                row["peak_ours_vs_trl"] = round(row["ours"]["peak_growth_mib"] / row["trl"]["peak_growth_mib"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
            _save_partial({"ok": False, "partial": True, "rows": rows})
    note = None if "trl" in arms else "trl is not installed: ours alone (pip install -e '.[bench]')"
    return {"ok": all("seconds" in r["ours"] for r in rows), "arms": arms, "rows": rows, "note": note,
            "settings": {"rows": size["rows"], "micro_batch_rows": size["micro"], "prompt_tokens": 128,
                         "gradient_checkpointing": True, "bf16_autocast": device == "cuda", "loss_type": "dr_grpo"}}


# ----------------------------------------------------------------------------- 3. generation


def _char_tokenizer():
    """One token per character (exact offsets, as comprehension scoring needs), ids 0-2 for pad,
    unk and EOS (the probe model's), and a chat template."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789 .,:?=+-*x\\{}<>|\n":
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<eos>")
    tokenizer.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    return tokenizer


def part_generation(smoke: bool, size: dict, work: Path) -> dict:
    import torch

    from ampo_train.comprehension import Scoring, score_candidates
    from ampo_train.config import RolloutSettings
    from ampo_train.rollout import open_engine
    from bench.update_probe import UpdateProbe, make_update, probe_batch, random_qwen2

    device = _device()
    tokenizer = _char_tokenizer()
    probe = UpdateProbe(vocab=size["vocab"], rows=1, response_tokens=8, shape="qwen2", qwen2=_toy(smoke), device=device)
    model = random_qwen2(probe)
    if device == "cuda":
        model = model.to(torch.bfloat16)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    decode = {}
    for batch, tokens in ((size["gen_batch"], size["gen_tokens"]), size["gen_small"]):
        engine = open_engine("transformers", RolloutSettings(max_new_tokens=tokens), model, tokenizer)
        prompts = [torch.randint(10, len(tokenizer), (64,), generator=gen).tolist() for _ in range(batch)]
        # A first pass at the same size: a sequence length seen for the first time also pays kernel
        # selection (on the H200 a cold pass ran 2.3x slower per step); steps repeat across training.
        engine.generate(prompts, 1)
        _sync()
        started = time.perf_counter()
        groups = engine.generate(prompts, 1)
        _sync()
        seconds = time.perf_counter() - started
        generated = sum(len(g[0].token_ids) for g in groups)
        steps = max(len(g[0].token_ids) for g in groups)
        decode[f"{batch}x{tokens}"] = {"seconds": round(seconds, 2), "tokens": generated,
                                       "tokens_per_second": round(generated / seconds, 1),
                                       "seconds_per_step": seconds / steps}
    per_step = decode[f"{size['gen_small'][0]}x{size['gen_small'][1]}"]["seconds_per_step"]
    model.float()
    # A LoRA update of 8 rows per length (the cost part's setting), for the GRPO step it is compared with.
    scoring = []
    for length in size["score_lengths"]:
        traces = ["".join(chr(97 + (i * 7 + j) % 26) for j in range(length - 12)) + " \\boxed{42}" for i in range(4)]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            score_candidates(model, tokenizer, "What is 6 x 7?", traces[:1], "42", Scoring(chunk_size=256))  # warm-up
            _sync()
            started = time.perf_counter()
            score_candidates(model, tokenizer, "What is 6 x 7?", traces, "42", Scoring(chunk_size=256))
            _sync()
        score_s = time.perf_counter() - started
        update_probe = UpdateProbe(vocab=size["vocab"], rows=size["rows"], response_tokens=length, prompt_tokens=64,
                                   micro_batch=size["micro"], lora=True, shape="qwen2", qwen2=_toy(smoke), device=device,
                                   autocast=device == "cuda", gradient_checkpointing=True)
        update = make_update("ours", update_probe, work / f"gen-update-{length}")
        update_s = _measure_update(update, probe_batch(update_probe), device)["seconds"]
        update = None
        rollout_s = per_step * length  # 8 rollouts of `length` tokens decode in `length` steps at batch 8
        scoring.append({"candidate_tokens": length, "candidates": 4, "score_seconds": round(score_s, 3),
                        "grpo_step_seconds_per_prompt": round(rollout_s + update_s, 2),
                        "rollout_seconds_estimated": round(rollout_s, 2), "update_seconds": round(update_s, 3),
                        "guidance_fraction": round(score_s / (rollout_s + update_s), 4)})
        print(json.dumps(scoring[-1]), flush=True)
        _save_partial({"ok": False, "partial": True, "decode": decode, "guidance": scoring})
    return {"ok": True, "decode": decode, "guidance": scoring,
            "note": "rollout time of a prompt's 8 samples = decode steps x the measured seconds per step at batch "
                    "8 (decoding is memory-bound: the per-step time barely grows with the batch); the update: 8 rows "
                    "of that length, LoRA, measured"}


# ----------------------------------------------------------------------------- extra parts


def part_chunk_sweep(smoke: bool, size: dict, work: Path) -> dict:
    """One update (8 rows, LoRA and full, shortest and longest length) through ours at several
    LM-head chunk sizes (``logit_chunk_size``), beside TRL; best of 2."""


    from bench.update_probe import UpdateProbe

    device = _device()
    variants = [("trl", 256), ("ours", 256), ("ours", 1024), ("ours", 4096)]
    rows = []
    for mode in ("lora", "full"):
        for tokens in (size["tokens"][0], size["tokens"][-1]):
            row = {"mode": mode, "response_tokens": tokens}
            for arm, chunk in variants:
                if arm == "trl" and not importlib.util.find_spec("trl"):
                    continue
                name = arm if arm == "trl" else f"ours_chunk{chunk}"
                probe = UpdateProbe(vocab=size["vocab"], rows=size["rows"], response_tokens=tokens, prompt_tokens=128,
                                    micro_batch=size["micro"], lora=mode == "lora", shape="qwen2", qwen2=_toy(smoke),
                                    device=device, autocast=device == "cuda", gradient_checkpointing=True,
                                    logit_chunk_size=chunk)
                row[name] = _arm_update(arm, probe, work / f"{name}-{mode}-{tokens}")
            rows.append(row)
            print(json.dumps(row), flush=True)
            _save_partial({"ok": False, "partial": True, "rows": rows})
    return {"ok": True, "rows": rows}


def part_decode_overhead(smoke: bool, size: dict, work: Path) -> dict:
    """Seconds per decoding step at batch 64: ``model.generate`` alone, and through our
    TransformersRollout (which also records each sampled token's log-prob)."""
    import torch

    from ampo_train.config import RolloutSettings
    from ampo_train.rollout import open_engine
    from bench.update_probe import UpdateProbe, random_qwen2

    device = _device()
    tokenizer = _char_tokenizer()
    probe = UpdateProbe(vocab=size["vocab"], rows=1, response_tokens=8, shape="qwen2", qwen2=_toy(smoke),
                        device=device)
    model = random_qwen2(probe)
    if device == "cuda":
        model = model.to(torch.bfloat16)
    model.eval()
    steps = 128 if not smoke else 8
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, len(tokenizer), (64,), generator=gen).tolist() for _ in range(64 if not smoke else 4)]
    ids = torch.tensor(prompts, device=device)
    result = {}
    engine = open_engine("transformers", RolloutSettings(max_new_tokens=steps), model, tokenizer)
    for name in ("generate", "ours", "generate", "ours"):
        _sync()
        started = time.perf_counter()
        if name == "generate":
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                     max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0, eos_token_id=2)
            made = out.shape[1] - ids.shape[1]
        else:
            made = max(len(g[0].token_ids) for g in engine.generate(prompts, 1))
        _sync()
        result.setdefault(name, []).append((time.perf_counter() - started) / made)
    return {"ok": True, "batch": len(prompts), "steps": steps,
            "seconds_per_step": {k: [round(v, 4) for v in vals] for k, vals in result.items()}}


# ----------------------------------------------------------------------------- the parent

PARTIAL: Path | None = None  # a child's result file: long parts save what they have after each row


def _save_partial(result: dict) -> None:
    if PARTIAL is not None:
        PARTIAL.write_text(json.dumps(result, indent=1, default=str))



def run_part(name: str, args, out: Path) -> dict:
    """``name`` in a child process; its result dict (or the failure)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--out", str(out)]
    if args.smoke:
        cmd.append("--smoke")
    if args.world:
        cmd += ["--world", str(args.world)]
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=_child_env(), capture_output=True,
                              text=True, timeout=max(30, int(args.budget)))
    except subprocess.TimeoutExpired:
        partial = out / f"part-{name}.json"
        saved = json.loads(partial.read_text()) if partial.exists() else {}
        return {**saved, "ok": False, "error": "timed out (the rows above were measured before)",
                "seconds": round(time.perf_counter() - started, 1)}
    result_file = out / f"part-{name}.json"
    if done.returncode != 0 or not result_file.exists():
        return {"ok": False, "error": f"exit {done.returncode}", "stderr": done.stderr[-3000:],
                "seconds": round(time.perf_counter() - started, 1)}
    result = json.loads(result_file.read_text())
    result["seconds_part"] = round(time.perf_counter() - started, 1)
    return result


def child(name: str, args, out: Path) -> None:
    global PARTIAL
    PARTIAL = out / f"part-{name}.json"
    PARTIAL.unlink(missing_ok=True)
    size = SIZES["smoke" if args.smoke else "full"]
    work = Path(tempfile.mkdtemp(prefix=f"gpu-check-{name}-"))
    try:
        if name == "tiny_run":
            result = part_tiny_run(args.smoke, size, work, args.world)
        else:
            result = globals()[f"part_{name}"](args.smoke, size, work)
    except Exception as exc:  # recorded, so that the next part still runs
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:1000], "traceback": traceback.format_exc()[-3000:]}
    (out / f"part-{name}.json").write_text(json.dumps(result, indent=1, default=str))


def environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0),
                    gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1))
    from importlib.metadata import PackageNotFoundError, version

    for package in ("transformers", "peft", "accelerate", "trl", "datasets", "duckdb", "math-verify", "pyarrow"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = "not installed"
    return info


def summary_rows(report: dict) -> list[tuple[str, str]]:
    rows = []
    for name in (n for n in [*PARTS, *EXTRA_PARTS] if n in report["parts"]):
        part = report["parts"][name]
        status = "skipped" if "skipped" in part else ("ok" if part.get("ok") else "FAILED")
        detail = part.get("skipped") or part.get("error") or ""
        if name == "lm_head" and "fp32" in part:
            detail = (f"fp32 logp {part['fp32']['logprob_max_abs_diff']:.1e}, grad {part['fp32']['grad_rel_diff']:.1e}; "
                      f"bf16 grad {part['bf16']['grad_rel_diff']:.1e}")
        if name == "fp16_scaler" and "updates" in part:
            detail = "scales " + " -> ".join(f"{u['scale']:g}" for u in part["updates"])
        if name == "tiny_run" and "steps" in part:
            detail = f"{len(part['steps'])} steps, {part['seconds']} s"
        if name == "cost" and "rows" in part:
            detail = "; ".join(f"{r['mode']} {r['response_tokens']}: " + (
                f"{r['ours'].get('peak_growth_mib', '?')} MiB {r['ours'].get('seconds', '?')} s"
                + (f" (x{r['peak_ours_vs_trl']} mem, x{r['seconds_ours_vs_trl']} time vs TRL)"
                   if "peak_ours_vs_trl" in r else "")) for r in part["rows"])
        if name == "chunk_sweep" and "rows" in part:
            detail = f"{len(part['rows'])} rows (see the JSON)"
        if name == "decode_overhead" and "seconds_per_step" in part:
            detail = ", ".join(f"{k} {v}" for k, v in part["seconds_per_step"].items())
        if name == "generation" and "decode" in part:
            detail = ", ".join(f"{k}: {v['tokens_per_second']} tok/s" for k, v in part["decode"].items()) + "; guidance " + \
                ", ".join(f"{g['candidate_tokens']}: {g['guidance_fraction']:.1%}" for g in part["guidance"])
        rows.append((name, status, detail))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any device (CI): about a minute")
    parser.add_argument("--world", type=Path, help="a tiny world with its store, for the tiny_run part")
    parser.add_argument("--out", type=Path, help="output folder (default: $OUT when set, else runs/gpu-check)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated, of {','.join(PARTS)} (default: these) and {','.join(EXTRA_PARTS)}")
    parser.add_argument("--budget", type=float, default=450, help="seconds for all parts; later parts are skipped")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = args.out or Path(os.environ.get("OUT") or ROOT / "runs" / "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        child(args.child, args, out)
        return
    started = time.perf_counter()
    report = {"mode": "smoke" if args.smoke else "full", "environment": environment(), "parts": {}}
    wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
    for name in [*PARTS, *EXTRA_PARTS]:
        if name not in wanted:
            continue
        left = args.budget - (time.perf_counter() - started)
        if left < 20:
            report["parts"][name] = {"skipped": f"time budget ({args.budget:g} s) spent"}
            continue
        print(f"-- {name} ({left:.0f} s left)", flush=True)
        report["parts"][name] = run_part(name, argparse.Namespace(**{**vars(args), "budget": left}), out)
        (out / "gpu-check.json").write_text(json.dumps(report, indent=1, default=str))
    report["seconds"] = round(time.perf_counter() - started, 1)
    (out / "gpu-check.json").write_text(json.dumps(report, indent=1, default=str))
    width = max(len(name) for name in [*PARTS, *EXTRA_PARTS])
    print(f"\ngpu check ({report['mode']}, {report['environment'].get('gpu', 'no GPU')}, {report['seconds']} s)")
    for name, status, detail in summary_rows(report):
        print(f"{name:<{width}}  {status:<7}  {detail}")
    print(f"wrote {out / 'gpu-check.json'}")
    failed = [n for n, part in report["parts"].items() if "skipped" not in part and not part.get("ok")]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
