"""Speed options for the policy UNet that leave its numbers (to rounding) and parameter names unchanged."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

COMPILE_MODES = ("off", "full", "regional")
# Regional compilation compiles each instance of the UNet's repeated blocks (the transformer blocks with their
# LoRA layers, and the GroupNorm-SiLU-conv resnet blocks, where fusing the elementwise work pays most). Identical
# blocks share compiled code, so it compiles in a fraction of the time of the whole UNet.
REGIONAL_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")
REGIONAL_RECOMPILE_LIMIT = 64


def compile_mode(value: object) -> str:
    """``algo.compile`` as one of COMPILE_MODES: false/null -> off, true -> full."""
    if value is None or value is False:
        return "off"
    if value is True:
        return "full"
    if isinstance(value, str) and value in COMPILE_MODES:
        return value
    raise ValueError(f"algo.compile={value!r}: use false, true (the whole UNet) or 'regional' (its repeated blocks)")


def compiled_by_inductor(compile: object, backend: str) -> bool:
    """Whether ``algo.compile`` / ``algo.compile_backend`` hand the UNet (whole or its blocks) to inductor, the
    settings that inductor's own options (mode, layout optimization) and the fused LoRA layers depend on."""
    return compile_mode(compile) != "off" and backend == "inductor"


def resolve_fused_lora(setting: object, compile: object, backend: str) -> bool:
    """Whether a LoRA run fuses its layers, for ``algo.fused_lora`` = auto | true | false.

    auto fuses them when the UNet runs eagerly or under a backend other than inductor, and keeps PEFT's forward when
    inductor compiles it: inductor fuses PEFT's separate elementwise passes itself, and the fused layers' matmuls
    are opaque to it (on CPU the compiled tiny UNet's training call took 130 ms with PEFT's forward, 174 ms fused;
    benchmarks/README.md). true fuses them anyway: since the forward stopped writing in place, compiled fused
    layers train on eager's gradients (they were zero under torch 2.11, pytorch/pytorch#180642).
    """
    if not (isinstance(setting, bool) or setting == "auto"):
        raise ValueError(f"algo.fused_lora={setting!r}: use auto, true or false")
    return not compiled_by_inductor(compile, backend) if setting == "auto" else setting


INDUCTOR_MODES = ("default", "max-autotune-no-cudagraphs")  # algo.compile_mode


def inductor_mode(value: object, compile: object, backend: str) -> str | None:
    """``algo.compile_mode`` as torch.compile's ``mode`` (None for the default), refusing one that would do
    nothing: a mode needs the UNet compiled, and by inductor."""
    if value in (None, "default"):
        return None
    if value not in INDUCTOR_MODES:
        raise ValueError(f"algo.compile_mode={value!r}: use one of {', '.join(INDUCTOR_MODES)}")
    if compile_mode(compile) == "off":
        raise ValueError(f"algo.compile_mode={value} needs algo.compile=true (or regional): nothing is compiled")
    if backend != "inductor":
        raise ValueError(f"algo.compile_mode={value} is inductor's: set algo.compile_backend=inductor (now "
                         f"{backend}) or algo.compile_mode=default")
    return str(value)


def use_compile_cache(directory: str | None) -> str | None:
    """Point inductor's on-disk caches (compiled graphs, AOTAutograd entries, Triton kernels) at ``directory``,
    returned resolved (None: leave torch's default).

    torch's default is the machine's temporary folder, which a requeued job on another node, or a fresh container,
    does not have: every restart would compile the UNet's graphs again (about 2 minutes each on an H100). A folder
    in the user's cache survives restarts and is shared by a cluster's nodes. Set before the first compile; it is
    an environment variable, so the processes a launcher starts from this one inherit it.
    """
    if not directory:
        return None
    path = Path(str(directory)).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)  # torch reads it at every cache access
    log.info("inductor caches in %s (algo.compile_cache_dir; null: torch's own)", path)
    return str(path)


