"""The stochastic DDIM policy step must equal diffusers' DDIMScheduler.step and be exact fp32 math."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from torch.utils._python_dispatch import TorchDispatchMode

from sdpo.policy.steps import (
    StepOutput,
    ddim_step_with_logprob,
    make_scheduler,
    prev_timestep,
    timestep_schedule,
)

SHAPE = (3, 4, 8, 8)  # [B, C, H, W], a tiny latent


def sd_turbo_like(**overrides) -> DDIMScheduler:
    kwargs = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
    )
    kwargs.update(overrides)
    return DDIMScheduler(**kwargs)


def scheduler_for(spacing: str, prediction_type: str = "epsilon", **overrides) -> DDIMScheduler:
    offset = 1 if spacing == "leading" else None
    return make_scheduler(sd_turbo_like(prediction_type=prediction_type, **overrides), spacing, offset)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ oracle


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing,num_steps", [("trailing", 4), ("leading", 50)])
def test_matches_diffusers_ddim_step(prediction_type: str, spacing: str, num_steps: int) -> None:
    ours = scheduler_for(spacing, prediction_type)
    ref = scheduler_for(spacing, prediction_type)
    timesteps = timestep_schedule(ours, num_steps)
    ref.set_timesteps(num_steps)
    eta = 1.0
    for k in (0, len(timesteps) // 2, len(timesteps) - 1):  # first, middle, last step
        t = timesteps[k]
        x = randn(*SHAPE, seed=10 + k)
        out = randn(*SHAPE, seed=20 + k)
        z = randn(*SHAPE, seed=30 + k)
        expected = ref.step(out, t, x, eta=eta, variance_noise=z)

        # sampling path: our generator draws the same z as torch.randn with the same seed
        gen = torch.Generator().manual_seed(30 + k)
        got = ddim_step_with_logprob(ours, out, t, x, eta=eta, generator=gen)
        scale = expected.prev_sample.abs().max().item()
        torch.testing.assert_close(
            got.prev_sample, expected.prev_sample, atol=1e-5 * max(scale, 1), rtol=1e-5
        )
        scale0 = expected.pred_original_sample.abs().max().item()
        torch.testing.assert_close(
            got.pred_original_sample, expected.pred_original_sample, atol=1e-5 * max(scale0, 1), rtol=1e-5
        )

        # the rollout's path: the same z handed over as diffusers' variance_noise gives diffusers' action
        given = ddim_step_with_logprob(ours, out, t, x, eta=eta, variance_noise=z)
        torch.testing.assert_close(given.prev_sample, expected.prev_sample, atol=1e-5 * max(scale, 1), rtol=1e-5)

        # scoring path: diffusers' action must get the log-prob that its noise z implies
        scored = ddim_step_with_logprob(ours, out, t, x, eta=eta, prev_sample=expected.prev_sample)
        # diffusers' own variance; a negative prev uses final_alpha_cumprod = ᾱ_0 (set_alpha_to_one=False)
        sigma = eta * math.sqrt(ref._get_variance(int(t), int(t) - 1000 // num_steps).item())
        torch.testing.assert_close(scored.std_dev, torch.full((SHAPE[0],), sigma), atol=1e-7, rtol=1e-5)
        implied = (-0.5 * z**2).mean(dim=(1, 2, 3)) - math.log(sigma) - 0.5 * math.log(2 * math.pi)
        # |x - mu| / sigma recovers z up to fp32 rounding of x (|x| ~ scale) divided by sigma
        tol = 1e-4 * max(scale, 1) / sigma
        torch.testing.assert_close(scored.log_prob, implied, atol=tol, rtol=1e-5)


def test_clip_sample_matches_diffusers() -> None:
    """With clip_sample, x̂0 is clamped but ε̂ is not re-derived — exactly diffusers' default."""
    ours = scheduler_for("trailing", clip_sample=True, clip_sample_range=0.5)
    ref = scheduler_for("trailing", clip_sample=True, clip_sample_range=0.5)
    timesteps = timestep_schedule(ours, 4)
    ref.set_timesteps(4)
    x, out, z = (randn(*SHAPE, seed=s) * 3 for s in (1, 2, 3))
    t = timesteps[1]
    expected = ref.step(out, t, x, eta=1.0, variance_noise=z / 3)
    got = ddim_step_with_logprob(ours, out, t, x, eta=1.0, prev_sample=expected.prev_sample)
    assert got.pred_original_sample.abs().max() <= 0.5
    torch.testing.assert_close(got.pred_original_sample, expected.pred_original_sample)
    sampled = ddim_step_with_logprob(ours, out, t, x, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sampled.prev_sample, expected.prev_sample, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------- log-prob values


def test_log_prob_by_hand() -> None:
    """Hand computation in float64 numpy, ᾱ from the betas; checks the mean-not-sum scale."""
    sched = scheduler_for("trailing")
    timestep_schedule(sched, 4)
    t, t_prev = 749, 499
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2  # scaled_linear
    abar = np.cumprod(1.0 - betas)
    a_t, a_p = abar[t], abar[t_prev]

    x = randn(2, 1, 2, 3, seed=0)
    eps = randn(2, 1, 2, 3, seed=1)
    action = randn(2, 1, 2, 3, seed=2)
    got = ddim_step_with_logprob(sched, eps, t, x, eta=0.7, prev_sample=action)

    xn, en, an = (v.double().numpy() for v in (x, eps, action))
    x0 = (xn - np.sqrt(1 - a_t) * en) / np.sqrt(a_t)
    sigma = 0.7 * np.sqrt((1 - a_p) / (1 - a_t)) * np.sqrt(1 - a_t / a_p)
    mu = np.sqrt(a_p) * x0 + np.sqrt(1 - a_p - sigma**2) * en
    dens = -((an - mu) ** 2) / (2 * sigma**2) - np.log(sigma) - 0.5 * np.log(2 * np.pi)
    expected = dens.reshape(2, -1).mean(axis=1)  # mean over the 6 latent elements, not sum

    assert got.log_prob.dtype == torch.float32 and got.log_prob.shape == (2,)
    np.testing.assert_allclose(got.log_prob.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.std_dev.numpy(), [sigma, sigma], rtol=1e-5)
    np.testing.assert_allclose(got.pred_original_sample.numpy(), x0, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got.log_prob.numpy(), dens.reshape(2, -1).sum(axis=1))


def test_scoring_reproduces_sampling_log_prob_exactly() -> None:
    sched = scheduler_for("leading")
    timesteps = timestep_schedule(sched, 50)
    x, out = randn(*SHAPE, seed=4), randn(*SHAPE, seed=5)
    for t in (timesteps[0], timesteps[-1]):
        sampled = ddim_step_with_logprob(sched, out, t, x, generator=torch.Generator().manual_seed(6))
        scored = ddim_step_with_logprob(sched, out, t, x, prev_sample=sampled.prev_sample)
        assert torch.equal(scored.log_prob, sampled.log_prob)
        assert torch.equal(scored.prev_sample, sampled.prev_sample)


def test_per_sample_timesteps_match_individual_steps() -> None:
    sched = scheduler_for("trailing")
    timesteps = timestep_schedule(sched, 4)
    t = timesteps[[0, 3, 1]]  # [B] mixed timesteps, as in a training micro-batch
    x, out, action = randn(*SHAPE, seed=7), randn(*SHAPE, seed=8), randn(*SHAPE, seed=9)
    batched = ddim_step_with_logprob(sched, out, t, x, prev_sample=action)
    for i in range(SHAPE[0]):
        one = slice(i, i + 1)
        single = ddim_step_with_logprob(sched, out[one], int(t[i]), x[one], prev_sample=action[one])
        torch.testing.assert_close(batched.log_prob[i : i + 1], single.log_prob, atol=0, rtol=0)
        torch.testing.assert_close(batched.std_dev[i : i + 1], single.std_dev, atol=0, rtol=0)
        torch.testing.assert_close(batched.pred_original_sample[i : i + 1], single.pred_original_sample)
    assert len(set(batched.std_dev.tolist())) == 3


def test_gradient_flows_through_mean_not_action() -> None:
    sched = scheduler_for("trailing")
    timesteps = timestep_schedule(sched, 4)
    out = randn(*SHAPE, seed=1).requires_grad_(True)
    x, action = randn(*SHAPE, seed=2), randn(*SHAPE, seed=3)
    res = ddim_step_with_logprob(sched, out, timesteps[0], x, prev_sample=action)
    res.log_prob.sum().backward()
    assert out.grad is not None and torch.isfinite(out.grad).all() and out.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("spacing,num_steps", [("trailing", 1), ("trailing", 4), ("leading", 50)])
def test_last_step_is_finite_with_positive_sigma(spacing: str, num_steps: int) -> None:
    sched = scheduler_for(spacing)
    timesteps = timestep_schedule(sched, num_steps)
    t_last = timesteps[-1]
    assert prev_timestep(sched, int(t_last)) == 0
    res = ddim_step_with_logprob(sched, randn(*SHAPE, seed=1), t_last, randn(*SHAPE, seed=2))
    assert (res.std_dev > 0).all()
    for v in (res.prev_sample, res.pred_original_sample, res.log_prob):
        assert torch.isfinite(v).all()


def test_one_step_schedule_clamps_prev_to_zero() -> None:
    sched = scheduler_for("trailing")
    assert timestep_schedule(sched, 1).tolist() == [999]
    assert prev_timestep(sched, 999) == 0
    assert prev_timestep(sched, torch.tensor([999, 10])).tolist() == [0, 0]
    res = ddim_step_with_logprob(sched, randn(*SHAPE, seed=1), 999, randn(*SHAPE, seed=2))
    assert (res.std_dev > 0).all() and torch.isfinite(res.log_prob).all()


def test_bf16_inputs_use_fp32_math() -> None:
    sched = scheduler_for("trailing")
    timesteps = timestep_schedule(sched, 4)
    x16, out16, act16 = (randn(*SHAPE, seed=s).bfloat16() for s in (1, 2, 3))
    for t in timesteps:
        low = ddim_step_with_logprob(sched, out16, t, x16, prev_sample=act16)
        full = ddim_step_with_logprob(sched, out16.float(), t, x16.float(), prev_sample=act16.float())
        for field in ("prev_sample", "pred_original_sample", "log_prob", "std_dev"):
            a, b = getattr(low, field), getattr(full, field)
            assert a.dtype == torch.float32, field
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        sampled = ddim_step_with_logprob(sched, out16, t, x16, generator=torch.Generator().manual_seed(0))
        assert sampled.prev_sample.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast must not leak into the step
        res = ddim_step_with_logprob(sched, out16, timesteps[0], x16, prev_sample=act16)
    assert res.log_prob.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- schedules


def test_schedules() -> None:
    trailing = make_scheduler(sd_turbo_like(), "trailing")
    assert timestep_schedule(trailing, 1).tolist() == [999]
    assert timestep_schedule(trailing, 4).tolist() == [999, 749, 499, 249]
    assert prev_timestep(trailing, 249) == 0 and prev_timestep(trailing, 749) == 499

    leading = make_scheduler(sd_turbo_like(), "leading", steps_offset=1)
    ts = timestep_schedule(leading, 50)
    assert ts.dtype == torch.long and len(ts) == 50 and ts[0] == 981 and ts[-1] == 1
    assert (ts[:-1] - ts[1:] == 20).all()

    linspace = make_scheduler(sd_turbo_like(), "linspace")
    assert timestep_schedule(linspace, 2).tolist() == [999, 0]
    res = ddim_step_with_logprob(linspace, randn(*SHAPE, seed=1), 999, randn(*SHAPE, seed=2))
    assert torch.isfinite(res.log_prob).all()
    with pytest.raises(ValueError, match="timestep 0"):  # linspace ends at t=0: sigma = 0, no log-prob
        ddim_step_with_logprob(linspace, randn(*SHAPE, seed=1), 0, randn(*SHAPE, seed=2))


def test_make_scheduler_from_euler_and_dict() -> None:
    euler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",
        steps_offset=1,
    )
    ddim = make_scheduler(euler, "leading")
    assert isinstance(ddim, DDIMScheduler)
    assert ddim.config.timestep_spacing == "leading" and ddim.config.steps_offset == 1
    assert ddim.config.clip_sample is False and ddim.config.set_alpha_to_one is False
    torch.testing.assert_close(ddim.alphas_cumprod, euler.alphas_cumprod)
    assert euler.config.timestep_spacing == "trailing"  # source untouched

    from_dict = make_scheduler(dict(sd_turbo_like().config), "trailing", steps_offset=0)
    assert from_dict.config.steps_offset == 0 and from_dict.config.timestep_spacing == "trailing"

    with pytest.raises(ValueError, match="trailing"):
        make_scheduler(euler, "karras")


