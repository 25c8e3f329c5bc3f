"""Top CUDA kernels of one SD-Turbo UNet LoRA training forward+backward (bf16 autocast), by kernel time.

    python benchmarks/unet_profile.py --rows 32

Shows where the training call's time goes (matmuls, convolutions, attention, normalisation, elementwise). Not a test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from unet_mfu import build_unet, make_call, parse  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    unet, s = build_unet("full", device, dtype, 4)
    call = make_call(unet, s, parse(f"train:{args.rows}"), device, dtype)
    for _ in range(2):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=90))


if __name__ == "__main__":
    main()
