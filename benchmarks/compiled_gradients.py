"""Do inductor's compiled UNet gradients equal eager ones on this machine? Prints, per variant, how far the LoRA
gradients of the compiled UNet are from eager PyTorch's (fp32, TF32 off; or under bf16 autocast, as a run trains),
with inductor's layout optimization as torch ships it and as sdpo sets it (off: ``algo.compile_layout_optimization``,
``sdpo.policy.speed``). A run checks its own first steps the same way (``algo.compile_check``); this looks at one
torch and device without a run, variant by variant.

Why: on torch 2.11 the fused LoRA layers, whose forward then accumulated the adapter in place, came out of
torch.compile with every gradient zero (dynamo, any backend and device: pytorch/pytorch#180642). On torch 2.13 (CPU)
inductor's channels-last layout optimization made the backward of a diffusers resnet block followed by ``Upsample2D``
all zeros, so every LoRA layer before the UNet's first upsampler trained on a wrong or missing gradient, silently. The
first variant is that block alone (a resnet with a time embedding, then nearest upsampling and a conv; the input's
gradient); the others are the embedded tiny UNet with PEFT's LoRA and with the fused layers (``algo.fused_lora``). Not
a test: the test (tests/integration/test_compile.py) runs sdpo's setting only, so that it does not fail when torch
fixes the bug.

Under bf16 autocast the two differ by rounding alone, which inductor's fusions order differently; ``--scale
sd_turbo`` measures how far that goes at SD-Turbo's width and depth, what the compile check's tolerance must clear.

    python benchmarks/compiled_gradients.py                 # CPU: about 6 minutes on 2 cores (4 UNet compiles)
    python benchmarks/compiled_gradients.py --device cuda
    python benchmarks/compiled_gradients.py --cases fused --autocast --layout off   # bf16: what rounding alone gives
    python benchmarks/compiled_gradients.py --cases peft --autocast --layout off --scale sd_turbo --latent 16
                                                            # CPU: about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch
import torch._inductor.config as inductor_config
from torch import nn

from sdpo.policy.compile_check import TOLERANCE, relative_difference


def relative_error(value: torch.Tensor | None, oracle: torch.Tensor) -> float:
    if value is None:
        return float("inf")
    return float((value - oracle).abs().max() / oracle.abs().max().clamp_min(1e-30))


def block_case(device: torch.device):
    """A diffusers resnet block with a time embedding, then Upsample2D: the pattern the layout bug broke."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    torch.manual_seed(0)
    block = nn.ModuleDict({"resnet": ResnetBlock2D(in_channels=96, out_channels=64, temb_channels=128, groups=8),
                           "up": Upsample2D(64, use_conv=True)}).to(device).requires_grad_(False)
    x0 = torch.randn(2, 96, 8, 8, device=device)
    temb = torch.randn(2, 128, device=device)

    def grads(fn) -> dict[str, torch.Tensor | None]:
        x = x0.clone().requires_grad_(True)
        fn(x).square().mean().backward()
        return {"input": x.grad}

    def forward(x: torch.Tensor) -> torch.Tensor:
        return block["up"](block["resnet"](x, temb))

    return forward, grads


def unet_case(device: torch.device, fused: bool, args: argparse.Namespace):
    """A UNet with LoRA r4 on its attention projections (B ~ N(0, 1e-3): a LoRA a step or two into training), the
    adapters' gradients of a log-prob-like loss. ``--scale tiny``: the embedded default's UNet; ``sd_turbo``:
    SD-Turbo's architecture with random weights, its frozen weights in bf16 under ``--autocast``
    (``algo.low_precision_base``)."""
    from diffusers import UNet2DConditionModel

    from sdpo.policy.fused_lora import fuse_lora_layers
    from sdpo.policy.lora import make_trainable

    torch.manual_seed(0)
    if args.scale == "tiny":
        from sdpo.policy.loading import TinySpec, ensure_tiny_pipeline

        cache = tempfile.mkdtemp(prefix="sdpo-compiled-gradients-")
        unet = UNet2DConditionModel.from_pretrained(ensure_tiny_pipeline(cache, TinySpec()) / "unet").to(device)
    else:
        from sd_turbo_scale import SIZES, unet_config

        with torch.device(device):
            unet = UNet2DConditionModel(**unet_config(SIZES["full"]))
        if args.autocast:
            unet.to(torch.bfloat16)
    torch.manual_seed(args.seed)
    make_trainable(unet, True, 4, 8, ["to_q", "to_k", "to_v", "to_out.0"], "gaussian")
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=1e-3)
    if fused:
        fuse_lora_layers(unet)
    g = torch.Generator().manual_seed(args.seed + 1)
    size, rows = args.latent or unet.config.sample_size, args.rows
    x = torch.randn(rows, 4, size, size, generator=g).to(device)
    t = torch.linspace(*(int(t) for t in args.timesteps.split(",")), rows).long().to(device)
    inputs = (x, t, torch.randn(rows, 77, unet.config.cross_attention_dim, generator=g).to(device, unet.dtype))
    # On policy, a step's log-prob gradient is that of <w, network output> for a fixed w (the recorded action's
    # scaled noise): what the run's compile check differentiates
    weight = torch.randn(rows, 4, size, size, generator=g).to(device)

    def grads(model) -> dict[str, torch.Tensor | None]:
        model.zero_grad(set_to_none=True)
        (model(*inputs).sample.float() * weight).mean().backward()
        return {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters() if p.requires_grad}

    return unet, grads


