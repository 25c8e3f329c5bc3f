"""Say why a path given as a checkpoint is not one, and what was probably meant.

Used wherever a checkpoint path is read (``ckpt_path=`` of a run, a restarted job's ``last.ckpt``, ``sdpo.evaluate
checkpoint=``, ``sdpo.export``), so a researcher who gave a run folder, a broken link or a mistyped file name is told
the argument to use, already quoted for Hydra and the shell (checkpoint names hold ``=``).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from sdpo.commands import cli_arg


def run_last_checkpoint(cfg: Any) -> Path | None:
    """Where this run's own ``last.ckpt`` is (``callbacks.checkpoint.dirpath``); None without checkpointing."""
    checkpoint = (cfg.get("callbacks") or {}).get("checkpoint")
    if not checkpoint or not checkpoint.get("dirpath"):
        return None
    return Path(str(checkpoint["dirpath"])) / "last.ckpt"


def as_argument(key: str | None, path: Path) -> str:
    """``key=path`` as one shell word Hydra reads back, or the path alone as a shell word (``key=None``)."""
    return cli_arg(key, path) if key else shlex.quote(str(path))


def checkpoints_held(folder: Path, key: str | None, most: int = 3) -> str:
    """``"; that folder holds <arg>, <arg>"`` for the newest complete-looking checkpoint files in ``folder``."""
    try:
        files = [p for p in folder.glob("*.ckpt") if p.is_file()]  # is_file: a dangling link is not one
    except OSError:
        return ""
    files.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    if not files:
        return ""
    return "; that folder holds " + ", ".join(as_argument(key, p) for p in files[:most]) + " (newest first)"


def not_a_checkpoint(path: Path, key: str | None = "checkpoint") -> str:
    """Why ``path`` is not a checkpoint file, with the argument (``key=...``) that was probably meant."""
    if path.is_symlink() and not path.exists():
        return f"is a link to {os.readlink(path)}, which no longer exists" + checkpoints_held(path.parent, key)
    if not path.is_dir():
        return "no such file" + checkpoints_held(path.parent, key)
    run_checkpoint = path / "checkpoints" / "last.ckpt"
    if run_checkpoint.is_file():
        return f"is a run folder: use {as_argument(key, run_checkpoint)}"
    if (path / "last.ckpt").is_file():
        return f"is a folder: use {as_argument(key, path / 'last.ckpt')}"
    if list(path.glob("*.safetensors")):
        return f"is an exported folder (weights for diffusers): use {as_argument('lora', path)}"
    return "is a folder, not a checkpoint file (e.g. outputs/train/<run>/checkpoints/last.ckpt)"


def not_exported_weights(folder: Path) -> str:
    """Why ``folder`` (given as ``lora=``) holds no exported weights, with the argument that was probably meant."""
    if (folder / "trained").is_dir():
        return f"is a run folder: use {as_argument('lora', folder / 'trained')}"
    if (folder / "checkpoints" / "last.ckpt").is_file():
        return (f"is a run folder with no trained/ export (stopped early?): use "
                f"{as_argument('checkpoint', folder / 'checkpoints' / 'last.ckpt')}")
    return ("holds no exported weights (*.safetensors): give a run's trained/ folder or one written by "
            "python -m sdpo.export")
