"""The tiny pipeline goes through the real loading path: save_pretrained -> from_pretrained(local dir)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderTiny, UNet2DConditionModel

from sdpo.policy.conditioning import decode_latents, encode_prompts
from sdpo.policy.loading import (
    ModelNotAvailableError,
    TinySpec,
    build_tiny_pipeline,
    ensure_tiny_pipeline,
    load_components,
)
from sdpo.policy.tokenizer import build_clip_tokenizer

SPEC = TinySpec(latent_size=8, words=["cat", "dog", "red"])


def test_tiny_pipeline_round_trip(tmp_path):
    folder = build_tiny_pipeline(tmp_path / "tiny", SPEC)
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / sub).is_dir(), sub
    parts = load_components(str(folder))
    assert isinstance(parts.unet, UNet2DConditionModel)
    assert isinstance(parts.vae, AutoencoderTiny)
    assert parts.scheduler_config["prediction_type"] == "v_prediction"
    # the same seed builds the same weights: loading twice equals building again
    again = load_components(str(build_tiny_pipeline(tmp_path / "again", SPEC)))
    for (name, a), (_, b) in zip(parts.unet.state_dict().items(), again.unet.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert not any(p.requires_grad for p in parts.text_encoder.parameters())
    assert not any(p.requires_grad for p in parts.vae.parameters())


def test_tokenizer_round_trip_and_known_words(tmp_path):
    tok = build_clip_tokenizer(["cat", "zebra"])
    ids = tok("a zebra cat").input_ids
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>"
    assert "zebra</w>" in tokens and "cat</w>" in tokens  # listed words are single tokens
    assert "x" in tok.convert_ids_to_tokens(tok("xylophone").input_ids)  # unknown words fall back to bytes
    folder = build_tiny_pipeline(tmp_path / "t", TinySpec(latent_size=8, words=["cat", "zebra"]))
    loaded = load_components(str(folder)).tokenizer
    assert loaded("a zebra cat").input_ids == ids
    assert (folder / "tokenizer" / "vocab.json").exists() and (folder / "tokenizer" / "merges.txt").exists()


def test_cache_reuses_and_distinguishes_specs(tmp_path):
    a = ensure_tiny_pipeline(tmp_path, SPEC)
    assert ensure_tiny_pipeline(tmp_path, SPEC) == a
    b = ensure_tiny_pipeline(tmp_path, TinySpec(latent_size=8, words=["cat"], seed=1))
    assert a != b
    index = (a / "model_index.json").read_text()
    (a / "model_index.json").unlink()  # a folder cached before model_index.json was written
    weights = (a / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_pipeline(tmp_path, SPEC) == a
    assert (a / "model_index.json").read_text() == index  # written back, the weights left as they were
    assert (a / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == weights


def test_decoder_images_differ_and_have_range(tmp_path):
    """A random AutoencoderKL paints every latent the same grey; the tiny default's decoder must not."""
    parts = load_components(str(build_tiny_pipeline(tmp_path / "tiny", SPEC)))
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(8, 4, 8, 8, generator=g) + torch.linspace(-1, 1, 8).view(8, 1, 1, 1)
    images = decode_latents(parts.vae, latents, parts.latent_scale)
    assert images.shape == (8, 3, 16, 16)
    assert 0.0 <= images.min() and images.max() <= 1.0
    brightness = images.mean(dim=(1, 2, 3))
    assert brightness.max() - brightness.min() > 0.05  # shifting latents moves brightness


def test_text_encoding_depends_on_prompt(tmp_path):
    parts = load_components(str(build_tiny_pipeline(tmp_path / "tiny", SPEC)))
    emb = encode_prompts(parts, ["cat", "dog", "cat"]).hidden_states
    assert emb.shape[:2] == (3, parts.tokenizer.model_max_length)
    assert torch.equal(emb[0], emb[2]) and not torch.allclose(emb[0], emb[1])


def test_missing_model_names_the_fix():
    with pytest.raises(ModelNotAvailableError, match="model.source"):
        load_components("no-such-org/no-such-model", local_files_only=True)
