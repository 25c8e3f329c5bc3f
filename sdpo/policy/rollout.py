"""Dual-state pair rollouts: per prompt two trajectories from one shared x_T, both through one UNet call.

Both states of every step are kept: the noisy latent x_t (needed to recompute log-probs when training) and the
predicted clean latent x̂0_t (what dense rewards are computed on). x̂0 at the first step is what a 1-step
generation outputs, so rewards on x̂0 supervise every step count at once.

The step is chosen by ``step_kind``: "ddim" (SD/SDXL-Turbo, ``scheduler`` a DDIMScheduler) or "lcm" (latent
consistency models, ``scheduler`` an LCMScheduler; x̂0 is then the LCM's denoised output).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, LCMScheduler, UNet2DConditionModel
from torch import Tensor

from sdpo.policy.checks import deferred_checks
from sdpo.policy.conditioning import Conditioning
from sdpo.policy.steps import policy_step


@dataclass
class PairTrajectories:
    """P prompts x 2 trajectories (a, b) x T steps; the layout is [P, 2, T, ...] throughout."""

    prompts: list[str]  # [P]
    cond: Conditioning  # [P, ...] per prompt
    timesteps: Tensor  # [T] long, the sampling schedule (shared by all trajectories)
    latents: Tensor  # [P, 2, T+1, C, H, W]: x_T ... x_0; latents[:, :, i] is the input of step i
    x0_latents: Tensor  # [P, 2, T, C, H, W]: x̂0 predicted at each step (LCM: the denoised output)
    log_probs: Tensor  # [P, 2, T] log π_old of each recorded transition (fp32)

    @property
    def num_pairs(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    @staticmethod
    def concat(parts: list[PairTrajectories]) -> PairTrajectories:
        """Join the chunks sampled in several UNet batches into one batch of pairs."""
        return PairTrajectories(
            prompts=[p for part in parts for p in part.prompts],
            cond=Conditioning.cat([part.cond for part in parts]),
            timesteps=parts[0].timesteps,
            latents=torch.cat([part.latents for part in parts]),
            x0_latents=torch.cat([part.x0_latents for part in parts]),
            log_probs=torch.cat([part.log_probs for part in parts]),
        )


def predict_model_output(unet: UNet2DConditionModel, latents: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
    """The UNet's raw prediction (ε, v or x0 per the scheduler config), [B, C, H, W]; ``cond`` has B rows."""
    return unet(latents, timesteps, **cond.unet_kwargs(), return_dict=False)[0]


def _drop_rows(generator: torch.Generator, rows: int, shape: tuple[int, ...]) -> None:
    """Advance ``generator`` past ``rows`` noise rows, one draw per row exactly as the policy step draws them."""
    for _ in range(rows):
        torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)


@torch.no_grad()
def sample_pairs(
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler | LCMScheduler,
    prompts: list[str],
    cond: Conditioning,
    timesteps: Tensor,
    latent_shape: tuple[int, int, int],
    eta: float,
    generator: torch.Generator,
    latent_dtype: torch.dtype = torch.float32,
    step_kind: str = "ddim",
    unet_batch_size: int | None = None,
    others: tuple[int, int] = (0, 0),
) -> PairTrajectories:
    """Roll out one pair per prompt. Trajectories a and b share x_T and differ only in the per-step noise.

    The noise is one stream in global order: x_T of every pair of the global batch in one draw, then at each step
    one row per trajectory (2 per pair). ``others`` = (pairs before, pairs after) this batch in a global batch
    whose other pairs other processes sample: their rows are drawn and dropped, so a pair's noise depends only on
    its global index and W processes equal one process with the whole batch. ``unet_batch_size`` pairs go through
    each UNet call (the step math runs on all rows at once), so the batch split does not change the noise either.
    ``eta`` applies to the DDIM step only (the LCM step's noise is set by its schedule).
    """
    num_prompts = len(prompts)
    before, after = others
    device = cond.hidden_states.device
    shared_noise = torch.randn(
        (before + num_prompts + after, *latent_shape), generator=generator, device=generator.device,
        dtype=torch.float32,
    )[before : before + num_prompts].to(device)
    x = shared_noise.repeat_interleave(2, dim=0)  # [2P, C, H, W], rows (2p, 2p+1) = pair p
    pair_cond = cond.repeat_pairs()  # [2P, ...]
    rows, per_call = x.shape[0], 2 * (unet_batch_size or num_prompts)
    calls = []  # UNet batches: a row slice and its conditioning
    for start in range(0, rows, per_call):
        stop = min(start + per_call, rows)
        part_cond = pair_cond if stop - start == rows else pair_cond.select(torch.arange(start, stop))
        calls.append((slice(start, stop), part_cond))
    step_generators = [generator] * rows  # one draw per row, in row order
    latents, x0s, log_probs = [x], [], []
    with deferred_checks():  # the steps' timestep and NaN checks: one host sync at the end, not ~5 per step
        for t in timesteps:
            t_batch = t.expand(rows).to(device)
            outputs = [predict_model_output(unet, x[part].to(latent_dtype), t_batch[part], part_cond)
                       for part, part_cond in calls]
            model_output = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
            _drop_rows(generator, 2 * before, latent_shape)
            step = policy_step(step_kind, scheduler, model_output, t_batch, x, eta, generator=step_generators)
            _drop_rows(generator, 2 * after, latent_shape)
            x = step.prev_sample
            latents.append(x)
            x0s.append(step.pred_original_sample)
            log_probs.append(step.log_prob)

    def pairs(stacked: Tensor) -> Tensor:  # [2P, T, ...] -> [P, 2, T, ...]
        return stacked.view(num_prompts, 2, *stacked.shape[1:])

    return PairTrajectories(
        prompts=list(prompts),
        cond=cond,
        timesteps=timesteps.to(device),
        latents=pairs(torch.stack(latents, dim=1)),
        x0_latents=pairs(torch.stack(x0s, dim=1)),
        log_probs=pairs(torch.stack(log_probs, dim=1)),
    )


def transition_log_prob(
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler | LCMScheduler,
    latents: Tensor,
    timesteps: Tensor,
    next_latents: Tensor,
    cond: Conditioning,
    eta: float,
    latent_dtype: torch.dtype = torch.float32,
    step_kind: str = "ddim",
) -> Tensor:
    """log π_θ(next | latents, c) of recorded transitions under the current weights, [B] in fp32 (with grad)."""
    model_output = predict_model_output(unet, latents.to(latent_dtype), timesteps, cond)
    step = policy_step(step_kind, scheduler, model_output, timesteps, latents, eta, prev_sample=next_latents)
    return step.log_prob
