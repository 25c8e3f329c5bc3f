"""SDXL and LCM support: tiny stand-ins through the real loading path, conditioning, the LCM policy step, rollouts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DDIMScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdpo.policy.conditioning import encode_prompts, guidance_scale_embedding
from sdpo.policy.loading import (
    ModelNotAvailableError,
    TinySpec,
    build_tiny_pipeline,
    ensure_tiny_pipeline,
    load_components,
)
from sdpo.policy.rollout import PairTrajectories, sample_pair_chunks, transition_log_prob
from sdpo.policy.steps import (
    lcm_boundary_scalings,
    lcm_prev_timestep,
    lcm_step_with_logprob,
    make_lcm_scheduler,
    make_policy_scheduler,
    policy_step,
    timestep_schedule,
)
from tests.conftest import FAST, compose

WORDS = ["cat", "dog", "red"]
PROMPTS = ["cat", "dog", "red cat"]
SHAPE = (3, 4, 8, 8)


def spec(arch: str, **kw) -> TinySpec:
    return TinySpec(latent_size=8, words=WORDS, arch=arch, **kw)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-archs")
    return {arch: ensure_tiny_pipeline(root, spec(arch)) for arch in ("sd", "sdxl", "lcm")}


@pytest.fixture(scope="module")
def parts(tiny_dir):
    return {arch: load_components(str(folder)) for arch, folder in tiny_dir.items()}


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("arch", ["sd", "sdxl", "lcm"])
def test_each_tiny_arch_loads_through_the_real_path(arch, tiny_dir, parts):
    folder, c = tiny_dir[arch], parts[arch]
    index = json.loads((folder / "model_index.json").read_text())
    assert isinstance(c.unet, UNet2DConditionModel) and isinstance(c.vae, AutoencoderTiny)
    assert isinstance(c.text_encoder, CLIPTextModel) and isinstance(c.tokenizer, CLIPTokenizer)
    frozen = [c.vae, c.text_encoder] + ([c.text_encoder_2] if c.text_encoder_2 is not None else [])
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    if arch == "sdxl":
        assert isinstance(c.text_encoder_2, CLIPTextModelWithProjection) and isinstance(c.tokenizer_2, CLIPTokenizer)
        assert c.tokenizer_2.pad_token == "!"  # SDXL's second tokenizer pads with "!"
        cfg = c.unet.config
        assert cfg.addition_embed_type == "text_time"
        assert cfg.cross_attention_dim == c.text_encoder.config.hidden_size + c.text_encoder_2.config.hidden_size
        assert cfg.projection_class_embeddings_input_dim == (
            c.text_encoder_2.config.projection_dim + 6 * cfg.addition_time_embed_dim
        )
        assert "text_encoder_2" in index and c.is_sdxl
    else:
        assert c.text_encoder_2 is None and c.tokenizer_2 is None and not c.is_sdxl
    assert c.step_kind == ("lcm" if arch == "lcm" else "ddim")
    assert (c.unet.config.time_cond_proj_dim is not None) == (arch == "lcm")
    assert c.scheduler_config["_class_name"] == index["scheduler"][1]
    scheduler = make_policy_scheduler(c, "trailing")
    assert isinstance(scheduler, LCMScheduler if arch == "lcm" else DDIMScheduler)
    assert c.vae_scale_factor == 2 and c.native_resolution == 16 and c.latent_size(32) == 16


def test_sd_cache_key_is_unchanged_and_archs_differ():
    """The default's cache folder (and so its weights) must not move when fields are added to TinySpec."""
    assert TinySpec(latent_size=8, words=WORDS).key() == "9b135f30aecd"  # the key before arch existed
    keys = {spec(a).key() for a in ("sd", "sdxl", "lcm")}
    assert len(keys) == 3
    assert spec("sdxl", text_hidden_2=16).key() != spec("sdxl").key()


