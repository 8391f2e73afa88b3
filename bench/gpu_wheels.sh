#!/usr/bin/env bash
# The wheels bench/gpu_check.py needs on a lent GPU machine and its image lacks (torch, transformers,
# peft, accelerate, pyarrow, rich, typer, pyyaml, sympy and tensorboard are there), for its Python
# (3.12, x86-64), into .whl/ at the repository root (ignored by git: .git/info/exclude). About 29 MiB,
# under the device's 64 MiB per call together with the repository and a small tiny world.
#   bash bench/gpu_wheels.sh
# On the device, before the check:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl .git/info
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
# ampo's own needs (the store, the verifier, configs) and TRL's (the cost part's other arm). One
# version of each; --no-deps: every dependency the image lacks is named here.
WHEELS=(
  duckdb==2.0.1 math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
  Pebble==5.2.3
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
du -sh .whl