def compare(name: str, model, grads, layout_optimization: bool, autocast: bool, device: torch.device) -> None:
    """Eager against inductor-compiled gradients of ``model``, with inductor's layout optimization as given."""
    torch._dynamo.reset()
    inductor_config.layout_optimization = layout_optimization
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast)
    with amp:
        eager = grads(model)
    compiled_model = torch.compile(copy.deepcopy(model) if isinstance(model, nn.Module) else model,
                                   backend="inductor")
    start = time.perf_counter()
    with amp:
        compiled = grads(compiled_model)
    seconds = time.perf_counter() - start
    errors = {key: relative_error(compiled.get(key), oracle) for key, oracle in eager.items()}
    in_norm = sorted(relative_difference(compiled[key], oracle) if compiled.get(key) is not None else 1.0
                     for key, oracle in eager.items())
    limit = 3e-2 if autocast else 1e-3  # bf16 keeps 8 bits: elementwise, 1e-3 would flag rounding
    wrong = sorted(key for key, error in errors.items() if error > limit)
    setting = "on (torch's default)" if layout_optimization else "off (sdpo's setting)"
    over = sum(d > TOLERANCE for d in in_norm)
    print(f"{name:<22} layout optimization {setting:<21} max relative error {max(errors.values()):.2e} "
          f"(in norm {in_norm[-1]:.2e}, median {in_norm[len(in_norm) // 2]:.2e}; {over} over the compile check's "
          f"{TOLERANCE:g})   {len(wrong)} of {len(errors)} gradients off by > {limit:g}   "
          f"(compile + call {seconds:.0f} s)")
    for key in wrong[:3]:
        print(f"    e.g. {key}: {errors[key]:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", default="block,peft,fused", help="comma-separated: block, peft, fused")
    parser.add_argument("--autocast", action="store_true", help="under bf16 autocast, as a bf16-mixed run trains")
    parser.add_argument("--layout", choices=("both", "on", "off"), default="both",
                        help="inductor's layout optimization: both settings (default), or one")
    parser.add_argument("--scale", choices=("tiny", "sd_turbo"), default="tiny",
                        help="the UNet of the peft and fused cases: the embedded tiny one, or SD-Turbo's architecture")
    parser.add_argument("--latent", type=int, default=None, help="latent size (default: the UNet's; SD-Turbo 64)")
    parser.add_argument("--rows", type=int, default=2, help="UNet batch rows of the peft and fused cases")
    parser.add_argument("--seed", type=int, default=0, help="the LoRA factors and the inputs of those cases")
    parser.add_argument("--timesteps", default="999,50", help="FIRST,LAST: the rows' timesteps, evenly between")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.allow_tf32 = False  # eager and compiled convolutions in full fp32, comparable to 1e-3
    torch.backends.cuda.matmul.allow_tf32 = False
    precision = "bf16 autocast" if args.autocast else "fp32"
    print(f"compiled against eager gradients, {precision}, torch {torch.__version__}, {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    for case in args.cases.split(","):
        if case == "block":
            forward, grads = block_case(device)
            model, label = forward, "resnet + Upsample2D"
        else:
            model, grads = unet_case(device, case == "fused", args)
            label = f"{args.scale} UNet, {'fused' if case == 'fused' else 'PEFT'} LoRA"
        for layout_optimization in {"both": (True, False), "on": (True,), "off": (False,)}[args.layout]:
            compare(label, model, grads, layout_optimization, args.autocast, device)


if __name__ == "__main__":
    main()
