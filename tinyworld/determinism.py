"""One float order for the tiny world, so it builds the same weights on Intel and AMD x86-64 CPUs.

A float sum depends on the order of its terms, and the machine chooses that order: the thread count
(ATen splits reductions across threads, MKL its matrix products), the vector width of ATen's CPU
kernels (AVX-512: 16 lanes; AVX2: 8) and the code path MKL picks for the processor. The tiny world
trains for thousands of steps and samples with those weights, so a last-bit difference grows into
other models and other tables (issue 27: a newcomer's machine printed other numbers than the README).

What runs where (measured with ``MKL_VERBOSE=1`` and ``ONEDNN_VERBOSE=all`` over training steps and
sampling of the world's model): every matrix product, attention's included, is MKL's SGEMM; the
rest is ATen's own kernels (Sleef for exp/log/sin/cos), except ``torch.sqrt`` of a float tensor,
which ATen hands to MKL's vector math (VML); oneDNN runs nothing.

The pins (``PINNED``), each for a reason the vendors document or we measured:

- **2 threads**, ``MKL_DYNAMIC``/``OMP_DYNAMIC`` off: MKL's reproducibility conditions ask for a
  fixed thread count and no dynamic adjustment "especially ... on different systems" (oneMKL
  developer guide, "Reproducibility Conditions"). The world is sized for 2 cores.
- **ATen's AVX2 kernels** (``ATEN_CPU_CAPABILITY=avx2``): every x86-64 CPU of the last ten years
  has AVX2 and FMA, and both vendors compute those instructions to IEEE 754 (FMA rounds once).
- **MKL's ``COMPATIBLE`` branch** (``MKL_CBWR``): "Settings other than AUTO or COMPATIBLE are
  available only for Intel processors"; on a non-Intel CPU ``MKL_CBWR=AVX2`` "may cause results to
  differ because the AUTO branch is used instead" (oneMKL developer guide, "Specifying Code
  Branches" and "Getting Started with Conditional Numerical Reproducibility"). COMPATIBLE is one
  SSE2 code path on every x86-64 CPU, "without rcpps/rsqrtps", the approximation instructions that
  "may return different results" on Intel and Intel-compatible CPUs (developer reference, "Named
  Constants for CNR Control"). The earlier pin, ``MKL_CBWR=AVX2``, ran MKL's AVX2 branch on Intel
  and its AUTO branch on AMD (``MKL_VERBOSE`` prints ``CNR:AUTO`` on our AMD EPYC): issue 31.
- ``ONEDNN_MAX_CPU_ISA=AVX2``: a guard only. oneDNN runs nothing in the tiny world today; were a
  later torch to route a float32 product through it, its kernels would still be AVX2 ones.

One thing no variable pins: MKL's VML computes ``sqrt`` with ``rsqrtps`` plus a Newton step on its
COMPATIBLE and its non-Intel paths alike (we saw the instruction run, under qemu), so ``torch.sqrt``
differs in the last bit between CPU vendors, and torch's default AdamW takes its denominator's
square root that way. So every optimizer of a pinned stage is AdamW with ``fused=True``: ATen's own
kernel, whose square root is the exact ``vsqrtps``.

How it was checked (issue 31; docs/tiny-world.md, "The demo and the experiment"): on one AMD EPYC
(Zen 4, AVX-512) natively, and under ``qemu-x86_64`` 7.2 as an Intel Haswell, an Intel
Skylake-Client (both report GenuineIntel, so MKL takes its Intel branches) and an AMD EPYC-Milan,
the fingerprint (``tinyworld/fingerprint.py``) and the small world's weights were the same to the
bit under these pins, and differed between the Intel and AMD models under the earlier ones. Builds
under 1, 2 and 3 threads, with ATen's default kernels or MKL capped to AVX2 in the parent
environment are identical too (``tests/test_tinyworld.py``). No real Intel CPU was at hand: qemu's
CPUID makes MKL dispatch as on Intel, and it computes every instruction the pinned path uses exactly
as the hardware does (those are IEEE operations; the approximation instructions it computes
differently are the ones the pins keep out, and none ran). ``tinyworld/published_world.json``
holds the seed-0 world's weight hashes and the fingerprint, so any machine can tell in seconds
(``python -m tinyworld.fingerprint``) and the demo says whether it reproduced the published world.

The pins apply on x86-64 only: an ARM CPU has other kernels altogether, and its numbers differ.
``AMPO_NATIVE_FLOATS=1`` turns them off (all cores, the widest vectors; other numbers).
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
    "MKL_DYNAMIC": "FALSE",
    "OMP_DYNAMIC": "FALSE",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
OPT_OUT = "AMPO_NATIVE_FLOATS"
# AdamW's options in every pinned stage: fused=True is ATen's own kernel with an exact square root
# (the default takes torch.sqrt, i.e. MKL's VML, whose rsqrtps differs between CPU vendors).
ADAMW_OPTIONS = {"fused": True}


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


def float_order() -> dict:
    """What this process's float order depends on, for the record a build writes (world.json)."""
    import torch

    return {"pinned": all(os.environ.get(k) == v for k, v in PINNED.items()) and applies(),
            "torch": torch.__version__, "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "env": {k: os.environ.get(k) for k in PINNED}}


def describe() -> str:
    """One line for the demo's output: what the numbers it prints depend on."""
    if applies():
        return (f"floats pinned ({THREADS} threads, ATen's AVX2 kernels, MKL's vendor-neutral COMPATIBLE path, fused "
                f"AdamW): the world builds the same on Intel and AMD x86-64 (docs/tiny-world.md says how it was "
                f"checked); {OPT_OUT}=1 unpins them")
    if os.environ.get(OPT_OUT):
        return f"{OPT_OUT} is set: this machine's own float order; numbers differ from the README's"
    return (f"{platform.machine()}: not an x86-64 machine, so its own float order; numbers differ from the README's "
            "(docs/tiny-world.md, 'The demo', says by how much)")
