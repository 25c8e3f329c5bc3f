"""Say why a path given as a checkpoint is not one, and what was probably meant.

Used wherever a checkpoint path is read (``ckpt_path=`` of a run, a restarted job's ``last.ckpt``, ``sdpo.evaluate
checkpoint=``, ``sdpo.export``), so a researcher who gave a run folder, a broken link or a mistyped file name is told
the argument to use, already quoted for Hydra and the shell (checkpoint names hold ``=``).
"""

from __future__ import annotations

import os
import shlex
import zipfile
from pathlib import Path
from typing import Any

import torch

from sdpo.commands import cli_arg

ZIP_MAGIC = b"PK\x03\x04"  # how every file torch.save writes begins


def run_last_checkpoint(cfg: Any) -> Path | None:
    """Where this run's own ``last.ckpt`` is (``callbacks.checkpoint.dirpath``); None without checkpointing."""
    checkpoint = (cfg.get("callbacks") or {}).get("checkpoint")
    if not checkpoint or not checkpoint.get("dirpath"):
        return None
    return Path(str(checkpoint["dirpath"])) / "last.ckpt"


def as_argument(key: str | None, path: Path) -> str:
    """``key=path`` as one shell word Hydra reads back, or the path alone as a shell word (``key=None``)."""
    return cli_arg(key, path) if key else shlex.quote(str(path))


def checkpoints_held(folder: Path, key: str | None, most: int = 3, skip: Path | None = None) -> str:
    """``"; that folder holds <arg>, <arg>"`` for the newest complete-looking checkpoint files in ``folder`` other
    than ``skip``."""
    try:
        # is_file: a dangling link is not one; is_zipfile: one cut short has lost the directory at its end
        files = [p for p in folder.glob("*.ckpt") if p.is_file() and zipfile.is_zipfile(p)]
        if skip is not None:
            files = [p for p in files if not p.samefile(skip)]
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


def read_checkpoint(ckpt_path: str | Path, mmap: bool = False, key: str | None = "checkpoint") -> dict:
    """A checkpoint written by ``sdpo.train`` (safe loading only; ``mmap``: its tensors are not read), or an error
    that says what the file is not, naming the other checkpoints beside it as ``key=<path>``."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint: {not_a_checkpoint(path, key=None)}")
    if path.suffix == ".safetensors":
        raise ValueError(f"{path}: exported weights, not a training checkpoint (a run's checkpoints/last.ckpt); "
                         f"evaluate exported weights with lora={path.parent}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # pickle, zip and weights-only errors all mean: not a checkpoint we can read safely
        raise ValueError(f"{path}: {unreadable(path, error, key)}") from error
    if not isinstance(checkpoint, dict) or "hyper_parameters" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"{path}: not a checkpoint written by sdpo.train (it has no hyper_parameters/state_dict)"
                         + other_checkpoints(path, key))
    return checkpoint


def unreadable(path: Path, error: Exception, key: str | None) -> str:
    """Why torch could not load ``path``: a torch archive cut short or damaged (a copy or a save that did not finish,
    a full disk), or a file of another kind; with the other checkpoints beside it."""
    with path.open("rb") as file:
        head = file.read(len(ZIP_MAGIC))
    if head == ZIP_MAGIC:  # torch.save's format is a zip archive; torch then fails on its missing directory
        what = (f"a torch archive of {path.stat().st_size:,} bytes that cannot be read ({type(error).__name__}): "
                f"cut short or damaged (a copy or save that did not finish, a full disk?)")
    else:
        what = f"not a checkpoint torch can load safely ({type(error).__name__}); give a run's checkpoints/last.ckpt"
    return what + other_checkpoints(path, key)


def other_checkpoints(path: Path, key: str | None) -> str:
    """``checkpoints_held`` of ``path``'s folder, leaving out ``path`` itself."""
    return checkpoints_held(path.parent, key, skip=path)
