"""Loggers that continue a resumed run's records: the run folder's metrics.csv, and its W&B run.

Lightning's CSVLogger deletes an existing metrics.csv when a run starts in its folder. A requeued or restarted job
(``sdpo.cluster``) continues in the same folder, so it would wipe the rows of every iteration before it; with
``append=True`` the rows are added to the file instead, under its existing columns.

W&B starts a new run, with a new id, every time a process starts; a resumed job would split one training run's
curves across several W&B runs. Checkpoints therefore record the W&B run they were written under
(``SDPOModule.on_save_checkpoint``), and ``continue_wandb_run`` points the logger of a resumed run at it.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


class _AppendingWriter(ExperimentWriter):
    """Keeps an existing metrics.csv and starts from its columns, so new rows (and new columns) extend it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(next(csv.reader(file), []))


class RunCSVLogger(CSVLogger):
    """``CSVLogger``; ``append=True`` continues the folder's metrics.csv (train.py sets it for a restarted job)."""

    def __init__(self, *args, append: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.append = append

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            writer = _AppendingWriter if self.append else ExperimentWriter
            self._experiment = writer(log_dir=self.log_dir)
        return self._experiment


def wandb_run_id(loggers: list[Any]) -> str | None:
    """The id of the W&B run among ``loggers`` (None without one, or on ranks other than 0, which have no run)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger.version:
            return str(logger.version)
    return None


def recorded_wandb_run(state: Mapping[str, Any] | None) -> str | None:
    """The W&B run id a loaded checkpoint recorded (None: none, or no checkpoint)."""
    return ((state or {}).get("sdpo") or {}).get("wandb_run_id")


def continue_wandb_run(cfg: DictConfig, state: Mapping[str, Any] | None, ckpt_path: str | None) -> str | None:
    """Make the W&B logger of a run resumed from ``state`` (the checkpoint at ``ckpt_path``) log into the W&B run
    that checkpoint was written under, unless ``logger.wandb.id`` names one. Returns the id it set (None: nothing
    changed)."""
    wandb = (cfg.get("logger") or {}).get("wandb")
    if wandb is None or wandb.get("id"):
        return None
    run_id = recorded_wandb_run(state)
    if run_id:
        with open_dict(cfg):
            wandb.id = run_id
            wandb.resume = "allow"
        log.info("resuming from %s: logging into its W&B run %s (logger.wandb.id=<new id> starts another)",
                 ckpt_path, run_id)
    return run_id
