"""Text conditioning and latent decoding: the frozen ends of the pipeline around the policy."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer


@torch.no_grad()
def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]) -> Tensor:
    """CLIP last hidden states [P, L, D], padded to the tokenizer's full length as SD pipelines do."""
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(text_encoder.device)
    return text_encoder(ids)[0].float()


@torch.no_grad()
def decode_latents(vae: torch.nn.Module, latents: Tensor, scaling_factor: float, batch_size: int = 32) -> Tensor:
    """Latents [K, C, h, w] -> images [K, 3, H, W] in [0, 1], float32, decoded in batches of ``batch_size``."""
    dtype = next(vae.parameters()).dtype
    images = [
        vae.decode((chunk / scaling_factor).to(dtype), return_dict=False)[0]
        for chunk in latents.split(batch_size)
    ]
    return (torch.cat(images).float() / 2 + 0.5).clamp(0, 1)
