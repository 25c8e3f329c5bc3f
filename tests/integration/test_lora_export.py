"""The trained LoRA loads into the stock diffusers pipeline and reproduces the trained policy's images."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from sdpo.export import export_checkpoint, main
from sdpo.policy.loading import load_components
from sdpo.train import train
from tests.conftest import FAST, compose


def stock_pipeline(folder: str, unet=None) -> StableDiffusionPipeline:
    parts = load_components(folder)
    return StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=unet or parts.unet,
        scheduler=DDIMScheduler.from_config(parts.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


def generate(pipe: StableDiffusionPipeline) -> torch.Tensor:
    out = pipe(["cat", "dog"], num_inference_steps=2, guidance_scale=1.0, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    return out.images


def test_exported_lora_round_trips_through_load_lora_weights(tmp_path, cache_dir):
    cfg = compose([*FAST, "model.lora.enabled=true", "optim.lr=3e-2", "trainer.max_epochs=2"], tmp_path, cache_dir)
    trainer = train(cfg)
    module = trainer.lightning_module
    base_folder = str(next(p for p in cache_dir.iterdir() if p.name.startswith("tiny-")))
    exported = tmp_path / "trained"
    assert (exported / "pytorch_lora_weights.safetensors").exists()  # written by the ExportTrained callback
    again = export_checkpoint(tmp_path / "checkpoints" / "last.ckpt", tmp_path / "from_ckpt")

    with torch.no_grad():
        trained_images = generate(stock_pipeline(base_folder, unet=module.unet.eval()))
        base_images = generate(stock_pipeline(base_folder))
        for folder in (exported, again):
            pipe = stock_pipeline(base_folder)
            pipe.load_lora_weights(str(folder))
            torch.testing.assert_close(generate(pipe), trained_images, rtol=0, atol=1e-5)
    assert not torch.allclose(base_images, trained_images, atol=1e-4)  # the LoRA changes the images


def test_full_finetune_exports_a_unet(tmp_path, cache_dir):
    train(compose([*FAST, "trainer.max_epochs=1"], tmp_path, cache_dir))
    assert (tmp_path / "trained" / "config.json").exists()
    assert any((tmp_path / "trained").glob("*.safetensors"))


def test_export_cli_says_what_a_path_is_not_and_writes_nothing(tmp_path):
    not_a_checkpoint = tmp_path / "summary.json"
    not_a_checkpoint.write_text("{}")
    plain_tensor = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, plain_tensor)
    for path, said in [(tmp_path / "missing.ckpt", "no such checkpoint"),
                       (not_a_checkpoint, "not a checkpoint torch can load safely"),
                       (plain_tensor, "not a checkpoint written by sdpo.train")]:
        with pytest.raises(SystemExit) as stop:
            main([str(path), str(tmp_path / "out")])
        assert str(stop.value).startswith(f"sdpo.export: {path}: {said}")
    assert not (tmp_path / "out").exists()
