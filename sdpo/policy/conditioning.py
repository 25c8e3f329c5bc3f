"""Text conditioning and latent decoding: the frozen ends of the pipeline around the policy."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer


@dataclass
class Conditioning:
    """Everything the UNet is conditioned on; every tensor has the batch first ([P, ...])."""

    hidden_states: Tensor  # [P, L, D] text encoder states (cross-attention)
    added: dict[str, Tensor] = field(default_factory=dict)  # SDXL: text_embeds [P, D2], time_ids [P, 6]
    timestep_cond: Tensor | None = None  # LCM guidance-scale embedding [P, E]

    def _map(self, fn) -> Conditioning:
        return Conditioning(
            fn(self.hidden_states),
            {k: fn(v) for k, v in self.added.items()},
            None if self.timestep_cond is None else fn(self.timestep_cond),
        )

    def select(self, index: Tensor) -> Conditioning:
        """Rows ``index`` (a [B] long tensor)."""
        return self._map(lambda t: t[index.to(t.device)])

    def repeat_pairs(self) -> Conditioning:
        """Each row twice in a row: the layout of a pair's trajectories a, b."""
        return self._map(lambda t: t.repeat_interleave(2, dim=0))

    def to(self, *args, **kwargs) -> Conditioning:
        return self._map(lambda t: t.to(*args, **kwargs))

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        first = parts[0]
        return Conditioning(
            torch.cat([p.hidden_states for p in parts]),
            {k: torch.cat([p.added[k] for p in parts]) for k in first.added},
            None if first.timestep_cond is None else torch.cat([p.timestep_cond for p in parts]),
        )

    def unet_kwargs(self) -> dict:
        """Keyword arguments of ``UNet2DConditionModel.forward`` besides sample and timestep."""
        kwargs: dict = {"encoder_hidden_states": self.hidden_states}
        if self.added:
            kwargs["added_cond_kwargs"] = self.added
        if self.timestep_cond is not None:
            kwargs["timestep_cond"] = self.timestep_cond
        return kwargs


@torch.no_grad()
def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]) -> Conditioning:
    """CLIP last hidden states [P, L, D], padded to the tokenizer's full length as SD pipelines do."""
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(text_encoder.device)
    return Conditioning(text_encoder(ids)[0].float())


@torch.no_grad()
def decode_latents(vae: torch.nn.Module, latents: Tensor, scaling_factor: float, batch_size: int = 32) -> Tensor:
    """Latents [K, C, h, w] -> images [K, 3, H, W] in [0, 1], float32, decoded in batches of ``batch_size``."""
    dtype = next(vae.parameters()).dtype
    images = [
        vae.decode((chunk / scaling_factor).to(dtype), return_dict=False)[0]
        for chunk in latents.split(batch_size)
    ]
    return (torch.cat(images).float() / 2 + 0.5).clamp(0, 1)