# ------------------------------------------------------------------------------------------------ errors


def test_errors() -> None:
    sched = scheduler_for("trailing")
    x, out = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    with pytest.raises(ValueError, match="set_timesteps"):
        prev_timestep(sched, 999)
    timesteps = timestep_schedule(sched, 4)
    with pytest.raises(ValueError, match="eta > 0"):
        ddim_step_with_logprob(sched, out, timesteps[0], x, eta=0.0)

    thresh = scheduler_for("trailing", thresholding=True)
    timestep_schedule(thresh, 4)
    with pytest.raises(NotImplementedError):
        ddim_step_with_logprob(thresh, out, 999, x)

    bad = out.clone()
    bad[1, 0, 0, 0] = float("nan")
    t = torch.tensor([999, 499, 249])
    with pytest.raises(FloatingPointError, match=r"\[499\]"):
        ddim_step_with_logprob(sched, bad, t, x)

    with pytest.raises(ValueError, match="timestep"):
        ddim_step_with_logprob(sched, out, torch.tensor([999, 749]), x)

    with pytest.raises(ValueError, match=r"variance_noise has shape \(3, 4, 4, 4\), the sample \(3, 4, 8, 8\)"):
        ddim_step_with_logprob(sched, out, timesteps[0], x, variance_noise=randn(3, 4, 4, 4, seed=3))
    with pytest.raises(ValueError, match="either variance_noise or generator"):
        ddim_step_with_logprob(sched, out, timesteps[0], x, variance_noise=randn(*SHAPE, seed=3),
                               generator=torch.Generator())


