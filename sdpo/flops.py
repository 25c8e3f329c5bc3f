"""Model FLOPs of a call, the same whichever attention kernel runs: what MFU divides by.

``torch.utils.flop_counter`` counts attention by the kernel that ran. The math path decomposes into matmuls:
a backward of twice the forward. The fused CUDA kernels (flash, memory-efficient, cuDNN) are counted with their
backward's recomputation of the scores, 2.5 times the forward: hardware FLOPs, which raised the SD-Turbo UNet's
training call by 3.6% (56.91 against 54.90 TFLOP at 32 rows) and so its MFU. The CPU's fused kernel is not counted
at all. Here every SDPA kernel counts the model's FLOPs: two matmuls forward, four backward. ``addmm_``, which
torch's counter skips, counts as ``addmm``: the fused LoRA layers (``algo.fused_lora``) sum their adapter's product
into the base matmul's output with it, and must count the FLOPs of PEFT's layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, mm_flop, sdpa_flop_count

aten = torch.ops.aten


def _attention_forward(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                       **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward(grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *args: Any,
                        out_shape: Any = None, **kwargs: Any) -> int:
    return 2 * sdpa_flop_count(query_shape, key_shape, value_shape)  # dq, dk, dv and the scores' gradient


def _sdpa_ops(suffix: str) -> list[Any]:
    names = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    return [getattr(aten, name + suffix) for name in names if hasattr(aten, name + suffix)]


def _addmm_in_place(self_shape: Any, mat1_shape: Any, mat2_shape: Any, *args: Any, **kwargs: Any) -> int:
    return mm_flop(mat1_shape, mat2_shape)  # torch's formula for addmm's product


MODEL_FLOP_FORMULAS: dict[Any, Callable[..., int]] = {
    **{op: _attention_forward for op in _sdpa_ops("")},
    **{op: _attention_backward for op in _sdpa_ops("_backward")},
    aten.addmm_: _addmm_in_place,  # torch counts addmm but not its in-place form (the fused LoRA layers' sums)
}


def model_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (matmuls, convolutions, attention) as the model defines them, without any
    kernel's recomputation."""
    with FlopCounterMode(display=False, custom_mapping=MODEL_FLOP_FORMULAS) as counter:
        fn()
    return counter.get_total_flops()
