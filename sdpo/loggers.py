"""Loggers that continue a resumed run's records: the run folder's metrics.csv, and its W&B run.

Lightning's CSVLogger deletes an existing metrics.csv when a run starts in its folder. A run resumed in the folder
its checkpoint lies in (a requeued or restarted job, ``sdpo.cluster``, or ``ckpt_path=`` with the same
``hydra.run.dir=``) would wipe the rows of every iteration before it; with ``append=True`` the rows are added to
the file instead, under its existing columns, after dropping the rows of iterations the checkpoint does not hold
(the resumed run repeats those). A run that would start over another run's metrics.csv is refused
(``continue_metrics``).

W&B starts a new run, with a new id, every time a process starts; a resumed job would split one training run's
curves across several W&B runs. Checkpoints therefore record the W&B run they were written under
(``SDPOModule.on_save_checkpoint``), and ``continue_wandb_run`` points the logger of a resumed run at it.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, open_dict

from sdpo.resume import csv_metrics_path, foreign_metrics_problem

log = logging.getLogger(__name__)


def drop_rows_from_epoch(path: Path, epoch: int) -> int:
    """Remove the rows of ``path`` (a metrics.csv) whose ``epoch`` is ``epoch`` or later; returns how many."""
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        header, rows = list(reader.fieldnames or []), list(reader)
    kept = [row for row in rows if not (row.get("epoch") or "").strip() or int(float(row["epoch"])) < epoch]
    if len(kept) < len(rows):
        with open(path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=header)
            writer.writeheader()
            writer.writerows(kept)
    return len(rows) - len(kept)


class _AppendingWriter(ExperimentWriter):
    """Keeps an existing metrics.csv and starts from its columns, so new rows (and new columns) extend it."""

    def __init__(self, log_dir: str, keep_epochs_below: int | None = None) -> None:
        self.keep_epochs_below = keep_epochs_below  # read by _check_log_dir_exists, which the parent's init calls
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            if self.keep_epochs_below is not None:
                dropped = drop_rows_from_epoch(Path(self.metrics_file_path), self.keep_epochs_below)
                if dropped:
                    log.info("%s: dropped %d row(s) of iterations from %d on, which the checkpoint does not hold "
                             "(they run again)", self.metrics_file_path, dropped, self.keep_epochs_below)
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(next(csv.reader(file), []))


class RunCSVLogger(CSVLogger):
    """``CSVLogger``; ``append=True`` continues the folder's metrics.csv (sdpo.train_run sets it for a run resumed in
    its own folder), keeping only the rows of the first ``keep_epochs_below`` iterations when that is set."""

    def __init__(self, *args, append: bool = False, keep_epochs_below: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.append = append
        self.keep_epochs_below = keep_epochs_below

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            if self.append:
                self._experiment = _AppendingWriter(self.log_dir, keep_epochs_below=self.keep_epochs_below)
            else:
                self._experiment = ExperimentWriter(log_dir=self.log_dir)
        return self._experiment


def continue_metrics(cfg: DictConfig, ckpt_path: str | None, done: int | None) -> bool:
    """Decide what the CSV logger does with a metrics.csv already in the run folder, before anything is written.

    - Resumed from a checkpoint inside this run folder (``done`` iterations): continue it (append), without the rows
      of later iterations. Returns True.
    - Any other run: Lightning would delete it, so refuse with the folder to change (``ConfigError``).
    - No metrics.csv, or no CSV logger: nothing to decide (False).
    """
    from sdpo.config_checks import ConfigError

    path = csv_metrics_path(cfg)
    if path is None or not path.is_file() or path.stat().st_size == 0:
        return False
    problem = foreign_metrics_problem(cfg, ckpt_path)
    if problem is not None:
        raise ConfigError(problem)
    with open_dict(cfg):
        cfg.logger.csv.append = True
        if done is not None:
            cfg.logger.csv.keep_epochs_below = done
    return True


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
