"""A run refused before it starts leaves no folder behind, and says why in one message.

Hydra creates the run folder (``.hydra/`` and ``<job>.log``) before our code sees the config. A run that fails
its config check has done nothing, so that folder is only one more dead entry in ``outputs/`` next to the real
runs (which ``sdpo.plot`` and the notebook then have to skip). The folder is removed only when Hydra named it
itself (no ``hydra.run.dir=``: a folder the user chose, or a SLURM or torchrun run folder, may hold earlier work)
and it holds nothing but those two entries.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode


def discard_refused_run_folder() -> Path | None:
    """Remove this single run's Hydra-named folder if it holds only what Hydra wrote; return it if removed."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.RUN:
        return None  # a sweep's folder holds its other points
    if any(override.lstrip("+~").startswith("hydra.run.dir=") for override in hydra_cfg.overrides.hydra):
        return None
    folder = Path(hydra_cfg.runtime.output_dir)
    hydra_only = {hydra_cfg.output_subdir or ".hydra", f"{hydra_cfg.job.name}.log"}
    if not folder.is_dir() or any(entry.name not in hydra_only for entry in folder.iterdir()):
        return None
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def refuse(error: Exception) -> SystemExit:
    """The exit for a run refused by a check (bad config, nothing left to resume): the message alone, no
    traceback, and no empty run folder."""
    removed = discard_refused_run_folder()
    note = f"\n(nothing ran; its empty run folder {removed} was removed)" if removed else ""
    return SystemExit(f"error: {error}{note}")
