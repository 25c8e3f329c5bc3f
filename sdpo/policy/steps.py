"""A stochastic DDIM step viewed as a Gaussian policy.

SDPO treats one denoising step x_t -> x_{t-1} as an action drawn from
pi(x_{t-1} | x_t, c) = N(mu_t, sigma_t^2 I). Training needs the log-density of recorded actions under the
current weights, and the clip range on log-ratios is tiny (1e-4), so the math here must (a) equal diffusers'
own ``DDIMScheduler.step(..., eta, variance_noise=z)`` and (b) run in fp32 even when the UNet runs in
bf16/fp16. See docs/method.md, "Setting".

For a latent consistency model (LCM) the policy step is the LCM step (``lcm_step_with_logprob``): the
consistency prediction re-noised to the next timestep, N(sqrt(ᾱ_prev)·denoised, (1-ᾱ_prev) I), as in RLCM.
``policy_step`` dispatches on the step kind ("ddim" | "lcm") and ``make_policy_scheduler`` builds the matching
scheduler.

Written in the style of diffusers' scheduler files: small pure functions and a step returning a dataclass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from sdpo.policy.checks import require_not

if TYPE_CHECKING:  # imported where used: the config check reads SPACINGS without loading diffusers (~3 s)
    from diffusers import DDIMScheduler, LCMScheduler

__all__ = [
    "SPACINGS",
    "STEP_KINDS",
    "StepOutput",
    "check_training_schedule",
    "ddim_step_with_logprob",
    "gaussian_log_prob",
    "lcm_boundary_scalings",
    "lcm_prev_timestep",
    "lcm_step_with_logprob",
    "make_lcm_scheduler",
    "make_policy_scheduler",
    "make_scheduler",
    "policy_step",
    "prev_timestep",
    "timestep_schedule",
]

SPACINGS: tuple[str, ...] = ("trailing", "leading", "linspace")
STEP_KINDS: tuple[str, ...] = ("ddim", "lcm")

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass
class StepOutput:
    """Result of one stochastic policy step (DDIM or LCM); every tensor is float32 (the caller casts)."""

    prev_sample: Tensor  # [B, ...] the action x_{t-1}
    pred_original_sample: Tensor  # [B, ...] x̂0_t (DDIM) or the LCM's denoised output: what rewards are computed on
    log_prob: Tensor  # [B] Gaussian log-density of prev_sample, averaged over non-batch elements
    std_dev: Tensor  # [B] sigma_t per sample


# --------------------------------------------------------------------------------------------- schedules


def _scheduler_config(scheduler_or_config: Any) -> dict:
    """The config dict of a diffusers scheduler, or a copy of a config mapping."""
    if isinstance(scheduler_or_config, Mapping):
        return dict(scheduler_or_config)
    if hasattr(scheduler_or_config, "config"):
        return dict(scheduler_or_config.config)
    raise TypeError(f"expected a diffusers scheduler or a config mapping, got {type(scheduler_or_config).__name__}")


def make_scheduler(
    scheduler_or_config: Any,
    spacing: str = "trailing",
    steps_offset: int | None = None,
) -> DDIMScheduler:
    """Build a DDIMScheduler from any diffusers scheduler (or its config) with a chosen timestep spacing.

    Few-step models ship other schedulers (SD-Turbo: EulerDiscreteScheduler, trailing spacing) but the policy
    is a DDIM step, so we reuse their beta schedule / prediction type and only swap the class and spacing.
    "leading" with ``steps_offset=1`` reproduces the reference's 50-step schedule 981..1. "linspace" ends at
    t = 0, whose step is deterministic, so ``ddim_step_with_logprob`` refuses that last step.

    ``clip_sample`` and ``set_alpha_to_one`` default to False when the source config does not state them:
    DDIM's own defaults (True) would silently clip latents to ±1 and make the scheduler disagree with our
    clamp-at-0 last step (see ``prev_timestep``).
    """
    if spacing not in SPACINGS:
        raise ValueError(f"timestep spacing must be one of {list(SPACINGS)}, got {spacing!r}")
    config = _scheduler_config(scheduler_or_config)
    overrides: dict[str, Any] = {"timestep_spacing": spacing}
    for key in ("clip_sample", "set_alpha_to_one"):
        if key not in config:
            overrides[key] = False
    if steps_offset is not None:
        if steps_offset < 0:
            raise ValueError(f"steps_offset must be >= 0, got {steps_offset}")
        overrides["steps_offset"] = int(steps_offset)
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config, **overrides)


def make_lcm_scheduler(scheduler_or_config: Any) -> LCMScheduler:
    """An LCMScheduler from any diffusers scheduler (or its config): the model's own when it ships one.

    The LCM schedule is set by ``original_inference_steps`` (the distillation grid), not by a spacing, so there
    is nothing to override.
    """
    from diffusers import LCMScheduler

    return LCMScheduler.from_config(_scheduler_config(scheduler_or_config))


def make_policy_scheduler(
    components: Any, spacing: str = "trailing", steps_offset: int | None = None
) -> DDIMScheduler | LCMScheduler:
    """The scheduler of the policy step for loaded ``components`` (a ``PolicyComponents``).

    ``step_kind == "ddim"``: ``make_scheduler(config, spacing, steps_offset)``. ``"lcm"``: ``make_lcm_scheduler``;
    ``spacing`` and ``steps_offset`` do not apply to LCM timesteps and are ignored.
    """
    kind = getattr(components, "step_kind", "ddim")
    if kind == "ddim":
        return make_scheduler(components.scheduler_config, spacing, steps_offset)
    if kind == "lcm":
        return make_lcm_scheduler(components.scheduler_config)
    raise ValueError(f"step kind must be one of {list(STEP_KINDS)}, got {kind!r}")


def _is_lcm(scheduler: Any) -> bool:
    from diffusers import LCMScheduler

    return isinstance(scheduler, LCMScheduler)


def timestep_schedule(scheduler: DDIMScheduler | LCMScheduler, num_steps: int) -> torch.LongTensor:
    """Set ``num_steps`` inference steps on ``scheduler`` (in place) and return its timesteps [T].

    In place on purpose: ``prev_timestep`` / ``ddim_step_with_logprob`` read ``num_inference_steps`` (and
    ``lcm_prev_timestep`` reads ``timesteps``) from the same scheduler, so the schedule and the step size can
    never disagree. For an LCMScheduler ``num_steps`` must not exceed ``original_inference_steps``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    limit = getattr(scheduler.config, "original_inference_steps", None) if _is_lcm(scheduler) else None
    if limit is not None and num_steps > limit:  # diffusers' own message speaks of img2img strength
        raise ValueError(f"algo.num_steps={num_steps}: an LCM's schedule has at most {limit} steps (the grid it was "
                         f"distilled on, original_inference_steps); train at T <= {limit}")
    scheduler.set_timesteps(num_steps)
    return scheduler.timesteps.clone().long()  # [T], descending


