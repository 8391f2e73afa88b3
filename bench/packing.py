"""Padding-free packed rows vs padded micro-batches on the attention implementations a CPU has.

    python bench/packing.py [--rows 8] [--prompt 100] [--min-response 256] [--max-response 1024] [--repeats 3]

The same rows (random lengths, seeded) go through one forward + backward of a random 2-layer
Llama (hidden 256, 4 heads) twice per attention implementation (eager, sdpa):

* ``padded``: the trainer's layout (``data.collate``: prompts left-padded, responses right-padded,
  an attention mask), all rows in one micro-batch (token-budget packing would cut the padding
  further by grouping similar lengths);
* ``packed``: every row concatenated into one row with position ids restarting at 0, no
  attention mask and no cache, which transformers (5.x) detects and turns into a block-diagonal
  mask (``tests/test_batching.py`` checks the outputs are the same).

Printed per arm: input tokens (padding included), attention scores per head and layer (the
``[L, L]`` work the implementation does), and the median seconds, arms alternating. A packed row
saves the padding, but eager and sdpa attend over the whole packed row with a mask, so their
attention work grows with the square of the packed length; only a varlen kernel (flash-attention
``cu_seqlens``, not on a CPU) would skip the blocks off the diagonal. Not a timed test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ampo_train.data import Row, collate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=100)
    ap.add_argument("--min-response", type=int, default=256)
    ap.add_argument("--max-response", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    lengths = [(args.prompt, int(torch.randint(args.min_response, args.max_response + 1, (1,), generator=gen)))
               for _ in range(args.rows)]
    def ids(n: int) -> list[int]:
        return torch.randint(3, 1000, (n,), generator=gen).tolist()

    rows = [Row(ids(p), ids(r), 0.0) for p, r in sorted(lengths, key=lambda pr: -sum(pr))]
    padded = collate(rows, 0)
    seqs = [torch.tensor(list(r.prompt_ids) + r.response_ids) for r in rows]
    packed_ids = torch.cat(seqs).unsqueeze(0)
    packed_pos = torch.cat([torch.arange(len(s)) for s in seqs]).unsqueeze(0)
    real = sum(len(s) for s in seqs)

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, pad_token_id=0,
                                         max_position_embeddings=4096))
    model.train()

    def run(layout: str) -> float:
        if layout == "padded":
            kw = dict(input_ids=padded.input_ids, attention_mask=padded.attention_mask,
                      position_ids=padded.position_ids)
        else:
            kw = dict(input_ids=packed_ids, position_ids=packed_pos)
        started = time.perf_counter()
        hidden = model(**kw, use_cache=False, logits_to_keep=1, output_hidden_states=[1]).hidden_states[-1]
        hidden.square().mean().backward()  # the head is the same per real token in both layouts: left out
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    width = padded.input_ids.shape[1]
    work = {"padded": (padded.input_ids.numel(), args.rows * width * width), "packed": (real, real * real)}
    print(f"{args.rows} rows, {real:,} real tokens (lengths {sorted(sum(pr) for pr in lengths)}); torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'attention':<10} {'layout':<7} {'input tokens':>13} {'scores/head/layer':>18} {'fwd+bwd (s)':>12}")
    for impl in ("eager", "sdpa"):
        model.set_attn_implementation(impl)
        run("padded"), run("packed")  # warm-up
        times = {"padded": [], "packed": []}
        for i in range(args.repeats):
            for layout in ("padded", "packed") if i % 2 == 0 else ("packed", "padded"):
                times[layout].append(run(layout))
        for layout in ("padded", "packed"):
            tokens, scores = work[layout]
            print(f"{impl:<10} {layout:<7} {tokens:>13,} {scores:>18,} {statistics.median(times[layout]):>12.3f}")
        ratio = statistics.median(times["packed"]) / statistics.median(times["padded"])
        print(f"{impl:<10} packed/padded time {ratio:.2f}x")


if __name__ == "__main__":
    main()
