"""HPS v2 / v2.1 (Wu et al., 2023): human preference score from an OpenCLIP ViT-H-14 fine-tuned on HPD v2.

Optional extra: needs ``open_clip`` (``pip install -e ".[hpsv2]"``), imported only when the reward is built.
The model is created without pretrained weights (``open_clip.create_model(arch, pretrained=None)``, no
download) and filled from the HPS checkpoint, fetched through :func:`sdpo.rewards.hub.fetch_file` and loaded
with ``torch.load(weights_only=True)`` only.

Score, as in the official ``hpsv2.score``: the cosine similarity of the normalised image and prompt embeddings,
without the logit scale (typically ~0.2-0.35).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from sdpo.rewards.base import RewardModel, WeightSource
from sdpo.rewards.clip_based import _strip_prefixes, load_state_dict_file
from sdpo.rewards.hub import fetch_file
from sdpo.rewards.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess, module_dtype_device, parse_dtype
from sdpo.rewards.registry import register_reward

#: Checkpoint file of each HPS version in the ``xswu/HPSv2`` hub repo.
HPS_CHECKPOINTS: dict[str, str] = {
    "v2.0": "HPS_v2_compressed.pt",
    "v2.1": "HPS_v2.1_compressed.pt",
}


def _pair(value: Any) -> int:
    return int(value[0] if isinstance(value, (tuple, list)) else value)


@register_reward("hpsv2")
class HPSv2(RewardModel):
    """HPS v2 / v2.1 score: ``cos(image, prompt)`` of the HPS-tuned OpenCLIP model.

    Args:
        version: ``"v2.1"`` or ``"v2.0"``; picks the checkpoint file when ``checkpoint_filename`` is not given.
        checkpoint_source: hub repo hosting the checkpoints, or a local checkpoint file (or directory).
        checkpoint_filename: file in ``checkpoint_source``; ``None`` means the one of ``version``.
        architecture: OpenCLIP model name the checkpoint was trained from.
        cache_dir: Hugging Face cache directory (``None``: the default cache).
        dtype: model dtype, ``fp32`` / ``bf16`` / ``fp16``; images are cast to it, scores are float32.
    """

    optional_modules = (("open_clip", "hpsv2"),)
    requires_prompts = True

    @classmethod
    def weight_sources(cls, settings: Mapping[str, Any]) -> list[WeightSource]:
        filename = settings["checkpoint_filename"] or HPS_CHECKPOINTS.get(settings["version"])
        if filename is None:
            return []  # an unknown version: building it says so
        return [WeightSource("checkpoint_source", str(settings["checkpoint_source"]), filename, settings["cache_dir"])]

    def __init__(
        self,
        version: str = "v2.1",
        checkpoint_source: str = "xswu/HPSv2",
        checkpoint_filename: str | None = None,
        architecture: str = "ViT-H-14",
        cache_dir: str | None = None,
        dtype: str = "fp32",
    ) -> None:
        super().__init__()
        if version not in HPS_CHECKPOINTS:
            raise ValueError(f"unknown HPS version {version!r}; use one of {', '.join(HPS_CHECKPOINTS)}")
        open_clip = self.import_optional("open_clip")
        filename = checkpoint_filename or HPS_CHECKPOINTS[version]
        path = fetch_file(checkpoint_source, filename, cache_dir=cache_dir, config_key="checkpoint_source")
        state = _strip_prefixes(load_state_dict_file(path), ("module.",))
        model = open_clip.create_model(architecture, pretrained=None)
        model.load_state_dict(state, strict=True)
        self.model = model.to(parse_dtype(dtype)).eval()
        self.tokenizer = open_clip.get_tokenizer(architecture)
        visual = self.model.visual
        self.image_size = _pair(getattr(visual, "image_size", 224))
        self.image_mean = tuple(getattr(visual, "image_mean", None) or CLIP_MEAN)
        self.image_std = tuple(getattr(visual, "image_std", None) or CLIP_STD)
        self.version, self.checkpoint = version, str(path)

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        dtype, device = module_dtype_device(self.model)
        pixels = clip_preprocess(images.to(device), self.image_size, self.image_mean, self.image_std).to(dtype)
        image_features = self.model.encode_image(pixels, normalize=True).float()
        unique = list(dict.fromkeys(prompts))
        tokens = self.tokenizer(unique).to(device)
        text_features = self.model.encode_text(tokens, normalize=True).float()
        row = {prompt: i for i, prompt in enumerate(unique)}
        text_features = text_features[torch.tensor([row[p] for p in prompts], device=device)]
        return (image_features * text_features).sum(dim=-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, version={self.version!r}, checkpoint={self.checkpoint!r}"
