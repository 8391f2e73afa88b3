"""Started by tests/test_scale_out.py with `accelerate launch --config_file zero{2,3}.yaml`: the
trainer's own update (``update.Optimization.apply``) through DeepSpeed's engine, first with an infinite
gradient, then a finite one, each accumulated over two micro-batches as the loop does. Rank 0
writes what it saw to OUT (JSON).

    python tests/zero_skip_probe.py STUDENT OUT
"""

import contextlib
import json
import math
import sys

import torch
from transformers import AutoModelForCausalLM, get_scheduler

from ampo_train.distributed import accumulating, make_accelerator, parameter_digest, shutdown
from ampo_train.metrics import StepStats
from ampo_train.policy import Policy
from ampo_train.update import Optimization
from tests.trainer_fixtures import make_tokenizer


def main(student: str, out: str) -> None:
    accelerator = make_accelerator(cpu=True, mixed_precision="no", lora=False, max_grad_norm=1.0)
    model = AutoModelForCausalLM.from_pretrained(student)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=10)
    model, optimizer = accelerator.prepare(model, optimizer)
    policy = Policy(model, None, make_tokenizer().pad_token_id, module=accelerator.unwrap_model(model))
    optimization = Optimization(accelerator, model, optimizer, scheduler, max_grad_norm=1.0)
    stats, seen = StepStats(), {"start": parameter_digest(policy.module)}

    def update(poison: bool) -> float:
        for i in range(2):  # the first micro-batch is no accumulation boundary, as in the loop
            with accumulating(accelerator, model) if i == 0 else contextlib.nullcontext():
                ids = torch.tensor([[5, 6, 7, 8]]) + accelerator.process_index
                loss = model(input_ids=ids).logits.float().pow(2).mean()
                accelerator.backward(loss * float("inf") if poison else loss)
        return optimization.apply(policy, stats)

    seen["poisoned_norm"] = update(poison=True)
    seen.update(after_skip=parameter_digest(policy.module), skipped=stats.summary()["skipped_updates"],
                lr_after_skip=scheduler.get_last_lr()[0], state_after_skip=len(optimizer.optimizer.optimizer.state))
    seen["finite_norm"] = update(poison=False)
    seen.update(after_update=parameter_digest(policy.module), lr_after_update=scheduler.get_last_lr()[0],
                skipped_after_update=stats.summary()["skipped_updates"])
    if accelerator.is_main_process:
        with open(out, "w") as handle:
            json.dump({k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in seen.items()},
                      handle)
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
