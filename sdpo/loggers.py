"""The CSV logger of a run folder, able to continue the folder's metrics.csv.

Lightning's CSVLogger deletes an existing metrics.csv when a run starts in its folder. A requeued or restarted job
(``sdpo.cluster``) continues in the same folder, so it would wipe the rows of every iteration before it; with
``append=True`` the rows are added to the file instead, under its existing columns.
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


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
