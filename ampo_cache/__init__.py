"""The trace cache: produces verified teacher traces (build, import, merge), keeps them in a store of
Parquet shards with a DuckDB catalog, and serves them to the trainer (lookup)."""

import ampo_common  # noqa: F401  (its DeepSpeed log filter, set before anything imports DeepSpeed)
