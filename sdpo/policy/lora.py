"""Which UNet weights train: LoRA adapters through PEFT (the default) or the full UNet."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig

from sdpo.export_files import earlier_export


def make_trainable(
    unet: UNet2DConditionModel,
    use_lora: bool,
    rank: int = 4,
    alpha: float | None = None,
    targets: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
    init: str = "gaussian",
) -> list[torch.nn.Parameter]:
    """Attach LoRA adapters (B initialised to zero, so the first update is exactly on-policy) or unfreeze all.

    Returns the trainable parameters; everything else in the UNet stays frozen.
    """
    unet.requires_grad_(False)
    if use_lora:
        if rank < 1:
            raise ValueError(f"model.lora.rank must be >= 1, got {rank}")
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha if alpha is not None else rank,
            init_lora_weights=init,
            target_modules=list(targets),
        )
        try:
            unet.add_adapter(config)
        except ValueError as error:  # peft: no module matched (its message names neither the key nor the choices)
            if not any(name.endswith(tuple(targets)) for name, _ in unet.named_modules()):
                raise ValueError(
                    f"model.lora.targets={list(targets)} matches no module of this UNet; its Linear/Conv2d "
                    f"layers end in {adaptable_suffixes(unet)} (the reference: [to_q, to_k, to_v, to_out.0])"
                ) from error
            raise
    else:
        unet.requires_grad_(True)
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"no UNet module matched the LoRA targets {list(targets)}; check model.lora.targets")
    return params


def adaptable_suffixes(unet: torch.nn.Module) -> list[str]:
    """The names LoRA targets can use: each Linear/Conv2d layer's last name part (two when it is an index)."""
    suffixes = set()
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            parts = name.split(".")
            suffixes.add(".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1])
    return sorted(suffixes)


def has_lora(unet: UNet2DConditionModel) -> bool:
    return bool(getattr(unet, "peft_config", None))


def save_lora(unet: UNet2DConditionModel, directory: str | Path) -> Path:
    """Write the UNet's LoRA in diffusers' format: ``pipe.load_lora_weights(directory)`` loads it on the stock
    pipeline (SD 1.x/2.x, SD-Turbo, SDXL-Turbo and LCM pipelines read the same ``unet.``-prefixed file).

    The adapter's rank and alpha travel as metadata, so the loaded scale equals the trained one.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    if not has_lora(unet):
        raise ValueError("this UNet has no LoRA adapter (model.lora.enabled=false); save the full UNet instead")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    metadata = unet.peft_config["default"].to_dict()
    StableDiffusionPipeline.save_lora_weights(
        directory, unet_lora_layers=layers, safe_serialization=True, unet_lora_adapter_metadata=metadata
    )
    return directory


def save_trained_unet(unet: UNet2DConditionModel, directory: str | Path) -> Path:
    """What a run ships: the LoRA (diffusers format) or, after full fine-tuning, the whole UNet (safetensors), at
    the folder's root. An earlier export there is replaced, not mixed in: a stale LoRA file next to a full UNet
    would be what loaders pick."""
    directory = Path(directory)
    for stale in earlier_export(directory):
        stale.unlink()
    if has_lora(unet):
        path = save_lora(unet, directory)
    else:
        unet.save_pretrained(directory, safe_serialization=True)
        path = directory
    readable_as_umask_allows(directory, "*.safetensors")
    return path


def readable_as_umask_allows(directory: Path, pattern: str) -> None:
    """Give the files of ``directory`` matching ``pattern`` the permissions a new file gets there: safetensors
    writes its files 0600 whatever the umask, so colleagues on a shared cluster could not read the weights next to
    a README they can. The mode comes from a probe file (reading the umask would change it, process-wide)."""
    probe = directory / f".mode-probe-{os.getpid()}"
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        mode = probe.stat().st_mode & 0o777
    finally:
        probe.unlink()
    for file in directory.glob(pattern):
        file.chmod(mode)
