"""Step-generalisation evaluation: rewards of a policy at several sampling step counts, with the model's native
few-step sampler.

SDPO's claim is that one training run improves the 1-, 2-, 4- and 8-step images at once. Training samples with a
stochastic DDIM (or LCM) policy step at a fixed T; a user samples with the scheduler the model ships
(SD-Turbo: Euler, SDXL-Turbo: Euler ancestral, LCM: the LCM scheduler), deterministically where it is
deterministic. So evaluation runs that native sampler, for each step count, on held-out prompts:

- Initial noise comes from one generator per (seed, prompt index, image index), re-seeded for every step count:
  scores do not depend on the batch size or on the other prompts, and a prompt's k-step images share their noise
  across k (paired comparisons). Ancestral/LCM step noise comes from the same per-image generators.
- The loop is diffusers' pipeline loop without classifier-free guidance (SDPO samples with guidance 1):
  ``scale_model_input`` -> UNet -> ``scheduler.step`` (DDIM with eta = 0), then the final latents are decoded
  (for LCM the last step's ``denoised``, as the LCM pipeline does).
- Results (``sdpo.eval_results``) are mean, standard deviation and a 95% confidence interval of the mean per
  (reward, step count), over the prompt means (``sdpo.statistics``).

No Hydra here: ``sdpo.evaluate`` (the CLI) and ``sdpo.callbacks.EvalDuringTraining`` both call
``evaluate_policy``; ``sdpo.saved_policy`` turns checkpoints and exported folders into the UNet to evaluate.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers import UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor
from tqdm.auto import tqdm

from sdpo.config_checks import ConfigError
from sdpo.eval_results import EvalResult
from sdpo.policy.conditioning import Conditioning, decode_latents, encode_prompts
from sdpo.policy.loading import PolicyComponents
from sdpo.rewards import RewardModel

DEFAULT_STEPS: tuple[int, ...] = (1, 2, 4, 8)
NOISE_PURPOSE = 31  # keeps evaluation noise independent of every training stream (sdpo.module uses 11-13)


# ------------------------------------------------------------------------------------------------ sampling


def native_scheduler(scheduler_config: Mapping[str, Any]) -> SchedulerMixin:
    """A fresh instance of the scheduler class the model ships (``_class_name``), from its saved config."""
    name = scheduler_config.get("_class_name")
    cls = getattr(diffusers, str(name), None) if name else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"the model's scheduler config names {name!r}, which is not a diffusers scheduler class")
    return cls.from_config(dict(scheduler_config))


def check_step_counts(scheduler_config: Mapping[str, Any], steps: Sequence[int], key: str = "steps") -> None:
    """Refuse, before any sampling, a step count the model's own scheduler cannot run: at most one step per training
    timestep, and an LCM samples on the grid it was distilled on, so at most ``original_inference_steps`` steps
    (diffusers would fail only at that count, after the smaller ones had been sampled)."""
    name = scheduler_config.get("_class_name")
    timesteps = scheduler_config.get("num_train_timesteps")
    if timesteps and max(steps) > int(timesteps):
        raise ConfigError(f"{key}={list(steps)}: this model's {name} has {timesteps} training timesteps, so it samples "
                          f"at most {timesteps} steps; drop the larger step counts")
    limit = scheduler_config.get("original_inference_steps")
    if limit and max(steps) > int(limit):
        raise ConfigError(f"{key}={list(steps)}: this model's {name} samples at most {limit} steps "
                          f"(original_inference_steps); drop the larger step counts")


def item_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """A 63-bit seed for one evaluation image: independent of batching and of the other prompts."""
    state = np.random.SeedSequence([seed, prompt_index, image_index, NOISE_PURPOSE]).generate_state(2, np.uint64)
    return int(state[0] >> 1)


def item_generators(seed: int, items: Sequence[tuple[int, int]]) -> list[torch.Generator]:
    """One CPU generator per (prompt index, image index): portable across devices."""
    return [torch.Generator().manual_seed(item_seed(seed, p, i)) for p, i in items]


@torch.no_grad()
def sample_native(
    components: PolicyComponents,
    unet: UNet2DConditionModel,
    scheduler: SchedulerMixin,
    cond: Conditioning,
    generators: list[torch.Generator],
    num_steps: int,
    latent_shape: tuple[int, int, int],
) -> Tensor:
    """Images [B, 3, H, W] in [0, 1] from ``num_steps`` steps of ``scheduler``: one image per generator.

    Each generator first draws its image's initial noise, then (ancestral/LCM schedulers) its step noise, exactly
    as diffusers' pipelines use a list of generators.
    """
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    noise = torch.stack([torch.randn(latent_shape, generator=g, dtype=torch.float32) for g in generators])
    scheduler.set_timesteps(num_steps, device=device)  # also resets stateful schedulers (Euler's step index)
    x = noise.to(device) * scheduler.init_noise_sigma
    accepts = inspect.signature(scheduler.step).parameters
    extra: dict[str, Any] = {}
    if "eta" in accepts:
        extra["eta"] = 0.0  # deterministic DDIM
    if "generator" in accepts:
        extra["generator"] = generators
    unet_kwargs = cond.to(device).unet_kwargs()
    final = x
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        model_output = unet(model_input.to(dtype), t, **unet_kwargs, return_dict=False)[0]
        # fp32 scheduler math even if the UNet ran in low precision (a no-op for the fp32 UNets loaded here)
        out = scheduler.step(model_output.float(), t, x, **extra, return_dict=True)
        x = out.prev_sample
        denoised = getattr(out, "denoised", None)  # LCM: the consistency output, what its pipeline decodes
        final = x if denoised is None else denoised
    return decode_latents(components.vae, final.float(), components.latent_scale)


def _device_of(module: torch.nn.Module, default: torch.device) -> torch.device:
    param = next(module.parameters(), None)
    return default if param is None else param.device


# ------------------------------------------------------------------------------------------------ evaluation


def evaluate_policy(
    components: PolicyComponents,
    unet: UNet2DConditionModel | None,
    prompts: Sequence[str],
    step_counts: Sequence[int] = DEFAULT_STEPS,
    *,
    rewards: Mapping[str, RewardModel],
    images_per_prompt: int = 4,
    seed: int = 0,
    batch_size: int = 16,
    resolution: int | None = None,
    guidance_scale: float | None = None,
    progress: bool = True,
    keep_images: int = 1,
    keep_prompts: int | None = None,
) -> EvalResult:
    """Sample ``images_per_prompt`` images per prompt at each step count with the model's native scheduler and
    score them with every reward.

    ``unet`` defaults to ``components.unet`` (pass the policy's, e.g. a LoRA'd or training UNet). It is put in
    eval mode and restored. Nothing here draws from the global RNG. The first ``keep_images`` images of the first
    ``keep_prompts`` prompts (default: all) are kept (uint8) for grids: only those a grid draws, since at 512 px
    and more every kept image costs megabytes of memory.
    """
    prompts = [str(p) for p in prompts]
    steps = tuple(int(k) for k in step_counts)
    if not prompts:
        raise ValueError("evaluate_policy needs at least one prompt")
    if not steps or min(steps) < 1 or len(set(steps)) != len(steps):
        raise ValueError(f"step counts must be distinct integers >= 1, got {list(step_counts)}")
    if images_per_prompt < 1 or batch_size < 1:
        raise ValueError(f"images_per_prompt ({images_per_prompt}) and batch_size ({batch_size}) must be >= 1")
    if not rewards:
        raise ValueError("evaluate_policy needs at least one reward")
    unet = components.unet if unet is None else unet
    device = next(unet.parameters()).device
    side = components.latent_size(resolution)
    latent_shape = (int(unet.config.in_channels), side, side)
    image_size = side * components.vae_scale_factor
    keep = max(0, min(keep_images, images_per_prompt))
    keep_rows = len(prompts) if keep_prompts is None else max(0, min(keep_prompts, len(prompts)))
    scheduler = native_scheduler(components.scheduler_config)

    cond_all = Conditioning.cat([
        encode_prompts(components, prompts[i : i + batch_size], image_size, guidance_scale).to(device)
        for i in range(0, len(prompts), batch_size)
    ])
    items = [(p, i) for p in range(len(prompts)) for i in range(images_per_prompt)]
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    scores = {name: torch.full((len(steps), len(prompts), images_per_prompt), math.nan) for name in rewards}
    kept: Tensor | None = None
    was_training = unet.training
    unet.eval()
    bar = tqdm(total=len(steps) * len(chunks), desc="evaluate", unit="batch", disable=not progress, leave=False)
    try:
        with torch.no_grad():
            for s, k in enumerate(steps):
                for chunk in chunks:
                    p_idx = torch.tensor([p for p, _ in chunk])
                    i_idx = torch.tensor([i for _, i in chunk])
                    images = sample_native(components, unet, scheduler, cond_all.select(p_idx),
                                           item_generators(seed, chunk), k, latent_shape)
                    chunk_prompts = [prompts[p] for p, _ in chunk]
                    for name, reward in rewards.items():
                        values = reward(images.to(_device_of(reward, device)), chunk_prompts)
                        scores[name][s, p_idx, i_idx] = values.detach().float().cpu()
                    if keep and keep_rows:
                        if kept is None:
                            kept = torch.zeros((len(steps), keep_rows, keep, *images.shape[1:]), dtype=torch.uint8)
                        mask = (i_idx < keep) & (p_idx < keep_rows)
                        as_uint8 = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
                        kept[s, p_idx[mask], i_idx[mask]] = as_uint8[mask]
                    bar.update(1)
    finally:
        unet.train(was_training)
        bar.close()
    meta = {
        "source": components.source,
        "scheduler": type(scheduler).__name__,
        "seed": seed,
        "images_per_prompt": images_per_prompt,
        "image_size": image_size,
        "guidance_scale": guidance_scale,
    }
    if kept is None:
        kept = torch.zeros((len(steps), keep_rows, 0, 3, image_size, image_size), dtype=torch.uint8)
    return EvalResult(prompts, steps, scores, kept, meta)
