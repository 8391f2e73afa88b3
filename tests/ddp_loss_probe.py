"""Started by tests/test_accelerate.py, once as plain `python` (one process holding every row) and
once with `accelerate launch` (2 gloo processes, each holding half of the rows): one update of
the trainer's own loss with an entropy bonus and a KL term, through ``update.update_policy`` and
plain SGD at lr 1, so the change of the weights is the gradient itself. Rank 0 writes every
weight's change to OUT (a safetensors file).

    python tests/ddp_loss_probe.py STUDENT AGGREGATION OUT
"""

import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from ampo_train.config import TrainConfig
from ampo_train.data import Row
from ampo_train.distributed import make_accelerator, shutdown
from ampo_train.metrics import StepStats
from ampo_train.policy import Policy
from ampo_train.update import Optimization, UpdateSettings, sampling_logprobs, update_policy
from tests.trainer_fixtures import make_tokenizer

# Two prompts of G = 2 rows; rank 0 gets the first prompt (long responses), rank 1 the second
# (short ones), so the processes hold different token counts and a per-process mean differs from
# the global one.
ROWS = [([5, 6, 7], list(range(10, 40)), 0.5), ([5, 6, 7], list(range(20, 44)), -0.5),
        ([8, 9], [30, 31, 32, 2], 0.25), ([8, 9], [40, 41, 2], -0.25)]


def main(student: str, aggregation: str, out: str) -> None:
    accelerator = make_accelerator(cpu=True, mixed_precision="no", lora=False)
    rank, world = accelerator.process_index, accelerator.num_processes
    cfg = TrainConfig.model_validate({
        "student": student, "prompts": __file__, "store": None, "prompts_per_step": 2, "group_size": 2,
        "micro_batch_size": 1, "max_grad_norm": None, "guidance": {"mode": "off"},
        "loss": {"aggregation": aggregation, "entropy_coef": 0.05, "kl_coef": 0.5}})
    model = AutoModelForCausalLM.from_pretrained(student)
    reference = AutoModelForCausalLM.from_pretrained(student).eval().requires_grad_(False)
    with torch.no_grad():  # the policy has moved away from its reference: the KL term has a gradient
        for i, p in enumerate(model.parameters()):
            p.add_(0.02 * torch.sin(torch.arange(p.numel(), dtype=torch.float32) + i).view_as(p))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    module = accelerator.unwrap_model(model)
    policy = Policy(model, None, make_tokenizer().pad_token_id, module=module, ref_model=reference)
    share = len(ROWS) // world
    rows = [Row(p, r, 0.0, advantage=a) for p, r, a in ROWS[rank * share:(rank + 1) * share]]
    stats, settings = StepStats(), UpdateSettings.from_config(cfg)
    logprobs = sampling_logprobs(policy, rows, settings, stats)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    update_policy(policy, rows, logprobs, settings, stats, Optimization(accelerator, model, optimizer, scheduler))
    if accelerator.is_main_process:
        save_file({n: (start[n] - p.detach()).contiguous() for n, p in module.named_parameters()}, out)
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
