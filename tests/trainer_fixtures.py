"""A miniature world for the trainer's tests and bench: built in a second, no hub, no tinyworld.

- a character-level tokenizer (one token per character, exact offsets) with a chat template;
- a random 2-layer Llama student (head_dim 32) saved with save_pretrained: it almost never answers
  right, so adaptive guidance fires on nearly every prompt, which is what the tests want;
- addition problems with integer answers, and a store of teacher traces ("... \\boxed{N}") from
  three teachers, imported and verified through ``ampo_cache.importer.import_long``. Some prompts
  have no trace at all, and one teacher trace is wrong (the verifier keeps it out of lookups).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import yaml

CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;?!=+-*/()\\{}<>|_\n"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TEACHER_STYLES = {
    "alpha": "{a}+{b}={s}. \\boxed{{{s}}}",
    "beta": "add {a} and {b}: the sum is {s}, so \\boxed{{{s}}}",
    "gamma": "units first, then tens; {a} plus {b} makes {s}. Answer: \\boxed{{{s}}}",
}


def make_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_student(folder: Path, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """Save a random tiny Llama + the char tokenizer to ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32, head_dim=32,
        max_position_embeddings=512, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=None, tie_word_embeddings=False,
    )
    return save_model(LlamaForCausalLM(config), tok, folder)


def save_model(model, tokenizer, folder: Path) -> Path:
    """A model folder as `from_pretrained` reads it: weights, tokenizer, and generation stopping at EOS."""
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_unigram_student(folder: Path, probabilities: dict[str, float], hidden: int = 64, layers: int = 2) -> Path:
    """A tiny Llama that writes every token from the same distribution whatever it has read: every
    embedding is the same vector and every attention and MLP weight is zero, so the last hidden
    state is constant and the LM head alone sets the logits (``probabilities``: character or
    ``<eos>`` -> probability; the rest of the vocabulary shares nothing). A real checkpoint whose
    outputs the verifier sometimes accepts: groups with some rollouts right and some wrong, at a
    rate set here rather than learned. Training moves it like any model."""
    import torch
    from transformers import AutoModelForCausalLM

    make_student(folder, hidden=hidden, layers=layers)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = make_tokenizer()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "embed_tokens" in name:
                param.fill_(1.0)
            elif "norm" not in name and "lm_head" not in name:
                param.zero_()
        logits = torch.full((len(tok),), -30.0)
        for token, p in probabilities.items():
            logits[tok.convert_tokens_to_ids(token)] = math.log(p)
        model.lm_head.weight.copy_((logits / hidden).unsqueeze(1).expand(-1, hidden))  # . ones(hidden) = logits
    model.save_pretrained(folder)
    return folder


def make_problems(n: int, seed: int = 0) -> list[tuple[str, str, int, int]]:
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        out.append((f"What is {a} + {b}?", str(a + b), a, b))
    return out


def make_world(root: Path, num_prompts: int = 12, covered: float = 0.75, seed: int = 0, hidden: int = 64,
               layers: int = 2, problems: list[tuple[str, str, int, int]] | None = None,
               unigram: dict[str, float] | None = None) -> dict[str, Path]:
    """Student, prompts and store under ``root``. The first ``covered`` share of prompts get traces.
    ``problems``: (text, answer, a, b) instead of random two-digit sums; ``unigram``: the student is
    ``make_unigram_student``'s with these probabilities instead of a random one."""
    from ampo_cache.importer import LongLayout, import_long
    from ampo_cache.verify import Verifier

    root.mkdir(parents=True, exist_ok=True)
    if unigram is not None:
        student = make_unigram_student(root / "student", unigram, hidden=hidden, layers=layers)
    else:
        student = make_student(root / "student", seed=seed, hidden=hidden, layers=layers)
    problems = problems or make_problems(num_prompts, seed)
    num_prompts = len(problems)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"problem": p, "answer": ans}) + "\n" for p, ans, _, _ in problems))
    traces = root / "traces.jsonl"
    with_traces = problems[: round(covered * num_prompts)]
    lines = []
    for i, (problem, answer, a, b) in enumerate(with_traces):
        for teacher, style in TEACHER_STYLES.items():
            if teacher == "gamma" and i % 2:  # gamma solved only half of them
                continue
            lines.append({"problem": problem, "answer": answer, "teacher": teacher, "trace": style.format(a=a, b=b, s=a + b)})
    if with_traces:  # one wrong trace: verified out, never injected
        problem, answer, a, b = with_traces[0]
        lines.append({"problem": problem, "answer": answer, "teacher": "delta", "trace": f"{a}+{b}={a + b + 1}. \\boxed{{{a + b + 1}}}"})
    traces.write_text("".join(json.dumps(line) + "\n" for line in lines))
    store = root / "store"
    if lines:
        import_long(traces, store, LongLayout(), Verifier(workers=0))
    else:
        store.mkdir()
    return {"root": root, "student": student, "prompts": prompts, "store": store, "traces": traces}


def base_config(world: dict[str, Path], output_dir: Path, **overrides) -> dict:
    """A fast config for the tiny world (a few seconds per run on 2 cores)."""
    config = {
        "student": str(world["student"]),
        "prompts": str(world["prompts"]),
        "store": str(world["store"]),
        "output_dir": str(output_dir),
        "seed": 0,
        "max_steps": 2,
        "prompts_per_step": 4,
        "group_size": 4,
        "micro_batch_size": 8,
        "lr": 1e-3,
        "rollout": {"max_new_tokens": 12},
        "guidance": {"mode": "adaptive", "k": 2, "max_candidates": 4, "max_target_length": 64},
        "save_steps": 100,
        "tensorboard": False,
    }
    for key, value in overrides.items():
        node = config
        parts = key.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def make_policy(model, rollout=None, tokenizer=None, chunk_size=None):
    """A ``Policy`` over ``model`` with the transformers engine, as the trainer builds it on one process."""
    from ampo_train.config import RolloutSettings
    from ampo_train.policy import ForwardSettings, Policy
    from ampo_train.rollout import open_engine

    rollout = rollout or RolloutSettings()
    tokenizer = tokenizer or make_tokenizer()
    forward = ForwardSettings(rollout.temperature) if chunk_size is None else ForwardSettings(rollout.temperature, chunk_size)
    return Policy(model, open_engine("transformers", rollout, model, tokenizer), tokenizer.pad_token_id, forward)
