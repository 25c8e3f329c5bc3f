"""ImageReward (Xu et al., 2023): a BLIP-based human preference reward, through the ``image-reward`` package.

Optional extra: needs the ``ImageReward`` package (``pip install -e ".[imagereward]"``), imported only when the
reward is built. The package builds the model and downloads its weights (``RM.load``); this wrapper then scores
batches itself so images stay tensors on their device: preprocessing in torch (224 px bicubic resize, centre
crop, CLIP normalisation, as the package's PIL transform does), BLIP image encoder, BLIP text encoder
cross-attending to the image, MLP head, then ``(r - mean) / std`` exactly like ``ImageReward.score``.

Caveats of the package, not of this wrapper: ``RM.load`` also fetches the ``bert-base-uncased`` tokenizer and
the ImageReward weights from the hub (pre-download them on an offline machine), loads the weights with
``torch.load`` (safe only because torch >= 2.6 defaults to ``weights_only=True``), and may lag behind the
newest ``transformers`` releases.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sdpo.rewards.base import RewardModel
from sdpo.rewards.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess, module_dtype_device, parse_dtype
from sdpo.rewards.registry import register_reward

#: ImageReward's prompt context (``ImageReward.score`` pads and truncates to 35 BERT tokens).
IMAGEREWARD_MAX_LENGTH = 35


@register_reward("imagereward")
class ImageRewardScore(RewardModel):
    """ImageReward score (standardised, roughly N(0, 1) over its training data; higher is better).

    Args:
        model: ``RM.load`` name (``"ImageReward-v1.0"``) or a local path to its ``ImageReward.pt``.
        download_root: where ``RM.load`` caches the weights (``None``: the package default).
        med_config: BLIP ``med_config.json`` path (``None``: the package fetches it).
        dtype: model dtype, ``fp32`` / ``bf16`` / ``fp16``; images are cast to it, scores are float32.
        image_size: BLIP input resolution (224 for ImageReward v1.0).
    """

    optional_modules = (("ImageReward", "imagereward"),)
    requires_prompts = True

    def __init__(
        self,
        model: str = "ImageReward-v1.0",
        download_root: str | None = None,
        med_config: str | None = None,
        dtype: str = "fp32",
        image_size: int = 224,
    ) -> None:
        super().__init__()
        rm = self.import_optional("ImageReward")
        # positional: the 4th parameter is ``med_config`` in image-reward 1.x and ``med_config_path`` later
        loaded = rm.load(model, "cpu", download_root, med_config)
        self.model = loaded.to(parse_dtype(dtype)).eval()
        self.image_size = int(image_size)
        self.source = str(model)

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        blip = self.model.blip
        dtype, device = module_dtype_device(blip.visual_encoder)
        pixels = clip_preprocess(images.to(device), self.image_size, CLIP_MEAN, CLIP_STD).to(dtype)
        tokens = blip.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=IMAGEREWARD_MAX_LENGTH, return_tensors="pt"
        )
        image_embeds = blip.visual_encoder(pixels)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)
        text_output = blip.text_encoder(
            tokens["input_ids"].to(device),
            attention_mask=tokens["attention_mask"].to(device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            return_dict=True,
        )
        features = text_output.last_hidden_state[:, 0, :]
        mlp_dtype, _ = module_dtype_device(self.model.mlp)
        rewards = self.model.mlp(features.to(mlp_dtype)).squeeze(-1).float()
        return (rewards - float(self.model.mean)) / float(self.model.std)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, model={self.source!r}"
