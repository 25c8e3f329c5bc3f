"""PEFT's LoRA Linear layers run as one autograd node: the same function, with fewer passes over activations.

PEFT computes ``base(x) + B(A(x)) * s`` as separate ops. Under autocast it first copies the input to the adapters'
fp32 (which autocast casts straight back), writes the adapter's full-width output, scales it and adds it to the
base output; the backward then writes the adapter's input gradient in full and adds it to the base layer's. At
SD-Turbo sizes every such pass moves a (rows x 4096 tokens x 320 channels) activation through memory, and the
adapters' own matmuls are rank 4, so it is that traffic, not arithmetic, which they cost.

Here the adapter's rank-r product is added to the base output by the matmul itself (``addmm``: one read of the base
output and one write of the sum), and the same for the input gradient; the low-rank factors are formed once from the
saved input and the rank-r intermediate. The arithmetic is PEFT's with fewer roundings (the adapter's contribution
is rounded once, with the sum), so outputs and gradients agree with PEFT's to the compute dtype's rounding
(tests/unit/test_fused_lora.py). Parameter names, ``state_dict``, saving and loading stay PEFT's: only the layer's
forward changes. Anything beyond plain LoRA (adapters disabled or merged, several active adapters, dropout, DoRA and
other variants, LoRA bias, ``adapter_names`` batches) runs PEFT's own forward.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import Tensor, nn


class _LoraLinear(torch.autograd.Function):
    """``x @ W.T + b + s * (x @ A.T) @ B.T`` for 2-D ``x``, every tensor already in the compute dtype; W and b
    frozen (no gradient)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                scaling: float) -> Tensor:
        down = x @ lora_a.t()  # (rows, r): the only intermediate the backward needs besides x
        base = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
        # Out of place on purpose: torch 2.11's dynamo routes the gradient of an autograd.Function whose forward
        # mutates its returned tensor to the wrong output, so every gradient comes back zero under torch.compile
        # (pytorch/pytorch#180642). addmm reads the base output once either way, so this costs no extra traffic.
        out = torch.addmm(base, down, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, down)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, lora_a, lora_b, down = ctx.saved_tensors
        grad_down = grad @ lora_b  # (rows, r)
        if ctx.scaling != 1.0:
            grad_down = grad_down * ctx.scaling
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight
            grad_x.addmm_(grad_down, lora_a)
        grad_a = grad_down.t() @ x
        grad_b = grad.t() @ down
        if ctx.scaling != 1.0:
            grad_b = grad_b * ctx.scaling
        return grad_x, None, None, grad_a, grad_b, None


class FusedLoraLinear(PeftLoraLinear):
    """A PEFT LoRA Linear whose plain-LoRA forward is one ``_LoraLinear`` node (see the module docstring)."""

    def _plain_lora_adapter(self, x: Tensor, autocast: bool, args: tuple, kwargs: dict) -> str | None:
        """The one active adapter when this call is plain LoRA that ``_LoraLinear`` computes exactly; else None."""
        if args or kwargs or self.disable_adapters or self.merged or self.fan_in_fan_out:
            return None
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1:
            return None
        name = active[0]
        base = self.base_layer
        # DoRA and other variants (peft >= 0.15 keeps them in lora_variant, earlier ones flag DoRA in use_dora)
        if (name in getattr(self, "lora_variant", {}) or getattr(self, "use_dora", {}).get(name, False)
                or not isinstance(self.lora_dropout[name], nn.Identity)
                or self.lora_A[name].bias is not None or self.lora_B[name].bias is not None
                or type(base) is not nn.Linear or base.weight.requires_grad
                or (base.bias is not None and base.bias.requires_grad)):
            return None
        if not autocast and not (
                x.dtype == base.weight.dtype == self.lora_A[name].weight.dtype == self.lora_B[name].weight.dtype):
            return None  # mixed dtypes without autocast: PEFT's own casting rules apply
        return name

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        name = self._plain_lora_adapter(x, autocast, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype  # what PEFT's layer computes in
        base = self.base_layer
        bias = base.bias.to(dtype) if base.bias is not None else None
        flat = x.to(dtype).reshape(-1, x.shape[-1])
        out = _LoraLinear.apply(flat, base.weight.to(dtype), bias, self.lora_A[name].weight.to(dtype),
                                self.lora_B[name].weight.to(dtype), float(self.scaling[name]))
        return out.view(*x.shape[:-1], out.shape[-1])


def fuse_lora_layers(module: nn.Module) -> int:
    """Switch every PEFT LoRA Linear layer of ``module`` to ``FusedLoraLinear`` in place; returns how many.

    Only the class changes (its forward): parameters, buffers and adapter settings are the same objects, so
    optimizers, checkpoints and LoRA export see no difference. Idempotent.
    """
    fused = 0
    for layer in module.modules():
        if type(layer) is PeftLoraLinear:
            layer.__class__ = FusedLoraLinear
            fused += 1
    return fused


def has_fused_lora(module: nn.Module) -> bool:
    return any(isinstance(layer, FusedLoraLinear) for layer in module.modules())
