"""`ampo-train eval`: avg@n, unbiased pass@k, greedy accuracy and solution diversity on benchmark files.

    metrics.py     pure functions: pass@k estimator, diversity, per-benchmark summaries
    benchmarks.py  reading benchmark files in the common layouts
    runner.py      sampling a model (+ adapter) on them and verifying the answers
    plots.py       pass@k curves and learning curves as PNGs (matplotlib)
"""
