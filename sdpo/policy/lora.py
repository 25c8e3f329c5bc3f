"""Which UNet weights train: LoRA adapters through PEFT (the default) or the full UNet."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig


def make_trainable(
    unet: UNet2DConditionModel,
    use_lora: bool,
    rank: int = 4,
    alpha: float | None = None,
    targets: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
    init: str = "gaussian",
) -> list[torch.nn.Parameter]:
    """Attach LoRA adapters (B initialised to zero, so the first update is exactly on-policy) or unfreeze all.

    Returns the trainable parameters; everything else in the UNet stays frozen.
    """
    unet.requires_grad_(False)
    if use_lora:
        if rank < 1:
            raise ValueError(f"model.lora.rank must be >= 1, got {rank}")
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha if alpha is not None else rank,
            init_lora_weights=init,
            target_modules=list(targets),
        )
        unet.add_adapter(config)
    else:
        unet.requires_grad_(True)
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"no UNet module matched the LoRA targets {list(targets)}; check model.lora.targets")
    return params
