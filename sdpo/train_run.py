"""The training run a composed ``train`` config describes (``python -m sdpo.train`` calls ``train``).

Check the config, instantiate the data module, the SDPO module, loggers and callbacks, then ``Trainer.fit``. Thin on
purpose: everything it builds is described in ``conf/``. Kept apart from the command-line module ``sdpo.train``,
which imports it only once Hydra has a config to run, so that ``--help`` and shell completion skip these imports.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

import sdpo.app_config  # noqa: F401  (registers the configs' resolvers)
from sdpo.cluster import exit_with_a_failed_ranks_status, local_ranks_stopped_on_failure, slurm_plugins
from sdpo.config_checks import ConfigError, check_distributed, pairs_per_rank, validate_config
from sdpo.library_output import quiet_libraries
from sdpo.loggers import continue_metrics, continue_wandb_run
from sdpo.policy.speed import compile_mode, use_compile_cache
from sdpo.progress import default_progress_bar
from sdpo.restart import restart_checkpoint
from sdpo.resume import check_resume, check_work_left, iterations_done, read_resume_state
from sdpo.run_log import reports_after_fit

log = logging.getLogger(__name__)


def log_config(logger: Any, cfg: DictConfig) -> None:
    """The composed config as the logger's hyperparameters. This starts a W&B run, so a missing W&B login surfaces
    here, before any iteration: say how to log in or go offline instead of wandb's bare 'No API key configured'."""
    try:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    except Exception as error:
        if type(error).__name__ != "UsageError" or "API key" not in str(error):
            raise
        raise ConfigError(
            f"logger=wandb found no W&B login on this machine (wandb: {error}) Log in with `wandb login` or set "
            f"WANDB_API_KEY; or log offline with logger.wandb.offline=true (no account needed) and upload later "
            f"with `wandb sync <run>/wandb/offline-run-*`"
        ) from None


def warn_single_pair(cfg: DictConfig) -> bool:
    """One prompt pair per iteration on one process: until a prompt has ``algo.tracker.min_count`` rewards, its
    advantages are normalised over that pair's two trajectories, which gives +-1 whatever the reward difference.
    Legal, but rarely meant; say so once."""
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    single = isinstance(devices, int) and devices * int(nodes or 1) == 1
    if single and pairs_per_rank(cfg) == 1:
        log.warning("one prompt pair per iteration: until a prompt has algo.tracker.min_count=%s rewards, its "
                    "advantages are normalised over that pair alone (+-1, whatever the reward difference); raise "
                    "data.prompts_per_batch for a meaningful baseline", cfg.algo.tracker.min_count)
        return True
    return False


def instantiate_callback(name: str, callback_cfg: DictConfig) -> L.Callback:
    """``callbacks.<name>``, with a ValueError from its own argument checks (a step count of 0, a period < 1)
    turned into a refusal: the message alone, no Hydra instantiation traceback, no run folder left behind."""
    try:
        return instantiate(callback_cfg)
    except InstantiationException as error:
        cause = error.__cause__
        if not isinstance(cause, ValueError):
            raise
        said = str(cause)
        raise ConfigError(said if said.startswith(f"callbacks.{name}") else f"callbacks.{name}: {said}") from None


def train(cfg: DictConfig) -> L.Trainer:
    """Train with a composed config; returns the fitted Trainer (tests read its metrics)."""
    validate_config(cfg)
    check_distributed(cfg)
    warn_single_pair(cfg)
    quiet_libraries()
    if "SDPO_NUM_THREADS" in os.environ:  # e.g. 1 per process when several CPU ranks share few cores
        torch.set_num_threads(int(os.environ["SDPO_NUM_THREADS"]))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if str(cfg.trainer.get("precision", "32-true")).startswith("32"):
        # TF32 convolutions move recomputed log-probs by ~1e-4 on Ampere+ GPUs: the size of the clip range.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    from sdpo.module import SDPOModule

    ckpt_path = cfg.get("ckpt_path")
    restart = restart_checkpoint(cfg, os.environ)
    if restart is not None:
        log.info("restarted job (SLURM requeue or torchrun restart): continuing from %s", restart)
        ckpt_path = restart
    if compile_mode(cfg.algo.get("compile")) != "off" and cfg.algo.get("compile_backend", "inductor") == "inductor":
        use_compile_cache(cfg.algo.get("compile_cache_dir"))  # before anything compiles (and before DDP launches)
    resumed = read_resume_state(ckpt_path, restarted=restart is not None)  # once: resume checks, the W&B run id
    check_work_left(cfg, resumed, ckpt_path)
    # resumed in its own folder: continue its metrics.csv rather than let Lightning delete it
    continue_metrics(cfg, ckpt_path, iterations_done(resumed) if resumed else None)
    for difference in check_resume(cfg, resumed, ckpt_path):  # raises unless resume_check=false
        log.warning("resuming %s with a changed setting (resume_check=false): %s", ckpt_path, difference)
    continue_wandb_run(cfg, resumed, ckpt_path)
    datamodule = instantiate(cfg.data)
    # before the module loads its models: a callback's own argument checks are refusals like the config check's
    callbacks = [instantiate_callback(name, c) for name, c in cfg.get("callbacks", {}).items() if c is not None]
    callbacks += default_progress_bar(callbacks, bool(cfg.trainer.get("enable_progress_bar", True)))
    module = SDPOModule(model=cfg.model, algo=cfg.algo, reward=cfg.reward, optim=cfg.optim, seed=cfg.seed)
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values() if c is not None]
    no_checkpoints = {}
    if not any(isinstance(c, ModelCheckpoint) for c in callbacks) and "enable_checkpointing" not in cfg.trainer:
        no_checkpoints = {"enable_checkpointing": False}  # callbacks.checkpoint=null: not Lightning's default either
    trainer = instantiate(cfg.trainer, logger=loggers, callbacks=callbacks, plugins=slurm_plugins() or None,
                          **no_checkpoints)
    for logger in trainer.loggers:  # not ``loggers``: trainer.fast_dev_run swaps them for a logger that writes nothing
        log_config(logger, cfg)
    exit_with_a_failed_ranks_status()  # a rank this process started fails: exit with its status, not SIGKILL's
    # the reward table after the progress bar's last redraw, not above it; then, after a failure here, the ranks
    # this process started are stopped rather than left waiting for it
    with local_ranks_stopped_on_failure(trainer), reports_after_fit():
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer
