"""MFU of the SD-Turbo UNet's two SDPO calls in isolation, across batch sizes, memory layout and torch.compile.

The calls are those of an SDPO iteration at SD-Turbo sizes (random weights, bf16 frozen weights, LoRA r4 on the
attention projections, bf16 autocast): the sampling forward (no grad) and the training forward+backward (grads
reach only the LoRA weights). Each variant builds its own UNet, so compiled and plain ones never share state.

    python benchmarks/unet_mfu.py                                    # GPU: the default sweep
    python benchmarks/unet_mfu.py train:32:cl:regional sample:16     # chosen variants
    python benchmarks/unet_mfu.py --scale tiny --device cpu train:4 train:4:regional   # a CPU dry run

A variant is ``kind:rows[:cl][:bm][:dyn][:regional|:full][:autotune][:layout][:flash|:cudnn|:efficient|:math]
[:nolora|:fused]``:
kind ``sample`` or ``train``; rows = UNet batch rows (a pair is 2 rows, so training micro-batch m pairs is 2m rows);
``cl`` = channels_last weights; ``bm`` = cuDNN autotuning (``torch.backends.cudnn.benchmark``, Lightning's
``trainer.benchmark=true``); ``regional`` / ``full`` = ``algo.compile`` (see ``sdpo/policy/speed.py``); ``dyn`` =
``full`` compiled with a symbolic batch size (what torch's default makes of a graph that meets a second size;
``algo.compile=true`` compiles static ones); ``autotune`` = inductor's ``max-autotune-no-cudagraphs`` mode (kernel
choices benchmarked while compiling); ``layout`` = inductor's layout optimization on
(``algo.compile_layout_optimization=true``; off by default, since it returned wrong gradients on CPU: check a torch
version with ``compiled_gradients.py`` before trusting a figure with it); ``flash`` / ``cudnn`` / ``efficient`` /
``math`` pin the UNet's attention kernel (``algo.attention_backend``; torch chooses otherwise;
``attention_backends.py`` compares them alone);
``nolora`` trains without adapters: the backward computes the input's gradient instead, the same data-gradient work
down to the UNet's input but no adapter, so its MFU next to the LoRA variant's shows what the adapters' extra memory
traffic costs (the backward through the first down block's resnets, which a LoRA run skips, is in its FLOPs);
``fused`` runs the LoRA layers fused (``algo.fused_lora``; without it PEFT's forward, as every figure before
2026-11-27 was measured), its MFU counted on PEFT's FLOPs, the same model's. Compiled fused figures taken before
2026-11-27's fix are void: torch 2.11 compiled the layers' in-place forward into zero gradients (a fast call that
skipped most of its backward). Prints one line per variant as soon as it is measured: ms per call, TFLOP/s, MFU
against ``--peak-flops``, peak memory, and the compile (first-call) time. Not a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from epoch import flops_of  # noqa: E402

from sdpo.policy.attention import pin_attention_backend  # noqa: E402
from sdpo.policy.sdpa_backends import ATTENTION_BACKENDS  # noqa: E402
from sdpo.scoring import synchronize  # noqa: E402

KERNEL_FLAGS = set(ATTENTION_BACKENDS) - {"auto"}  # flags that pin the attention kernel
DEFAULT_VARIANTS = ("sample:16", "sample:16:cl", "train:4", "train:16", "train:16:cl", "train:32", "train:32:cl",
                    "sample:16:cl:regional", "train:32:cl:regional", "train:32:cl:full")


def parse(variant: str) -> dict:
    kind, rows, *flags = variant.split(":")
    kernels = [f for f in flags if f in KERNEL_FLAGS]
    known = {"cl", "bm", "dyn", "regional", "full", "autotune", "layout", "nolora", "fused", *KERNEL_FLAGS}
    compile_flag = next((f for f in flags if f in ("regional", "full")), "off")
    if (kind not in ("sample", "train") or not rows.isdigit() or set(flags) - known
            or ({"autotune", "layout"} & set(flags) and compile_flag == "off") or len(kernels) > 1
            or {"nolora", "fused"} <= set(flags)):
        raise SystemExit(f"bad variant {variant!r}: use kind:rows[:cl][:bm][:dyn][:regional|:full][:autotune][:layout]"
                         "[:flash|:cudnn|:efficient|:math][:nolora|:fused], kind sample or train (autotune and "
                         "layout need regional or full)")
    return {"name": variant, "kind": kind, "rows": int(rows), "channels_last": "cl" in flags,
            "benchmark": "bm" in flags, "compile": compile_flag, "dynamic": "dyn" in flags,
            "inductor_mode": "max-autotune-no-cudagraphs" if "autotune" in flags else None,
            "attention": kernels[0] if kernels else "auto", "lora": "nolora" not in flags, "fused": "fused" in flags,
            "layout": "layout" in flags}


def build_unet(scale: str, device: torch.device, dtype: torch.dtype, lora_rank: int | None):
    from diffusers import UNet2DConditionModel
    from sd_turbo_scale import SIZES, unet_config

    from sdpo.policy.lora import make_trainable

    s = SIZES[scale]
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config(s))
    unet.to(dtype)
    if lora_rank:
        make_trainable(unet, True, rank=lora_rank)
    else:
        unet.requires_grad_(False)
    return unet, s


def make_call(unet, s: dict, v: dict, device: torch.device, dtype: torch.dtype):
    rows = v["rows"]
    # without adapters the input takes the gradient, so the backward still runs through the UNet
    x = torch.randn(rows, 4, s["latent"], s["latent"], device=device, requires_grad=not v["lora"])
    t = torch.randint(0, 1000, (rows,), device=device)
    cond = torch.randn(rows, 77, s["cross"], device=device, dtype=dtype)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()
    if v["dynamic"]:  # the batch dimension alone symbolic, as torch's automatic dynamic shapes make it
        for tensor in (x, t, cond):
            torch._dynamo.mark_dynamic(tensor, 0)

    def call() -> None:
        if v["kind"] == "sample":
            with torch.no_grad(), amp:
                unet(x, t, cond, return_dict=False)
        else:
            with amp:
                out = unet(x, t, cond, return_dict=False)[0]
            out.float().square().mean().backward()

    return call


def prepare(v: dict, scale: str, lora_rank: int, device: torch.device, dtype: torch.dtype):
    """The variant's UNet with its speed options applied (not yet compiled: that happens at the first call), its
    call, and the call's model FLOPs."""
    from sdpo.policy.fused_lora import fuse_lora_layers
    from sdpo.policy.speed import apply_speed_options

    torch.backends.cudnn.benchmark = v["benchmark"]
    unet, s = build_unet(scale, device, dtype, lora_rank if v["lora"] else None)
    call = make_call(unet, s, v, device, dtype)
    flops = flops_of(call)  # before any compile, fusing, and torch's attention choice: the model FLOPs
    if v["fused"]:
        fuse_lora_layers(unet)
    pin_attention_backend(unet, v["attention"])
    apply_speed_options(unet, v["channels_last"], v["compile"], dynamic=None if v["dynamic"] else False,
                        inductor_mode=v["inductor_mode"], layout_optimization=v["layout"])
    return unet, call, flops