def check_training_schedule(timesteps: Tensor, step_kind: str, spacing: str, steps_offset: int | None) -> None:
    """Refuse a DDIM training schedule that reaches t = 0, before any sampling, naming the keys to change.

    Its last step would be deterministic (sigma = 0), so ``ddim_step_with_logprob`` could not give it a log-prob;
    without this check the run would fail only after loading the models and sampling a batch. The config check
    catches the spellings it can see; this one also covers a scheduler whose own ``steps_offset`` is 0.
    """
    if step_kind != "ddim" or int(timesteps[-1]) > 0:
        return
    shown = timesteps.tolist() if len(timesteps) <= 8 else [*timesteps[:3].tolist(), "...", *timesteps[-2:].tolist()]
    raise ValueError(
        f"the DDIM training schedule {shown} (model.spacing={spacing}, model.steps_offset={steps_offset}, "
        f"{len(timesteps)} steps) ends at t = 0, where the step is deterministic and has no log-prob: use "
        f"model.spacing=trailing (SD-Turbo's own), or leading with model.steps_offset=1 (the reference's 981..1)"
    )


def prev_timestep(scheduler: DDIMScheduler, timestep: int | Tensor) -> int | Tensor:
    """t - num_train_timesteps // num_inference_steps, clamped at 0.

    Clamping (instead of diffusers' "alpha = 1" when ``set_alpha_to_one=True``) keeps sigma > 0 at the last
    step, so the final action still has a finite log-prob. With ``set_alpha_to_one=False`` diffusers uses
    alphas_cumprod[0] there too, so both agree.
    """
    num_inference_steps = getattr(scheduler, "num_inference_steps", None)
    if num_inference_steps is None:
        raise ValueError(
            "scheduler.num_inference_steps is None: call timestep_schedule(scheduler, T) "
            "(or scheduler.set_timesteps(T)) before stepping"
        )
    step = scheduler.config.num_train_timesteps // num_inference_steps
    if isinstance(timestep, Tensor):
        return (timestep.long() - step).clamp(min=0)
    return max(int(timestep) - step, 0)


