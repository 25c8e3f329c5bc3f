"""The evaluation a composed ``evaluate`` config describes (``python -m sdpo.evaluate`` calls ``evaluate``).

Evaluates a base model, a training checkpoint or an exported LoRA/UNet at several sampling step counts with the
model's native scheduler (``sdpo.evaluation``), prints the Markdown table and writes results.csv, results.json,
results.md and grid.png into its run folder (``outputs/evaluate/<date_time>/``). With ``baseline=true`` it also
evaluates the policy's base model on the same noise and writes the paired comparison (``sdpo.comparison``).
Config: ``conf/evaluate.yaml``. Kept apart from the command-line module ``sdpo.evaluate`` for the same reason as
``sdpo.train_run``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from omegaconf import DictConfig, OmegaConf

from sdpo.app_config import CONFIG_DIR
from sdpo.checkpoint_files import not_a_checkpoint, not_exported_weights
from sdpo.comparison import Comparison
from sdpo.config_checks import ConfigError, type_problems
from sdpo.config_keys import unknown_keys
from sdpo.data import PromptDataModule
from sdpo.eval_results import EvalResult
from sdpo.evaluation import check_step_counts, evaluate_policy
from sdpo.export import read_checkpoint
from sdpo.model_card import recorded_reward, recorded_training
from sdpo.prompts import load_prompts
from sdpo.rewards.registry import missing_packages
from sdpo.rewards.specs import build_rewards, parse_reward_specs
from sdpo.saved_policy import LoadedPolicy, load_policy

DEFAULT_REWARD = "brightness"  # rewards=null without a trained policy: the tiny default's reward
log = logging.getLogger(__name__)


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
    if cfg.prompts == TRAINING_PROMPTS:
        if cfg.checkpoint is None:
            problems.append("prompts=training needs checkpoint=<run>/checkpoints/last.ckpt (it reads the prompts "
                            "stored there; a LoRA folder carries none): give a list, a built-in set or a file")
        elif saved is not None:
            prompts = PromptDataModule.stored_prompts(saved)
            need(bool(prompts), f"prompts=training: {cfg.checkpoint} stores no training prompts (a checkpoint "
                                "written before they were stored): give the list or file it trained on")
    else:
        try:
            source = cfg.prompts if isinstance(cfg.prompts, str) else OmegaConf.to_container(cfg.prompts)
            prompts = load_prompts(source)
        except ValueError as err:
            problems.append(f"prompts: {err}")
    try:
        device = resolve_device(str(cfg.device))
        need(device.type != "cuda" or torch.cuda.is_available(), f"device={cfg.device}: no CUDA device here")
    except RuntimeError as err:
        problems.append(f"device={cfg.device}: {err}")
    problems += unknown_keys(cfg, CONFIG_DIR, primary="evaluate")
    if problems:
        raise ConfigError("invalid evaluation config:\n  - " + "\n  - ".join(problems))
    return prompts, [int(k) for k in steps], specs


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


@contextmanager
def base_unet(policy: LoadedPolicy, device: torch.device) -> Iterator[UNet2DConditionModel]:
    """The UNet ``policy`` was trained from: its own module with the LoRA adapters switched off, or for a full
    fine-tune the base model's UNet loaded anew (its other parts are dropped at once)."""
    from sdpo.module import SDPOModule

    unet = policy.unet
    if getattr(unet, "_hf_peft_config_loaded", False):
        unet.disable_adapters()
        try:
            yield unet
        finally:
            unet.enable_adapters()
        return
    base = SDPOModule._load_components(dict(policy.model_cfg)).unet
    yield base.to(device).requires_grad_(False).eval()