def set_inductor_layout_optimization(enabled: bool) -> None:
    """Turn inductor's layout optimization on or off, process-wide; sdpo turns it off by default.

    With it on, inductor stores convolution activations channels-last inside a compiled graph, and on torch 2.13
    (CPU) the backward of a diffusers resnet block followed by ``Upsample2D``'s nearest upsampling and conv came out
    as zeros (the forward was right): every LoRA layer before the tiny UNet's first upsampler trained on a missing or
    wrong gradient, silently. Eager, ``aot_eager`` and inductor with it off agree (tests/integration/test_compile.py;
    benchmarks/compiled_gradients.py prints both settings on any device). Off, compiled graphs keep eager
    PyTorch's layouts: no extra copies, and none of channels-last's possible gain on a GPU. Off has a bug of its own
    on that CPU build, a loud one: the backward of a nearest upsampling of a 1 x 1 map fails to compile (an
    InductorError at the first training call), which only toy UNets meet (SD's deepest map is 8 x 8).
    """
    import torch._inductor.config as inductor_config

    if inductor_config.layout_optimization != enabled:
        inductor_config.layout_optimization = enabled
        log.info("inductor's layout optimization %s (algo.compile_layout_optimization)", "on" if enabled else "off")


def apply_speed_options(unet: nn.Module, channels_last: bool, compile: object, backend: str = "inductor",
                        dynamic: bool | None = False, inductor_mode: str | None = None,
                        layout_optimization: bool = False) -> None:
    """Put the UNet's weights in channels_last and/or torch.compile it in place.

    Both act in place (``nn.Module.compile``), so ``state_dict`` keys, LoRA saving and checkpoints are those of the
    plain UNet. ``backend`` is torch.compile's (``aot_eager`` traces and differentiates the graphs without
    generating kernels: a quick check that a model compiles).

    The whole UNet compiles with ``dynamic`` (default False: one static graph per batch shape and grad mode). Left to
    torch's default (None), a frame that meets a second batch size recompiles with that size symbolic, so whether
    the training graph came out static depended on whether the sampling batch happened to have the same rows (it
    did not in the reference setting: 16 sampling rows, 4 training rows). An SDPO run has two or three shapes, each
    compiled once (tests/integration/test_compile.py). Regional blocks keep torch's default: their shared code meets
    every resolution of the UNet, so static graphs multiply (tiny UNet, one sampling and one training shape: 34
    static graphs against 28, 22 of them dynamic).

    ``inductor_mode`` is torch.compile's ``mode`` (inductor only; e.g. ``max-autotune-no-cudagraphs`` benchmarks
    kernel choices while compiling: a longer compile for a possibly faster call, measured by ``unet_mfu.py``).
    ``layout_optimization`` is inductor's (``set_inductor_layout_optimization``: off unless asked for).
    """
    mode = compile_mode(compile)
    if compiled_by_inductor(compile, backend):
        set_inductor_layout_optimization(layout_optimization)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if mode == "full":
        unet.compile(backend=backend, dynamic=dynamic, mode=inductor_mode)
        log.info("torch.compile (%s): the whole UNet, %s; the first calls of each batch shape compile", backend,
                 {False: "static shapes", True: "dynamic shapes", None: "torch's automatic dynamic shapes"}[dynamic])
    elif mode == "regional":
        blocks = [m for m in unet.modules() if type(m).__name__ in REGIONAL_BLOCKS]
        if not blocks:
            raise ValueError(f"algo.compile=regional: this UNet has none of {REGIONAL_BLOCKS}; use algo.compile=true")
        # every instance shares its class's forward, and each distinct shape, stride or grad mode is one more cache
        # entry of that one code object: an SD UNet's resnet blocks alone exceed dynamo's default limit of 8, past
        # which it silently runs the rest eagerly
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, REGIONAL_RECOMPILE_LIMIT)
        for block in blocks:
            block.compile(backend=backend, mode=inductor_mode)
        log.info("torch.compile (%s): %d UNet blocks (%s); the first calls of each shape compile", backend,
                 len(blocks), ", ".join(REGIONAL_BLOCKS))


def cast_frozen_layers(unet: nn.Module, dtype: torch.dtype) -> int:
    """Store the weights of the UNet's frozen Linear and Conv2d layers (a LoRA run's base model) in ``dtype``.

    Under autocast to ``dtype`` these layers compute in ``dtype`` anyway: autocast casts their fp32 weights on every
    call, which costs a pass over ~0.9 G weights per UNet call at SD-Turbo sizes and keeps an fp32 copy in memory.
    Stored in ``dtype``, the same products come out (the cast is the same rounding) without the cast, in half the
    memory. Norm layers keep fp32 parameters: autocast runs them in fp32. Trainable layers (the LoRA adapters)
    stay as they are. Returns how many layers were cast.
    """
    cast = 0
    for module in unet.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not any(p.requires_grad for p in module.parameters()):
            module.to(dtype)
            cast += 1
    return cast