# ------------------------------------------------------------------------------------------------ pieces


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x; mean, std^2) averaged (not summed) over non-batch elements -> [B].

    The mean keeps log-probs O(1) whatever the latent size; clip ranges and learning rates are calibrated
    to this scale. ``std`` broadcasts against ``x`` (e.g. [B, 1, 1, 1]).
    """
    elementwise = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI  # [B, ...]
    return elementwise.mean(dim=tuple(range(1, x.ndim)))  # [B]


def _as_timesteps(timestep: int | Tensor, batch_size: int, device: torch.device) -> Tensor:
    """Normalise an int / 0-d / [B] timestep to a LongTensor [B] on ``device``."""
    t = torch.as_tensor(timestep, device=device)
    if t.is_floating_point():
        if not torch.equal(t, t.round()):
            raise ValueError(f"DDIM timesteps must be integers, got {t.tolist()}")
    t = t.long()
    if t.ndim == 0:
        return t.expand(batch_size)
    if t.ndim == 1 and t.shape[0] == batch_size:
        return t
    raise ValueError(
        f"timestep must be an int, a 0-d tensor or a [B={batch_size}] tensor, got shape {tuple(t.shape)}"
    )


def _check_step_inputs(
    config: Any, name: str, model_output: Tensor, sample: Tensor, prev_sample: Tensor | None
) -> None:
    """Shape and feature checks shared by every policy step."""
    if config.thresholding:
        raise NotImplementedError(f"dynamic thresholding is not supported by {name}")
    if model_output.shape != sample.shape:
        raise ValueError(f"model_output {tuple(model_output.shape)} and sample {tuple(sample.shape)} differ")
    if prev_sample is not None and prev_sample.shape != sample.shape:
        raise ValueError(f"prev_sample {tuple(prev_sample.shape)} and sample {tuple(sample.shape)} differ")


def _checked_timesteps(timestep: int | Tensor, batch_size: int, device: torch.device, num_train: int) -> Tensor:
    """Per-sample timesteps [B], validated against the training range (see ``sdpo.policy.checks``).

    Returned clamped into the range: under deferred checks the step runs on before the error is raised, and an
    out-of-range index would crash the CUDA context instead of raising this clear error.
    """
    t = _as_timesteps(timestep, batch_size, device)
    require_not((t < 0) | (t >= num_train), lambda: ValueError(f"timesteps {t.tolist()} outside [0, {num_train})"))
    return t.clamp(0, num_train - 1)


def _predict_x0_and_eps(
    prediction_type: str, model_output: Tensor, sample: Tensor, alpha_t: Tensor
) -> tuple[Tensor, Tensor]:
    """x̂0 and ε̂ from the network output, as in DDIMScheduler.step (formula 12 of the DDIM paper)."""
    beta_t = 1 - alpha_t
    if prediction_type == "epsilon":
        x0 = (sample - beta_t.sqrt() * model_output) / alpha_t.sqrt()
        eps = model_output
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - alpha_t.sqrt() * x0) / beta_t.sqrt()
    elif prediction_type == "v_prediction":
        x0 = alpha_t.sqrt() * sample - beta_t.sqrt() * model_output
        eps = alpha_t.sqrt() * model_output + beta_t.sqrt() * sample
    else:
        raise ValueError(
            f"prediction_type {prediction_type!r} must be one of 'epsilon', 'v_prediction', 'sample'"
        )
    return x0, eps


def _draw_noise(
    shape: torch.Size, device: torch.device, generator: torch.Generator | Sequence[torch.Generator] | None
) -> Tensor:
    """z ~ N(0, I) in float32 on ``device``; generated on the generator's device so seeds are portable."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=torch.float32)
    if isinstance(generator, torch.Generator):
        z = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
        return z.to(device)
    generators = list(generator)
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}")
    per_sample = [
        torch.randn(shape[1:], generator=g, device=g.device, dtype=torch.float32).to(device)
        for g in generators
    ]
    return torch.stack(per_sample)  # [B, ...]