def evaluate(cfg: DictConfig) -> EvalResult | Comparison:
    """Evaluate with a composed ``evaluate`` config; writes the run folder and returns the result (with
    ``baseline=true``, the ``Comparison`` whose ``policy`` and ``base`` are both results)."""
    from sdpo.train_run import quiet_libraries

    prompts, steps, specs = validate_eval_config(cfg)
    quiet_libraries()
    if "SDPO_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["SDPO_NUM_THREADS"]))
    device = resolve_device(str(cfg.device))
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    policy = load_policy(model_cfg, cfg.checkpoint, cfg.lora)
    parts = policy.components
    check_step_counts(parts.scheduler_config, steps)
    for module in (parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2):
        if module is not None:
            module.to(device)
    rewards = {label: reward.to(device) for label, reward in build_rewards(specs).items()}
    for reward in rewards.values():  # a prompt a reward cannot score fails before any sampling
        reward.check_prompts(prompts, "prompts")
    resolution = cfg.resolution if cfg.resolution is not None else policy.model_cfg.get("resolution")
    guidance = cfg.guidance_scale if cfg.guidance_scale is not None else policy.model_cfg.get("guidance_scale")
    settings = dict(rewards=rewards, images_per_prompt=cfg.images_per_prompt, seed=cfg.seed,
                    batch_size=cfg.batch_size, resolution=resolution, guidance_scale=guidance, progress=cfg.progress,
                    keep_images=cfg.grid_images, keep_prompts=cfg.grid_prompts)  # kept in memory: what grids draw
    result = evaluate_policy(parts, parts.unet, prompts, steps, **settings)
    result.meta["policy"] = policy.origin
    out_dir = Path(cfg.paths.output_dir)
    paths = result.save(out_dir, grid_prompts=cfg.grid_prompts)
    print(f"\n{policy.origin}\n\n{result.to_markdown()}")
    comparison = None
    if cfg.get("baseline"):
        log.info("evaluating the base model on the same prompts and noise, for the comparison")
        with base_unet(policy, device) as unet:
            base = evaluate_policy(parts, unet, prompts, steps, **settings)
        base.meta["policy"] = f"base model {policy.model_cfg['source']}"
        base.save(out_dir / "baseline", grid_prompts=cfg.grid_prompts)
        comparison = Comparison(base, result)
        paths.update(comparison.save(out_dir, grid_prompts=cfg.grid_prompts))
        print(f"\n{policy.origin} against its {base.meta['policy']}\n\n{comparison.to_markdown()}\n\n"
              f"{comparison.prompt_markdown()}")
    print(f"\nwrote {out_dir}")
    if cfg.wandb.enabled:
        log_to_wandb(result, cfg, paths.get("grid.png"), comparison, paths.get("grid_compare.png"))
    return result if comparison is None else comparison


def log_to_wandb(result: EvalResult, cfg: DictConfig, grid_path: Path | None, comparison: Comparison | None = None,
                 compare_grid_path: Path | None = None) -> None:
    """One W&B run: the config, the table as a ``wandb.Table``, the means (also as summary) and the grid; with a
    comparison, its table, mean changes and side-by-side grid too."""
    import wandb

    run = wandb.init(
        project=cfg.wandb.project, dir=str(Path(cfg.paths.output_dir)), job_type="evaluate",
        mode="offline" if cfg.wandb.offline else "online", config=OmegaConf.to_container(cfg, resolve=True),
    )
    def table(rows: list[dict[str, Any]]) -> Any:
        return wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])

    metrics: dict[str, Any] = {"eval/table": table(result.table()), **result.means()}
    if grid_path is not None:
        metrics["eval/grid"] = wandb.Image(str(grid_path), caption=f"{result.meta.get('policy')}: prompts x step "
                                                                   f"counts")
    if comparison is not None:
        metrics.update({"compare/table": table(comparison.table()), **comparison.means()})
        if compare_grid_path is not None:
            metrics["compare/grid"] = wandb.Image(str(compare_grid_path), caption="base | policy, same noise")
    run.log(metrics)
    run.summary.update({k: v for k, v in metrics.items() if isinstance(v, float)})
    run.finish()
