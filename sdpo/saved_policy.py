"""A policy to evaluate, from wherever a researcher has it: the base model of a model config, a training
checkpoint (which carries its own model config and LoRA layout), or an exported folder (a diffusers LoRA or a full
fine-tune's UNet) on top of its base model."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from sdpo.config_checks import ConfigError
from sdpo.model_card import CARD_NAME, recorded_base_model, recorded_training
from sdpo.model_sources import TINY
from sdpo.policy.loading import PolicyComponents

log = logging.getLogger(__name__)


@dataclass
class LoadedPolicy:
    """What to evaluate: components whose ``unet`` is the policy, the model config it was built from, and how."""

    components: PolicyComponents
    model_cfg: dict
    origin: str

    @property
    def unet(self) -> UNet2DConditionModel:
        return self.components.unet


def load_policy(model_cfg: Mapping[str, Any], checkpoint: str | Path | None = None,
                lora: str | Path | None = None) -> LoadedPolicy:
    """The base model of ``model_cfg``; or a training checkpoint (with the model config stored in it); or the base
    model plus an exported folder: a diffusers-format LoRA (``pytorch_lora_weights.safetensors``) or a full UNet
    (``config.json`` + safetensors, what a full fine-tune exports)."""
    from sdpo.module import SDPOModule

    if checkpoint is not None and lora is not None:
        raise ValueError("give either a checkpoint or an exported LoRA/UNet folder, not both")
    model_cfg = dict(model_cfg)
    if checkpoint is not None:
        return _load_checkpoint(Path(checkpoint), model_cfg)
    components = SDPOModule._load_components(model_cfg)
    if lora is None:
        return LoadedPolicy(components, model_cfg, f"base model {model_cfg['source']}")
    path = Path(lora).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no LoRA/UNet at {path}")
    folder = path if path.is_dir() else path.parent
    config = folder / "config.json"
    warn_if_trained_on_another_base(folder, model_cfg)
    if path.is_dir() and config.exists() and not list(folder.glob("*lora*.safetensors")):
        components.unet = _load_full_unet(folder, components.unet)
        return LoadedPolicy(components, model_cfg, f"full UNet {folder}")
    load_lora_into(components, path)
    return LoadedPolicy(components, model_cfg, f"LoRA {path}")


def base_model_differences(trained_on: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> list[str]:
    """How ``model_cfg`` names another base model than the one an export was trained on (its recorded ``model``
    settings): source, revision, and for the built-in tiny model its spec (another seed is another model)."""
    keys = ["source", "revision"] + (["tiny"] if model_cfg.get("source") == TINY else [])
    differences = []
    for key in keys:
        then, now = _plain(trained_on.get(key)), _plain(model_cfg.get(key))
        if isinstance(then, dict) and isinstance(now, dict):  # the tiny spec: name the fields that differ
            differences += [f"model.{key}.{field}: trained on {then.get(field)!r}, here {now.get(field)!r}"
                            for field in sorted(set(then) | set(now)) if then.get(field) != now.get(field)]
        elif then != now:
            differences.append(f"model.{key}: trained on {then!r}, here {now!r}")
    return differences


def _plain(value: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def warn_if_trained_on_another_base(folder: Path, model_cfg: Mapping[str, Any]) -> None:
    """Weights that fit another base model load without complaint, and the scores then describe neither model.
    Evaluating on another base can be meant (a LoRA carried over), so say it rather than refuse."""
    recorded = recorded_training(folder) or {}
    if not recorded.get("model"):
        return
    differences = base_model_differences(recorded["model"], model_cfg)
    if differences:
        log.warning("%s was trained on another base model than the one it is applied to here (%s): if that was not "
                    "meant, give the training run's model settings (its %s records them)", folder,
                    "; ".join(differences), "sdpo_training.json")


def _load_checkpoint(path: Path, current: dict) -> LoadedPolicy:
    from sdpo.checkpoint_files import read_checkpoint

    return policy_from_checkpoint(read_checkpoint(path), path, current)


def policy_from_checkpoint(ckpt: Mapping[str, Any], path: str | Path, current: Mapping[str, Any]) -> LoadedPolicy:
    """Rebuild the UNet of ``ckpt`` (``read_checkpoint(path)``): its own model config, its LoRA layout, its trained
    weights. The training module without its reward model, which a CLIP reward would load (and need on this
    machine) just to drop it. A tiny model is built in ``current``'s cache (the model config here), not the
    training run's."""
    from sdpo.module import SDPOModule
    from sdpo.policy.lora import make_trainable

    if "model" not in ckpt["hyper_parameters"]:
        raise ValueError(f"{path} is not a checkpoint written by sdpo.train (no hyper_parameters.model)")
    hp = ckpt["hyper_parameters"]
    model_cfg = dict(hp["model"])
    if model_cfg.get("source") == TINY and current.get("cache_dir"):
        model_cfg["cache_dir"] = current["cache_dir"]
    components = SDPOModule._load_components(model_cfg)
    lora = model_cfg["lora"]
    with torch.random.fork_rng(devices=[]):  # LoRA init draws; its A matrices are overwritten below anyway
        torch.manual_seed(int(hp.get("seed", 0)))
        make_trainable(components.unet, lora["enabled"], lora["rank"], lora["alpha"], lora["targets"], lora["init"])
    unet = components.unet
    state = {k.removeprefix("unet."): v for k, v in ckpt["state_dict"].items() if k.startswith("unet.")}
    others = [k for k in ckpt["state_dict"] if not k.startswith("unet.")]
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    missing = sorted(trainable - set(state))
    if missing or others:
        raise KeyError(f"checkpoint {path} does not match its model config: missing {missing[:3]}, "
                       f"unexpected {others[:3]}")
    _, unexpected = unet.load_state_dict(state, strict=False)
    if unexpected:
        raise KeyError(f"checkpoint weights the UNet does not have: {unexpected[:3]}")
    unet.requires_grad_(False).eval()
    return LoadedPolicy(components, model_cfg, f"checkpoint {path}")


