"""Pair rollouts keep both states and share x_T; dense scoring decodes only what it queries."""

from __future__ import annotations

import pytest
import torch

from sdpo.policy.conditioning import decode_latents, encode_prompts
from sdpo.policy.loading import TinySpec, ensure_tiny_pipeline, load_components
from sdpo.policy.rollout import PairTrajectories, RolloutNoise, sample_pair_chunks, transition_log_prob
from sdpo.policy.steps import make_scheduler, timestep_schedule
from sdpo.rewards import RewardModel
from sdpo.scoring import score_pairs

PROMPTS = ["cat", "dog", "red cat"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    folder = ensure_tiny_pipeline(tmp_path_factory.mktemp("c"), TinySpec(latent_size=8, words=["cat", "dog", "red"]))
    parts = load_components(str(folder))
    scheduler = make_scheduler(parts.scheduler_config, "trailing")
    return parts, scheduler


def pair_generators(seed, count=None):
    """One noise generator per pair (default: per prompt), as the module seeds them (one per global pair index)."""
    return [torch.Generator().manual_seed(1000 * seed + pair) for pair in range(count or len(PROMPTS))]


def rollout(pipeline, num_steps=4, seed=0, unet_batch_size=None, on_step=None):
    parts, scheduler = pipeline
    timesteps = timestep_schedule(scheduler, num_steps)
    embeds = encode_prompts(parts, PROMPTS)
    return PairTrajectories.concat(sample_pair_chunks(parts.unet, scheduler, PROMPTS, embeds, timesteps, (4, 8, 8),
                                                      1.0, pair_generators(seed),
                                                      unet_batch_size=unet_batch_size, on_step=on_step))


def test_pairs_share_start_and_differ_after(pipeline):
    traj = rollout(pipeline)
    assert traj.latents.shape == (3, 2, 5, 4, 8, 8)
    assert traj.x0_latents.shape == (3, 2, 4, 4, 8, 8) and traj.log_probs.shape == (3, 2, 4)
    assert torch.equal(traj.latents[:, 0, 0], traj.latents[:, 1, 0])  # shared x_T
    assert torch.allclose(traj.x0_latents[:, 0, 0], traj.x0_latents[:, 1, 0])  # so the 1-step x̂0 is shared
    assert not torch.allclose(traj.latents[:, 0, 1], traj.latents[:, 1, 1])  # per-step noise differs
    assert not torch.allclose(traj.latents[0, 0, 0], traj.latents[1, 0, 0])  # prompts get different x_T
    assert torch.isfinite(traj.log_probs).all()


def test_same_seed_same_rollout(pipeline):
    a, b = rollout(pipeline, seed=3), rollout(pipeline, seed=3)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)


def test_unet_batch_size_is_a_speed_knob_only(pipeline):
    """algo.sample_batch_size splits the UNet calls, never the noise stream: 1, 2 or all 3 prompts per call give
    the same trajectories (up to the UNet's batch-size-dependent rounding)."""
    whole = rollout(pipeline, seed=5)
    for size in (1, 2):
        split = rollout(pipeline, seed=5, unet_batch_size=size)
        torch.testing.assert_close(split.latents, whole.latents, rtol=0, atol=1e-5)
        torch.testing.assert_close(split.log_probs, whole.log_probs, rtol=0, atol=1e-5)
    assert not torch.allclose(rollout(pipeline, seed=6).latents, whole.latents, atol=1e-3)  # the seed does matter


@pytest.mark.parametrize("unet_batch_size,calls", [(None, 4), (2, 8), (1, 12)])
def test_on_step_ticks_once_per_unet_call(pipeline, unet_batch_size, calls):
    """The sampling bar's tick (``on_step``): once per UNet call, T = 4 for each chunk of the 3 prompts."""
    ticks = []
    rollout(pipeline, unet_batch_size=unet_batch_size, on_step=lambda: ticks.append(1))
    assert len(ticks) == calls


def test_a_pairs_noise_comes_from_its_own_generator_only():
    """Pair p's x_T and z are its generator's stream (x_T, then both trajectories' z of step 0, 1, ...), whatever
    the other pairs are and whichever chunk asks: this is what lets a rank draw only its own pairs' noise."""
    shape = (4, 8, 8)
    whole = RolloutNoise(pair_generators(4, 6), shape, "cpu")
    mine = RolloutNoise(pair_generators(4, 6)[2:5], shape, "cpu")  # a middle rank's pairs 2-4
    assert torch.equal(mine.start, whole.start[2:5])
    for step in range(3):
        whole_rows = torch.cat([whole.step(step, slice(0, 4)), whole.step(step, slice(4, 6))])  # two chunks
        assert torch.equal(mine.step(step, slice(0, 3)), whole_rows[4:10])
    own = pair_generators(4, 1)[0]
    by_hand = [torch.randn(shape, generator=own), torch.randn((2, *shape), generator=own)]
    first = RolloutNoise(pair_generators(4, 1), shape, "cpu")
    assert torch.equal(first.start[0], by_hand[0]) and torch.equal(first.step(0, slice(0, 1)), by_hand[1])
    assert not torch.equal(whole.start[0], whole.start[1])


def test_noise_steps_are_drawn_once_and_in_order():
    noise = RolloutNoise(pair_generators(0, 2), (4, 8, 8), "cpu")
    with pytest.raises(RuntimeError, match="pair 0 has drawn 0 steps; asked for step 1"):
        noise.step(1, slice(0, 2))
    noise.step(0, slice(0, 1))
    with pytest.raises(RuntimeError, match="pair 0 has drawn 1 steps; asked for step 0"):
        noise.step(0, slice(0, 2))


