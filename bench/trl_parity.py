"""Our GRPO loss against TRL's ``GRPOTrainer`` on one fixed batch: loss value and every gradient.

    python bench/trl_parity.py --world tiny/            # a tiny world's student and tokenizer
    python bench/trl_parity.py --model DIR [--tokenizer DIR]

One batch, built once and fed to both sides:

* prompts rendered by each side's own code (TRL: its chat templating of a conversational
  ``prompt`` column; ours: ``ampo_train.data.prepare_prompts``); the token ids are checked equal;
* fixed completions (some correct, some wrong, some ending in EOS, some cut at
  ``max_completion_length``), scored by each side through the same reward function (our verifier);
  the advantages each side computes are compared;
* *injected* old log-probs = current log-probs + Gaussian noise (std 0.3), so the ratio is not 1,
  many tokens are clipped on both sides of [1 - eps, 1 + eps], and the loss value depends on the
  model. (In lockstep the old log-probs are the current ones detached and the value of the
  clipped surrogate is -sum(A * mask) / normaliser whatever the model; only gradients would then
  say anything. The ``lockstep`` case is run too.)

TRL's side is ``GRPOTrainer._generate_and_score_completions`` with generation replaced by the fixed
completions (its tokenisation, decoding, reward call and advantage code run unchanged), then its
own ``_compute_loss`` and ``backward``. Ours is the trainer's own code: ``group_advantages`` and
``update.minibatch_backward`` (``micro_loss``: ``mixed_token_loss`` + ``aggregate``) with a
``TrainConfig`` matched to TRL's settings. Two fresh copies of the same model are used, and the
loss and the gradient of every parameter are compared.

Matched settings per case (``CASES``): TRL ``grpo`` ~ our ``seq_mean_token_mean``, ``bnpo`` ~
``token_mean``, ``dr_grpo`` ~ ``seq_mean_token_sum_norm`` (L = max_completion_length), ``dapo`` ~
``token_mean`` (one generation per optimizer step); ``scale_rewards="none"`` ~
``advantage_scale: none``; ``epsilon`` 0.2 ~ ``clip_low = clip_high = 0.2``; ``beta = 0``; TRL has no
dual clip, so ours is off (``loss.dual_clip: null``). What cannot match is measured, not hidden:
``scale_rewards="group"`` divides by (std + 1e-4) in TRL and by (std + 1e-6) in our trainer (the
``group_std`` case reports the difference and checks that ``group_advantages(eps=1e-4)`` removes it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The fixed batch: three problems (different prompt lengths, so prompts are left-padded) and G = 4
# completions each. Group 1 is mixed, group 2 has one correct answer, group 3 is all wrong
# (advantage 0: it contributes only to the normalisers). "<cut>" marks a completion that is cut at
# max_completion_length without EOS (a truncated rollout); the others end in EOS.
PROBLEMS = [
    ("What is 6 + 3 + 9 + 8?", "26", [
        "6+3=9, 9+9=18, 18+8=26. \\boxed{26}",
        "6+3+9+8 = 25",
        "26",
        "<cut>6 + 3 is 9 and 9 + 9 is 18 and then 18 + 8 is 26 so the answer",
    ]),
    ("What is 7 + 9?", "16", [
        "16",
        "7+9=15",
        "<cut>seven plus nine, let me count: 8 9 10 11 12 13 14 15 16 17 18",
        "17. \\boxed{17}",
    ]),
    ("What is 12 + 30 + 5?", "47", [
        "48",
        "12+30=42, 42+5=46",
        "\\boxed{45}",
        "<cut>12 + 30 + 5 equals forty-something, maybe 44 or 45 or so",
    ]),
]
MAX_COMPLETION_LENGTH = 48
OLD_LOGP_NOISE = 0.3


@dataclass(frozen=True)
class Case:
    name: str
    trl_loss_type: str
    aggregation: str
    scale_rewards: str = "none"  # TRL's; ours: advantage_scale "none" or "group"
    injected_old: bool = True  # False: lockstep (old = current detached on both sides)
    entropy_coef: float = 0.0


CASES = [
    Case("grpo", "grpo", "seq_mean_token_mean"),
    Case("bnpo", "bnpo", "token_mean"),
    Case("dr_grpo", "dr_grpo", "seq_mean_token_sum_norm"),
    Case("dapo", "dapo", "token_mean"),
    Case("dr_grpo_lockstep", "dr_grpo", "seq_mean_token_sum_norm", injected_old=False),
    Case("dr_grpo_entropy", "dr_grpo", "seq_mean_token_sum_norm", entropy_coef=1e-3),
    Case("group_std", "dr_grpo", "seq_mean_token_sum_norm", scale_rewards="group"),
]


@dataclass
class CaseResult:
    case: str
    trl_loss_type: str
    aggregation: str
    loss_trl: float
    loss_ours: float
    loss_diff: float
    grad_max_abs_diff: float
    grad_max_abs: float  # the largest gradient entry (scale for grad_max_abs_diff)
    advantage_max_abs_diff: float
    clipped_fraction: float  # share of on-policy tokens where the clip was active (ours)
    params: int
    note: str = ""
    extra: dict = field(default_factory=dict)


def _fixed_completions(tokenizer, max_len: int) -> list[list[int]]:
    out = []
    for _, _, texts in PROBLEMS:
        for text in texts:
            if text.startswith("<cut>"):
                ids = tokenizer(text[len("<cut>"):], add_special_tokens=False)["input_ids"]
                ids = (ids * (max_len // max(len(ids), 1) + 1))[:max_len]  # exactly max_len, no EOS
            else:
                ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_len - 1] + [tokenizer.eos_token_id]
            out.append(ids)
    return out


def _reward_func(verifier):
    from ampo_train.config import RewardSettings
    from ampo_train.rewards import score_responses

    def verifier_reward(prompts, completions, answer, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return score_responses(verifier, texts, answer, RewardSettings()).rewards.tolist()

    return verifier_reward


def _load_model(model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    return model


def run_case(case: Case, model_dir: Path, tokenizer_dir: Path, work: Path, seed: int = 0) -> CaseResult:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    from ampo_cache.generation import conversation
    from ampo_cache.prompts import load_prompts
    from ampo_cache.verify import Verifier
    from ampo_train.advantages import group_advantages
    from ampo_train.config import load_train_config
    from ampo_train.data import Row, collate, prepare_prompts
    from ampo_train.metrics import StepStats
    from ampo_train.rewards import score_responses
    from ampo_train.forward import response_logprobs
    from ampo_train.policy import ForwardSettings, Policy
    from ampo_train.update import PlainBackward, RowLogprobs, UpdateSettings, minibatch_backward

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    G = len(PROBLEMS[0][2])
    B = G * len(PROBLEMS)
    M = MAX_COMPLETION_LENGTH
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    completions = _fixed_completions(tokenizer, M)
    verifier = Verifier(workers=0)
    reward = _reward_func(verifier)

    # ---- our side's config (validated like `ampo-train run`'s) and rows
    work.mkdir(parents=True, exist_ok=True)
    prompts_file = work / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"problem": p, "answer": a}) + "\n" for p, a, _ in PROBLEMS))
    cfg = load_train_config(None, [], base={
        "student": str(model_dir), "tokenizer": str(tokenizer_dir), "prompts": str(prompts_file),
        "output_dir": str(work / "out"), "store": None, "guidance": {"mode": "off"},
        "prompts_per_step": len(PROBLEMS), "group_size": G, "micro_batch_size": B, "lr": 1e-5,
        "rollout": {"temperature": 1.0, "max_new_tokens": M},
        "loss": {"aggregation": case.aggregation, "advantage_scale": case.scale_rewards,
                 "clip_low": 0.2, "clip_high": 0.2, "dual_clip": None, "entropy_coef": case.entropy_coef,
                 "kl_coef": 0.0},
        "tensorboard": False,
    })
    ours_prompts = prepare_prompts(load_prompts(prompts_file), tokenizer, cfg.system_prompt)
    answers = [a for _, a, _ in PROBLEMS for _ in range(G)]
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
    scored = score_responses(verifier, texts, answers, cfg.reward)
    rewards = scored.rewards.view(len(PROBLEMS), G)
    ours_adv = group_advantages(rewards, scale=cfg.loss.advantage_scale).flatten()
    rows = [Row(ours_prompts[i // G].token_ids, list(ids), float(rewards.flatten()[i]), bool(scored.correct[i]),
                finished=ids[-1] == tokenizer.eos_token_id, advantage=a)
            for i, (ids, a) in enumerate(zip(completions, ours_adv.tolist()))]

    # ---- two fresh copies of the same model
    torch.manual_seed(seed)
    model_ours = _load_model(model_dir)
    model_trl = _load_model(model_dir)

    # ---- the injected old log-probs: current + noise (identical tensors for both sides)
    old_by_row = None
    if case.injected_old:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            mb = collate(rows, tokenizer.pad_token_id)
            current = response_logprobs(model_ours, mb, cfg.rollout.temperature)
        noise = torch.randn(current.shape, generator=gen) * OLD_LOGP_NOISE
        old_by_row = (current + noise) * mb.response_mask  # padding: 0 (never used by either side)

    # ---- TRL: its own prompt handling, reward call, advantages and loss
    args = GRPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=B, gradient_accumulation_steps=1,
        num_generations=G, max_completion_length=M, temperature=1.0, learning_rate=1e-5, beta=0.0,
        epsilon=0.2, loss_type=case.trl_loss_type, scale_rewards=case.scale_rewards, entropy_coef=case.entropy_coef,
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=seed, shuffle_dataset=False, max_steps=1,
        dataloader_num_workers=0,
    )
    dataset = Dataset.from_list([{"prompt": conversation(p, cfg.system_prompt), "answer": a} for p, a, _ in PROBLEMS])
    trainer = GRPOTrainer(model=model_trl, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    seen_prompt_ids = []

    def fixed_generation(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        seen_prompt_ids.extend(list(p) for p in prompt_ids)
        return [list(c) for c in completions], None

    trainer._generate_single_turn = fixed_generation
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    inputs = [{"prompt": conversation(p, cfg.system_prompt), "answer": a} for p, a, _ in PROBLEMS for _ in range(G)]
    batch = trainer._generate_and_score_completions(inputs)
    # the same tokens on both sides: prompts (TRL's own chat templating) and completions
    assert seen_prompt_ids == [list(ours_prompts[i // G].token_ids) for i in range(B)], "prompt token ids differ"
    got = [ids[m.bool()].tolist() for ids, m in zip(batch["completion_ids"], batch["completion_mask"])]
    assert got == completions, "completion token ids differ"
    if old_by_row is not None:
        width = batch["completion_ids"].shape[1]
        assert width == old_by_row.shape[1]
        batch["old_per_token_logps"] = old_by_row.clone()
    adv_diff = float((batch["advantages"].float() - ours_adv.float()).abs().max())

    model_trl.zero_grad(set_to_none=True)
    loss_trl = trainer._compute_loss(trainer.model, batch)
    loss_trl.backward()
    grads_trl = {n: p.grad.detach().clone() for n, p in model_trl.named_parameters() if p.grad is not None}

    # ---- ours: the trainer's own accumulation and loss
    model_ours.zero_grad(set_to_none=True)
    losses = []

    class Recording(PlainBackward):
        def backward(self, loss):
            losses.append(float(loss.detach()))
            loss.backward()

    stats = StepStats()
    policy = Policy(model_ours, None, tokenizer.pad_token_id, ForwardSettings(cfg.rollout.temperature))
    old = None if old_by_row is None else [old_by_row[i, :len(row.response_ids)].clone() for i, row in enumerate(rows)]
    minibatch_backward(policy, rows, UpdateSettings.from_config(cfg), stats, Recording(), RowLogprobs(old))
    loss_ours = sum(losses)
    grads_ours = {n: p.grad.detach().clone() for n, p in model_ours.named_parameters() if p.grad is not None}
    verifier.close()

    if set(grads_trl) != set(grads_ours):
        raise AssertionError(f"different parameters got gradients: {sorted(set(grads_trl) ^ set(grads_ours))}")
    grad_diff = max(float((grads_trl[n] - grads_ours[n]).abs().max()) for n in grads_ours)
    grad_max = max(float(g.abs().max()) for g in grads_ours.values())
    summary = stats.summary()
    note = ""
    extra = {"rewards": rewards.flatten().tolist(), "advantages_trl": batch["advantages"].tolist(),
             "advantages_ours": ours_adv.tolist()}
    if case.scale_rewards == "group":
        matched = group_advantages(rewards, scale="group", eps=1e-4).flatten()
        extra["advantage_diff_with_eps_1e-4"] = float((batch["advantages"].float() - matched).abs().max())
        note = ("TRL divides by (std + 1e-4), our trainer by (std + 1e-6): the advantages differ by "
                f"{adv_diff:.2e}; group_advantages(eps=1e-4) matches TRL to "
                f"{extra['advantage_diff_with_eps_1e-4']:.1e}")
    return CaseResult(case.name, case.trl_loss_type, case.aggregation, float(loss_trl.detach()), loss_ours,
                      abs(float(loss_trl.detach()) - loss_ours), grad_diff, grad_max, adv_diff,
                      float(summary.get("clip/fraction") or 0.0), sum(g.numel() for g in grads_ours.values()), note, extra)


def check_parity(model_dir: Path, tokenizer_dir: Path | None = None, cases=CASES, seed: int = 0) -> list[CaseResult]:
    """Run every case; returns the measured differences (nothing is asserted here)."""
    tokenizer_dir = tokenizer_dir or model_dir
    results = []
    with tempfile.TemporaryDirectory(prefix="ampo-trl-parity-") as tmp:
        for case in cases:
            with contextlib.redirect_stdout(sys.stderr):  # TRL/Trainer chatter stays off stdout
                results.append(run_case(case, Path(model_dir), Path(tokenizer_dir), Path(tmp) / case.name, seed))
    return results


def print_results(results: list[CaseResult]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="our loss vs TRL GRPOTrainer._compute_loss: one fixed batch, 12 rows")
    for col in ("case", "TRL", "ours", "loss TRL", "|loss diff|", "max|grad diff|", "max|grad|", "max|adv diff|",
                "clipped"):
        table.add_column(col, justify="left" if col in ("case", "TRL", "ours") else "right", no_wrap=True)
    for r in results:
        table.add_row(r.case, r.trl_loss_type, r.aggregation, f"{r.loss_trl:.6f}", f"{r.loss_diff:.1e}",
                      f"{r.grad_max_abs_diff:.1e}", f"{r.grad_max_abs:.1e}", f"{r.advantage_max_abs_diff:.1e}",
                      f"{r.clipped_fraction:.0%}")
    console = Console(width=max(Console().width, 150))
    console.print(table)
    for r in results:
        if r.note:
            console.print(f"{r.case}: {r.note}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=Path, help="a tiny world folder (uses its student/ and tokenizer/)")
    parser.add_argument("--model", type=Path, help="a model folder (instead of --world)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the model's)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.world is None and args.model is None:
        parser.error("give --world or --model")
    model = args.model or args.world / "student"
    tokenizer = args.tokenizer or (args.world / "tokenizer" if args.world else None)
    results = check_parity(model, tokenizer)
    print_results(results)
    if args.out:
        args.out.write_text(json.dumps([asdict(r) for r in results], indent=1))
    exact = [r for r in results if r.case != "group_std"]
    worst_loss = max(r.loss_diff for r in exact)
    print(f"max |loss diff| {worst_loss:.1e}, max |grad diff| {max(r.grad_max_abs_diff for r in exact):.1e} "
          f"over the matched cases")
    return 0 if worst_loss <= 1e-6 and all(math.isfinite(r.loss_ours) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
