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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from omegaconf import DictConfig, OmegaConf

from sdpo.comparison import Comparison
from sdpo.eval_config import resolve_device, validate_eval_config
from sdpo.eval_results import EvalResult
from sdpo.evaluation import check_step_counts, evaluate_policy
from sdpo.rewards.specs import build_rewards
from sdpo.saved_policy import LoadedPolicy, load_policy

log = logging.getLogger(__name__)


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
    from sdpo.library_output import quiet_libraries

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
