"""Model sources checked before anything loads (``sdpo.model_sources``): a missing folder, a path that is not a hub id,
and a hub model outside the Hugging Face cache while downloads are off. The cache is a real one in Hugging Face's
on-disk layout (``models--org--name/refs/<rev>`` naming a ``snapshots/<commit>/`` folder), read by
``huggingface_hub``'s own lookup."""

from __future__ import annotations

import json

import pytest
import torch

from sdpo.config_checks import ConfigError, validate_config
from sdpo.eval_config import validate_eval_config
from sdpo.model_sources import model_source_problems, source_problem
from tests.conftest import HUB_COMMIT, cache_repo, compose, compose_eval


def test_local_folders_and_paths(tmp_path):
    assert source_problem(str(tmp_path), "model.source") is None  # its files are the loader's to check
    for missing in (str(tmp_path / "no-such-model"), "~/no-such-sdpo-model", "./models/sd-turbo/"):
        problem = source_problem(missing, "model.source")
        assert problem.startswith(f"model.source={missing}: no such folder, and not a hub id"), problem
        assert "Point `model.source` at a diffusers-layout folder (model_index.json, unet/" in problem
    (tmp_path / "unet.safetensors").write_bytes(b"")
    assert "is a file, not a folder" in source_problem(str(tmp_path / "unet.safetensors"), "model.source")


def test_a_hub_model_offline_must_be_in_the_cache(tmp_path, downloads):
    downloads(False)
    problem = source_problem("org/model", "model.source", hub_cache=tmp_path)
    assert "not in the local Hugging Face cache while downloads are off (HF_HUB_OFFLINE=1)" in problem, problem
    assert "`hf download org/model`" in problem and "point `model.source` at a local diffusers-layout copy" in problem
    cache_repo(tmp_path, "org/model", ["model_index.json", "unet/config.json"])
    assert source_problem("org/model", "model.source", hub_cache=tmp_path) is None
    pinned = source_problem("org/model", "model.source", revision="v2", hub_cache=tmp_path)
    assert "not in the local Hugging Face cache at revision v2" in pinned, pinned
    # a VAE repo has config.json at its root, not a pipeline index
    assert source_problem("org/model", "model.vae_source", index_file="config.json", hub_cache=tmp_path) is not None


def test_a_hub_model_online_downloads_unless_local_files_only(tmp_path, downloads):
    downloads(True)
    assert source_problem("org/model", "model.source", hub_cache=tmp_path) is None
    problem = source_problem("org/model", "model.source", local_files_only=True, hub_cache=tmp_path)
    assert "while downloads are off (model.local_files_only=true)" in problem, problem


def test_the_tiny_stand_in_is_not_looked_up_and_each_source_is_named(tmp_path, downloads):
    downloads(False)
    assert model_source_problems({"source": "tiny", "vae_source": None}, hub_cache=tmp_path) == []
    problems = model_source_problems({"source": "org/model", "vae_source": str(tmp_path / "gone")},
                                     hub_cache=tmp_path)
    assert [p.split("=")[0] for p in problems] == ["model.source", "model.vae_source"]


def test_train_and_evaluate_refuse_a_missing_model_before_loading(tmp_path, cache_dir):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ConfigError, match=f"model.source={missing}: no such folder"):
        validate_config(compose([f"model.source={missing}"], tmp_path, cache_dir))
    with pytest.raises(ConfigError, match=f"model.vae_source={missing}: no such folder"):
        validate_eval_config(compose_eval([f"model.vae_source={missing}"], tmp_path, cache_dir))


def test_a_checkpoint_whose_base_model_is_not_here_says_what_model_cannot_change(tmp_path, cache_dir):
    """Evaluating a checkpoint takes the model its config names (``model`` is ignored), so the advice is a copy
    at that place or the run's export applied to a copy elsewhere, not ``model.source``."""
    gone = "/cluster/models/sd-turbo"  # where the run was trained
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": {"model": {"source": gone, "vae_source": None}, "reward": {"name": "brightness"}},
                "state_dict": {}}, checkpoint)
    with pytest.raises(ConfigError) as refused:
        validate_eval_config(compose_eval([f"checkpoint={checkpoint}"], tmp_path, cache_dir))
    message = str(refused.value)
    assert f"checkpoint={checkpoint} was trained on a model that is not here: model.source={gone}" in message
    assert f"`python -m sdpo.export {checkpoint} <folder>`, then lora=<folder> model.source=<your copy>" in message
    assert "Point `model.source`" not in message


SD_INDEX = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "safety_checker": [None, None]}  # listed as absent: not asked for
SHARDS = ["text_encoder/model.fp16-00001-of-00002.safetensors", "text_encoder/model.fp16-00002-of-00002.safetensors"]
TEXT_INDEX = "text_encoder/model.safetensors.index.fp16.json"
PIPELINE_FILES = ["scheduler/scheduler_config.json", "unet/config.json",
                  "unet/diffusion_pytorch_model.fp16.safetensors", "vae/config.json",
                  "vae/diffusion_pytorch_model.fp16.safetensors", "text_encoder/config.json", TEXT_INDEX, *SHARDS,
                  "tokenizer/vocab.json",
                  "tokenizer/merges.txt"]


