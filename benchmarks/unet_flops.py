"""FLOPs of the SD-Turbo UNet's sampling and training calls, counted on the meta device (no GPU, no weights), and
the MFU that measured phase times imply.

    python benchmarks/unet_flops.py                                  # the H200 figures of benchmarks/README.md
    python benchmarks/unet_flops.py --sampling 13.58 --training 103.3 --pairs 32 --steps 50 --micro 2

A phase's MFU = (calls x FLOPs per call) / phase seconds / peak FLOP/s. Sampling makes ``pairs / sample_batch``
x T UNet forwards of 2 x sample_batch rows; training makes ``pairs x T / micro`` forward+backward passes of
2 x micro rows, through a LoRA r4 UNet whose base weights are frozen (no weight gradients). FLOPs come from
``torch.utils.flop_counter`` (matmuls and convolutions; attention through SDPA is counted too). Not a test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from epoch import flops_of  # noqa: E402
from unet_mfu import build_unet, make_call, parse  # noqa: E402

META = torch.device("meta")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sampling", type=float, default=13.58, help="measured sampling seconds per iteration")
    parser.add_argument("--training", type=float, default=103.30, help="measured training seconds per iteration")
    parser.add_argument("--pairs", type=int, default=32, help="prompt pairs per iteration (per GPU)")
    parser.add_argument("--steps", type=int, default=50, help="T")
    parser.add_argument("--sample-batch", type=int, default=8, help="prompts per sampling call")
    parser.add_argument("--micro", type=int, default=2, help="pairs per training micro-batch")
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument("--peak-flops", type=float, default=989e12, help="H100/H200 dense bf16")
    args = parser.parse_args()

    unet, s = build_unet("full", META, torch.float32, args.lora_rank)  # no memory, no weights: shapes only
    print(f"UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M params, latents 4x{s['latent']}x{s['latent']}")
    sample_rows, train_rows = 2 * args.sample_batch, 2 * args.micro
    forward = flops_of(make_call(unet, s, parse(f"sample:{sample_rows}"), META, torch.float32))
    train = flops_of(make_call(unet, s, parse(f"train:{train_rows}"), META, torch.float32))
    sample_calls = -(-args.pairs // args.sample_batch) * args.steps
    train_calls = -(-args.pairs // args.micro) * args.steps
    print(f"sampling: {sample_calls} forwards of {sample_rows} rows, {forward / 1e12:.2f} TFLOP each")
    print(f"training: {train_calls} forward+backward passes of {train_rows} rows, {train / 1e12:.2f} TFLOP each")
    for name, calls, per_call, seconds in (("sampling", sample_calls, forward, args.sampling),
                                           ("training", train_calls, train, args.training)):
        achieved = calls * per_call / seconds
        print(f"{name}: {achieved / 1e12:.0f} TFLOP/s = {achieved / args.peak_flops:.1%} MFU "
              f"(peak {args.peak_flops / 1e12:.0f} TFLOP/s, {seconds} s measured)")


if __name__ == "__main__":
    main()
