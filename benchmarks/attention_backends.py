"""The SD-Turbo UNet's attention alone, under each SDPA backend (``algo.attention_backend``): which kernel to pin.

Records every ``scaled_dot_product_attention`` call one UNet call makes (shapes only, on the meta device), then
times exactly those calls on this device under torch's own choice (``auto``) and under each backend: forward alone
(sampling) and forward+backward (training, gradients to q, k and v as LoRA training needs them), in bf16 on a GPU.
Prints ms per UNet call, the attention's own TFLOP/s, and the fastest backend (auto: pinning none beats torch's own
choice, which is then what to keep). Takes seconds; compile-free,
so it isolates the kernel (the whole compiled call is ``unet_mfu.py train:32:bm:full:<backend>``).

    python benchmarks/attention_backends.py                       # GPU: 32 rows (micro-batch 16 pairs)
    python benchmarks/attention_backends.py --rows 4 --scale tiny # a CPU dry run
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from unet_mfu import build_unet, make_call, parse  # noqa: E402

from sdpo.policy.attention import projected_heads  # noqa: E402
from sdpo.policy.sdpa_backends import ATTENTION_BACKENDS  # noqa: E402
from sdpo.scoring import synchronize  # noqa: E402

Shape = tuple[tuple[int, ...], tuple[int, ...]]  # (query, key) shapes; value has the key's


class AttentionCalls(TorchFunctionMode):
    """Counts the (query, key) shapes of the SDPA calls made under it."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: Counter[Shape] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.shapes[(tuple(args[0].shape), tuple(args[1].shape))] += 1
        return func(*args, **(kwargs or {}))


def unet_attention_shapes(scale: str, rows: int) -> Counter[Shape]:
    meta = torch.device("meta")
    unet, s = build_unet(scale, meta, torch.float32, lora_rank=4)
    with AttentionCalls() as calls:
        make_call(unet, s, parse(f"sample:{rows}"), meta, torch.float32)()
    return calls.shapes


def attention_flops(q: tuple[int, ...], k: tuple[int, ...]) -> int:
    """Forward FLOPs of one attention: QK^T and PV, 2 x b x h x s_q x s_k x d each."""
    b, h, s_q, d = q
    return 2 * 2 * b * h * s_q * k[2] * d


def one_call(backend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, train: bool) -> None:
    with sdpa_kernel([backend]) if backend is not None else nullcontext(), torch.set_grad_enabled(train):
        out = F.scaled_dot_product_attention(q, k, v)
        if train:
            torch.autograd.grad(out, (q, k, v), grad)


def time_backend(backend, shapes: Counter[Shape], device: torch.device, dtype: torch.dtype, train: bool,
                 repeats: int) -> float:
    """Seconds that one UNet call's attention takes under ``backend`` (each distinct shape timed, times its count)."""
    total = 0.0
    for (q_shape, k_shape), count in shapes.items():
        (b, h, s_q, d), s_k = q_shape, k_shape[2]  # laid out as diffusers' processor passes them (transposed views)
        q = projected_heads(b, s_q, h, d, device, train, dtype)
        k = projected_heads(b, s_k, h, d, device, train, dtype)
        v = projected_heads(b, s_k, h, d, device, train, dtype)
        grad = torch.randn(q_shape, device=device, dtype=dtype)

        one_call(backend, q, k, v, grad, train)  # a first call selects and loads kernels
        synchronize(device)
        tic = time.perf_counter()
        for _ in range(repeats):
            one_call(backend, q, k, v, grad, train)
        synchronize(device)
        total += (time.perf_counter() - tic) / repeats * count
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32, help="UNet batch rows (2 per pair)")
    parser.add_argument("--scale", choices=("full", "tiny"), default="full")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = unet_attention_shapes(args.scale, args.rows)
    forward = sum(attention_flops(q, k) * n for (q, k), n in shapes.items())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"attention of one {args.scale} SD-Turbo UNet call, {args.rows} rows: {sum(shapes.values())} calls in "
          f"{len(shapes)} shapes, {forward / 1e12:.2f} TFLOP forward; {dtype}, {name}, torch {torch.__version__}")
    for (q, k), n in sorted(shapes.items(), key=lambda item: -attention_flops(*item[0]) * item[1]):
        print(f"  {n:3d} x q {list(q)} k {list(k)}")
    print(f"{'backend':<10} {'sampling ms':>12} {'TFLOP/s':>8} {'training ms':>12} {'TFLOP/s':>8}")
    results = {}
    for label, backend in ATTENTION_BACKENDS.items():  # auto first: torch's own choice, the baseline
        try:
            sample = time_backend(backend, shapes, device, dtype, False, args.repeats)
            train = time_backend(backend, shapes, device, dtype, True, args.repeats)
        except RuntimeError as error:  # a backend this device or shape lacks
            print(f"{label:<10} unavailable: {str(error).strip().splitlines()[0]}")
            continue
        results[label] = train  # auto too: pinning a kernel is worth it only when it beats torch's own choice
        print(f"{label:<10} {1e3 * sample:12.2f} {forward / sample / 1e12:8.3g} {1e3 * train:12.2f} "
              f"{3 * forward / train / 1e12:8.3g}")  # model FLOPs: backward = 2x forward (sdpo.flops)
    if results:
        best = min(results, key=results.get)
        print(f"fastest for training: {best} (algo.attention_backend={best})")


if __name__ == "__main__":
    main()
