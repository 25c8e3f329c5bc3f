"""Dual-state pair rollouts: per prompt two trajectories from one shared x_T, both through one UNet call.

Both states of every step are kept: the noisy latent x_t (needed to recompute log-probs when training) and the
predicted clean latent x̂0_t (what dense rewards are computed on). x̂0 at the first step is what a 1-step
generation outputs, so rewards on x̂0 supervise every step count at once.

The step is chosen by ``step_kind``: "ddim" (SD/SDXL-Turbo, ``scheduler`` a DDIMScheduler) or "lcm" (latent
consistency models, ``scheduler`` an LCMScheduler; x̂0 is then the LCM's denoised output).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
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
    def concat(chunks: Iterable[PairTrajectories]) -> PairTrajectories:
        """Join the chunks sampled in several UNet batches (e.g. all of ``sample_pair_chunks``) into one batch."""
        parts = list(chunks)
        if len(parts) == 1:
            return parts[0]
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


class RolloutNoise:
    """All the noise of one rollout of P pairs: one generator per pair, drawing x_T (shared by the pair's
    trajectories a and b) and then, at each step, z of both trajectories in one draw.

    A pair's noise depends only on its own generator, which the caller seeds from the pair's global index
    (``SDPOModule._generators``). So a rank draws only its own pairs' noise, O(its batch) per step at any world
    size, and neither the chunk a pair is sampled in nor the number of processes changes any sample. Each
    chunk draws its steps as it runs them, so nothing is kept between chunks.
    """

    def __init__(self, generators: Sequence[torch.Generator], latent_shape: tuple[int, int, int],
                 device: torch.device | str) -> None:
        if not generators:
            raise ValueError("RolloutNoise needs one generator per pair; got none")
        self.generators, self.latent_shape, self.device = list(generators), latent_shape, device
        self.start = torch.stack([self._draw(g, latent_shape) for g in self.generators]).to(device)  # [P, C, H, W]
        self._steps_drawn = [0] * len(self.generators)

    @staticmethod
    def _draw(generator: torch.Generator, shape: tuple[int, ...]) -> Tensor:
        return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)

    def step(self, index: int, pairs: slice) -> Tensor:
        """z of both trajectories of the pairs ``pairs`` at step ``index``, [2n, C, H, W] (rows 2p, 2p+1 = pair p).

        A pair's steps must be drawn in order, each once: its generator's stream is x_T, step 0, step 1, ...
        """
        chosen = range(len(self.generators))[pairs]
        for p in chosen:
            if self._steps_drawn[p] != index:
                raise RuntimeError(f"RolloutNoise: pair {p} has drawn {self._steps_drawn[p]} steps; asked for step "
                                   f"{index} (each pair's steps are drawn once, in order)")
            self._steps_drawn[p] += 1
        z = torch.stack([self._draw(self.generators[p], (2, *self.latent_shape)) for p in chosen])
        return z.flatten(0, 1).to(self.device)


@torch.no_grad()
def sample_pair_chunks(
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler | LCMScheduler,
    prompts: list[str],
    cond: Conditioning,
    timesteps: Tensor,
    latent_shape: tuple[int, int, int],
    eta: float,
    generators: Sequence[torch.Generator],
    latent_dtype: torch.dtype = torch.float32,
    step_kind: str = "ddim",
    unet_batch_size: int | None = None,
    on_step: Callable[[], None] | None = None,
) -> Iterator[PairTrajectories]:
    """Roll out one pair per prompt, ``unet_batch_size`` prompts (2 UNet rows each) at a time, and yield each such
    chunk as soon as it has run all T steps, so its rewards can be computed while the next chunk samples.

    Trajectories a and b of a pair share x_T and differ only in the per-step noise. All noise comes from
    ``RolloutNoise``, one generator per pair (``generators``, one per prompt), so neither the chunk size nor the
    number of processes changes any sample. ``eta`` applies to the DDIM step only (the LCM step's noise is set by
    its schedule). The steps' NaN checks are evaluated at the end of each chunk (one host sync), before anyone
    reads its latents.
    ``on_step`` is called after each UNet step (a progress bar).
    """
    num_prompts = len(prompts)
    if len(generators) != num_prompts:
        raise ValueError(f"sample_pair_chunks needs one noise generator per prompt: {len(generators)} for "
                         f"{num_prompts} prompts")
    device = cond.hidden_states.device
    noise = RolloutNoise(generators, latent_shape, device)
    per_call = unet_batch_size or num_prompts
    for first in range(0, num_prompts, per_call):
        last = min(first + per_call, num_prompts)
        part_cond = cond if last - first == num_prompts else cond.select(torch.arange(first, last))
        yield _roll_out_chunk(unet, scheduler, prompts[first:last], part_cond, timesteps, noise, slice(first, last),
                              eta, latent_dtype, step_kind, on_step)


def _roll_out_chunk(
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler | LCMScheduler,
    prompts: list[str],
    cond: Conditioning,
    timesteps: Tensor,
    noise: RolloutNoise,
    pairs_of_chunk: slice,
    eta: float,
    latent_dtype: torch.dtype,
    step_kind: str,
    on_step: Callable[[], None] | None = None,
) -> PairTrajectories:
    """All T steps of the pairs ``pairs_of_chunk`` of ``noise``, one UNet call per step."""
    num_prompts = len(prompts)
    device = cond.hidden_states.device
    x = noise.start[pairs_of_chunk].repeat_interleave(2, dim=0)  # [2P, C, H, W], rows (2p, 2p+1) = pair p
    pair_cond = cond.repeat_pairs()  # [2P, ...]
    latents, x0s, log_probs = [x], [], []
    with deferred_checks():  # the steps' timestep and NaN checks: one host sync at the end, not ~5 per step
        for i, t in enumerate(timesteps):
            t_batch = t.expand(x.shape[0]).to(device)
            model_output = predict_model_output(unet, x.to(latent_dtype), t_batch, pair_cond)
            z = noise.step(i, pairs_of_chunk)
            step = policy_step(step_kind, scheduler, model_output, t_batch, x, eta, variance_noise=z)
            x = step.prev_sample
            latents.append(x)
            x0s.append(step.pred_original_sample)
            log_probs.append(step.log_prob)
            if on_step is not None:
                on_step()

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