def _noise(
    sample: Tensor, variance_noise: Tensor | None, generator: torch.Generator | Sequence[torch.Generator] | None
) -> Tensor:
    """The z of a sampled action: the caller's ``variance_noise`` (shape-checked), else a fresh draw."""
    if variance_noise is None:
        return _draw_noise(sample.shape, sample.device, generator)
    if variance_noise.shape != sample.shape:
        raise ValueError(f"variance_noise has shape {tuple(variance_noise.shape)}, the sample {tuple(sample.shape)}")
    if generator is not None:
        raise ValueError("pass either variance_noise or generator, not both")
    return variance_noise.to(device=sample.device, dtype=torch.float32)


# -------------------------------------------------------------------------------------------------- step


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: Tensor,
    timestep: int | Tensor,
    sample: Tensor,
    eta: float = 1.0,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    variance_noise: Tensor | None = None,
) -> StepOutput:
    """One stochastic DDIM step and the log-prob of its action.

    Sampling: leave ``prev_sample`` None and x_{t-1} = mu + sigma * z is drawn (z = ``variance_noise`` when given,
    as in diffusers, else drawn with ``generator``). Training: pass the recorded
    ``prev_sample`` to get its log-prob under the current ``model_output`` (gradients flow through mu only;
    the action is treated as a constant, as a policy gradient requires).

    ``timestep`` may be an int, a 0-d tensor or a [B] tensor: training micro-batches mix timesteps.
    All math is fp32 with autocast off, whatever the input dtype, because log-ratios are clipped at 1e-4.
    """
    if eta <= 0:
        raise ValueError(
            f"eta={eta}: a deterministic (or negative-eta) DDIM step has no log-prob; "
            "use eta > 0 (SDPO uses 1)"
        )
    config = scheduler.config
    _check_step_inputs(config, "ddim_step_with_logprob", model_output, sample, prev_sample)
    device = sample.device
    batch_size = sample.shape[0]
    bshape = (batch_size,) + (1,) * (sample.ndim - 1)  # broadcast per-sample scalars over [B, ...]

    with torch.autocast(device_type=device.type, enabled=False):
        t = _checked_timesteps(timestep, batch_size, device, config.num_train_timesteps)  # [B]
        # At t = 0 the prev timestep clamps to 0 as well, so ᾱ_prev = ᾱ_t and sigma = 0: the step is deterministic.
        require_not(t == 0, lambda: ValueError(
            "timestep 0 has sigma = 0 (prev timestep clamps to 0), so its action has no log-prob; "
            "use a schedule that stops above 0 ('trailing' or 'leading', not 'linspace')"
        ))
        t_prev = prev_timestep(scheduler, t)  # [B]

        alphas_cumprod = scheduler_tensor(scheduler, "alphas_cumprod", device, torch.float32)  # [num_train]
        alpha_t = alphas_cumprod[t].view(bshape)  # ᾱ_t
        alpha_prev = alphas_cumprod[t_prev].view(bshape)  # ᾱ_prev

        model_output = model_output.float()
        sample = sample.float()

        x0, eps = _predict_x0_and_eps(config.prediction_type, model_output, sample, alpha_t)
        if config.clip_sample:
            # Like diffusers' default (use_clipped_model_output=False): ε̂ is NOT re-derived after clipping.
            x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)

        # sigma_t = eta * sqrt((1 - ᾱ_prev) / (1 - ᾱ_t)) * sqrt(1 - ᾱ_t / ᾱ_prev)   (diffusers' _get_variance)
        variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
        std_dev = eta * variance.sqrt()  # [B, 1, ...]

        direction = (1 - alpha_prev - std_dev**2).clamp(min=0).sqrt() * eps
        mean = alpha_prev.sqrt() * x0 + direction  # [B, ...]

        if prev_sample is None:
            prev_sample = mean + std_dev * _noise(sample, variance_noise, generator)
        else:
            prev_sample = prev_sample.to(device=device, dtype=torch.float32)

        log_prob = gaussian_log_prob(prev_sample.detach(), mean, std_dev)  # [B]

    _check_finite(t, log_prob=log_prob, prev_sample=prev_sample)
    return StepOutput(
        prev_sample=prev_sample,
        pred_original_sample=x0,
        log_prob=log_prob,
        std_dev=std_dev.view(batch_size),
    )


