"""`ampo-train eval`: avg@n, unbiased pass@k, greedy accuracy and solution diversity on benchmark files.

    metrics.py     pure functions: pass@k estimator, diversity, per-benchmark summaries
    benchmarks.py  reading benchmark files in the common layouts (verl's chat prompts and data_source too)
    prompts.py     the chat as the model gets it, the context check, generate calls by a token budget
    runner.py      sampling a model (+ adapter) on them through the trainer's rollout engines and
                   verifying the answers: evaluate (the CLI); the trainer's evaluation runs the same
                   loop on its own weights (ampo_train.training_eval)
    sample_log.py  --log-samples: every sampled answer as a Parquet row
    plots.py       pass@k curves and learning curves as PNGs (matplotlib)
"""