def test_one_generator_per_prompt_is_required(pipeline):
    parts, scheduler = pipeline
    with pytest.raises(ValueError, match="one noise generator per prompt: 2 for 3 prompts"):
        list(sample_pair_chunks(parts.unet, scheduler, PROMPTS, encode_prompts(parts, PROMPTS),
                                timestep_schedule(scheduler, 2), (4, 8, 8), 1.0, pair_generators(0, 2)))


def test_recorded_log_probs_are_reproduced_per_transition(pipeline):
    """Recomputing every transition one sample at a time gives the sampling-time log-prob (fp32)."""
    parts, scheduler = pipeline
    traj = rollout(pipeline)
    for step in range(traj.num_steps):
        x = traj.latents[:, :, step].flatten(0, 1)
        nxt = traj.latents[:, :, step + 1].flatten(0, 1)
        t = traj.timesteps[step].expand(x.shape[0])
        emb = traj.cond.repeat_pairs()
        with torch.no_grad():
            lp = transition_log_prob(parts.unet, scheduler, x, t, nxt, emb, 1.0)
        assert (lp - traj.log_probs[:, :, step].flatten()).abs().max() < 1e-5


class CountingReward:
    """Brightness that records every image it is asked to score."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images, prompts):
        assert len(prompts) == images.shape[0]
        self.calls += images.shape[0]
        return images.mean(dim=(1, 2, 3))


@pytest.mark.parametrize(("strategy", "per_traj"), [("argmin", 3), ("uniform", 3), ("all", 4)])
def test_scoring_queries_only_the_plan(pipeline, strategy, per_traj):
    parts, _ = pipeline
    traj = rollout(pipeline)
    reward = CountingReward()
    scored = score_pairs(traj, parts.vae, parts.latent_scale, reward, strategy, 1, False,
                         torch.Generator().manual_seed(0), batch_size=4)
    pairs = traj.num_pairs
    expected = pairs * 2 * per_traj - pairs  # the shared first step is scored once per pair
    assert scored.num_queries == expected == reward.calls
    assert scored.dense.shape == (pairs, 2, 4)
    # exact at the first and last step: equal to scoring the decoded x̂0 directly
    x0 = traj.x0_latents
    direct_last = decode_latents(parts.vae, x0[:, :, -1].flatten(0, 1), parts.latent_scale).mean(dim=(1, 2, 3))
    assert torch.allclose(scored.dense[:, :, -1].flatten(), direct_last, atol=1e-6)
    direct_first = decode_latents(parts.vae, x0[:, 0, 0], parts.latent_scale).mean(dim=(1, 2, 3))
    assert torch.allclose(scored.dense[:, 0, 0], direct_first, atol=1e-6)
    assert torch.equal(scored.dense[:, 0, 0], scored.dense[:, 1, 0])
    assert scored.first_images.shape == (pairs, 3, 16, 16) and scored.last_images.shape == (pairs, 2, 3, 16, 16)


def test_two_step_schedule_is_all_exact(pipeline):
    parts, _ = pipeline
    traj = rollout(pipeline, num_steps=2)
    reward = CountingReward()
    scored = score_pairs(traj, parts.vae, parts.latent_scale, reward, "argmin", 1, False, None, batch_size=8)
    assert scored.num_queries == traj.num_pairs * 3  # first (shared) + last of a and b


def test_a_nan_in_the_rollout_stops_it_and_names_the_first_timestep(pipeline, tmp_path):
    """The rollout defers the steps' NaN checks to its end (one host sync): the error still names where it arose."""
    parts, scheduler = pipeline
    timesteps = timestep_schedule(scheduler, 4)
    saved = parts.unet.conv_out.bias.detach().clone()
    try:
        with torch.no_grad():
            parts.unet.conv_out.bias[0] = float("nan")
        with pytest.raises(FloatingPointError, match=rf"timestep\(s\) \[{int(timesteps[0])}\]"):
            list(sample_pair_chunks(parts.unet, scheduler, PROMPTS, encode_prompts(parts, PROMPTS), timesteps,
                                    (4, 8, 8), 1.0, pair_generators(0)))
    finally:
        with torch.no_grad():
            parts.unet.conv_out.bias.copy_(saved)


class DtypeReward(RewardModel):
    """Brightness computed by a tiny fp32 layer, recording the dtype that layer's output had."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.dtypes: set[torch.dtype] = set()

    def score(self, images, prompts):
        out = self.layer(images.mean(dim=(2, 3)))
        self.dtypes.add(out.dtype)
        return out.squeeze(1).float()


def test_scoring_runs_the_frozen_models_in_their_own_dtype_under_autocast(pipeline):
    """Under the policy's bf16 autocast, the fp32 VAE (a force_upcast VAE under 16-mixed, say) and an fp32 reward
    still compute in fp32: the same scores as outside autocast, bit for bit."""
    parts, _ = pipeline
    traj = rollout(pipeline, num_steps=2)
    assert next(parts.vae.parameters()).dtype == torch.float32
    last_conv = [m for m in parts.vae.decoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    vae_dtypes: set[torch.dtype] = set()
    handle = last_conv.register_forward_hook(lambda m, i, out: vae_dtypes.add(out.dtype))
    reward = DtypeReward()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert last_conv(torch.zeros(1, last_conv.in_channels, 4, 4)).dtype == torch.bfloat16  # autocast is on
            vae_dtypes.clear()
            mixed = score_pairs(traj, parts.vae, parts.latent_scale, reward, "argmin", 1, False, None, batch_size=8)
    finally:
        handle.remove()
    plain = score_pairs(traj, parts.vae, parts.latent_scale, reward, "argmin", 1, False, None, batch_size=8)
    assert vae_dtypes == {torch.float32} and reward.dtypes == {torch.float32}
    assert torch.equal(mixed.dense, plain.dense) and torch.equal(mixed.first_images, plain.first_images)
