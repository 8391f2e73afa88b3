"""A seconds-fast fingerprint of this machine's float order: will it build the published tiny world?

It runs the build's own code on a short fixed job: a model of the world's size (``ModelSize``)
trained for a few steps by ``tinyworld.models.train`` on the world's problems in every style, then
sampled through the same backend the build evaluates with, and hashes the weights and the sampled
text. That job goes through every kernel the build uses (MKL's SGEMM, ATen's attention, norms,
activations and losses, fused AdamW, sampling), so a machine, a torch release or a pin that changes
any last bit of them changes the fingerprint; one whose fingerprint matches
``tinyworld/published_world.json`` builds the published world. Checked both ways (issue 31): under
the pins, AMD natively and Intel and AMD CPU models under qemu gave the published fingerprint and
the published small world; under the earlier pins the Intel models gave another fingerprint and
another world.

    python -m tinyworld.fingerprint           # prints it, says whether it matches; exit 1 if not
    python -m tinyworld.fingerprint --print   # prints it only

It pins the process first (``tinyworld.determinism``), as ``ampo-cache tiny-world build`` does.
"""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

from tinyworld.determinism import pin_process

STEPS = 8
BATCH = 16
PROMPTS_PER_LEVEL = 2
SAMPLES = 2
MAX_TOKENS = 24


def compute() -> str:
    """The fingerprint (hex SHA-256) of a short fixed training and sampling job."""
    import hashlib

    from ampo_cache.generation import conversation
    from ampo_cache.generation.hf import TransformersBackend
    from ampo_cache.teachers import Teacher
    from tinyworld.models import ModelSize, chat_example, new_model, train
    from tinyworld.problems import TERMS_PER_LEVEL, ProblemSampler, held_out_problems
    from tinyworld.published import tensors_digest
    from tinyworld.styles import STYLES, render
    from tinyworld.tokenizer import save_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = save_tokenizer(Path(folder))
        tests = held_out_problems(0, PROMPTS_PER_LEVEL)
        sampler, rng = ProblemSampler(0, tests, "fingerprint"), random.Random(0)

        def next_batch():
            problems = [sampler.sample(list(TERMS_PER_LEVEL)) for _ in range(BATCH)]
            return [chat_example(tokenizer, p, render(rng.choice(list(STYLES)), p.terms)) for p in problems]

        model = new_model(tokenizer, ModelSize(), seed=0)
        train(model, next_batch, STEPS, 3e-3, tokenizer.pad_token_id)
        teacher = Teacher(name="fingerprint", model=folder, backend="transformers",
                          sampling={"temperature": 1.0, "top_p": 1.0, "max_tokens": MAX_TOKENS})
        backend = TransformersBackend(teacher, device="cpu", model=model)
        problems = [p for level in sorted(tests) for p in tests[level][:PROMPTS_PER_LEVEL]]
        texts = [g.text for gens in backend.generate([conversation(p.text, None) for p in problems], n=SAMPLES, seed=0)
                 for g in gens]
    digest = hashlib.sha256(tensors_digest(model.state_dict().items()).encode())
    digest.update("\x00".join(texts).encode())
    return digest.hexdigest()


def main(argv: list[str]) -> int:
    pinned = pin_process()  # before torch loads
    value = compute()
    if "--print" in argv:
        print(value)
        return 0
    from tinyworld.published import PUBLISHED, load_published

    import torch

    published = load_published()
    print(f"fingerprint {value}")
    if value == published["fingerprint"]:
        print(f"matches {PUBLISHED.name}: this machine builds the published tiny world")
        return 0
    reason = ("the pins do not apply here (not x86-64, or AMPO_NATIVE_FLOATS is set)" if not pinned
              else f"torch {torch.__version__}, published with {published['torch']}"
              if torch.__version__ != published["torch"] else "same pins and torch, another float order")
    print(f"differs from {PUBLISHED.name} ({published['fingerprint'][:16]}...): this machine does not build the "
          f"published tiny world; {reason} (docs/tiny-world.md, 'The demo and the experiment')")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
