"""Load a few-step text-to-image model as policy components, from the hub, a local folder or a tiny build.

There is one loading path: everything goes through ``from_pretrained`` on a diffusers-layout folder
(``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, plus ``text_encoder_2/`` and
``tokenizer_2/`` for SDXL). Three families share it:

- SD 1.x / 2.x (SD-Turbo): one CLIP text encoder; the policy step is DDIM.
- SDXL (SDXL-Turbo): a second text encoder with projection; detected from ``text_encoder_2`` in
  ``model_index.json`` (or the folder).
- LCM (an SD or SDXL pipeline whose scheduler is ``LCMScheduler``; its UNet may take a guidance embedding via
  ``time_cond_proj_dim``): the policy step is the LCM re-noising step (``step_kind="lcm"``).

The embedded offline stand-ins ("tiny", one per family: ``TinySpec.arch``) are built in code with a fixed seed,
saved in that layout, and then loaded by the same function that loads ``stabilityai/sd-turbo`` — so tests
exercise the real code path with no network.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    LCMScheduler,
    UNet2DConditionModel,
)
from diffusers.configuration_utils import ConfigMixin
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdpo.model_sources import unavailable_advice
from sdpo.policy.steps import STEP_KINDS
from sdpo.policy.tokenizer import build_clip_tokenizer, save_tokenizer
from sdpo.rewards.hub import WeightsNotFound

log = logging.getLogger(__name__)

ARCHS: tuple[str, ...] = ("sd", "sdxl", "lcm")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


class ModelNotAvailableError(WeightsNotFound):
    """The model could not be found locally and could not be fetched."""


@dataclass
class PolicyComponents:
    """The parts of a latent text-to-image pipeline that SDPO needs."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL | AutoencoderTiny
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict
    source: str
    text_encoder_2: CLIPTextModelWithProjection | None = None  # SDXL only
    tokenizer_2: CLIPTokenizer | None = None  # SDXL only
    step_kind: str = "ddim"  # the policy step: "ddim" (SD/SDXL-Turbo) or "lcm" (latent consistency models)
    requires_aesthetics_score: bool = False  # SDXL refiner-style time ids (not supported by encode_prompts)

    @property
    def latent_scale(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 1.0))

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for SD/SDXL VAEs), as diffusers' pipelines compute it."""
        config = self.vae.config
        if isinstance(self.vae, AutoencoderTiny):
            return int(config.upsampling_scaling_factor) ** (len(config.decoder_block_out_channels) - 1)
        return 2 ** (len(config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        """The UNet's default image side in pixels (``unet.config.sample_size`` x the VAE scale factor)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def latent_size(self, resolution: int | None = None) -> int:
        """Latent side for an image side of ``resolution`` pixels (None: the UNet's native size)."""
        if resolution is None:
            return int(self.unet.config.sample_size)
        factor = self.vae_scale_factor
        if resolution < factor or resolution % factor:
            raise ValueError(
                f"model.resolution={resolution} must be a positive multiple of the VAE scale factor {factor}"
            )
        return resolution // factor


@dataclass
class TinySpec:
    """Sizes of the embedded random-weight pipeline. Changing any field builds (and caches) a new one.

    ``arch`` picks the family: "sd" (SD 1.x/2.x layout, the tuned default), "sdxl" (two text encoders, the
    ``text_time`` added conditioning; ``cross_attention_dim`` is then derived as ``text_hidden +
    text_hidden_2``) or "lcm" (the SD layout with a guidance-embedding UNet and an ``LCMScheduler``).
    """

    seed: int = 0
    latent_size: int = 16
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64)
    cross_attention_dim: int = 32
    text_hidden: int = 32
    text_layers: int = 2
    decoder_channels: tuple[int, ...] = (32, 32)
    decoder_out_std: float = 0.01
    prediction_type: str = "v_prediction"
    words: list[str] = field(default_factory=list)
    # Fields added with the SDXL/LCM stand-ins. At their defaults they are left out of key() and tiny_spec.json,
    # so the SD default keeps the cache folder (and weights) it had before they existed.
    arch: str = "sd"  # sd | sdxl | lcm
    text_hidden_2: int = 32  # sdxl: width of the second text encoder (CLIPTextModelWithProjection)
    projection_dim: int = 32  # sdxl: size of its pooled, projected text_embeds
    addition_time_embed_dim: int = 8  # sdxl: embedding size of each of the 6 time ids
    transformer_layers_per_block: tuple[int, ...] = (1, 2)  # sdxl: transformer depth per down block
    time_cond_proj_dim: int = 32  # lcm: width of the guidance-scale embedding (timestep_cond)

    def to_dict(self) -> dict:
        """The fields that identify this build: everything, minus added fields left at their defaults."""
        data = asdict(self)
        for name in _ADDED_TINY_FIELDS:
            if data[name] == _TINY_DEFAULTS[name]:
                del data[name]
        return data

    def key(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, default=list).encode()
        return hashlib.sha1(blob).hexdigest()[:12]


_ADDED_TINY_FIELDS = (
    "arch", "text_hidden_2", "projection_dim", "addition_time_embed_dim", "transformer_layers_per_block",
    "time_cond_proj_dim",
)
_TINY_DEFAULTS = asdict(TinySpec())


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}") from None


def build_tiny_pipeline(directory: str | Path, spec: TinySpec) -> Path:
    """Build a random-weight pipeline of family ``spec.arch`` (UNet, tiny decoder, CLIP text encoder(s), BPE
    tokenizer(s), scheduler) and save it in diffusers layout, with a ``model_index.json``.

    The decoder is diffusers' ``AutoencoderTiny``: it has no normalisation layers, so unlike a random
    ``AutoencoderKL`` (whose GroupNorms map every latent to nearly the same grey image) its images keep the
    latents' differences in brightness and colour — the reward has range.
    """
    if spec.arch not in ARCHS:
        raise ValueError(f"tiny.arch must be one of {list(ARCHS)}, got {spec.arch!r}")
    directory = Path(directory)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched (LoRA init, seeds)
        torch.manual_seed(spec.seed)
        _build_and_save(directory, spec)
    return directory


def _tiny_text_config(tokenizer: CLIPTokenizer, spec: TinySpec, hidden: int, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _tiny_unet(spec: TinySpec) -> UNet2DConditionModel:
    n_blocks = len(spec.unet_channels)
    common = dict(
        sample_size=spec.latent_size,
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        block_out_channels=spec.unet_channels,
        layers_per_block=1,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    if spec.arch == "sdxl":
        # SDXL's layout: no attention in the first (highest-resolution) block, linear projections in the
        # transformers, and the "text_time" added conditioning: pooled text_embeds + 6 Fourier-embedded time ids.
        if len(spec.transformer_layers_per_block) != n_blocks:
            raise ValueError(
                f"tiny.transformer_layers_per_block needs {n_blocks} entries (one per UNet block), "
                f"got {list(spec.transformer_layers_per_block)}"
            )
        return UNet2DConditionModel(
            **common,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n_blocks - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (n_blocks - 1) + ("UpBlock2D",),
            cross_attention_dim=spec.text_hidden + spec.text_hidden_2,
            transformer_layers_per_block=tuple(spec.transformer_layers_per_block),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=spec.addition_time_embed_dim,
            projection_class_embeddings_input_dim=spec.projection_dim + 6 * spec.addition_time_embed_dim,
        )
    extra = {"time_cond_proj_dim": spec.time_cond_proj_dim} if spec.arch == "lcm" else {}
    return UNet2DConditionModel(
        **common,
        down_block_types=("CrossAttnDownBlock2D",) * (n_blocks - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_blocks - 1),
        cross_attention_dim=spec.cross_attention_dim,
        **extra,
    )


def _tiny_scheduler(spec: TinySpec):
    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    if spec.arch == "lcm":  # as LCM_Dreamshaper_v7 ships it
        return LCMScheduler(
            **betas, original_inference_steps=50, clip_sample=False, set_alpha_to_one=True,
            prediction_type=spec.prediction_type, timestep_spacing="leading", timestep_scaling=10.0,
        )
    if spec.arch == "sdxl":  # as SDXL-Turbo ships it (make_scheduler swaps the class for the DDIM policy)
        return EulerAncestralDiscreteScheduler(
            **betas, prediction_type=spec.prediction_type, timestep_spacing="trailing", steps_offset=1,
        )
    return DDIMScheduler(
        **betas, clip_sample=False, set_alpha_to_one=False, prediction_type=spec.prediction_type,
        timestep_spacing="trailing",
    )


_PIPELINE_CLASS = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                   "lcm": "LatentConsistencyModelPipeline"}


def _build_and_save(directory: Path, spec: TinySpec) -> None:
    # The draw order (text encoder, [text encoder 2,] UNet, decoder) is fixed: the "sd" build must stay
    # bit-identical for a given spec, because the default experiment is tuned on it.
    tokenizer = build_clip_tokenizer(spec.words)
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, spec, spec.text_hidden))
    parts: dict[str, object] = {"text_encoder": text_encoder}
    if spec.arch == "sdxl":
        tokenizer_2 = build_clip_tokenizer(spec.words)
        tokenizer_2.pad_token = "!"  # as SDXL's second tokenizer: pads with "!", not the end token
        parts["text_encoder_2"] = CLIPTextModelWithProjection(
            _tiny_text_config(tokenizer_2, spec, spec.text_hidden_2, projection_dim=spec.projection_dim)
        )
    parts["unet"] = _tiny_unet(spec)
    n_dec = len(spec.decoder_channels)
    vae = AutoencoderTiny(
        latent_channels=spec.latent_channels,
        encoder_block_out_channels=spec.decoder_channels,
        decoder_block_out_channels=spec.decoder_channels,
        num_encoder_blocks=(1,) * n_dec,
        num_decoder_blocks=(1,) * n_dec,
    )
    init_decoder_passthrough(vae, spec.decoder_out_std)
    parts["vae"] = vae
    scheduler = _tiny_scheduler(spec)
    directory.mkdir(parents=True, exist_ok=True)
    for name, model in parts.items():
        model.save_pretrained(directory / name)
    save_tokenizer(tokenizer, directory / "tokenizer")
    if spec.arch == "sdxl":
        save_tokenizer(tokenizer_2, directory / "tokenizer_2")
    scheduler.save_pretrained(directory / "scheduler")
    write_model_index(directory, spec)
    (directory / "tiny_spec.json").write_text(json.dumps(spec.to_dict(), indent=1, default=list))


