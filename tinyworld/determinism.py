"""One float order for the tiny world, so the demo prints the same numbers on every x86-64 machine.

A float sum depends on the order of its terms, and three things of the machine choose that order:
the thread count (ATen splits reductions across threads, MKL its matrix products), the vector
width of ATen's CPU kernels (AVX-512: 16 lanes; AVX2: 8) and the code path MKL picks for the
processor. The tiny world trains for thousands of steps and samples with those weights, so a
last-bit difference grows into other models and other tables: a newcomer's machine printed
other numbers than the README (issue 27). Measured on one Intel Xeon (AVX-512), building the small
world and hashing the student's weights: 1 or 2 threads, ``ATEN_CPU_CAPABILITY`` avx2 or default,
``MKL_ENABLE_INSTRUCTIONS=AVX2`` each gave other weights; with the three pinned as below, builds
under ``OMP_NUM_THREADS`` 1, 2 and 3 and with MKL capped to AVX2 were identical, and the build took
the same time (15 s vs 14 s). ``tests/test_tinyworld.py`` checks it on every CI run.

The pins: 2 threads (the tiny world is sized for 2 cores; a 1-core machine runs 2 threads on one,
a 16-core one leaves 14 idle), ATen's AVX2 kernels (every x86-64 CPU since 2013-2015) and MKL's
AVX2 code path (``MKL_CBWR``, its conditional numerical reproducibility). They are set in the
environment of every stage the demo and the experiment run (``pinned_environment``) and by
``ampo-cache tiny-world build`` before torch loads (``pin_process``). They apply on x86-64 only:
an ARM CPU has other kernels altogether, and its numbers differ (docs/tiny-world.md, "The demo").
``AMPO_NATIVE_FLOATS=1`` turns the pins off (all cores, the widest vectors; other numbers).
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

THREADS = 2
PINNED = {
    "OMP_NUM_THREADS": str(THREADS),
    "MKL_NUM_THREADS": str(THREADS),
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
}
OPT_OUT = "AMPO_NATIVE_FLOATS"


def applies(env: Mapping[str, str] | None = None) -> bool:
    """Whether the pins hold here: an x86-64 machine, not opted out."""
    env = os.environ if env is None else env
    return platform.machine().lower() in ("x86_64", "amd64") and env.get(OPT_OUT, "") not in ("1", "true", "yes")


def pinned_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with the pins, for a stage's subprocess."""
    env = dict(os.environ if env is None else env)
    if applies(env):
        env.update(PINNED)
    return env


def pin_process() -> bool:
    """Pin this process (before torch is imported: ATen and MKL read the variables once, when they
    start). Returns whether the pins hold; False when torch was already imported (then only the
    thread count could still be set) or they do not apply here."""
    if not applies():
        return False
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(THREADS)
        return False
    os.environ.update(PINNED)
    return True


def describe() -> str:
    """One line for the demo's output: what the numbers it prints depend on."""
    if applies():
        return (f"floats pinned ({THREADS} threads, AVX2 kernels, MKL_CBWR=AVX2): these numbers are the same on any "
                f"x86-64 machine; {OPT_OUT}=1 unpins them")
    if os.environ.get(OPT_OUT):
        return f"{OPT_OUT} is set: this machine's own float order; numbers differ from the README's"
    return (f"{platform.machine()}: not an x86-64 machine, so its own float order; numbers differ from the README's "
            "(docs/tiny-world.md, 'The demo', says by how much)")
