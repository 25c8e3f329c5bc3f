"""Where one SD-Turbo UNet call's GPU time goes: its top kernels and their time by kind, eager or compiled.

    python benchmarks/unet_profile.py                                  # the eager 32-row LoRA training call
    python benchmarks/unet_profile.py train:32:bm:full train:32:bm:fused         # compiled PEFT, eager fused LoRA
    python benchmarks/unet_profile.py train:32:bm:full train:32:bm:full:nolora   # compiled, with and without LoRA
    python benchmarks/unet_profile.py --scale tiny --device cpu train:4:full     # a CPU dry run of the same path

Variants are ``unet_mfu.py``'s (``kind:rows[:bm][:full][:nolora|:fused]...``). For each: ms per call over ``--calls``
timed calls, MFU in model FLOPs, then one call under ``torch.profiler``: the kernels that took most time and the
kernel time summed by kind (attention, matmul, convolution, normalisation, fused Triton kernels, elementwise, dtype
copies and layout conversions, other). Kinds are read from kernel names, so they are a guide, not an exact split;
the top-kernels table shows the names. A compiled variant's fused kernels are Triton's (``triton_``): a norm fused
with its casts and activation counts under "Triton (fused)". Not a test.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from unet_mfu import add_call_arguments, device_and_dtype, parse, prepare  # noqa: E402

from sdpo.scoring import synchronize  # noqa: E402

# First match wins: Triton first (inductor names a fused kernel after the ops it fuses, attention's neighbours
# included), attention before matmul (cuDNN's and flash's attention kernels name gemm-like parts), convolution
# before matmul (cuDNN convolutions run implicit-GEMM kernels).
KINDS: tuple[tuple[str, str], ...] = (
    ("Triton (fused)", r"^triton_"),
    ("attention", r"fmha|flash|attention|sdpa|attn"),
    ("convolution", r"conv|fprop|dgrad|wgrad|implicit_gemm|winograd"),
    ("matmul", r"gemm|cutlass|nvjet|xmma|matmul|_mm_|addmm|\bmm\b|bmm"),
    ("normalisation", r"norm"),
    ("dtype copies, layout", r"copy|cast|to_copy|nchwtonhwc|nhwctonchw|transpose|memcpy"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce|silu|gelu|add|mul"),
)


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, name)), "other")


def kernel_times(prof, device: torch.device) -> dict[str, float]:
    """Self time (ms) of each kernel the profiled call ran: device time on CUDA, CPU time of the ops on CPU."""
    times: dict[str, float] = {}
    for event in prof.key_averages():
        us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        if us > 0:
            times[event.key] = us / 1e3
    return times


def report(name: str, ms_per_call: float, flops: float, peak_flops: float, times: dict[str, float], top: int,
           on_gpu: bool) -> None:
    total = sum(times.values())
    work = f"{flops / 1e12:.2f} TFLOP" if flops >= 1e12 else f"{flops / 1e9:.2f} GFLOP"
    mfu = f"MFU {flops / (ms_per_call / 1e3) / peak_flops:.1%}" if on_gpu else "MFU n/a on the CPU"
    print(f"\n=== {name}: {ms_per_call:.1f} ms per call, {work}, {mfu}; profiled call: {total:.1f} ms of "
          f"{'kernels' if on_gpu else 'CPU ops (self time)'}")
    by_kind: dict[str, float] = defaultdict(float)
    for kernel, ms in times.items():
        by_kind[kind_of(kernel)] += ms
    print(f"{'kind':<24} {'ms':>8} {'share':>6}")
    for kind, ms in sorted(by_kind.items(), key=lambda item: -item[1]):
        print(f"{kind:<24} {ms:8.1f} {ms / total:6.1%}")
    print(f"\n{'top kernels':<100} {'ms':>8} {'kind':>22}")
    for kernel, ms in sorted(times.items(), key=lambda item: -item[1])[:top]:
        print(f"{kernel[:100]:<100} {ms:8.2f} {kind_of(kernel):>22}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", default=["train:32"])
    parser.add_argument("--top", type=int, default=25, help="kernels listed per variant")
    add_call_arguments(parser)
    args = parser.parse_args()
    variants = [parse(v) for v in args.variants]  # all checked before the first (slow) one runs
    device, dtype, name = device_and_dtype(args.device)
    print(f"UNet profile: {args.scale} SD-Turbo UNet, LoRA r{args.lora_rank}, {dtype}, {name}, "
          f"torch {torch.__version__}", flush=True)
    for v in variants:
        unet, call, flops = prepare(v, args.scale, args.lora_rank, device, dtype)
        tic = time.perf_counter()
        call()  # a compiled variant compiles here
        synchronize(device)
        print(f"{v['name']}: first call (compile included) {time.perf_counter() - tic:.1f} s", flush=True)
        for _ in range(args.warmup):
            call()
        tic = time.perf_counter()
        for _ in range(args.calls):
            call()
        synchronize(device)
        ms_per_call = 1e3 * (time.perf_counter() - tic) / args.calls
        activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
        with profile(activities=activities) as prof:
            call()
            synchronize(device)
        report(v["name"], ms_per_call, flops, args.peak_flops, kernel_times(prof, device), args.top,
               device.type == "cuda")
        del unet, call
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
