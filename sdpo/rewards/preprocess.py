"""CLIP-style image preprocessing in torch: batched, on the images' device, no PIL round trip.

Reward models score decoded images straight from the VAE (``[B, 3, H, W]`` floats in [0, 1]). Going through
PIL and a ``CLIPProcessor`` would copy every image to the CPU, quantise it to uint8 and loop in Python; this
module does the same three steps (shortest-side bicubic resize, centre crop, normalisation) as tensor ops.
It matches ``transformers.CLIPImageProcessor`` (and OpenCLIP's eval transform) up to resampling differences
of about one uint8 step, see ``tests/unit/test_model_rewards.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: OpenAI CLIP's normalisation, also used by OpenCLIP's LAION models (ViT-H-14: PickScore, HPS v2) and BLIP.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def resize_shortest_side(images: Tensor, size: int) -> Tensor:
    """Bicubic (antialiased) resize so the shorter side is ``size``; the longer one is ``int(size * long / short)``.

    The rounding of the longer side follows ``CLIPImageProcessor`` / torchvision's ``Resize(int)``. Values are
    clamped back to the input range [0, 1] because bicubic interpolation overshoots near edges (PIL clamps too).
    """
    height, width = images.shape[-2:]
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = size, int(size * long / short)
    new_hw = (new_short, new_long) if height <= width else (new_long, new_short)
    if new_hw == (height, width):
        return images
    resized = F.interpolate(images, size=new_hw, mode="bicubic", antialias=True, align_corners=False)
    return resized.clamp(0.0, 1.0)


def center_crop(images: Tensor, size: int) -> Tensor:
    """Central ``size`` x ``size`` window; offsets ``(dim - size) // 2`` as in ``CLIPImageProcessor``."""
    height, width = images.shape[-2:]
    if height < size or width < size:
        raise ValueError(f"cannot centre-crop {size}x{size} from a {height}x{width} image")
    top, left = (height - size) // 2, (width - size) // 2
    return images[..., top : top + size, left : left + size]


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Per-channel ``(x - mean) / std``."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def clip_preprocess(
    images: Tensor,
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> Tensor:
    """CLIP's eval transform on a batch: ``[B, 3, H, W]`` in [0, 1] -> normalised float32 ``[B, 3, size, size]``.

    Shortest side resized to ``size`` (bicubic, antialias), centre crop ``size`` x ``size``, then normalised
    with ``mean``/``std``. Computed in float32 on the images' device whatever the input dtype; callers cast the
    result to their model's dtype.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
    if int(size) <= 0:
        raise ValueError(f"size must be positive, got {size}")
    images = images.float()
    images = resize_shortest_side(images, int(size))
    images = center_crop(images, int(size))
    return normalize(images, mean, std)


# ---------------------------------------------------------------------------------------------- model dtypes

#: Names a reward's ``dtype`` config key accepts.
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"fp32"`` / ``"bf16"`` / ``"fp16"`` (or the long names, or a ``torch.dtype``) -> ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported reward dtype {dtype}; use one of {sorted(set(DTYPES))}")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unsupported reward dtype {dtype!r}; use one of {', '.join(DTYPES)}") from None


def module_dtype_device(module: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    """Dtype and device of a module's first floating-point parameter.

    Rewards read these at call time rather than storing them, so they follow ``.to()`` of the parent (Lightning
    moving the module to the GPU, or converting it for true half precision).
    """
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype, param.device
    raise ValueError(f"{type(module).__name__} has no floating-point parameters")
