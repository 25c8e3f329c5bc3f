"""Load a few-step text-to-image model as policy components, from the hub, a local folder or a tiny build.

There is one loading path: everything goes through ``from_pretrained`` on a diffusers-layout folder
(``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``). The embedded offline default
("tiny") is built in code with a fixed seed, saved in that layout, and then loaded by the same function that
loads ``stabilityai/sd-turbo`` — so tests exercise the real code path with no network.
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
from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdpo.policy.tokenizer import build_clip_tokenizer, save_tokenizer

log = logging.getLogger(__name__)

TINY = "tiny"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


class ModelNotAvailableError(FileNotFoundError):
    """Weights could not be found locally and could not be fetched."""


@dataclass
class PolicyComponents:
    """The parts of a latent text-to-image pipeline that SDPO needs."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL | AutoencoderTiny
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict
    source: str

    @property
    def latent_scale(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 1.0))


@dataclass
class TinySpec:
    """Sizes of the embedded random-weight pipeline. Changing any field builds (and caches) a new one."""

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

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True, default=list).encode()
        return hashlib.sha1(blob).hexdigest()[:12]


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}") from None


def build_tiny_pipeline(directory: str | Path, spec: TinySpec) -> Path:
    """Build a random-weight SD-style pipeline (UNet, tiny decoder, CLIP text encoder, BPE tokenizer) and save it.

    The decoder is diffusers' ``AutoencoderTiny``: it has no normalisation layers, so unlike a random
    ``AutoencoderKL`` (whose GroupNorms map every latent to nearly the same grey image) its images keep the
    latents' differences in brightness and colour — the reward has range.
    """
    directory = Path(directory)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched (LoRA init, seeds)
        torch.manual_seed(spec.seed)
        _build_and_save(directory, spec)
    return directory


def _build_and_save(directory: Path, spec: TinySpec) -> None:
    tokenizer = build_clip_tokenizer(spec.words)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_hidden,
            intermediate_size=2 * spec.text_hidden,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    n_blocks = len(spec.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=spec.latent_size,
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        block_out_channels=spec.unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (n_blocks - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_blocks - 1),
        cross_attention_dim=spec.cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    n_dec = len(spec.decoder_channels)
    vae = AutoencoderTiny(
        latent_channels=spec.latent_channels,
        encoder_block_out_channels=spec.decoder_channels,
        decoder_block_out_channels=spec.decoder_channels,
        num_encoder_blocks=(1,) * n_dec,
        num_decoder_blocks=(1,) * n_dec,
    )
    init_decoder_passthrough(vae, spec.decoder_out_std)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, set_alpha_to_one=False, prediction_type=spec.prediction_type,
        timestep_spacing="trailing",
    )
    directory.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(directory / "unet")
    vae.save_pretrained(directory / "vae")
    text_encoder.save_pretrained(directory / "text_encoder")
    save_tokenizer(tokenizer, directory / "tokenizer")
    scheduler.save_pretrained(directory / "scheduler")
    (directory / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=1, default=list))


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
        return target
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    build_tiny_pipeline(staging, spec)
    try:
        staging.rename(target)
    except OSError:  # another process won the race; its copy is identical (same seed and spec)
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _vae_class(path: Path | None, source: str, subfolder: str, revision: str | None, local_only: bool):
    """AutoencoderTiny or AutoencoderKL, read from the saved config (hub models default to KL)."""
    config_file = path / subfolder / "config.json" if path is not None else None
    if config_file is not None and config_file.exists():
        name = json.loads(config_file.read_text()).get("_class_name", "AutoencoderKL")
        return AutoencoderTiny if name == "AutoencoderTiny" else AutoencoderKL
    return AutoencoderKL


def load_components(
    source: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    weight_dtype: str | torch.dtype = "fp32",
    local_files_only: bool = False,
    vae_source: str | None = None,
) -> PolicyComponents:
    """Load UNet, VAE, text encoder, tokenizer and scheduler config from a hub id or a local folder.

    Frozen parts (VAE, text encoder) are cast to ``weight_dtype``; the UNet stays fp32 so trainable weights and
    optimizer state are full precision (autocast supplies the low-precision forward).
    """
    dtype = resolve_dtype(weight_dtype)
    local = Path(source).expanduser()
    path = local if local.is_dir() else None
    where = str(path) if path is not None else source
    common = dict(revision=revision, local_files_only=local_files_only or path is not None)
    try:
        unet = UNet2DConditionModel.from_pretrained(where, subfolder="unet", variant=variant, **common)
        vae_cls = _vae_class(path, source, "vae", revision, local_files_only)
        vae = vae_cls.from_pretrained(vae_source or where, subfolder=None if vae_source else "vae", **common)
        text_encoder = CLIPTextModel.from_pretrained(where, subfolder="text_encoder", variant=variant, **common)
        tokenizer = CLIPTokenizer.from_pretrained(where, subfolder="tokenizer", **common)
        scheduler_config = dict(DDIMScheduler.load_config(where, subfolder="scheduler", **common))
    except (OSError, ValueError) as err:
        raise ModelNotAvailableError(
            f"could not load the model {source!r}: {err}\n"
            f"With no network: pre-download it on a connected machine with `hf download {source}` (then set "
            f"HF_HUB_OFFLINE=1), or point `model.source` at a local diffusers-layout copy."
        ) from err
    unet.requires_grad_(False)
    vae.requires_grad_(False).to(dtype)
    text_encoder.requires_grad_(False).to(dtype)
    vae.eval()
    text_encoder.eval()
    return PolicyComponents(unet, vae, text_encoder, tokenizer, scheduler_config, source)