def write_pipeline(folder, drop=(), add=()) -> None:
    """A pipeline's fp16 files as ``hf download --include "*.fp16.*" ...`` leaves them (contents that matter only for
    the two indexes), less ``drop``, plus ``add``; the text encoder's weights are sharded."""
    for name in [n for n in PIPELINE_FILES if n not in drop] + list(add):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}")
    (folder / "model_index.json").write_text(json.dumps(SD_INDEX))
    if TEXT_INDEX not in drop:
        weight_map = {f"layer.{i}": shard.split("/")[1] for i, shard in enumerate(SHARDS)}
        (folder / TEXT_INDEX).write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("drop,add,variant,with_vae,says", [
    ((), (), "fp16", True, None),
    (["unet/diffusion_pytorch_model.fp16.safetensors"], (), "fp16", True,
     "unet/diffusion_pytorch_model.fp16.safetensors"),
    (["unet/diffusion_pytorch_model.fp16.safetensors"], ["unet/diffusion_pytorch_model.safetensors"], "fp16", True,
     "unet/diffusion_pytorch_model.fp16.safetensors (full-precision weights are there for unet/: "
     "model.variant=null loads those)"),  # diffusers loads only the variant asked for
    ([SHARDS[1]], (), "fp16", True, f"{SHARDS[1]} (a shard its index names)"),
    (["vae/diffusion_pytorch_model.fp16.safetensors", "scheduler/scheduler_config.json"], (), "fp16", True,
     "scheduler/scheduler_config.json, vae/diffusion_pytorch_model.fp16.safetensors"),
    ((), (), None, True, "unet/diffusion_pytorch_model.safetensors"),  # model.variant=null: fp16 files are not it
    (["vae/diffusion_pytorch_model.fp16.safetensors"], (), "fp16", False, None),  # model.vae_source replaces it
    (["tokenizer/vocab.json"], ["tokenizer/tokenizer.json"], "fp16", True, None),
    (["tokenizer/vocab.json"], (), "fp16", True, "tokenizer/vocab.json"),
])
def test_a_pipeline_must_hold_every_file_the_loader_reads(drop, add, variant, with_vae, says, tmp_path, downloads):
    """A download or copy that did not finish: a local folder, or a hub model in the cache while downloads are off.
    Before, such a model failed as it loaded, with "does not appear to have a file named config.json"."""
    downloads(False)
    local = tmp_path / "local"
    write_pipeline(local, drop, add)
    cache_repo(tmp_path / "cache", "org/model", [])
    write_pipeline(tmp_path / "cache" / "models--org--model" / "snapshots" / HUB_COMMIT, drop, add)
    in_folder = source_problem(str(local), "model.source", variant=variant, with_vae=with_vae)
    in_cache = source_problem("org/model", "model.source", variant=variant, with_vae=with_vae,
                              hub_cache=tmp_path / "cache")
    if says is None:
        assert in_folder is None and in_cache is None, (in_folder, in_cache)
        return
    assert in_folder.startswith(f"model.source={local}: the folder lacks {says}"), in_folder
    assert in_cache.startswith("model.source=org/model: the local Hugging Face cache holds only part of it"), in_cache
    assert f"downloads are off (HF_HUB_OFFLINE=1): no {says}" in in_cache and "`hf download org/model`" in in_cache
    downloads(True)  # what is not in the cache is downloaded as the model loads
    assert source_problem("org/model", "model.source", variant=variant, hub_cache=tmp_path / "cache") is None


def test_train_and_evaluate_refuse_a_pipeline_folder_missing_its_unet_weights(tmp_path, cache_dir):
    folder = tmp_path / "sd-copy"
    write_pipeline(folder, drop=["unet/diffusion_pytorch_model.fp16.safetensors"])
    with pytest.raises(ConfigError, match=f"model.source={folder}: the folder lacks unet/diffusion_pytorch_model"):
        validate_config(compose([f"model.source={folder}"], tmp_path, cache_dir))
    with pytest.raises(ConfigError, match=f"model.source={folder}: the folder lacks unet/diffusion_pytorch_model"):
        validate_eval_config(compose_eval([f"model.source={folder}"], tmp_path, cache_dir))


def test_a_vae_source_must_hold_its_config_and_weights(tmp_path, downloads):
    """``model.vae_source``: a VAE repository or folder (config.json at its root), or a pipeline folder whose vae/
    is taken; loaded in full precision whatever ``model.variant`` says."""
    downloads(False)

    def vae(folder, names):
        for name in names:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text("{}")
        return str(folder)

    def problem(source, **where):
        return source_problem(source, "model.vae_source", index_file="config.json", **where)

    assert problem(vae(tmp_path / "ok", ["config.json", "diffusion_pytorch_model.safetensors"])) is None
    fp16_only = vae(tmp_path / "fp16", ["config.json", "diffusion_pytorch_model.fp16.safetensors"])
    assert problem(fp16_only) == (f"model.vae_source={fp16_only}: the folder lacks diffusion_pytorch_model.safetensors "
                                  f"(a copy that did not finish?). Copy what is missing, or point "
                                  f"`model.vae_source` at a complete copy")
    pipeline = vae(tmp_path / "pipeline", ["model_index.json", "vae/config.json"])
    assert "the folder lacks vae/diffusion_pytorch_model.safetensors" in problem(pipeline)
    cache_repo(tmp_path / "cache", "org/vae", ["config.json"])  # the weights' download did not finish
    in_cache = problem("org/vae", hub_cache=tmp_path / "cache")
    assert "holds only part of it" in in_cache and "no diffusion_pytorch_model.safetensors" in in_cache, in_cache
    downloads(True)
    assert problem("org/vae", hub_cache=tmp_path / "cache") is None
