"""The trained LoRA loads into the stock diffusers pipeline and reproduces the trained policy's images."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from sdpo.export import export_checkpoint, main
from sdpo.model_card import model_card
from sdpo.policy.loading import load_components
from sdpo.train_run import train
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


def test_exported_lora_round_trips_through_load_lora_weights(tmp_path, cache_dir, monkeypatch):
    cfg = compose([*FAST, "model.lora.enabled=true", "optim.lr=3e-2", "trainer.max_epochs=2"], tmp_path, cache_dir)
    trainer = train(cfg)
    module = trainer.lightning_module
    base_folder = module.components.source  # the tiny pipeline's folder in the session cache
    exported = tmp_path / "trained"
    assert (exported / "pytorch_lora_weights.safetensors").exists()  # written by the ExportTrained callback
    with monkeypatch.context() as m:  # a relative path, as typed from the run's parent folder
        m.chdir(tmp_path)
        again = tmp_path / export_checkpoint(Path("checkpoints") / "last.ckpt", "from_ckpt")
    # the card's checkpoint and evaluate command work from anywhere: the absolute path, as a finished run writes it
    assert f"checkpoint={tmp_path / 'checkpoints' / 'last.ckpt'}" in (again / "README.md").read_text()

    with torch.no_grad():
        trained_images = generate(stock_pipeline(base_folder, unet=module.unet.eval()))
        base_images = generate(stock_pipeline(base_folder))
        for folder in (exported, again):
            pipe = stock_pipeline(base_folder)
            pipe.load_lora_weights(str(folder))
            torch.testing.assert_close(generate(pipe), trained_images, rtol=0, atol=1e-5)
    assert not torch.allclose(base_images, trained_images, atol=1e-4)  # the LoRA changes the images
    summary = json.loads((tmp_path / "summary.json").read_text())
    for folder in (exported, again):
        weights = (folder / "pytorch_lora_weights.safetensors").stat().st_mode & 0o777
        assert weights == (folder / "README.md").stat().st_mode & 0o777  # as readable as the card (safetensors: 0600)
        card = check_model_card(folder, base_folder)
        assert "| weights | LoRA r8 (alpha 8) on to_q, to_k, to_v, to_out.0 |" in card
        assert "2 iterations, 8 optimizer steps, T = 4 ddim steps" in card
        first, last = summary["first"]["train/reward_1step"], summary["last"]["train/reward_1step"]
        assert f"| 1-step | {first:.4f} | {last:.4f} | {last - first:+.4f} |" in card


def test_export_rebuilds_the_policy_without_the_reward_model(tmp_path, cache_dir, tiny_reward_assets):
    """A checkpoint trained on the aesthetic reward exports where the reward's CLIP and head are not (a laptop, a
    login node; here: deleted after training), into the files the run's own export wrote."""
    from safetensors.torch import load_file

    clip = Path(shutil.copytree(tiny_reward_assets["clip"], tmp_path / "clip"))
    head = Path(shutil.copy(tiny_reward_assets["head"], tmp_path / "aesthetic_head.pth"))
    run = tmp_path / "run"
    train(compose([*FAST, "model.lora.enabled=true", "trainer.max_epochs=1", "reward=aesthetic",
                   f"reward.clip_model={clip}", f"reward.head_source={head}"], run, cache_dir))
    shutil.rmtree(clip)
    head.unlink()
    exported = export_checkpoint(run / "checkpoints" / "last.ckpt", tmp_path / "export")
    ours, theirs = (load_file(f / "pytorch_lora_weights.safetensors") for f in (exported, run / "trained"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    record = json.loads((exported / "sdpo_training.json").read_text())
    assert record == json.loads((run / "trained" / "sdpo_training.json").read_text())
    assert record["reward"]["name"] == "aesthetic" and record["checkpoint"] == str(run / "checkpoints" / "last.ckpt")


def check_model_card(folder: Path, base_folder: str) -> str:
    """The folder's README.md: its loading snippet, run as written, applies these weights to the stock pipeline."""
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\n") and "base_model:" not in card  # a local base
    (snippet,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert f"from_pretrained({base_folder!r}" in snippet and repr(str(folder)) in snippet
    namespace: dict = {}
    exec(compile(snippet, "model card", "exec"), namespace)
    assert namespace["image"].size == (16, 16)
    unet = namespace["pipe"].unet
    if "load_lora_weights" in snippet:
        assert getattr(unet, "peft_config", None)  # the LoRA is on the pipeline's UNet
    else:  # a full fine-tune: the pipeline runs the folder's UNet, not the base's
        saved = UNet2DConditionModel.from_pretrained(folder)
        torch.testing.assert_close(unet.conv_out.bias, saved.conv_out.bias, rtol=0, atol=0)
        base = UNet2DConditionModel.from_pretrained(Path(base_folder) / "unet")
        assert not torch.equal(unet.conv_out.bias, base.conv_out.bias)
    return card


def test_full_finetune_exports_a_unet(tmp_path, cache_dir):
    trainer = train(compose([*FAST, "trainer.max_epochs=1"], tmp_path, cache_dir))
    assert (tmp_path / "trained" / "config.json").exists()
    assert any((tmp_path / "trained").glob("*.safetensors"))
    card = check_model_card(tmp_path / "trained", trainer.lightning_module.components.source)
    assert "| weights | the whole UNet (full fine-tune) |" in card

    # an export never mixes into another: a stale LoRA file next to a full UNet is what loaders would pick
    ckpt, out = str(tmp_path / "checkpoints" / "last.ckpt"), tmp_path / "shipped"
    out.mkdir()
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"an earlier LoRA export")
    with pytest.raises(SystemExit, match=r"already holds pytorch_lora_weights.safetensors: choose a new folder, or "
                                         r"pass --overwrite"):
        main([ckpt, str(out)])
    main([ckpt, str(out), "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "trained").iterdir())
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"holds files that are not an earlier export \(notes.txt\)"):
        main([ckpt, str(out), "--overwrite"])
    assert (out / "notes.txt").exists() and (out / "config.json").exists()  # refused before writing anything


def test_model_card_of_hub_models_names_the_base_and_its_sampler():
    """A hub base goes into the front matter; the snippet pins the revision, loads SDXL's fp16-safe VAE, and
    samples an LCM with its guidance at 4 steps, a turbo model at 1 step without guidance."""
    def card(source: str, step_kind: str, **model) -> str:
        hparams = {"model": {"lora": {"enabled": True, "rank": 4, "alpha": None, "targets": ["to_q"]},
                             "spacing": "trailing", **model},
                   "algo": {"num_steps": 50, "eta": 1.0}, "reward": {"name": "aesthetic"}, "optim": {"lr": 1e-4}}
        text = model_card(hparams, source, step_kind, 100, 10_000, [], "my_lora")
        compile(re.findall(r"```python\n(.*?)```", text, flags=re.S)[0], "snippet", "exec")  # valid Python
        return text

    sdxl = card("stabilityai/sdxl-turbo", "ddim", revision="abc123", vae_source="madebyollin/sdxl-vae-fp16-fix")
    assert sdxl.startswith("---\nbase_model: stabilityai/sdxl-turbo\n")
    assert "vae = AutoencoderKL.from_pretrained('madebyollin/sdxl-vae-fp16-fix', torch_dtype=dtype)" in sdxl
    assert "from_pretrained('stabilityai/sdxl-turbo', revision='abc123', vae=vae, torch_dtype=dtype)" in sdxl
    assert "num_inference_steps=1, guidance_scale=0.0" in sdxl and "LoRA r4 (alpha 4) on to_q" in sdxl
    lcm = card("SimianLuo/LCM_Dreamshaper_v7", "lcm", guidance_scale=8.0)
    assert "num_inference_steps=4, guidance_scale=8.0" in lcm and "No complete iteration was recorded." in lcm


def test_export_cli_says_what_a_path_is_not_and_writes_nothing(tmp_path):
    not_a_checkpoint = tmp_path / "summary.json"
    not_a_checkpoint.write_text("{}")
    plain_tensor = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, plain_tensor)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"w": torch.zeros(2)}, run / "checkpoints" / "last.ckpt")
    for path, said in [(tmp_path / "missing.ckpt", "not a checkpoint: no such file"),
                       (run, f"not a checkpoint: is a run folder: use {run / 'checkpoints' / 'last.ckpt'}"),
                       (not_a_checkpoint, "not a checkpoint torch can load safely"),
                       (plain_tensor, "not a checkpoint written by sdpo.train")]:
        with pytest.raises(SystemExit) as stop:
            main([str(path), str(tmp_path / "out")])
        assert str(stop.value).startswith(f"sdpo.export: {path}: {said}")
    assert not (tmp_path / "out").exists()