def write_model_index(directory: Path, spec: TinySpec) -> None:
    """The ``model_index.json`` that lets the stock ``DiffusionPipeline.from_pretrained(directory)`` load the tiny
    pipeline (what a shipped LoRA's model card tells users to run). Written last, by an atomic rename."""
    scheduler = json.loads((directory / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    index = {
        "_class_name": _PIPELINE_CLASS[spec.arch],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderTiny"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", scheduler],
    }
    if spec.arch == "sdxl":
        index |= {"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                  "tokenizer_2": ["transformers", "CLIPTokenizer"]}
    staging = directory / f"model_index.json.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.write_text(json.dumps(index, indent=1))
    staging.replace(directory / "model_index.json")


def init_decoder_passthrough(vae: AutoencoderTiny, out_std: float) -> None:
    """Re-initialise a random tiny decoder so latent differences survive to the pixels.

    PyTorch's default conv init shrinks the signal at every layer, so a random decoder paints every latent
    the same dark grey. He-normal init (ReLU gain) keeps the signal's scale through the stack, and a final
    layer with small weights and bias 0.5 centres the image on mid-grey with room to move either way.
    """
    convs = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        for conv in convs[:-1]:
            torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            if conv.bias is not None:
                conv.bias.zero_()
        torch.nn.init.normal_(convs[-1].weight, std=out_std)
        torch.nn.init.constant_(convs[-1].bias, 0.5)


def ensure_tiny_pipeline(cache_dir: str | Path, spec: TinySpec) -> Path:
    """The cached tiny pipeline folder for ``spec``, built on first use (atomically, so parallel ranks agree)."""
    target = Path(cache_dir).expanduser() / f"tiny-{spec.key()}"
    if (target / "tiny_spec.json").exists():
        if not (target / "model_index.json").exists():  # cached by a version that did not write it
            write_model_index(target, spec)
        return target
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    build_tiny_pipeline(staging, spec)
    try:
        staging.rename(target)
    except OSError:  # another process won the race; its copy is identical (same seed and spec)
        shutil.rmtree(staging, ignore_errors=True)
    return target


class _ModelIndex(ConfigMixin):
    """Reads a pipeline's ``model_index.json`` (locally or from the hub) without importing the pipelines."""

    config_name = "model_index.json"


def _model_index(where: str, path: Path | None, common: dict) -> dict:
    """The pipeline's ``model_index.json``; for a local folder without one, entries inferred from its subfolders."""
    if path is not None and not (path / "model_index.json").exists():
        return {name: ["", "present"] for name in ("text_encoder", "text_encoder_2", "tokenizer_2")
                if (path / name).is_dir()}
    return dict(_ModelIndex.load_config(where, **common))


def _present(index: dict, name: str) -> bool:
    """A component listed with a class (diffusers writes ``[null, null]`` for absent optional components)."""
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None


def _vae_class(where: str, subfolder: str | None, common: dict):
    """AutoencoderTiny or AutoencoderKL, read from the VAE's saved config."""
    config = AutoencoderKL.load_config(where, subfolder=subfolder, **common)
    return AutoencoderTiny if config.get("_class_name") == "AutoencoderTiny" else AutoencoderKL


def resolve_step_kind(step_kind: str, scheduler_config: dict) -> str:
    """The policy step kind: for "auto", "lcm" when the model ships an ``LCMScheduler``, else "ddim"."""
    if step_kind == "auto":
        return "lcm" if scheduler_config.get("_class_name") == "LCMScheduler" else "ddim"
    if step_kind not in STEP_KINDS:
        raise ValueError(f"model.step_kind must be 'auto' or one of {list(STEP_KINDS)}, got {step_kind!r}")
    return step_kind


def _not_available(source: str, err: Exception, key: str = "model.source") -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"could not load the model {source!r}: {err}\n" + unavailable_advice(source, key)
    )


def load_components(
    source: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    weight_dtype: str | torch.dtype = "fp32",
    local_files_only: bool = False,
    vae_source: str | None = None,
    step_kind: str = "auto",
) -> PolicyComponents:
    """Load UNet, VAE, text encoder(s), tokenizer(s) and scheduler config from a hub id or a local folder.

    The family is read from ``model_index.json`` (or, for a local folder without one, its subfolders):
    ``text_encoder_2`` present means SDXL. ``step_kind="auto"`` picks the LCM step when the scheduler is an
    ``LCMScheduler`` (e.g. ``SimianLuo/LCM_Dreamshaper_v7``), DDIM otherwise; "ddim"/"lcm" force one (e.g. "lcm"
    for a base model with an LCM-LoRA fused in).

    Frozen parts (VAE, text encoders) are cast to ``weight_dtype``; the UNet stays fp32 so trainable weights and
    optimizer state are full precision (autocast supplies the low-precision forward). A VAE whose config says
    ``force_upcast`` (SDXL's original VAE overflows in fp16) stays fp32 when ``weight_dtype`` is fp16; pass
    ``vae_source`` (e.g. "madebyollin/sdxl-vae-fp16-fix": a VAE repo or folder with ``config.json`` at its root,
    or a local pipeline folder whose ``vae/`` to use) to use an fp16-safe VAE instead. Only safetensors weights
    are loaded; no remote code is ever run.
    """
    dtype = resolve_dtype(weight_dtype)
    if step_kind != "auto" and step_kind not in STEP_KINDS:
        raise ValueError(f"model.step_kind must be 'auto' or one of {list(STEP_KINDS)}, got {step_kind!r}")
    local = Path(source).expanduser()
    path = local if local.is_dir() else None
    where = str(path) if path is not None else source
    common = dict(revision=revision, local_files_only=local_files_only or path is not None)
    weights = dict(variant=variant, use_safetensors=True, **common)
    try:
        index = _model_index(where, path, common)
    except (OSError, ValueError) as err:
        raise _not_available(source, err) from err
    if not _present(index, "text_encoder"):
        raise ValueError(
            f"{source!r} has no text_encoder (an SDXL refiner?): only text-to-image base pipelines are supported"
        )
    sdxl = _present(index, "text_encoder_2")
    try:
        scheduler_config = dict(DDIMScheduler.load_config(where, subfolder="scheduler", **common))
        unet = UNet2DConditionModel.from_pretrained(where, subfolder="unet", **weights)
        text_encoder = CLIPTextModel.from_pretrained(where, subfolder="text_encoder", **weights)
        tokenizer = CLIPTokenizer.from_pretrained(where, subfolder="tokenizer", **common)
        text_encoder_2 = tokenizer_2 = None
        if sdxl:
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(where, subfolder="text_encoder_2", **weights)
            tokenizer_2 = CLIPTokenizer.from_pretrained(where, subfolder="tokenizer_2", **common)
        if vae_source is None:
            vae = _vae_class(where, "vae", common).from_pretrained(where, subfolder="vae", **weights)
    except (OSError, ValueError) as err:
        raise _not_available(source, err) from err
    if vae_source is not None:
        vae_local = Path(vae_source).expanduser()
        vae_where = str(vae_local) if vae_local.is_dir() else vae_source
        # a VAE repo/folder (config.json at its root), or a local pipeline folder whose vae/ to take
        vae_sub = "vae" if (vae_local / "vae").is_dir() and not (vae_local / "config.json").exists() else None
        vae_common = dict(local_files_only=local_files_only or vae_local.is_dir())
        try:
            vae = _vae_class(vae_where, vae_sub, vae_common).from_pretrained(
                vae_where, subfolder=vae_sub, use_safetensors=True, **vae_common
            )
        except (OSError, ValueError) as err:
            raise _not_available(vae_source, err, key="model.vae_source") from err

    unet.requires_grad_(False)
    vae_dtype = torch.float32 if dtype == torch.float16 and getattr(vae.config, "force_upcast", False) else dtype
    if vae_dtype != dtype:
        log.info("the VAE of %s asks for force_upcast: decoding in fp32 (set model.vae_source to an fp16-safe VAE, "
                 "e.g. madebyollin/sdxl-vae-fp16-fix, to decode in fp16)", vae_source or source)
    vae.requires_grad_(False).to(vae_dtype)
    frozen_text = [text_encoder] + ([text_encoder_2] if text_encoder_2 is not None else [])
    for encoder in frozen_text:
        encoder.requires_grad_(False).to(dtype)
        encoder.eval()
    vae.eval()
    kind = resolve_step_kind(step_kind, scheduler_config)
    if kind == "ddim" and unet.config.time_cond_proj_dim is not None:
        log.warning("%s's UNet takes a guidance embedding (time_cond_proj_dim) but its scheduler is %s: using "
                    "the DDIM policy step; set model.step_kind=lcm if this is a latent consistency model",
                    source, scheduler_config.get("_class_name"))
    return PolicyComponents(
        unet, vae, text_encoder, tokenizer, scheduler_config, source,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        step_kind=kind,
        requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)),
    )