def measure(v: dict, args, device: torch.device, dtype: torch.dtype) -> dict:
    unet, call, flops = prepare(v, args.scale, args.lora_rank, device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    tic = time.perf_counter()
    call()
    synchronize(device)
    first = time.perf_counter() - tic
    for _ in range(args.warmup):
        call()
    synchronize(device)
    tic = time.perf_counter()
    for _ in range(args.calls):
        call()
    synchronize(device)
    seconds = (time.perf_counter() - tic) / args.calls
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del unet, call
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return {"ms": 1e3 * seconds, "tflops": flops / seconds / 1e12, "mfu": flops / seconds / args.peak_flops,
            "flop": flops / 1e12, "first_s": first, "peak_gib": peak}


def add_call_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a script that times variants' calls (this one, ``unet_profile.py``)."""
    parser.add_argument("--scale", choices=("full", "tiny"), default="full")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--calls", type=int, default=5, help="timed calls per variant")
    parser.add_argument("--warmup", type=int, default=2, help="calls after the first (compiling) one, before timing")
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument("--peak-flops", type=float, default=989e12, help="H100/H200 SXM dense bf16")


def device_and_dtype(choice: str) -> tuple[torch.device, torch.dtype, str]:
    """The device (``--device``), the autocast dtype there (bf16 on CUDA, fp32 on CPU), and the device's name."""
    device = torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype, torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", default=list(DEFAULT_VARIANTS))
    add_call_arguments(parser)
    args = parser.parse_args()
    variants = [parse(v) for v in args.variants]  # all checked before the first (slow) one runs
    device, dtype, name = device_and_dtype(args.device)
    print(f"UNet MFU sweep: {args.scale} SD-Turbo UNet, LoRA r{args.lora_rank}, {dtype}, {name}, "
          f"torch {torch.__version__}, peak {args.peak_flops / 1e12:.0f} TFLOP/s", flush=True)
    print(f"{'variant':<30} {'TFLOP/call':>10} {'ms/call':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9} "
          f"{'first call s':>12}", flush=True)
    for v in variants:
        try:
            r = measure(v, args, device, dtype)
        except Exception as error:  # one failing variant (memory, a compile error) must not lose the others
            print(f"{v['name']:<30} failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}", flush=True)
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        print(f"{v['name']:<30} {r['flop']:10.2f} {r['ms']:9.1f} {r['tflops']:8.0f} {r['mfu']:6.1%} "
              f"{r['peak_gib']:9.1f} {r['first_s']:12.1f}", flush=True)


if __name__ == "__main__":
    main()
