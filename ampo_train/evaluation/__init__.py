"""`ampo-train eval`: avg@n, unbiased pass@k, greedy accuracy and solution diversity on benchmark files.

    metrics.py     pure functions: pass@k estimator, diversity, per-benchmark summaries
    benchmarks.py  reading benchmark files in the common layouts
    runner.py      sampling a model (+ adapter) on them and verifying the answers: evaluate (the CLI)
                   and evaluate_loaded (a model in memory, e.g. the trainer's), one shared loop
    sample_log.py  --log-samples: every sampled answer as a Parquet row
    plots.py       pass@k curves and learning curves as PNGs (matplotlib)
"""
