"""Entry point: ``python -m sdpo.train [+experiment=NAME] [key=value ...]``.

Compose the config, check it, instantiate the data module, the SDPO module, loggers and callbacks, then
``Trainer.fit``. Thin on purpose: everything it builds is described in ``conf/``.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sdpo.config_checks import validate_config

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger(__name__)


def quiet_libraries() -> None:
    """Silence warnings from diffusers/transformers that say nothing about the user's run."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    # Frozen parts are in eval mode on purpose; the pytree notice is Lightning-internal.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r".*litlogger")


def train(cfg: DictConfig) -> L.Trainer:
    """Train with a composed config; returns the fitted Trainer (tests read its metrics)."""
    validate_config(cfg)
    quiet_libraries()
    if "SDPO_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["SDPO_NUM_THREADS"]))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if str(cfg.trainer.get("precision", "32-true")).startswith("32"):
        # TF32 convolutions move recomputed log-probs by ~1e-4 on Ampere+ GPUs: the size of the clip range.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    from sdpo.module import SDPOModule

    datamodule = instantiate(cfg.data)
    module = SDPOModule(model=cfg.model, algo=cfg.algo, reward=cfg.reward, optim=cfg.optim, seed=cfg.seed)
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values() if c is not None]
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values() if c is not None]
    trainer = instantiate(cfg.trainer, logger=loggers, callbacks=callbacks)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    return trainer


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
