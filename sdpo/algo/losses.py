"""Dense reward-difference loss (method.md section 4).

Per pair (a, b) at one denoising step, the weighted difference of log-ratios is regressed onto the
difference of advantages (REBEL/PRDP made per step), with a PPO-style pessimistic clip. The clip range
(1e-4) is tiny compared to bf16 resolution, so all of this runs in float32 regardless of autocast.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = ["sdpo_loss", "temporal_weights"]

_AUTOCAST_DEVICES = {"cpu", "cuda", "xpu", "mps", "hpu"}


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Disable autocast for this device so the tiny-ratio math stays fp32 (no-op on unknown devices)."""
    if device_type in _AUTOCAST_DEVICES:
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def sdpo_loss(
    log_prob_a: Tensor,
    log_prob_b: Tensor,
    old_log_prob_a: Tensor,
    old_log_prob_b: Tensor,
    adv_a: Tensor,
    adv_b: Tensor,
    weights: Tensor,
    clip_range: float,
    adv_clip_max: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SDPO loss over ``B`` pairs; every input is ``[B]`` (one step per pair).

    ``loss = mean_B max((w·Δρ - ΔA)², (w·Δρ̃ - ΔA)²)`` with ``ρ^j = log_prob_j - old_log_prob_j``,
    ``ρ̃^j = clamp(ρ^j, ±clip_range)`` (new log-prob clamped to old ± ε), ``Δ = a - b`` and advantages
    clamped to ``±adv_clip_max`` before differencing. Gradients flow only into ``log_prob_a/b``; old
    log-probs, advantages and weights are treated as constants. Returns ``(loss, diagnostics)`` where the
    diagnostics are detached float32 scalars.
    """
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if adv_clip_max <= 0:
        raise ValueError(f"adv_clip_max must be > 0, got {adv_clip_max}")
    named = {
        "log_prob_a": log_prob_a,
        "log_prob_b": log_prob_b,
        "old_log_prob_a": old_log_prob_a,
        "old_log_prob_b": old_log_prob_b,
        "adv_a": adv_a,
        "adv_b": adv_b,
        "weights": weights,
    }
    shape = log_prob_a.shape
    if log_prob_a.dim() != 1 or shape[0] == 0:
        raise ValueError(f"log_prob_a must be a non-empty [B] tensor, got shape {tuple(shape)}")
    for name, value in named.items():
        if value.shape != shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)} like log_prob_a")

    device = log_prob_a.device
    with _no_autocast(device.type):
        f32 = lambda x: x.to(device=device, dtype=torch.float32)
        lp_a, lp_b = f32(log_prob_a), f32(log_prob_b)  # [B], carry grad
        old_a, old_b = f32(old_log_prob_a.detach()), f32(old_log_prob_b.detach())  # [B]
        w = f32(weights.detach())  # [B]
        a_a = f32(adv_a.detach()).clamp(-adv_clip_max, adv_clip_max)  # [B]
        a_b = f32(adv_b.detach()).clamp(-adv_clip_max, adv_clip_max)  # [B]
        adv_diff = a_a - a_b  # [B]

        ratio_a, ratio_b = lp_a - old_a, lp_b - old_b  # [B] log-ratios
        ratio_diff = ratio_a - ratio_b  # [B]
        clipped_diff = ratio_a.clamp(-clip_range, clip_range) - ratio_b.clamp(-clip_range, clip_range)

        loss_unclipped = (w * ratio_diff - adv_diff).square()  # [B]
        loss_clipped = (w * clipped_diff - adv_diff).square()  # [B]
        loss = torch.maximum(loss_unclipped, loss_clipped).mean()

        with torch.no_grad():
            ratios = torch.cat([ratio_a, ratio_b]).detach()  # [2B]
            abs_ratios = ratios.abs()
            info = {
                "clipfrac": (abs_ratios > clip_range).float().mean(),
                "approx_kl": 0.5 * ratios.square().mean(),
                "log_ratio_abs_max": abs_ratios.max(),
                "log_ratio_abs_mean": abs_ratios.mean(),
                "loss_unclipped": loss_unclipped.detach().mean(),
                "adv_diff_abs_mean": adv_diff.abs().mean(),
                # fraction of pairs where the pessimistic max took the clipped branch (strictly larger)
                "clip_branch_frac": (loss_clipped > loss_unclipped).float().mean(),
            }
    return loss, info


def temporal_weights(step_indices: Tensor, lam: float, eta: float) -> Tensor:
    """Temporal importance weights ``lam**i / eta`` (float32, same shape/device as ``step_indices``).

    With lam < 1 the early, high-noise steps (small i), which decide few-step outputs, weigh most.
    """
    if eta == 0:
        raise ValueError("eta must be non-zero")
    idx = step_indices.detach().cpu().to(torch.float64)  # float64 on CPU: not every backend has it
    out = torch.full_like(idx, float(lam)).pow(idx) / float(eta)
    return out.to(device=step_indices.device, dtype=torch.float32)
