"""Which scaled-dot-product-attention kernel the policy UNet's attention runs (``algo.attention_backend``).

Left to torch (``auto``), CUDA attention picks a kernel per call. Attention is 17% of the FLOPs of an SD-Turbo
sampling call and 23% of a training call's, so the kernel matters to MFU; on an H100 with torch 2.11, ``auto`` was
the fastest choice, ahead of pinned cuDNN by 5% and of pinned FlashAttention-2 by a third (benchmarks/README.md,
2026-11-27). A pin is for a GPU or torch where ``benchmarks/attention_backends.py`` finds one faster.
Pinning one backend is strict on purpose: a backend that cannot run these shapes raises, rather than falling back
to a slower one unnoticed. The pin applies to the UNet alone; the VAE's single-head attention (head dim 512) and
the reward model keep torch's choice.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from sdpo.config_checks import ConfigError
from sdpo.policy.sdpa_backends import ATTENTION_BACKENDS, attention_backend


class PinnedAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA processor with the attention kernel fixed to one backend.

    ``sdpa_kernel`` is traced by torch.compile, so a compiled UNet's graphs use the same kernel as the eager one.
    """

    def __init__(self, backend: SDPBackend) -> None:
        super().__init__()
        self.backend = backend

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        with sdpa_kernel([self.backend]):
            return super().__call__(attn, hidden_states, *args, **kwargs)


def pin_attention_backend(unet: nn.Module, name: str | None) -> int:
    """Make every attention layer of ``unet`` run the backend ``name`` (``auto``/None: leave torch's choice).

    Only diffusers' default SDPA processor is replaced: a UNet carrying other processors (IP-Adapter, custom
    attention) is refused rather than silently stripped of them. Returns how many layers were pinned.
    """
    backend = attention_backend(name)
    if backend is None:
        return 0
    layers = [m for m in unet.modules() if isinstance(m, Attention)]
    foreign = sorted({type(m.processor).__name__ for m in layers
                      if not isinstance(m.processor, (AttnProcessor2_0, PinnedAttnProcessor))})
    if foreign:
        raise ValueError(f"algo.attention_backend={name}: this UNet's attention uses {', '.join(foreign)}, which a "
                         f"pinned backend would replace; use algo.attention_backend=auto")
    for layer in layers:
        layer.set_processor(PinnedAttnProcessor(backend))
    return len(layers)


def pinned_backend(unet: nn.Module) -> SDPBackend | None:
    """The backend ``pin_attention_backend`` fixed on ``unet`` (None when torch chooses)."""
    for module in unet.modules():
        if isinstance(module, Attention) and isinstance(module.processor, PinnedAttnProcessor):
            return module.processor.backend
    return None


@contextmanager
def torch_attention(unet: nn.Module) -> Iterator[None]:
    """Inside: the UNet's attention as torch chooses it (diffusers' default processor); after: the same pinned
    processor objects again (a compiled UNet does not recompile after it: tests/integration/test_compile.py).

    Evaluation runs the UNet outside training's autocast (in fp32 unless ``algo.low_precision_base``), where a
    kernel pinned for bf16 training (flash, cuDNN) may not run at all; evaluation is not what the pin speeds up,
    and this way its numbers match ``python -m sdpo.evaluate`` on the checkpoint."""
    pinned = {m: m.processor for m in unet.modules()
              if isinstance(m, Attention) and isinstance(m.processor, PinnedAttnProcessor)}
    try:
        for layer in pinned:
            layer.set_processor(AttnProcessor2_0())
        yield
    finally:
        for layer, processor in pinned.items():
            layer.set_processor(processor)


def head_shapes(unet: nn.Module) -> list[tuple[int, int]]:
    """The distinct (heads, head dim) of the UNet's attention layers."""
    return sorted({(m.heads, m.inner_dim // m.heads) for m in unet.modules() if isinstance(m, Attention)})


def projected_heads(batch: int, tokens: int, heads: int, head_dim: int, device: torch.device | str,
                    requires_grad: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A [batch, heads, tokens, head_dim] input laid out as diffusers' processor hands it to SDPA: a projection's
    output viewed per head and transposed (not contiguous), since a kernel's support can depend on strides."""
    flat = torch.randn(batch, tokens, heads * head_dim, device=device, dtype=dtype, requires_grad=requires_grad)
    return flat.view(batch, tokens, heads, head_dim).transpose(1, 2)


def check_attention_backend(unet: nn.Module, device: torch.device,
                            context: Callable[[], AbstractContextManager] = nullcontext, backward: bool = True) -> None:
    """Run the pinned backend once per head shape of the UNet on ``device`` (under a fresh ``context()``, e.g. the
    run's autocast, so the dtype is the run's), forward and backward, and raise a clear error if it cannot.

    Called before the first iteration: an unsupported kernel would otherwise fail deep inside sampling with torch's
    terse "no viable backend"."""
    backend = pinned_backend(unet)
    if backend is None:
        return
    name = next(k for k, v in ATTENTION_BACKENDS.items() if v == backend)
    for (heads, head_dim), keys in itertools.product(head_shapes(unet), (16, 77)):  # self-attention, and cross-
        with warnings.catch_warnings(record=True) as caught, context():  # attention to 77 tokens
            warnings.simplefilter("always")
            try:
                q = projected_heads(2, 16, heads, head_dim, device, backward)
                kv = projected_heads(2, keys, heads, head_dim, device, False)
                with sdpa_kernel([backend]):
                    out = F.scaled_dot_product_attention(q, kv, kv)
                    if backward:
                        out.float().sum().backward()
            except RuntimeError as error:
                reasons = ("; ".join(str(w.message).strip() for w in caught) or str(error)).rstrip(".")
                raise ConfigError(  # a refusal: the message alone, nothing ran yet
                    f"algo.attention_backend={name} cannot run this UNet's attention ({heads} heads of dim {head_dim}) "
                    f"on {device}: {reasons}. Use algo.attention_backend=auto (torch chooses), or "
                    f"{'flash or math' if device.type == 'cpu' else 'another backend'}"
                ) from error
