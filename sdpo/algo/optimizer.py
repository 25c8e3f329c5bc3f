"""The optimizer and its gradient clipping, arranged so that a step never waits on the GPU.

AdamW runs fused on CUDA by default: one kernel per step instead of a dozen multi-tensor launches, and, more
important, a step that mixed precision's loss scaler can skip on the device. With the foreach AdamW, Lightning's
16-mixed asks the scaler whether the gradients overflowed with a host sync before every step; a fused one receives
that answer as a device tensor. Lightning leaves unscaling to such optimizers, so ``clip_gradients`` unscales
first: the clip then sees true gradients, whichever AdamW runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


def build_adamw(params: Iterable[torch.nn.Parameter], cfg: dict[str, Any], device: torch.device) -> torch.optim.AdamW:
    """AdamW from the ``optim`` config; ``optim.fused`` null means fused on CUDA (foreach elsewhere)."""
    fused = cfg.get("fused")
    if fused is None:
        fused = device.type == "cuda"
    return torch.optim.AdamW(list(params), lr=cfg["lr"], betas=tuple(cfg["betas"]), weight_decay=cfg["weight_decay"],
                             eps=cfg["eps"], fused=bool(fused))


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float | None,
                   scaler: torch.amp.GradScaler | None = None) -> Tensor | None:
    """Clip the gradient norm of ``optimizer``'s parameters to ``max_norm`` (None: no clipping) and return the norm
    before clipping (a device tensor: no host sync), or None when no parameter has a gradient.

    Call it where Lightning calls ``on_before_optimizer_step``: for a foreach optimizer the loss scaler has
    unscaled the gradients by then; for one that unscales in its step (fused AdamW), Lightning has not, so this
    unscales them (once; the scaler then steps without scaling again).
    """
    if scaler is not None and scaler.is_enabled() and getattr(optimizer, "_step_supports_amp_scaling", False):
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not params:
        return None
    if max_norm is not None and max_norm <= 0:  # torch would zero (0) or flip (< 0) every gradient
        raise ValueError(f"max_norm={max_norm}: use a value > 0, or None for no clipping")
    limit = float("inf") if max_norm is None else max_norm  # inf: the gradients are multiplied by exactly 1
    return torch.nn.utils.clip_grad_norm_(params, limit).detach()


def grad_norm_stats(norms: list[Tensor]) -> dict[str, Tensor]:
    """An iteration's pre-clip gradient norms as two device scalars (no host sync): ``grad_norm``, the mean over
    the steps whose gradients were finite, and ``nonfinite_grad_steps``, how many were not. Under 16-mixed the
    loss scaler skips those steps, routinely while it lowers its initial scale of 2^16; a plain mean would log NaN
    for the whole iteration and hide the norms of the steps that were taken."""
    if not norms:
        return {"grad_norm": torch.zeros(()), "nonfinite_grad_steps": torch.zeros(())}
    stacked = torch.stack(norms).float()
    finite = torch.isfinite(stacked)
    mean = torch.where(finite, stacked, 0.0).sum() / finite.sum()  # 0 / 0: NaN when no step was taken
    return {"grad_norm": mean, "nonfinite_grad_steps": (~finite).sum().float()}