def test_detects_sdxl_without_model_index(tmp_path):
    """Folders built before model_index.json was written (old caches, hand-made copies) still load."""
    folder = build_tiny_pipeline(tmp_path / "x", spec("sdxl"))
    (folder / "model_index.json").unlink()
    c = load_components(str(folder))
    assert c.is_sdxl and c.step_kind == "ddim"


def test_step_kind_override_and_validation(tiny_dir):
    c = load_components(str(tiny_dir["sd"]), step_kind="lcm")  # e.g. a base model with an LCM-LoRA fused in
    assert c.step_kind == "lcm" and isinstance(make_policy_scheduler(c), LCMScheduler)
    with pytest.raises(ValueError, match="step_kind"):
        load_components(str(tiny_dir["sd"]), step_kind="euler")


def _save_kl_vae(directory, force_upcast: bool):
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, force_upcast=force_upcast)
    vae.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("force_upcast", [True, False])
def test_vae_source_and_fp16_upcast(tmp_path, tiny_dir, force_upcast):
    vae_dir = _save_kl_vae(tmp_path / "vae", force_upcast)
    c = load_components(str(tiny_dir["sdxl"]), weight_dtype="fp16", vae_source=str(vae_dir))
    assert isinstance(c.vae, AutoencoderKL)
    assert next(c.vae.parameters()).dtype == (torch.float32 if force_upcast else torch.float16)
    assert next(c.text_encoder_2.parameters()).dtype == torch.float16
    assert next(c.unet.parameters()).dtype == torch.float32  # trainable: stays fp32
    bf16 = load_components(str(tiny_dir["sdxl"]), weight_dtype="bf16", vae_source=str(vae_dir))
    assert next(bf16.vae.parameters()).dtype == torch.bfloat16  # only fp16 overflows
    other = load_components(str(tiny_dir["sdxl"]), vae_source=str(tiny_dir["sd"]))  # a pipeline folder's vae/
    assert isinstance(other.vae, AutoencoderTiny)


def test_missing_vae_source_names_the_fix(tiny_dir):
    with pytest.raises(ModelNotAvailableError, match="model.vae_source") as info:
        load_components(str(tiny_dir["sdxl"]), vae_source="no-such-org/no-such-vae", local_files_only=True)
    assert "hf download no-such-org/no-such-vae" in str(info.value)


# ------------------------------------------------------------------------------------------- conditioning


def test_sdxl_conditioning_matches_the_diffusers_pipeline(parts):
    c = parts["sdxl"]
    cond = encode_prompts(c, PROMPTS, image_size=16)
    d1, d2 = c.text_encoder.config.hidden_size, c.text_encoder_2.config.hidden_size
    assert cond.hidden_states.shape == (3, c.tokenizer.model_max_length, d1 + d2)
    assert cond.added["text_embeds"].shape == (3, c.text_encoder_2.config.projection_dim)
    assert cond.added["time_ids"].tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 3
    assert cond.timestep_cond is None

    pipe = StableDiffusionXLPipeline(
        vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2, tokenizer=c.tokenizer,
        tokenizer_2=c.tokenizer_2, unet=c.unet, scheduler=DDIMScheduler.from_config(c.scheduler_config),
    )
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"), do_classifier_free_guidance=False)
    time_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32,
                                      text_encoder_projection_dim=c.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(cond.hidden_states, embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.added["text_embeds"], pooled, rtol=0, atol=0)
    torch.testing.assert_close(cond.added["time_ids"], time_ids.expand(3, 6), rtol=0, atol=0)

    out = c.unet(randn(*SHAPE, seed=0), torch.tensor([999, 500, 20]), **cond.unet_kwargs()).sample
    assert out.shape == SHAPE and torch.isfinite(out).all()
    # the time ids and pooled embeds reach the UNet
    other = encode_prompts(c, PROMPTS, image_size=32)
    out_32 = c.unet(randn(*SHAPE, seed=0), torch.tensor([999, 500, 20]), **other.unet_kwargs()).sample
    assert not torch.allclose(out, out_32)
    # default image size: the UNet's native one
    assert encode_prompts(c, PROMPTS).added["time_ids"][0, 0] == c.native_resolution


