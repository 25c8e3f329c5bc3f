"""What the LoRA adapters cost inside one SD-Turbo training call, PEFT's forward against ``algo.fused_lora``'s.

Every LoRA-adapted Linear layer of the SD-Turbo UNet (LoRA r4 on to_q, to_k, to_v, to_out.0) is found with the shape
its input has in a training call of ``--rows`` rows, by a forward on the meta device (no weights, no memory). Each
distinct layer shape is then timed alone, forward+backward with the input taking the gradient (as inside the
UNet): the frozen Linear without an adapter, with PEFT's LoRA forward, and with the fused one. Times are summed
over the UNet's layers of that shape, so the last lines estimate the milliseconds the adapters add to one training
call, and what fusing saves of it:

    python benchmarks/lora_layers.py                         # GPU: bf16 autocast, bf16 frozen weights, eager
    python benchmarks/lora_layers.py --compile               # each layer compiled by inductor (timing only: the
                                                             # whole UNet's compiled fused layers trained wrong)
    python benchmarks/lora_layers.py --device cpu --rows 2   # CPU: fp32

Layers timed alone miss what a compiled UNet fuses across layers, so the whole call (``unet_mfu.py`` variants
``train:32:bm`` and ``train:32:bm:fused``, eager; ``train:32:bm:full`` compiled with PEFT's layers) is the final
word. H100, 2026-11-27, 32 rows, eager: frozen 82.2 ms, PEFT's LoRA 206.2 ms, fused 161.1 ms. Not a test.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from unet_mfu import build_unet, device_and_dtype, make_call, parse  # noqa: E402

from sdpo.policy.fused_lora import fuse_lora_layers  # noqa: E402
from sdpo.scoring import synchronize  # noqa: E402


def layer_shapes(rows: int, rank: int) -> Counter:
    """(tokens per row, in features, out features, bias, input from a LayerNorm) of every LoRA layer in a training
    call of ``rows`` rows, with counts.

    Under autocast a LayerNorm's output is fp32: the projections that read the normalised tokens (self-attention's
    q, k, v and cross-attention's q) take fp32 inputs, the others (to_out.0; cross-attention's k, v on the text)
    bf16 ones, and PEFT's forward casts each input once more than the fused one does.
    """
    unet, s = build_unet("full", torch.device("meta"), torch.float32, rank)
    shapes: Counter = Counter()

    def recorder(name: str):
        normalised = name.endswith(".attn1.to_q") or name.endswith(".attn1.to_k") or name.endswith(".attn1.to_v") \
            or name.endswith(".attn2.to_q")

        def record(layer: nn.Module, inputs: tuple) -> None:
            x = inputs[0]
            shapes[(x.numel() // x.shape[-1] // rows, layer.in_features, layer.out_features,
                    layer.base_layer.bias is not None, normalised)] += 1
        return record

    hooks = [m.register_forward_pre_hook(recorder(n)) for n, m in unet.named_modules() if hasattr(m, "lora_A")]
    with torch.no_grad():
        make_call(unet, s, parse(f"sample:{rows}"), torch.device("meta"), torch.float32)()
    for hook in hooks:
        hook.remove()
    return shapes


class Projection(nn.Module):
    def __init__(self, width_in: int, width_out: int, bias: bool) -> None:
        super().__init__()
        self.to_q = nn.Linear(width_in, width_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_q(x)


def variants(width_in: int, width_out: int, bias: bool, rank: int, device: torch.device,
             weight_dtype: torch.dtype) -> dict[str, nn.Module]:
    """The frozen layer alone, with PEFT's LoRA, and with the fused LoRA (B non-zero: the adapter contributes)."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    base = Projection(width_in, width_out, bias).to(device)
    base.requires_grad_(False)
    peft = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q"]), copy.deepcopy(base))
    for name, p in peft.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_B" in name:
            nn.init.normal_(p, std=0.01)
    fused = copy.deepcopy(peft)
    fuse_lora_layers(fused)
    for frozen in (base.to_q, peft.to_q.base_layer, fused.to_q.base_layer):  # as algo.low_precision_base stores them
        frozen.to(weight_dtype)
    return {"frozen Linear": base, "PEFT LoRA": peft, "fused LoRA": fused}


def time_call(module: nn.Module, x: torch.Tensor, amp, calls: int, warmup: int, device: torch.device) -> float:
    """Milliseconds per forward+backward."""
    grad = torch.randn(*x.shape[:-1], module.to_q.out_features, device=device)

    def call() -> None:
        with amp:
            out = module(x)
        out.backward(grad.to(out.dtype))
        x.grad = None

    for _ in range(warmup):
        call()
    synchronize(device)
    tic = time.perf_counter()
    for _ in range(calls):
        call()
    synchronize(device)
    return 1e3 * (time.perf_counter() - tic) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32, help="UNet rows of the training call (2 per pair)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="compile each layer with inductor")
    args = parser.parse_args()
    device, dtype, name = device_and_dtype(args.device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()
    shapes = layer_shapes(args.rows, args.lora_rank)
    print(f"LoRA layers of the SD-Turbo UNet, training call of {args.rows} rows, LoRA r{args.lora_rank}, {dtype}, "
          f"{name}, torch {torch.__version__}, {'compiled layers' if args.compile else 'eager'}: "
          f"{sum(shapes.values())} layers in {len(shapes)} shapes", flush=True)
    header = f"{'tokens x in -> out':<24} {'layers':>6}"  # in "f": an fp32 input (a LayerNorm's); "+b": a bias
    labels = ("frozen Linear", "PEFT LoRA", "fused LoRA")
    print(f"{header} " + " ".join(f"{label + ' ms':>16}" for label in labels), flush=True)
    totals = dict.fromkeys(labels, 0.0)
    for (tokens, width_in, width_out, bias, normalised), count in sorted(shapes.items(), key=lambda i: -i[0][0]):
        x = torch.randn(args.rows, tokens, width_in, device=device, dtype=torch.float32 if normalised else dtype,
                        requires_grad=True)
        times = {}
        for label, module in variants(width_in, width_out, bias, args.lora_rank, device, dtype).items():
            if args.compile:
                module.compile()
            times[label] = time_call(module, x, amp, args.calls, args.warmup, device)
            totals[label] += count * times[label]
        shape = f"{tokens} x {width_in}{'f' if normalised else ''} -> {width_out}{' +b' if bias else ''}"
        print(f"{shape:<24} {count:>6} " + " ".join(f"{times[label]:16.3f}" for label in labels), flush=True)
        torch._dynamo.reset()
    base = totals["frozen Linear"]
    print(f"\nsummed over the call's layers: frozen {base:.1f} ms, PEFT LoRA {totals['PEFT LoRA']:.1f} ms, fused "
          f"LoRA {totals['fused LoRA']:.1f} ms")
    print(f"the adapters add: PEFT {totals['PEFT LoRA'] - base:.1f} ms, fused {totals['fused LoRA'] - base:.1f} ms; "
          f"fusing saves {totals['PEFT LoRA'] - totals['fused LoRA']:.1f} ms per training call")


if __name__ == "__main__":
    main()
