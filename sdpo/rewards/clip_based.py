"""CLIP-based rewards on ``transformers``: LAION aesthetic predictor v2, PickScore and CLIPScore.

All three embed the images with a CLIP vision tower (preprocessed in torch by :func:`clip_preprocess`, on the
images' device) and L2-normalise the embedding in float32. The towers are called directly
(``vision_model`` + ``visual_projection``, ``text_model`` + ``text_projection``) rather than through
``CLIPModel.get_image_features``, whose return type changed in transformers 5 (an output object instead of a
tensor); the computation is the same.

Weights load through the ``from_pretrained`` of a hub id *or* a local directory (same code path), never with
remote code; the aesthetic head, a plain ``.pth`` state dict, loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdpo.rewards.base import RewardModel, WeightSource
from sdpo.rewards.hub import fetch_file, load_pretrained
from sdpo.rewards.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess, module_dtype_device, parse_dtype
from sdpo.rewards.registry import register_reward

#: CLIP's text context; prompts are padded/truncated to this many tokens (or to the model's maximum if shorter).
CLIP_MAX_LENGTH = 77


# what CLIPModel.from_pretrained loads weights from (safetensors first; .bin only with weights_only loading)
TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                        "pytorch_model.bin.index.json")


def load_clip_model(source: str, dtype: str | torch.dtype = "fp32", *, config_key: str = "model") -> nn.Module:
    """``CLIPModel.from_pretrained(source)`` (hub id or local dir) in ``dtype``, eval mode."""
    from transformers import CLIPModel

    model = load_pretrained(CLIPModel.from_pretrained, source, config_key=config_key)
    return model.to(parse_dtype(dtype)).eval()


def load_clip_tokenizer(source: str, *, config_key: str = "processor") -> Any:
    """The tokenizer of a CLIP checkpoint or processor repo (hub id or local dir)."""
    from transformers import AutoTokenizer

    return load_pretrained(AutoTokenizer.from_pretrained, source, config_key=config_key)


def _image_size(vision_config: Any) -> int:
    size = vision_config.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def embed_images(vision_model: nn.Module, projection: nn.Module, images: Tensor, image_size: int) -> Tensor:
    """L2-normalised float32 CLIP image embeddings of ``[B, 3, H, W]`` images in [0, 1]."""
    dtype, device = module_dtype_device(projection)
    pixels = clip_preprocess(images.to(device), image_size, CLIP_MEAN, CLIP_STD).to(dtype)
    pooled = vision_model(pixel_values=pixels).pooler_output
    return F.normalize(projection(pooled).float(), dim=-1)


class _ClipTextImageReward(RewardModel):
    """Shared CLIP loading and embedding of images and prompts, for the rewards comparing the two."""

    requires_prompts = True

    tokenizer_key = "tokenizer"  # the setting that names where the tokenizer comes from

    @classmethod
    def weight_sources(cls, settings: Mapping[str, Any]) -> list[WeightSource]:
        model, tokenizer = str(settings["model"]), settings.get(cls.tokenizer_key)
        same = tokenizer is None or str(tokenizer) == model  # the model's own tokenizer: one source to look for
        return [WeightSource("model", model, weights=TRANSFORMERS_WEIGHTS)] + (
            [] if same else [WeightSource(cls.tokenizer_key, str(tokenizer))])

    def __init__(self, model: str, tokenizer: str, dtype: str, max_length: int, tokenizer_key: str) -> None:
        super().__init__()
        self.clip = load_clip_model(model, dtype, config_key="model")
        self.tokenizer = load_clip_tokenizer(tokenizer, config_key=tokenizer_key)
        self.model_source, self.tokenizer_source = str(model), str(tokenizer)
        self.image_size = _image_size(self.clip.config.vision_config)
        self.max_length = min(int(max_length), int(self.clip.config.text_config.max_position_embeddings))

    def image_embeddings(self, images: Tensor) -> Tensor:
        """L2-normalised float32 ``[B, D]`` image embeddings."""
        return embed_images(self.clip.vision_model, self.clip.visual_projection, images, self.image_size)

    def text_embeddings(self, prompts: list[str]) -> Tensor:
        """L2-normalised float32 ``[B, D]`` prompt embeddings; each distinct prompt is encoded once.

        Tokenised like the reference processors: padding to ``max_length`` (77), truncation.
        """
        _, device = module_dtype_device(self.clip.text_projection)
        unique = list(dict.fromkeys(prompts))
        tokens = self.tokenizer(
            unique, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        pooled = self.clip.text_model(
            input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
        ).pooler_output
        embeddings = F.normalize(self.clip.text_projection(pooled).float(), dim=-1)
        row = {prompt: i for i, prompt in enumerate(unique)}
        return embeddings[torch.tensor([row[p] for p in prompts], device=device)]

    def cosine(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Cosine similarity of each image with its own prompt, float32 ``[B]``."""
        return (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(dim=-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, model={self.model_source!r}, tokenizer={self.tokenizer_source!r}"


@register_reward("pickscore")
class PickScore(_ClipTextImageReward):
    """PickScore (Kirstain et al., 2023): ``logit_scale.exp() * cos(image, prompt)`` with the PickScore CLIP-H.

    This is the official scale (the model's learnt temperature, ~100), so scores are ~15-25 for typical
    images. Note that the reference SDPO code drops the logit scale and uses the bare cosine (~0.15-0.25):
    the ranking is the same, but raw values (and un-normalised advantages) differ by that factor.

    Args:
        model: PickScore weights, hub id or local ``save_pretrained`` directory.
        processor: where the tokenizer comes from (PickScore's repo has none; it uses the LAION CLIP-H one).
        dtype: model dtype, ``fp32`` / ``bf16`` / ``fp16``; images are cast to it, scores are float32.
        max_length: token context (padding and truncation).
    """

    tokenizer_key = "processor"

    def __init__(
        self,
        model: str = "yuvalkirstain/PickScore_v1",
        processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        dtype: str = "fp32",
        max_length: int = CLIP_MAX_LENGTH,
    ) -> None:
        super().__init__(model, processor, dtype, max_length, tokenizer_key="processor")

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.clip.logit_scale.float().exp() * self.cosine(images, prompts)


@register_reward("clip_score")
class ClipScore(_ClipTextImageReward):
    """CLIPScore (Hessel et al., 2021) in torchmetrics' convention: ``100 * max(cos(image, prompt), 0)``.

    Args:
        model: CLIP weights, hub id or local ``save_pretrained`` directory.
        tokenizer: where the tokenizer comes from; ``None`` means the same as ``model``.
        dtype: model dtype, ``fp32`` / ``bf16`` / ``fp16``; images are cast to it, scores are float32.
        max_length: token context (padding and truncation).
    """

    def __init__(
        self,
        model: str = "openai/clip-vit-large-patch14",
        tokenizer: str | None = None,
        dtype: str = "fp32",
        max_length: int = CLIP_MAX_LENGTH,
    ) -> None:
        super().__init__(model, model if tokenizer is None else tokenizer, dtype, max_length, tokenizer_key="tokenizer")

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return 100.0 * self.cosine(images, prompts).clamp(min=0.0)


# ------------------------------------------------------------------------------------------------- aesthetic


class AestheticHead(nn.Module):
    """The LAION aesthetic predictor v2 MLP, laid out like the original so its ``.pth`` loads strictly.

    ``layers.{0,2,4,6,7}`` are the Linear layers (Dropouts at 1, 3, 5; no activations, as in the original).
    """

    def __init__(self, input_dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.layers(embeddings)


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.pt``/``.pth`` loaded with ``torch.load(weights_only=True)``.

    A checkpoint wrapping its weights as ``{"state_dict": ...}`` is unwrapped. A file needing arbitrary
    unpickling is refused (``weights_only`` raises) instead of being loaded unsafely.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RuntimeError(
            f"{path} is not a plain tensor checkpoint loadable with torch.load(weights_only=True) ({err}); "
            "refusing to unpickle it unsafely. Re-save its state_dict (or convert it to .safetensors) in a "
            "trusted environment and point the config at that file."
        ) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise RuntimeError(f"{path} does not hold a state dict of tensors (got {type(state).__name__})")
    return state


def _strip_prefixes(state: dict[str, Tensor], prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


@register_reward("aesthetic")
class Aesthetic(RewardModel):
    """LAION aesthetic predictor v2 (``sac+logos+ava1-l14-linearMSE``): MLP on the normalised CLIP L/14 embedding.

    Score ~1-10 (higher is more aesthetic); prompts are ignored. Only the CLIP vision tower is kept (the text
    tower is dropped after loading). The head is small and kept in float32 whatever ``dtype`` is, so only
    the CLIP embedding is computed in reduced precision.

    Args:
        clip_model: CLIP checkpoint whose image embedding the head was trained on (hub id or local dir).
        head_source: hub repo hosting the head, or a local ``.pth`` / ``.safetensors`` file (or directory).
        head_filename: file name of the head in ``head_source`` when that is a repo or directory.
        cache_dir: Hugging Face cache directory for the head (``None``: the default cache).
        dtype: CLIP dtype, ``fp32`` / ``bf16`` / ``fp16``; images are cast to it, scores are float32.
    """

    @classmethod
    def weight_sources(cls, settings: Mapping[str, Any]) -> list[WeightSource]:
        return [WeightSource("clip_model", str(settings["clip_model"]), weights=TRANSFORMERS_WEIGHTS),
                WeightSource("head_source", str(settings["head_source"]), settings["head_filename"],
                             settings["cache_dir"])]

    def __init__(
        self,
        clip_model: str = "openai/clip-vit-large-patch14",
        head_source: str = "camenduru/improved-aesthetic-predictor",
        head_filename: str | None = "sac+logos+ava1-l14-linearMSE.pth",
        cache_dir: str | None = None,
        dtype: str = "fp32",
    ) -> None:
        super().__init__()
        clip = load_clip_model(clip_model, dtype, config_key="clip_model")
        self.vision_model = clip.vision_model
        self.visual_projection = clip.visual_projection
        self.image_size = _image_size(clip.config.vision_config)
        del clip  # the text tower is not needed
        self.head = AestheticHead(int(self.visual_projection.out_features))
        head_path = fetch_file(head_source, head_filename, cache_dir=cache_dir, config_key="head_source")
        state = load_state_dict_file(head_path)
        state = _strip_prefixes(state, ("module.", "model."))
        if not any(key.startswith("layers.") for key in state):  # saved from a bare nn.Sequential
            state = {f"layers.{key}": value for key, value in state.items()}
        self.head.load_state_dict(state, strict=True)
        self.clip_source, self.head_path = str(clip_model), str(head_path)

    def image_embeddings(self, images: Tensor) -> Tensor:
        """L2-normalised float32 ``[B, D]`` CLIP image embeddings (the head's input)."""
        return embed_images(self.vision_model, self.visual_projection, images, self.image_size)

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        embeddings = self.image_embeddings(images)
        head_dtype, _ = module_dtype_device(self.head)
        return self.head(embeddings.to(head_dtype)).squeeze(-1).float()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, clip_model={self.clip_source!r}, head={self.head_path!r}"
