"""Text conditioning and latent decoding: the frozen ends of the pipeline around the policy.

``encode_prompts`` builds what the UNet is conditioned on, per family, as diffusers' pipelines do without
classifier-free guidance (SDPO samples with guidance 1, like the reference):

- SD 1.x/2.x: the text encoder's last hidden state.
- SDXL: the penultimate hidden states of both encoders concatenated on the feature axis, the pooled and
  projected ``text_embeds`` of encoder 2, and ``time_ids`` = (size, size, 0, 0, size, size) — original size,
  crop top-left, target size — for square images of side ``image_size`` pixels.
- LCM with a guidance-embedding UNet (``time_cond_proj_dim``): ``timestep_cond`` = the sinusoidal embedding of
  ``guidance_scale - 1`` (the LCM pipeline's convention), on top of the SD or SDXL conditioning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from transformers import CLIPTokenizer

if TYPE_CHECKING:
    from sdpo.policy.loading import PolicyComponents


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


def truncated_prompts(tokenizer: CLIPTokenizer, prompts: list[str]) -> list[str]:
    """The prompts longer than the text encoder's context (77 tokens for CLIP, start and end included): they are
    cut there, silently, as diffusers' pipelines cut them; the words past it never reach the UNet."""
    lengths = [len(ids) for ids in tokenizer(list(prompts), truncation=False).input_ids]
    return [p for p, n in zip(prompts, lengths, strict=True) if n > tokenizer.model_max_length]


def _token_ids(tokenizer: CLIPTokenizer, prompts: list[str], device: torch.device) -> Tensor:
    """Token ids [P, L], padded to the tokenizer's full length as SD pipelines do."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


def guidance_scale_embedding(w: Tensor, embedding_dim: int) -> Tensor:
    """Sinusoidal embedding [N, embedding_dim] of guidance weights ``w`` [N] (VDM's, as LCM pipelines use it).

    ``w`` is scaled by 1000, then sin/cos at ``half = embedding_dim // 2`` geometric frequencies
    ``10000^(-k / (half - 1))``; an odd ``embedding_dim`` is zero-padded. Computed in fp32.
    """
    if w.ndim != 1:
        raise ValueError(f"w must be 1-d, got shape {tuple(w.shape)}")
    half = embedding_dim // 2
    step = torch.log(torch.tensor(10000.0, device=w.device)) / (half - 1)  # fp32, as the pipeline computes it
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -step)
    angles = (w.float() * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def sdxl_time_ids(image_size: int, count: int, device: torch.device | None = None) -> Tensor:
    """SDXL's micro-conditioning [count, 6]: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) for an
    uncropped square image of side ``image_size`` pixels."""
    row = torch.tensor([image_size, image_size, 0, 0, image_size, image_size], dtype=torch.float32, device=device)
    return row.expand(count, 6).clone()


@torch.no_grad()
def encode_prompts(
    components: PolicyComponents,
    prompts: list[str],
    image_size: int | None = None,
    guidance_scale: float | None = None,
) -> Conditioning:
    """The UNet conditioning of ``prompts`` (every tensor [P, ...], fp32, on the text encoder's device).

    ``image_size`` is the generated image's side in pixels (latent side x the VAE scale factor; default: the
    UNet's native size); only SDXL uses it (``time_ids``). ``guidance_scale`` feeds an LCM UNet's guidance
    embedding and is required for one (e.g. 8.0 for LCM_Dreamshaper_v7); for other UNets it must be None or 1,
    because SDPO samples without classifier-free guidance.
    """
    prompts = list(prompts)
    text_encoder = components.text_encoder
    device = text_encoder.device
    unet_config = components.unet.config
    ids = _token_ids(components.tokenizer, prompts, device)
    if components.text_encoder_2 is None:
        cond = Conditioning(text_encoder(ids)[0].float())  # last hidden state
    else:
        if components.requires_aesthetics_score:
            raise NotImplementedError("SDXL refiner-style conditioning (aesthetic score time ids) is not supported")
        ids_2 = _token_ids(components.tokenizer_2, prompts, components.text_encoder_2.device)
        out_1 = text_encoder(ids, output_hidden_states=True)
        out_2 = components.text_encoder_2(ids_2, output_hidden_states=True)
        hidden = torch.cat([out_1.hidden_states[-2].float(), out_2.hidden_states[-2].float().to(device)], dim=-1)
        size = components.native_resolution if image_size is None else int(image_size)
        added = {
            "text_embeds": out_2.text_embeds.float().to(device),  # [P, projection_dim]
            "time_ids": sdxl_time_ids(size, len(prompts), device),  # [P, 6]
        }
        cond = Conditioning(hidden, added)
    embed_dim = getattr(unet_config, "time_cond_proj_dim", None)
    if embed_dim is not None:
        if guidance_scale is None:
            raise ValueError(
                "this UNet takes a guidance-scale embedding (time_cond_proj_dim): set model.guidance_scale "
                "(e.g. 8.0 for LCM_Dreamshaper_v7)"
            )
        w = torch.full((len(prompts),), float(guidance_scale) - 1.0, device=device)  # the LCM pipeline's w
        cond.timestep_cond = guidance_scale_embedding(w, int(embed_dim))
    elif guidance_scale is not None and float(guidance_scale) != 1.0:
        raise ValueError(
            f"model.guidance_scale={guidance_scale}, but this UNet has no guidance embedding and SDPO samples "
            "without classifier-free guidance: set model.guidance_scale to null"
        )
    return cond


@torch.no_grad()
def decode_latents(vae: torch.nn.Module, latents: Tensor, scaling_factor: float, batch_size: int = 32) -> Tensor:
    """Latents [K, C, h, w] -> images [K, 3, H, W] in [0, 1], float32, decoded in batches of ``batch_size``.

    The VAE runs in the dtype it is stored in (``model.weight_dtype``), outside any autocast the caller is under
    (training's, or evaluation's with ``algo.low_precision_base``): under 16-mixed autocast a VAE kept in fp32
    because it overflows in fp16 (``force_upcast``, SDXL's) would run its convolutions in fp16 all the same, and
    autocast adds casts around its norm layers."""
    dtype = next(vae.parameters()).dtype
    with torch.autocast(latents.device.type, enabled=False):
        images = [
            vae.decode((chunk / scaling_factor).to(dtype), return_dict=False)[0]
            for chunk in latents.split(batch_size)
        ]
    return (torch.cat(images).float() / 2 + 0.5).clamp(0, 1)
