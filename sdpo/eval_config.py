"""Check an ``evaluate`` config before any model loads: every value, the checkpoint or LoRA folder, the rewards and
the prompts; returns what the evaluation needs from them.

Imports torch and the config's own checks only: ``python -m sdpo.evaluate`` runs it before diffusers and the
models load, so a wrong path or value is refused in seconds (``sdpo.evaluate_run`` calls it again to evaluate).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sdpo.app_config import CONFIG_DIR
from sdpo.checkpoint_files import not_a_checkpoint, not_exported_weights, read_checkpoint
from sdpo.config_checks import ConfigError, type_problems
from sdpo.config_keys import unknown_keys
from sdpo.model_card import recorded_reward, recorded_training
from sdpo.model_sources import model_source_problems
from sdpo.prompts import load_prompts, stored_prompts
from sdpo.rewards.preflight import reward_prompt_problem, reward_weight_problems
from sdpo.rewards.registry import missing_packages
from sdpo.rewards.specs import parse_reward_specs

DEFAULT_REWARD = "brightness"  # rewards=null without a trained policy: the tiny default's reward


def resolve_device(name: str) -> torch.device:
    """``auto``: the first GPU if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


TRAINING_PROMPTS = "training"


def validate_eval_config(cfg: DictConfig) -> tuple[list[str], list[int], list[tuple[str, str, dict]]]:
    """Check every value before any model loads; returns the prompts, the step counts and the reward specs."""
    problems: list[str] = []
    prompts: list[str] = []
    specs: list[tuple[str, str, dict]] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    counts = ("images_per_prompt", "batch_size", "grid_prompts", "grid_images", "seed")
    wrong_types = type_problems(cfg, integers=counts, nullable_integers=("resolution",), numbers=(),
                                nullable_numbers=("guidance_scale",))
    if wrong_types:  # the checks below compare these with numbers
        raise ConfigError("invalid evaluation config:\n  - " + "\n  - ".join(wrong_types))
    steps = OmegaConf.to_container(cfg.steps) if OmegaConf.is_list(cfg.steps) else [cfg.steps]
    need(bool(steps), "steps=[]: give at least one step count, e.g. steps=[1,2,4,8]")
    need(all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in steps),
         f"steps={steps}: every step count must be an integer >= 1")
    need(len(set(map(str, steps))) == len(steps), f"steps={steps}: step counts must be distinct")
    need(cfg.images_per_prompt >= 1, f"images_per_prompt={cfg.images_per_prompt}: need >= 1")
    need(cfg.batch_size >= 1, f"batch_size={cfg.batch_size}: need >= 1")
    need(cfg.resolution is None or (cfg.resolution > 0 and cfg.resolution % 8 == 0),
         f"resolution={cfg.resolution}: use null or a positive multiple of 8 (the VAE downsamples by 8)")
    need(cfg.grid_prompts >= 1, f"grid_prompts={cfg.grid_prompts}: need >= 1 (the rows of grid.png)")
    need(cfg.grid_images >= 1, f"grid_images={cfg.grid_images}: need >= 1 (each prompt's images in grid.png)")
    need(cfg.guidance_scale is None or cfg.guidance_scale >= 1,
         f"guidance_scale={cfg.guidance_scale}: use null or a value >= 1")
    if cfg.checkpoint is not None and cfg.lora is not None:
        problems.append("checkpoint and lora are both set: evaluate one of them (a checkpoint already holds its "
                        "weights; lora is an exported folder applied to `model`)")
    need(not cfg.get("baseline") or cfg.checkpoint is not None or cfg.lora is not None,
         "baseline=true compares a trained policy with its base model: give checkpoint=<run>/checkpoints/last.ckpt "
         "or lora=<run>/trained (without either, the base model is what is evaluated)")
    saved = None  # the checkpoint, memory-mapped: is it one, and which prompts did it train on
    if cfg.checkpoint is not None:
        checkpoint = Path(str(cfg.checkpoint)).expanduser()
        need(checkpoint.is_file(), f"checkpoint={cfg.checkpoint}: {not_a_checkpoint(checkpoint)}")
        if checkpoint.is_file():
            try:
                saved = read_checkpoint(checkpoint, mmap=True)
            except ValueError as err:
                problems.append(f"checkpoint={err}")
    if cfg.checkpoint is None:
        problems += model_source_problems(OmegaConf.to_container(cfg.model, resolve=True))
    elif saved is not None:  # the checkpoint's own base model, which `model` cannot change
        recorded = (saved.get("hyper_parameters") or {}).get("model") or {}
        problems += [f"checkpoint={cfg.checkpoint} was trained on a model that is not here: {problem}"
                     for problem in model_source_problems(recorded, advice=checkpoint_model_advice(cfg.checkpoint))]
    if cfg.lora is not None:
        lora = Path(str(cfg.lora)).expanduser()
        need(lora.exists(), f"lora={cfg.lora}: no such file or folder")
        if lora.is_dir() and not list(lora.glob("*.safetensors")):
            problems.append(f"lora={cfg.lora}: {not_exported_weights(lora)}")
        need(lora.suffix != ".ckpt", f"lora={cfg.lora} is a training checkpoint: evaluate it with "
                                     f"checkpoint={cfg.lora} (lora= takes an exported folder, e.g. <run>/trained)")
    try:
        specs = parse_reward_specs(trained_rewards(cfg, saved) if cfg.rewards is None else cfg.rewards, key="rewards")
    except ValueError as err:
        problems.append(str(err))
    problems += [f"rewards: {problem}" for _, name, _ in specs for problem in missing_packages(name)]
    problems += [problem for label, name, kwargs in specs
                 for problem in reward_weight_problems(name, kwargs, "rewards", label)]
    if cfg.prompts == TRAINING_PROMPTS:
        if cfg.checkpoint is None:
            problems.append("prompts=training needs checkpoint=<run>/checkpoints/last.ckpt (it reads the prompts "
                            "stored there; a LoRA folder carries none): give a list, a built-in set or a file")
        elif saved is not None:
            prompts = stored_prompts(saved)
            need(bool(prompts), f"prompts=training: {cfg.checkpoint} stores no training prompts (a checkpoint "
                                "written before they were stored): give the list or file it trained on")
    else:
        try:
            source = cfg.prompts if isinstance(cfg.prompts, str) else OmegaConf.to_container(cfg.prompts)
            prompts = load_prompts(source)
        except ValueError as err:
            problems.append(f"prompts: {err}")
    if prompts:  # a reward that cannot score some of them (color_match: a colour word)
        problems += [problem for _, name, kwargs in specs
                     if (problem := reward_prompt_problem(name, kwargs, prompts, "prompts")) is not None]
    try:
        device = resolve_device(str(cfg.device))
        need(device.type != "cuda" or torch.cuda.is_available(), f"device={cfg.device}: no CUDA device here")
    except RuntimeError as err:
        problems.append(f"device={cfg.device}: {err}")
    problems += unknown_keys(cfg, CONFIG_DIR, primary="evaluate")
    if problems:
        raise ConfigError("invalid evaluation config:\n  - " + "\n  - ".join(problems))
    return prompts, [int(k) for k in steps], specs


