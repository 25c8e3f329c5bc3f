"""Model FLOPs (what MFU divides by) are the same whichever attention kernel runs, and equal the hand count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sdpo.flops import model_flops

B, H, S_Q, S_K, D = 2, 4, 64, 48, 32
FORWARD = 2 * (2 * B * H * S_Q * S_K * D)  # scores = q k^T, then scores v: two matmuls of 2 m n k FLOPs each


@pytest.mark.parametrize("backend", [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION])
def test_attention_counts_its_model_flops_on_every_kernel(backend):
    """torch's counter gives the fused kernels' backward with its recomputation (2.5x forward on CUDA) and the
    CPU's fused kernel nothing at all; the model's attention is 1x forward and 2x backward on any kernel."""
    q = torch.randn(B, H, S_Q, D, requires_grad=True)
    k, v = (torch.randn(B, H, S_K, D, requires_grad=True) for _ in range(2))

    def forward() -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    def forward_backward() -> None:
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(q, k, v).sum().backward()

    with torch.no_grad():
        assert model_flops(forward) == FORWARD
    assert model_flops(forward_backward) == 3 * FORWARD


def test_matmuls_count_as_torch_counts_them():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert model_flops(lambda: a @ b) == 2 * 8 * 16 * 4


def test_in_place_addmm_counts_as_addmm():
    """torch's counter skips ``addmm_``, which the fused LoRA layers sum their adapter's product with."""
    c, a, b = torch.randn(8, 4), torch.randn(8, 16), torch.randn(16, 4)
    assert model_flops(lambda: c.addmm_(a, b)) == model_flops(lambda: torch.addmm(c, a, b)) == 2 * 8 * 16 * 4
