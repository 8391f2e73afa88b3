import ampo_cache  # noqa: F401  (its DeepSpeed log filter, set before anything imports DeepSpeed)