def test_step_output_fields() -> None:
    sched = scheduler_for("trailing")
    timestep_schedule(sched, 2)
    res = ddim_step_with_logprob(sched, randn(*SHAPE, seed=1), torch.tensor(999), randn(*SHAPE, seed=2))
    assert isinstance(res, StepOutput)
    assert res.prev_sample.shape == SHAPE and res.pred_original_sample.shape == SHAPE
    assert res.log_prob.shape == (SHAPE[0],) and res.std_dev.shape == (SHAPE[0],)


def test_deferred_checks_raise_the_same_errors_once_at_the_end() -> None:
    """Inside ``deferred_checks`` the steps queue their checks (no host sync per call); the block's end raises the
    first failure, with the message the immediate check gives."""
    from sdpo.policy.checks import deferred_checks

    sched = scheduler_for("trailing")
    timesteps = timestep_schedule(sched, 4)
    x, out = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    bad = out.clone()
    bad[1, 0, 0, 0] = float("nan")
    reached = []
    with pytest.raises(FloatingPointError, match=r"non-finite log_prob in DDIM step at timestep\(s\) \[499\]"):
        with deferred_checks():
            good = ddim_step_with_logprob(sched, out, timesteps[0], x)
            ddim_step_with_logprob(sched, bad, torch.tensor([999, 499, 249]), x)  # queued, not raised here
            ddim_step_with_logprob(sched, out, torch.tensor([999, -5, 249]), x)  # a later failure: not the one
            reached.append(True)
    assert reached == [True]
    with pytest.raises(ValueError, match=r"timesteps \[999, -5, 249\] outside \[0, 1000\)"):
        with deferred_checks():
            ddim_step_with_logprob(sched, out, torch.tensor([999, -5, 249]), x)  # clamped inside, then raised
    with deferred_checks():  # nothing fails: same numbers as outside the block
        again = ddim_step_with_logprob(sched, out, timesteps[0], x, prev_sample=good.prev_sample)
    torch.testing.assert_close(again.log_prob, good.log_prob, rtol=0, atol=0)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_verdict_read_later_names_the_first_failure(device) -> None:
    """``collected_checks`` queues without evaluating; a ``Verdict`` (on CUDA: flags copied to pinned memory
    without a wait) later gives the first queued failure, and None when every check passed. Flags written after
    the verdict was made do not change it."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from sdpo.policy.checks import Verdict, collected_checks

    sched = scheduler_for("trailing")
    timestep_schedule(sched, 4)
    x, out = randn(*SHAPE, seed=1).to(device), randn(*SHAPE, seed=2).to(device)
    bad = out.clone()
    bad[1, 0, 0, 0] = float("nan")
    with collected_checks() as checks:
        ddim_step_with_logprob(sched, out, torch.tensor([999, 749, 249], device=device), x)
        ddim_step_with_logprob(sched, bad, torch.tensor([999, 499, 249], device=device), x)
        ddim_step_with_logprob(sched, bad, torch.tensor([999, 249, 249], device=device), x)
    verdict = Verdict(checks)
    checks[0][0].fill_(True)  # the flags are the verdict's copies: later writes do not reach it
    error = verdict.first_failure()
    assert isinstance(error, FloatingPointError) and "[499]" in str(error)
    with collected_checks() as fine:
        ddim_step_with_logprob(sched, out, torch.tensor([999, 749, 249], device=device), x)
    assert len(fine) > 0 and Verdict(fine).first_failure() is None
    assert Verdict([]).first_failure() is None


class CopiesOf(TorchDispatchMode):
    """Counts the copies (``aten._to_copy``) a block makes of ``tensor``."""

    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__()
        self.tensor, self.count = tensor, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0] is self.tensor:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_the_schedule_is_copied_once_not_on_every_step() -> None:
    """diffusers keeps alphas_cumprod on the CPU; on a GPU each step's copy waited for every queued kernel (a host
    sync per sampling step and training micro-batch). Here the copy is a dtype change, which the CPU can count."""
    sched = scheduler_for("trailing")
    timesteps = timestep_schedule(sched, 4)
    sched.alphas_cumprod = sched.alphas_cumprod.double()  # a copy to fp32 then happens on the CPU too
    x, out = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    with CopiesOf(sched.alphas_cumprod) as copies:
        first = ddim_step_with_logprob(sched, out, timesteps[0], x, generator=torch.Generator().manual_seed(3))
        again = ddim_step_with_logprob(sched, out, timesteps[1], x, prev_sample=first.prev_sample)
    assert copies.count == 1 and torch.isfinite(again.log_prob).all()
    sched.alphas_cumprod = sched.alphas_cumprod * 1.0  # replaced: copied again, with its new values
    with CopiesOf(sched.alphas_cumprod) as copies:
        ddim_step_with_logprob(sched, out, timesteps[0], x, prev_sample=first.prev_sample)
    assert copies.count == 1
    sched.alphas_cumprod.mul_(1.0)  # changed in place: copied again
    with CopiesOf(sched.alphas_cumprod) as copies:
        ddim_step_with_logprob(sched, out, timesteps[0], x, prev_sample=first.prev_sample)
    assert copies.count == 1
