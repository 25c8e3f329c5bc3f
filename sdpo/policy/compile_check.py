"""A compiled run's first gradients, compared with eager PyTorch's on the same micro-batch before they are used.

Twice a ``torch.compile`` path here computed the right forward and wrong gradients, silently: torch 2.11's dynamo
zeroed every gradient through an autograd.Function whose forward wrote into its output (pytorch/pytorch#180642; the
fused LoRA layers did, then), and torch 2.13's inductor (CPU) zeroed the backward through the tiny UNet's first
upsampler when its layout optimization was on. Neither shows in the loss, the rewards or the step time, only in a
run that does not learn. So a compiled run computes one micro-batch's gradient of its mean log-prob twice, with
the compiled UNet and with the same modules run eagerly (``torch.compiler.set_stance("force_eager")``), and stops
before its first optimizer step if they disagree. It costs one more forward and backward of each kind per check.

A fresh LoRA starts with B = 0, so at the first step every A factor's gradient is exactly zero, compiled or not:
those tensors are compared again at the next steps (at most ``MAX_CHECKS``) until their gradients are non-zero.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

# Largest relative difference (in norm, per tensor) between a compiled and an eager gradient that passes. Both
# failures above gave 1.0 (a zero gradient). bf16 roundings, which inductor's fusions order differently, gave up to
# 0.19 at SD-Turbo's width and depth on small inputs (16 x 16 latents, 2 rows; 0.11 at 32 x 32, median 0.04), where
# the tiny UNet gave 0.05: halfway, so that neither a real run's rounding nor a zeroed gradient lands near the line
# (benchmarks/README.md, "Compiled gradients").
TOLERANCE = 0.5
MAX_CHECKS = 3


class CompiledGradientError(RuntimeError):
    """The compiled UNet's gradients are not eager PyTorch's: training on them would be silently wrong."""


def relative_difference(compiled: Tensor, eager: Tensor) -> float:
    """``|compiled - eager| / max(|compiled|, |eager|)`` in norm: 0 when equal (both zero included), 1 when one
    is zero and the other not, at most 2; inf when only the compiled one is not finite, nan when both are not."""
    compiled, eager = compiled.detach().float(), eager.detach().float()
    if not bool(torch.isfinite(compiled).all()):
        return float("inf") if bool(torch.isfinite(eager).all()) else float("nan")
    scale = torch.maximum(compiled.norm(), eager.norm())
    return float((compiled - eager).norm() / scale) if scale > 0 else 0.0


class CompiledGradientCheck:
    """Compares compiled with eager gradients until every used trainable tensor had a non-zero one."""

    def __init__(self, description: str, tolerance: float = TOLERANCE, max_checks: int = MAX_CHECKS) -> None:
        if getattr(torch.compiler, "set_stance", None) is None:
            raise RuntimeError(f"algo.compile_check needs torch.compiler.set_stance (torch >= 2.6; this is "
                               f"{torch.__version__}): upgrade torch, or set algo.compile_check=false")
        self.description = description  # the compile settings, for the messages
        self.tolerance = tolerance
        self.max_checks = max_checks
        self.checks = 0
        self.pending: set[str] | None = None  # tensors still to compare (None: before the first check)
        self.worst = 0.0  # largest relative difference seen

    @property
    def due(self) -> bool:
        return self.checks < self.max_checks and (self.pending is None or bool(self.pending))

    def run(self, loss: Callable[[], Tensor], params: dict[str, nn.Parameter],
            worst_of_all_ranks: Callable[[float], float] = lambda worst: worst) -> None:
        """Compare the gradients of ``loss()`` (a fresh forward each call) compiled and eager; raise
        ``CompiledGradientError`` if a compared tensor differs by more than the tolerance on any rank (every rank
        runs this, so all stop together)."""
        names = list(params)
        compiled = torch.autograd.grad(loss(), list(params.values()), allow_unused=True)
        with torch.compiler.set_stance("force_eager"):
            eager = torch.autograd.grad(loss(), list(params.values()), allow_unused=True)
        self.checks += 1
        if self.pending is None:
            # unused tensors (no eager gradient at all) never reach the loss: nothing to compare
            self.pending = {n for n, g in zip(names, eager, strict=True) if g is not None}
        differences: dict[str, float] = {}
        for name, c, e in zip(names, compiled, eager, strict=True):
            if name not in self.pending:
                continue
            if e is None or c is None:
                differences[name] = 0.0 if c is e else 1.0
                continue
            if not bool(torch.isfinite(e).all()):
                continue  # eager overflowed too (fp16 without loss scaling): nothing to judge, so next step
            differences[name] = relative_difference(c, e)
            if differences[name] <= self.tolerance and bool(e.any()):
                self.pending.discard(name)  # compared on a non-zero gradient
        worst_here = max(differences.values(), default=0.0)
        self.worst = max(self.worst, worst_of_all_ranks(worst_here))
        failed = {n: d for n, d in differences.items() if d > self.tolerance}
        if self.worst > self.tolerance:  # this rank's failures are in it too
            shown = sorted(failed.items(), key=lambda item: -item[1])[:5]
            raise CompiledGradientError(
                f"the compiled UNet's gradients are not eager PyTorch's ({self.description}, torch "
                f"{torch.__version__}): on one training micro-batch, {len(failed)} of {len(differences)} trainable "
                f"tensors differ by more than {self.tolerance:.0%} in norm on this rank (largest on any rank "
                f"{self.worst:.2f}); e.g. " + ", ".join(f"{n} {d:.2f}" for n, d in shown) + ". No optimizer step "
                "used them. Run the UNet eagerly (algo.compile=false), or look for the culprit with "
                "benchmarks/compiled_gradients.py; algo.compile_check=false trains on them anyway")
        zero = len(self.pending)
        log.info("compile check %d: compiled gradients of %d trainable tensors agree with eager's (largest relative "
                 "difference %.2e)%s", self.checks, len(differences) - zero, worst_here,
                 f"; {zero} had zero gradient, compared again at the next step" if zero and self.due else "")
        if zero and not self.due:
            log.warning("compile check: %d trainable tensors still had zero gradients after %d checks, so their "
                        "compiled gradients were never compared with eager ones", zero, self.checks)
