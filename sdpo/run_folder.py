"""Run folders: what Hydra makes of them, and what a refused run or sweep point leaves (nothing).

Hydra creates the run folder (``.hydra/`` and ``<job>.log``) before our code sees the config. A run that fails
its config check has done nothing, so that folder is only one more dead entry in ``outputs/`` next to the real
runs (which ``sdpo.plot`` and the notebook then have to skip). The folder is removed only when Hydra named it
itself (no ``hydra.run.dir=``: a folder the user chose, or a SLURM or torchrun run folder, may hold earlier work)
and it holds nothing but those (and the CSV logger's copy of the config, written as fitting starts, when a check
there refuses the run). In a folder that does hold a run, Hydra would overwrite its
``.hydra/`` record: ``KeepEarlierRecord`` copies it aside first, and a refused run puts it back.

Sweep points get folder names without ``=`` and ``,`` (``safe_dirname``).
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sdpo.config_checks import ConfigError
from sdpo.resume import NothingToResume, ResumeMismatch
from sdpo.rewards import UnscorablePrompts
from sdpo.rewards.hub import WeightsNotFound
from sdpo.run_log import to_log_files

# What the entry points report as a refusal (``refuse``): the message says what to change, a traceback adds nothing
REFUSALS = (ConfigError, ResumeMismatch, NothingToResume, UnscorablePrompts, WeightsNotFound)


def safe_dirname(text: str) -> str:
    """A sweep point's folder name from its overrides (``algo.num_steps-2_seed-0``): Hydra's ``key=value,key=value``
    put ``=`` and ``,`` into every path under it, which Hydra's own grammar then refuses in ``ckpt_path=`` or
    ``checkpoint=``; a path-valued override (``data.source=/x/y.txt``) made nested folders. Anything but letters,
    digits and ``._+-@%`` becomes ``-``."""
    return re.sub(r"[^\w.+\-@%]", "-", text)


OmegaConf.register_new_resolver("sdpo_dirname", safe_dirname, replace=True)  # conf/hydra/default.yaml


def names_run_dir(hydra_overrides: Any, key: str = "hydra.run.dir") -> bool:
    """Whether the command named its run folder (``hydra.run.dir=``; or ``key``, e.g. ``hydra.sweep.dir``): a
    folder that may hold earlier work."""
    return any(str(o).lstrip("+~").startswith(f"{key}=") for o in hydra_overrides)


RECORD_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")
_saved_record: tuple[Path, Path] | None = None  # (the run's .hydra, this process's copy of what it held)


class KeepEarlierRecord(Callback):
    """Hydra callback (conf/hydra/default.yaml): before Hydra rewrites ``.hydra/`` in a folder named with
    ``hydra.run.dir=`` that already holds a run (a resume, a requeue), copy what it held to ``.hydra/earlier/<k>/``.
    The command and config that started the run would otherwise be lost to the one that continued it, or to one
    that was refused (``refuse`` then puts them back)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _saved_record
        if not names_run_dir(config.hydra.overrides.hydra) or config.hydra.output_subdir is None:
            return
        record = Path(str(config.hydra.run.dir)) / str(config.hydra.output_subdir)
        files = [record / name for name in RECORD_FILES if (record / name).is_file()]
        if not files:
            return
        earlier = record / "earlier"
        copy = earlier / str(1 + sum(1 for _ in earlier.iterdir()) if earlier.is_dir() else 1)
        copy.mkdir(parents=True)
        for file in files:
            shutil.copy2(file, copy / file.name)
        _saved_record = (record, copy)


def restore_earlier_record() -> None:
    """Undo this process's rewrite of ``.hydra/``: a refused run leaves the folder's record as it found it."""
    global _saved_record
    if _saved_record is None:
        return
    record, copy = _saved_record
    for name in RECORD_FILES:
        if (copy / name).is_file():
            shutil.copy2(copy / name, record / name)
    shutil.rmtree(copy, ignore_errors=True)
    if not any(copy.parent.iterdir()):
        copy.parent.rmdir()
    _saved_record = None


def discard_refused_run_folder() -> Path | None:
    """Remove this run's Hydra-named folder if it holds only what Hydra wrote; return it if removed. A sweep point's
    folder is its own (removed the same way); the sweep's folder goes too once nothing but Hydra's multirun.yaml is
    left in it, unless the command named it (``hydra.sweep.dir=``)."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if not multirun and names_run_dir(hydra_cfg.overrides.hydra):
        return None
    folder = Path(hydra_cfg.runtime.output_dir)
    setup_only = {hydra_cfg.output_subdir or ".hydra", f"{hydra_cfg.job.name}.log"}

    def written_before_any_work(entry: Path) -> bool:  # Hydra's files, and the CSV logger's copy of the config
        if entry.name == "csv" and entry.is_dir():
            return all(f.name == "hparams.yaml" for f in entry.iterdir())
        return entry.name in setup_only

    if not folder.is_dir() or not all(written_before_any_work(entry) for entry in folder.iterdir()):
        return None
    shutil.rmtree(folder, ignore_errors=True)
    if multirun:
        sweep = Path(hydra_cfg.sweep.dir)
        named = names_run_dir(hydra_cfg.overrides.hydra, "hydra.sweep.dir")
        if not named and sweep.is_dir() and all(entry.name == "multirun.yaml" for entry in sweep.iterdir()):
            shutil.rmtree(sweep, ignore_errors=True)
            return sweep
    return folder


def refuse(error: Exception) -> SystemExit:
    """The exit for a run refused by a check (bad config, nothing left to resume): the message alone, no
    traceback, and no empty run folder."""
    to_log_files(f"error: {error}", logging.ERROR)  # kept only where the folder is kept
    restore_earlier_record()
    removed = discard_refused_run_folder()
    note = f"\n(nothing ran; its empty run folder {removed} was removed)" if removed else ""
    return SystemExit(f"error: {error}{note}")