def checkpoint_model_advice(checkpoint: str) -> Callable[[str], str]:
    """What to do when a checkpoint's base model is missing here: evaluating a checkpoint takes the model its config
    names, so only a copy at that place helps, or the run's export applied to a copy elsewhere (``lora=``)."""
    def advice(source: str) -> str:
        return (f"Put a copy where the checkpoint's config points (a hub model: `hf download {source}` on a "
                f"connected machine), or evaluate the run's export on a copy you have: `python -m sdpo.export "
                f"{checkpoint} <folder>`, then lora=<folder> model.source=<your copy>.")
    return advice


def trained_rewards(cfg: DictConfig, saved: Mapping[str, Any] | None) -> Any:
    """``rewards=null``: what the policy was trained on, so that its own objective is what gets measured. A checkpoint
    and an export store the reward with every setting (an older export's model card names it only); a base model
    gets brightness (the tiny default's reward)."""
    if cfg.lora is None:
        reward = ((saved or {}).get("hyper_parameters") or {}).get("reward")
    else:
        folder = Path(str(cfg.lora)).expanduser()
        name = recorded_reward(folder)
        reward = (recorded_training(folder) or {}).get("reward") or ({"name": name} if name else None)
    if reward and reward.get("name"):
        return {str(reward["name"]): dict(reward)}
    return [DEFAULT_REWARD]