def _load_full_unet(folder: Path, base: UNet2DConditionModel) -> UNet2DConditionModel:
    unet = UNet2DConditionModel.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    for key in ("in_channels", "cross_attention_dim", "sample_size"):
        if unet.config[key] != base.config[key]:
            raise ConfigError(f"the UNet in {folder} has {key}={unet.config[key]}, the base model "
                             f"{base.config[key]}: it was not fine-tuned from this model")
    return unet.to(next(base.parameters()).device).requires_grad_(False).eval()


def load_lora_into(components: PolicyComponents, path: str | Path) -> None:
    """Load a diffusers-format LoRA (a folder or the .safetensors file) into ``components.unet``, the way
    ``pipe.load_lora_weights`` does (same state-dict conversion, metadata-driven rank and alpha)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    path = Path(path).expanduser()
    folder, weight_name = (path, None) if path.is_dir() else (path.parent, path.name)
    mixin = StableDiffusionXLLoraLoaderMixin if components.is_sdxl else StableDiffusionLoraLoaderMixin
    state_dict, alphas, metadata = mixin.lora_state_dict(
        str(folder), weight_name=weight_name, unet_config=components.unet.config, use_safetensors=True,
        local_files_only=True, return_lora_metadata=True,
    )
    if not any(k.startswith("unet.") for k in state_dict):
        raise ConfigError(f"{path} holds no UNet LoRA weights (keys like 'unet.*')")
    if any(not k.startswith("unet.") for k in state_dict):
        log.warning("%s also holds text-encoder LoRA weights: only the UNet's are loaded", path)
    try:
        mixin.load_lora_into_unet(state_dict, alphas, components.unet, metadata=metadata)
    except RuntimeError as error:  # torch lists every mismatched tensor: a screenful that hides the cause
        mismatch = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), str(error))
        named = recorded_base_model(folder)  # the card sdpo writes next to the weights it exports
        trained_on = f" ({CARD_NAME} says: {named})" if named else ""
        raise ConfigError(
            f"the LoRA in {path} does not fit the UNet of {components.source}: {mismatch}. Evaluate it on the "
            f"base model it was trained from{trained_on}, with model=<that model's config> or model.source=..."
        ) from None
    components.unet.requires_grad_(False).eval()
