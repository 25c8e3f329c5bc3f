"""DDPO's offline rewards: JPEG (in)compressibility, cheap and model-free but meaningful on real models."""

from __future__ import annotations

import io

import torch
from PIL import Image
from torch import Tensor

from sdpo.rewards.base import RewardModel
from sdpo.rewards.registry import register_reward


def jpeg_size_kb(images: Tensor, quality: int = 95) -> Tensor:
    """Per-image JPEG size in kB (1 kB = 1000 bytes) at ``quality``; float32 ``[B]`` on the images' device.

    Images are quantised exactly as a saved PNG would be (``round(x * 255)`` after clamping), so the
    score matches what an independent encoder sees. Encoding needs PIL, hence the per-image loop.
    """
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
    pixels = (
        (images.detach().float().clamp(0.0, 1.0) * 255.0)
        .round()
        .to(torch.uint8)
        .permute(0, 2, 3, 1)
        .contiguous()
        .cpu()
        .numpy()
    )
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=int(quality))
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class _JpegReward(RewardModel):
    """Shared quality handling; the sign is the only difference between the two rewards."""

    sign: float = 1.0

    def __init__(self, quality: int = 95) -> None:
        super().__init__()
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
        self.quality = int(quality)

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.sign * jpeg_size_kb(images, self.quality)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quality={self.quality}"


@register_reward("jpeg_compressibility")
class JpegCompressibility(_JpegReward):
    """Minus the JPEG size in kB: rewards simple, flat images."""

    sign = -1.0


@register_reward("jpeg_incompressibility")
class JpegIncompressibility(_JpegReward):
    """Plus the JPEG size in kB: rewards detailed, high-frequency images."""

    sign = 1.0
