"""Reward weights checked before any model loads (``RewardModel.weight_sources``, ``sdpo.rewards.preflight``):
each model reward names the weights its settings load, and the config checks of train and evaluate refuse those
that are neither here nor downloadable, with the setting to change. The Hugging Face cache is a real one in its
on-disk layout (tests/conftest.py ``cache_repo``), read by huggingface_hub's own lookup."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdpo.config_checks import ConfigError, validate_config
from sdpo.eval_config import validate_eval_config
from sdpo.rewards.registry import missing_packages
from tests.conftest import compose, compose_eval


def refusal(validate, cfg) -> list[str]:
    """The problems a config check lists (none: [])."""
    try:
        validate(cfg)
    except ConfigError as error:
        return str(error).split("\n  - ")[1:]
    return []


# reward -> the settings naming weights it would load with its defaults (clip_score's tokenizer is its model's)
WEIGHTS = {"aesthetic": ["clip_model", "head_source"], "pickscore": ["model", "processor"],
           "clip_score": ["model"], "hpsv2": ["checkpoint_source"]}


@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_offline_each_model_reward_names_the_weights_it_lacks(name, tmp_path, downloads, hub_cache):
    downloads(False)
    problems = [p for p in refusal(validate_config, compose([f"reward={name}"], tmp_path, tmp_path))
                if not p.startswith("reward.name: ")]  # hpsv2 without its package also says so
    assert [p.split("=")[0] for p in problems] == [f"reward.{key}" for key in WEIGHTS[name]]
    assert all("not in the local Hugging Face cache while downloads are off (HF_HUB_OFFLINE=1)" in p and
               "`hf download " in p for p in problems), problems
    downloads(True)  # online: downloaded as they load
    assert refusal(validate_config, compose([f"reward={name}"], tmp_path, tmp_path)) == [
        f"reward.name: {problem}" for problem in missing_packages(name)]


def test_cached_weights_pass_and_the_file_of_a_repo_is_what_is_looked_up(tmp_path, downloads, hub_cache):
    downloads(False)
    hub_cache("openai/clip-vit-large-patch14", ["config.json", "model.safetensors"])
    hub_cache("camenduru/improved-aesthetic-predictor", ["another-head.pth"])
    problems = refusal(validate_config, compose(["reward=aesthetic"], tmp_path, tmp_path))
    assert [p.split(":")[0] for p in problems] == ["reward.head_source=camenduru/improved-aesthetic-predictor"]
    assert "`hf download camenduru/improved-aesthetic-predictor sac+logos+ava1-l14-linearMSE.pth`" in problems[0]
    cfg = compose(["reward=aesthetic", "reward.head_filename=another-head.pth"], tmp_path, tmp_path)
    assert refusal(validate_config, cfg) == []
    hub_cache("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", ["tokenizer_config.json"])  # a tokenizer alone
    problems = refusal(validate_config, compose(["reward=pickscore"], tmp_path, tmp_path))
    assert [p.split("=")[0] for p in problems] == ["reward.model"]


def test_local_paths(tmp_path, cache_dir, tiny_reward_assets):
    clip, head = tiny_reward_assets["clip"], tiny_reward_assets["head"]
    good = compose(["reward=aesthetic", f"reward.clip_model={clip}", f"reward.head_source={head}"], tmp_path, cache_dir)
    assert refusal(validate_config, good) == []
    folder = compose(["reward=aesthetic", f"reward.clip_model={clip}", f"reward.head_source={head.parent}",
                      f"reward.head_filename={head.name}"], tmp_path, cache_dir)
    assert refusal(validate_config, folder) == []
    bad = compose(["reward=aesthetic", f"reward.clip_model={tmp_path / 'gone'}", f"reward.head_source={clip}"],
                  tmp_path, cache_dir)
    assert refusal(validate_config, bad) == [
        f"reward.clip_model={tmp_path / 'gone'}: no such file or folder, and not a hub id (org/name): give a local "
        f"path or a hub repo",
        f"reward.head_source={clip}: that folder has no 'sac+logos+ava1-l14-linearMSE.pth': give the file's path, "
        f"or the folder that holds it"]


def test_multi_parts_and_held_out_rewards_say_where_their_setting_goes(tmp_path, cache_dir, downloads, hub_cache):
    downloads(False)
    cfg = compose(["reward=multi", "callbacks.eval.rewards=[brightness,{clip_score:{model:org/clip}}]"],
                  tmp_path, cache_dir)
    problems = refusal(validate_config, cfg)
    assert [p.split("=")[0] for p in problems] == [
        "reward.components.pickscore.model", "reward.components.pickscore.processor",
        "reward.components.aesthetic.clip_model", "reward.components.aesthetic.head_source",
        "callbacks.eval.rewards: clip_score's model"]
    assert problems[0].endswith("or set reward.components.pickscore.model=<local path>.")
    assert problems[-1].endswith("or set callbacks.eval.rewards=[{clip_score: {model: <local path>}}, ...].")
    evaluate = compose_eval(["rewards=[{pickscore:{model:/models/pick,processor:org/tokenizer}}]"], tmp_path,
                            cache_dir)
    assert [p.split(":")[0:2] for p in refusal(validate_eval_config, evaluate)] == [
        ["rewards", " pickscore's model=/models/pick"], ["rewards", " pickscore's processor=org/tokenizer"]]


def test_a_model_download_or_copy_cut_short_names_the_weights_it_lacks(tmp_path, cache_dir, downloads, hub_cache,
                                                                      tiny_reward_assets):
    """A CLIP model whose config arrived but whose weights did not (or only some shards of them) failed as the reward
    loaded, after the policy and the training stack. A tokenizer needs no weights (PickScore's processor)."""
    import json
    import shutil

    import huggingface_hub.constants

    downloads(False)
    hub_cache("openai/clip-vit-large-patch14", ["config.json", "tokenizer_config.json"])
    hub_cache("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", ["tokenizer_config.json"])
    hub_cache("yuvalkirstain/PickScore_v1", ["config.json", "model.safetensors.index.json",
                                             "model-00001-of-00002.safetensors"])
    snapshot = Path(huggingface_hub.constants.HF_HUB_CACHE) / "models--yuvalkirstain--PickScore_v1" / "snapshots"
    (index,) = snapshot.glob("*/model.safetensors.index.json")
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors"}}))
    cut, sharded = refusal(validate_config, compose(["reward=clip_score", "callbacks.eval.rewards=[pickscore]"],
                                                    tmp_path, cache_dir))
    assert cut.startswith("reward.model=openai/clip-vit-large-patch14: the local Hugging Face cache holds only part "
                          "of it (a download that did not finish?), and downloads are off (HF_HUB_OFFLINE=1): no "
                          "model.safetensors (nor model.safetensors.index.json, pytorch_model.bin, "
                          "pytorch_model.bin.index.json). "), cut
    assert sharded.startswith("callbacks.eval.rewards: pickscore's model=yuvalkirstain/PickScore_v1: the local "
                              "Hugging Face cache holds only part of it"), sharded
    assert "no model-00002-of-00002.safetensors (a shard its index names)" in sharded, sharded
    copy = Path(shutil.copytree(tiny_reward_assets["clip"], tmp_path / "clip-copy"))
    (copy / "model.safetensors").unlink()
    local = compose(["reward=clip_score", f"reward.model={copy}"], tmp_path, cache_dir)
    assert refusal(validate_config, local) == [
        f"reward.model={copy}: that folder lacks model.safetensors (nor model.safetensors.index.json, "
        f"pytorch_model.bin, pytorch_model.bin.index.json) (a copy that did not finish?)"]
