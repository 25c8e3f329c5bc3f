"""The values of ``algo.attention_backend``: names for torch's scaled-dot-product-attention kernels.

Apart from ``sdpo.policy.attention`` (which pins them in a diffusers UNet) so that the config check reads them
without importing diffusers.
"""

from __future__ import annotations

from torch.nn.attention import SDPBackend

ATTENTION_BACKENDS: dict[str, SDPBackend | None] = {
    "auto": None,  # torch's own order
    "flash": SDPBackend.FLASH_ATTENTION,  # FlashAttention-2 on CUDA; torch's flash kernel on CPU
    "cudnn": SDPBackend.CUDNN_ATTENTION,  # CUDA only
    "efficient": SDPBackend.EFFICIENT_ATTENTION,  # CUDA only
    "math": SDPBackend.MATH,  # the reference: plain matmuls and softmax
}
CUDA_ONLY = ("cudnn", "efficient")


def attention_backend(value: object) -> SDPBackend | None:
    """``algo.attention_backend`` as the SDPBackend to pin (None: torch chooses)."""
    if value is None:
        return None
    if not isinstance(value, str) or value not in ATTENTION_BACKENDS:
        raise ValueError(f"algo.attention_backend={value!r}: use one of {', '.join(ATTENTION_BACKENDS)}")
    return ATTENTION_BACKENDS[value]