def test_lcm_guidance_embedding_matches_the_pipeline(parts):
    w = torch.tensor([7.0, 0.0, 3.5])
    for dim in (32, 33, 256):
        ours = guidance_scale_embedding(w, dim)
        ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    c = parts["lcm"]
    cond = encode_prompts(c, PROMPTS, guidance_scale=8.0)
    expected = guidance_scale_embedding(torch.full((3,), 7.0), c.unet.config.time_cond_proj_dim)
    torch.testing.assert_close(cond.timestep_cond, expected, rtol=0, atol=0)  # w = guidance_scale - 1
    assert cond.hidden_states.shape == (3, c.tokenizer.model_max_length, c.text_encoder.config.hidden_size)
    out = c.unet(randn(*SHAPE, seed=0), torch.tensor([999, 759, 259]), **cond.unet_kwargs()).sample
    other = c.unet(randn(*SHAPE, seed=0), torch.tensor([999, 759, 259]),
                   **encode_prompts(c, PROMPTS, guidance_scale=2.0).unet_kwargs()).sample
    assert not torch.allclose(out, other)  # the guidance embedding reaches the UNet


def test_guidance_scale_must_match_the_unet(parts):
    with pytest.raises(ValueError, match="model.guidance_scale"):
        encode_prompts(parts["lcm"], PROMPTS)  # an LCM UNet needs w
    with pytest.raises(ValueError, match="without classifier-free guidance"):
        encode_prompts(parts["sd"], PROMPTS, guidance_scale=7.5)  # SDPO has no CFG to apply it to
    assert encode_prompts(parts["sd"], PROMPTS, guidance_scale=1.0).timestep_cond is None


# ---------------------------------------------------------------------------------------------- LCM step


def lcm_scheduler(prediction_type: str = "epsilon") -> LCMScheduler:
    return LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        original_inference_steps=50, prediction_type=prediction_type, set_alpha_to_one=True)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_lcm_step_matches_diffusers(prediction_type):
    ours, ref = lcm_scheduler(prediction_type), lcm_scheduler(prediction_type)
    timesteps = timestep_schedule(ours, 4)
    assert timesteps.tolist() == [999, 759, 499, 259]  # not equally spaced
    for k, t in enumerate(timesteps):
        x, out = randn(*SHAPE, seed=10 + k), randn(*SHAPE, seed=20 + k)
        ref.set_timesteps(4)  # resets the step index; diffusers finds it from t
        expected = ref.step(out, t, x, generator=torch.Generator().manual_seed(30 + k))
        got = lcm_step_with_logprob(ours, out, t, x, generator=torch.Generator().manual_seed(30 + k))
        torch.testing.assert_close(got.pred_original_sample, expected.denoised, rtol=1e-6, atol=1e-6)
        # the per-sample boundary scalings equal diffusers' own
        c_skip, c_out = ref.get_scalings_for_boundary_condition_discrete(t)
        ours_skip, ours_out = lcm_boundary_scalings(ours, t.expand(2))
        torch.testing.assert_close(ours_skip, torch.as_tensor(c_skip).float().expand(2), rtol=0, atol=0)
        torch.testing.assert_close(ours_out, torch.as_tensor(c_out).float().expand(2), rtol=0, atol=0)
        t_prev = int(timesteps[k + 1]) if k + 1 < len(timesteps) else 0
        alpha_prev = ref.alphas_cumprod[t_prev]
        sigma = math.sqrt(1 - float(alpha_prev))
        torch.testing.assert_close(got.std_dev, torch.full((SHAPE[0],), sigma), rtol=1e-6, atol=0)
        z = randn(*SHAPE, seed=30 + k)
        if k + 1 < len(timesteps):  # diffusers re-noises with the same z
            torch.testing.assert_close(got.prev_sample, expected.prev_sample, rtol=1e-5, atol=1e-5)
        else:  # diffusers returns `denoised`; the policy re-noises to t = 0 (σ ≈ 0.03) so the step has a log-prob
            assert torch.equal(expected.prev_sample, expected.denoised)
            assert 0.02 < sigma < 0.04
            torch.testing.assert_close(got.prev_sample, alpha_prev.sqrt() * expected.denoised + sigma * z,
                                       rtol=1e-5, atol=1e-5)
        assert torch.isfinite(got.log_prob).all()
        # log-prob by hand: the noise z implies it exactly
        implied = (-0.5 * z**2).mean(dim=(1, 2, 3)) - math.log(sigma) - 0.5 * math.log(2 * math.pi)
        torch.testing.assert_close(got.log_prob, implied, rtol=1e-5, atol=1e-4)
        scored = lcm_step_with_logprob(ours, out, t, x, prev_sample=got.prev_sample)
        torch.testing.assert_close(scored.log_prob, got.log_prob, rtol=0, atol=1e-6)