def _check_finite(timesteps: Tensor, kind: str = "DDIM", **tensors: Tensor) -> None:
    """Fail loudly, naming the timestep(s), instead of letting a NaN poison the update silently."""
    for name, value in tensors.items():
        finite = torch.isfinite(value.detach()).view(value.shape[0], -1).all(dim=1)  # [B]

        def error(name: str = name, finite: Tensor = finite) -> FloatingPointError:
            bad = sorted(set(timesteps[~finite].tolist()))
            return FloatingPointError(f"non-finite {name} in {kind} step at timestep(s) {bad}")

        require_not(~finite, error)


# ------------------------------------------------------------------------------------------------ LCM step


def scheduler_tensor(scheduler: Any, name: str, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``scheduler.<name>`` (``alphas_cumprod``, ``timesteps``) on ``device`` in ``dtype``, copied once.

    diffusers keeps these on the CPU, and a copy from pageable host memory to a GPU waits for every kernel already
    queued: one host sync per policy step, in sampling and in every training micro-batch, which is what the deferred
    checks exist to avoid. The copy is kept on the scheduler and made again only when the tensor is replaced
    (``set_timesteps``) or changed in place.
    """
    source = getattr(scheduler, name)
    if source.device == torch.device(device) and source.dtype == dtype:
        return source
    cache = vars(scheduler).setdefault("_sdpo_device_copies", {})
    key = (name, str(device), dtype)
    kept = cache.get(key)
    if kept is None or kept[0] is not source or kept[1] != source._version:
        kept = cache[key] = (source, source._version, source.to(device=device, dtype=dtype))
    return kept[2]


def lcm_prev_timestep(scheduler: LCMScheduler, timestep: int | Tensor) -> int | Tensor:
    """The timestep after ``timestep`` in ``scheduler.timesteps``, or 0 after the last one.

    LCM timesteps are not equally spaced (e.g. 999, 759, 499, 259 for 4 steps), so the next one is looked up
    in the schedule, per sample for a [B] tensor. A timestep that is not in the schedule is an error. Ending at
    0 (not at "no noise") keeps σ = sqrt(1 - ᾱ_0) ≈ 0.03 > 0 at the last step, so it has a log-prob too.
    """
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError(
            "scheduler.num_inference_steps is None: call timestep_schedule(scheduler, T) "
            "(or scheduler.set_timesteps(T)) before stepping"
        )
    t = torch.as_tensor(timestep).long()
    schedule = scheduler_tensor(scheduler, "timesteps", t.device, torch.long)  # [T], descending
    match = t.reshape(-1, 1) == schedule.reshape(1, -1)  # [N, T]
    found = match.any(dim=1)  # [N]
    require_not(~found, lambda: ValueError(
        f"timestep(s) {sorted(set(t.reshape(-1)[~found].tolist()))} are not in the LCM schedule {schedule.tolist()}"
    ))
    following = torch.cat([schedule[1:], schedule.new_zeros(1)])  # [T]: the next timestep, 0 after the last
    prev = following[match.long().argmax(dim=1)].reshape(t.shape)
    return prev if isinstance(timestep, Tensor) else int(prev)


def lcm_boundary_scalings(scheduler: LCMScheduler, timestep: Tensor) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) per timestep, fp32: LCMScheduler.get_scalings_for_boundary_condition_discrete for a [B].

    c_skip = σ_d² / ((s·t)² + σ_d²), c_out = s·t / sqrt((s·t)² + σ_d²), σ_d = 0.5, s = timestep_scaling.
    """
    sigma_data = 0.5
    scaled = timestep.float() * scheduler.config.timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def lcm_step_with_logprob(
    scheduler: LCMScheduler,
    model_output: Tensor,
    timestep: int | Tensor,
    sample: Tensor,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    variance_noise: Tensor | None = None,
) -> StepOutput:
    """One LCM step as a Gaussian policy (RLCM) and the log-prob of its action.

    x̂0 from the prediction type; denoised = c_out·x̂0 + c_skip·x_t (the consistency boundary condition); the
    action re-noises it to the next timestep of the schedule: x_prev ~ N(sqrt(ᾱ_prev)·denoised, (1-ᾱ_prev) I).
    For the same noise this equals ``LCMScheduler.step`` on every step but the last, where diffusers returns
    ``denoised`` itself; here the last step re-noises to t = 0 instead (σ = sqrt(1-ᾱ_0) ≈ 0.03), so every step
    has a log-prob. The policy's final latent therefore carries that small noise; images for rewards are decoded
    from ``pred_original_sample`` (= denoised), exactly what diffusers' pipeline outputs.

    ``timestep`` may be an int, a 0-d tensor or a [B] tensor (each must be in ``scheduler.timesteps``). Pass the
    recorded ``prev_sample`` to score it (gradients flow through the mean only); ``variance_noise`` is the z of a
    sampled action, as for the DDIM step. fp32 with autocast off.
    """
    config = scheduler.config
    _check_step_inputs(config, "lcm_step_with_logprob", model_output, sample, prev_sample)
    device = sample.device
    batch_size = sample.shape[0]
    bshape = (batch_size,) + (1,) * (sample.ndim - 1)

    with torch.autocast(device_type=device.type, enabled=False):
        t = _checked_timesteps(timestep, batch_size, device, config.num_train_timesteps)  # [B]
        t_prev = lcm_prev_timestep(scheduler, t)  # [B]

        alphas_cumprod = scheduler_tensor(scheduler, "alphas_cumprod", device, torch.float32)
        alpha_t = alphas_cumprod[t].view(bshape)
        alpha_prev = alphas_cumprod[t_prev].view(bshape)
        c_skip, c_out = (c.view(bshape) for c in lcm_boundary_scalings(scheduler, t))

        model_output = model_output.float()
        sample = sample.float()
        x0, _ = _predict_x0_and_eps(config.prediction_type, model_output, sample, alpha_t)
        if config.clip_sample:
            x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)
        denoised = c_out * x0 + c_skip * sample

        mean = alpha_prev.sqrt() * denoised
        std_dev = (1 - alpha_prev).sqrt()  # [B, 1, ...]
        if prev_sample is None:
            prev_sample = mean + std_dev * _noise(sample, variance_noise, generator)
        else:
            prev_sample = prev_sample.to(device=device, dtype=torch.float32)
        log_prob = gaussian_log_prob(prev_sample.detach(), mean, std_dev)

    _check_finite(t, "LCM", log_prob=log_prob, prev_sample=prev_sample)
    return StepOutput(
        prev_sample=prev_sample,
        pred_original_sample=denoised,
        log_prob=log_prob,
        std_dev=std_dev.view(batch_size),
    )


# ------------------------------------------------------------------------------------------------ dispatch


def policy_step(
    step_kind: str,
    scheduler: DDIMScheduler | LCMScheduler,
    model_output: Tensor,
    timestep: int | Tensor,
    sample: Tensor,
    eta: float = 1.0,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    variance_noise: Tensor | None = None,
) -> StepOutput:
    """``ddim_step_with_logprob`` (step_kind "ddim", uses ``eta``) or ``lcm_step_with_logprob`` ("lcm", whose
    noise level is fixed by the schedule, so ``eta`` is ignored)."""
    if step_kind == "ddim":
        return ddim_step_with_logprob(scheduler, model_output, timestep, sample, eta=eta,
                                      prev_sample=prev_sample, generator=generator, variance_noise=variance_noise)
    if step_kind == "lcm":
        if not _is_lcm(scheduler):
            raise TypeError(f"the LCM step needs an LCMScheduler, got {type(scheduler).__name__}")
        return lcm_step_with_logprob(scheduler, model_output, timestep, sample, prev_sample=prev_sample,
                                     generator=generator, variance_noise=variance_noise)
    raise ValueError(f"step kind must be one of {list(STEP_KINDS)}, got {step_kind!r}")
