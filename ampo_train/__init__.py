"""The online AMPO trainer: consumes the trace store that ``ampo_cache`` builds.

Read ``trainer.py`` first: ``setup(cfg) -> Run``, ``run_step(run, step)`` (one step, top to
bottom: sample, reward, guide, advantages, old log-probs, update, log) and ``train`` (the loop).
Every other module has one job:

The recipe and its settings
    trainer       setup / run_step / train: the loop, the Run it carries, saving at the end
    config        train.yaml: every setting once, documented, with the reference defaults
    loading       the tokenizer, the student (LoRA-wrapped when set) and the frozen KL reference

Data and sampling
    data          prompts rendered for the student, teacher traces as student tokens, rows padded
                  into batches, the reproducible prompt order
    rollout       the one home of "engine": the RolloutEngine interface, the transformers engine,
                  which engine a run uses and opening it (vLLM: ``vllm_rollout``); trainer and
                  evaluation both sample through it
    vllm_rollout  a colocated vLLM engine: adapter-only LoRA sync, full-weight reload, sleep mode
    policy        the student being trained and its engine: generate, log-probs with and without grad
    rewards       the verifier's verdicts and the shaped rewards, kept apart (format, repetition, overlong)
    sampling      a step's rows built once (reward, verdict, loss mask, advantage); dynamic sampling
    seeds         every draw keyed by the prompts' global positions: the same on any process count

The method (pure functions on tensors, unit-tested by hand)
    guidance      the trigger-rule and ranking-rule registries, candidate order, which rollouts are replaced
    comprehension how well the student follows a trace (the score that ranks candidates)
    advantages    group advantages over the mixed group
    loss          PPO clip + dual clip on rollout tokens, shaping on teacher tokens, aggregation, KL, TIS
    guided_step   the guidance interface: WholeTraces and PrefixTraces plan a step's injections
    prefix        prefix guidance's schedule and where a trace may be cut

Running the model
    forward       the student's forward passes as per-token log-probs (no [rows, tokens, vocab] logits)
    lm_head       the LM head chunk by chunk, forward and backward (log-probs and entropy)
    fused_logprob the CUDA path: a Triton kernel over hidden states and the head weight
    batching      micro-batches by row count or token budget; matching counts across processes
    update        old log-probs, each mini-batch's loss over micro-batches, the optimizer update
    schedule      the LR, placed by the step's progress (a short step does not shorten the schedule)

Scale and state
    distributed   DDP / FSDP2 / ZeRO layouts: gathering for no-grad passes, full state dicts
    zero          DeepSpeed's engine mapped onto the loop
    checkpoint    pickle-free checkpoints written atomically; resume; the final model

What a run reports
    metrics       per-step stats merged over processes, metrics.jsonl, TensorBoard, the console line
    step_record   what one step produced, handed to the metrics and the sample log
    training_eval evaluation during training and samples.jsonl
    evaluation/   ``ampo-train eval``: benchmark files, sampling, avg@k and pass@k, plots

Planning a run (``ampo-train plan``, no weights loaded)
    memory_model  one process's memory from the model's shape and train.yaml, per phase and layout
    plan          the plan's inputs: the config in planning mode, config.json, the launch layout
    plan_rows     the table's sections: student, files, a step, teachers, coverage, memory
    plan_advice   the verdict, and the one setting that makes a run fit

Why the printed loss can be ~0 while the model learns: see ``ampo_train.metrics``; watch reward,
accuracy, the guided fraction, clip fractions and the gradient norm instead.
"""

import ampo_common  # noqa: F401  (its DeepSpeed log filter, set before anything imports DeepSpeed)