def test_lcm_per_sample_timesteps_equal_single_ones():
    sched = lcm_scheduler()
    timesteps = timestep_schedule(sched, 4)
    t = timesteps[torch.tensor([0, 3, 1, 2, 3])]  # mixed, as in a shuffled training micro-batch
    x, out, nxt = randn(5, 4, 8, 8, seed=1), randn(5, 4, 8, 8, seed=2), randn(5, 4, 8, 8, seed=3)
    batched = lcm_step_with_logprob(sched, out, t, x, prev_sample=nxt)
    for i in range(5):
        single = lcm_step_with_logprob(sched, out[i : i + 1], int(t[i]), x[i : i + 1], prev_sample=nxt[i : i + 1])
        torch.testing.assert_close(batched.log_prob[i : i + 1], single.log_prob, rtol=0, atol=1e-6)
        torch.testing.assert_close(batched.pred_original_sample[i : i + 1], single.pred_original_sample,
                                   rtol=0, atol=1e-6)
    assert lcm_prev_timestep(sched, t).tolist() == [759, 0, 499, 259, 0]
    assert lcm_prev_timestep(sched, 499) == 259
    with pytest.raises(ValueError, match="not in the LCM schedule"):
        lcm_prev_timestep(sched, torch.tensor([999, 750]))
    with pytest.raises(ValueError, match="set_timesteps"):
        lcm_prev_timestep(lcm_scheduler(), 999)


