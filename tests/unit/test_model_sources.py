"""Model sources checked before anything loads (``sdpo.model_sources``): a missing folder, a path that is not a hub id,
and a hub model outside the Hugging Face cache while downloads are off. The cache is a real one in Hugging Face's
on-disk layout (``models--org--name/refs/<rev>`` naming a ``snapshots/<commit>/`` folder), read by
``huggingface_hub``'s own lookup."""

from __future__ import annotations

import pytest
import torch

from sdpo.config_checks import ConfigError, validate_config
from sdpo.eval_config import validate_eval_config
from sdpo.model_sources import model_source_problems, source_problem
from tests.conftest import cache_repo, compose, compose_eval


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
