"""Group outcome advantages over a mixed group (on-policy rollouts + injected teacher traces).

AMPO uses GRPO's outcome advantage without std normalisation (the reference's
``norm_adv_by_std_in_grpo = False``): A_i = r_i - mean(r of its group). Every token of a response
then receives its response's advantage (the loss broadcasts a ``[B]`` advantage over ``[B, T]``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

AdvantageScale = Literal["none", "group"]


def group_advantages(
    rewards: Tensor,
    group_size: int | None = None,
    scale: AdvantageScale = "none",
    eps: float = 1e-6,
) -> Tensor:
    """Outcome advantage of each response relative to the other responses of its prompt.

    Args:
        rewards: ``[B * G]`` with the G responses of a prompt in consecutive rows (TRL's and
            verl's layout), or ``[B, G]``. Any real or bool dtype; computed in float32.
        group_size: G. Required for a flat input; for ``[B, G]`` it may be omitted and, if
            given, must equal ``rewards.shape[1]``.
        scale: ``"none"`` (AMPO default): A = r - mean. ``"group"``: A = (r - mean) / (std + eps)
            with the *unbiased* (Bessel-corrected) group std, which is what both verl
            (eps 1e-6, its default here) and TRL's ``scale_rewards="group"`` (eps 1e-4: pass
            ``eps=1e-4`` to match TRL exactly) use.
        eps: added to the std before dividing; only used when ``scale="group"``.

    Returns:
        Advantages with the same shape as ``rewards``, float32 (or the input's floating dtype
        if wider). A group whose rewards are all equal (all correct, or all wrong and unguided)
        gets 0 everywhere: it carries no learning signal but stays in the batch, as in the
        reference. With ``scale="group"`` a group of size 1 also gets 0 (its std is undefined).

    Example (AMPO.md): G=8, two teacher traces with reward 1 and six wrong rollouts with 0:
    mean = 0.25, so the teacher rows get +0.75 and the rollouts -0.25.
    """
    if scale not in ("none", "group"):
        raise ValueError(f"scale must be 'none' or 'group', got {scale!r}")
    flat = rewards.dim() == 1
    if flat:
        if group_size is None or group_size <= 0:
            raise ValueError("a flat rewards tensor needs a positive group_size")
        if rewards.numel() % group_size:
            raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
        grouped = rewards.reshape(-1, group_size)
    elif rewards.dim() == 2:
        if group_size is not None and group_size != rewards.shape[1]:
            raise ValueError(f"group_size {group_size} != rewards.shape[1] {rewards.shape[1]}")
        grouped = rewards
    else:
        raise ValueError(f"rewards must be [B*G] or [B, G], got shape {tuple(rewards.shape)}")

    dtype = torch.promote_types(grouped.dtype, torch.float32) if grouped.is_floating_point() else torch.float32
    grouped = grouped.to(dtype)
    adv = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        if grouped.shape[1] > 1:
            adv = adv / (grouped.std(dim=1, correction=1, keepdim=True) + eps)
        # A one-element group already has adv == 0; dividing by a NaN std would poison it.
    return adv.reshape(rewards.shape)


def has_spread(rewards: Tensor) -> Tensor:
    """``[B, G]`` -> ``[B]`` bool: the groups whose rewards are not all equal, the only ones whose
    advantages are not all zero (DAPO's dynamic sampling keeps these)."""
    return rewards.max(dim=1).values > rewards.min(dim=1).values