def test_lcm_step_is_fp32_under_autocast_and_grads_flow_through_the_mean():
    sched = lcm_scheduler()
    timestep_schedule(sched, 2)
    x = randn(*SHAPE, seed=0).bfloat16()
    out = randn(*SHAPE, seed=1).bfloat16().requires_grad_(True)
    nxt = randn(*SHAPE, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        step = policy_step("lcm", sched, out, 999, x, eta=1.0, prev_sample=nxt)
    assert step.log_prob.dtype == torch.float32 and step.prev_sample.dtype == torch.float32
    step.log_prob.sum().backward()
    assert out.grad is not None and torch.isfinite(out.grad).all()
    with pytest.raises(TypeError, match="LCMScheduler"):
        policy_step("lcm", DDIMScheduler(), out, 999, x)
    with pytest.raises(ValueError, match="step kind"):
        policy_step("euler", sched, out, 999, x)


def test_make_lcm_scheduler_keeps_the_model_config():
    src = lcm_scheduler("v_prediction")
    made = make_lcm_scheduler(dict(src.config))
    assert isinstance(made, LCMScheduler) and made.config.prediction_type == "v_prediction"
    assert made.config.original_inference_steps == 50


# --------------------------------------------------------------------------------------------- rollouts


@pytest.mark.parametrize("arch", ["sd", "sdxl", "lcm"])
def test_pair_rollout_and_recorded_log_probs(arch, parts):
    c = parts[arch]
    scheduler = make_policy_scheduler(c, "trailing")
    timesteps = timestep_schedule(scheduler, 3)
    cond = encode_prompts(c, PROMPTS, image_size=16, guidance_scale=8.0 if arch == "lcm" else None)
    traj = PairTrajectories.concat(sample_pair_chunks(c.unet, scheduler, PROMPTS, cond, timesteps, (4, 8, 8), 1.0,
                                                      [torch.Generator().manual_seed(p) for p in range(len(PROMPTS))],
                                                      step_kind=c.step_kind))
    assert traj.latents.shape == (3, 2, 4, 4, 8, 8) and traj.x0_latents.shape == (3, 2, 3, 4, 8, 8)
    assert traj.log_probs.shape == (3, 2, 3) and torch.isfinite(traj.log_probs).all()
    assert torch.equal(traj.latents[:, 0, 0], traj.latents[:, 1, 0])  # shared x_T
    assert torch.allclose(traj.x0_latents[:, 0, 0], traj.x0_latents[:, 1, 0])
    assert not torch.allclose(traj.latents[:, 0, 1], traj.latents[:, 1, 1])
    worst = 0.0
    for step in range(traj.num_steps):  # every transition, at another batch composition (one pair at a time)
        for pair in range(traj.num_pairs):
            x, nxt = traj.latents[pair, :, step], traj.latents[pair, :, step + 1]
            t = traj.timesteps[step].expand(2)
            row = traj.cond.select(torch.tensor([pair])).repeat_pairs()
            with torch.no_grad():
                lp = transition_log_prob(c.unet, scheduler, x, t, nxt, row, 1.0, step_kind=c.step_kind)
            worst = max(worst, float((lp - traj.log_probs[pair, :, step]).abs().max()))
    assert worst < 1e-5
    if arch == "lcm":  # the last action is re-noised to t = 0: small noise around the decoded x̂0
        residual = traj.latents[:, :, -1] - scheduler.alphas_cumprod[0].sqrt() * traj.x0_latents[:, :, -1]
        assert 0.02 < float(residual.std()) < 0.04


@pytest.mark.parametrize(("model", "extra"), [("tiny_sdxl", ["model.resolution=32"]), ("tiny_lcm", [])])
def test_module_samples_and_trains_on_policy(model, extra, tmp_path, cache_dir):
    from sdpo.module import SDPOModule

    cfg = compose([*FAST, f"model={model}", "model.lora.enabled=true", *extra], tmp_path, cache_dir)
    module = SDPOModule(cfg.model, cfg.algo, cfg.reward, cfg.optim, seed=0)
    assert module.step_kind == ("lcm" if model == "tiny_lcm" else "ddim")
    traj = module.sample(["cat", "dog", "zebra"])
    size = 16 if model == "tiny_sdxl" else 8  # resolution 32 px / VAE factor 2
    assert traj.latents.shape == (3, 2, cfg.algo.num_steps + 1, 4, size, size)
    if model == "tiny_sdxl":
        assert traj.cond.added["time_ids"][0].tolist() == [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]
        assert module.text_encoder_2 is module.components.text_encoder_2
    else:
        assert traj.cond.timestep_cond is not None
        assert traj.timesteps.tolist() == [999, 759, 499, 259]
    worst = 0.0
    with torch.no_grad():
        for step in range(traj.num_steps):  # the training path, at a different batch composition
            idx, steps = torch.tensor([0, 2]), torch.tensor([step, traj.num_steps - 1 - step])
            log_prob = module._micro_batch_log_probs(traj, idx, steps)  # [2, 2]
            worst = max(worst, float((log_prob - traj.log_probs[idx, :, steps]).abs().max()))
    assert worst < 1e-5


@pytest.mark.parametrize("model", ["sd_turbo", "sdxl_turbo", "lcm"])
def test_real_model_configs_compose(model, tmp_path, cache_dir, downloads):
    """Valid configs where the hub can be reached (offline, the model must be in the cache first:
    tests/unit/test_model_sources.py)."""
    from sdpo.config_checks import validate_config

    cfg = compose([f"model={model}"], tmp_path, cache_dir)
    downloads(True)
    validate_config(cfg)
    tiny = compose([], tmp_path, cache_dir).model
    assert set(cfg.model) == set(tiny)  # every model config has the same keys
    assert cfg.model.source != "tiny" and cfg.model.lora.enabled and cfg.model.resolution == 512
