"""Messages for a path that is not a checkpoint (``sdpo.checkpoint_files.not_a_checkpoint``): each case names the
argument that was probably meant, quoted so Hydra reads it back (checkpoint names hold '=')."""

from __future__ import annotations

import os
import shlex

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser

from sdpo.checkpoint_files import not_a_checkpoint


def parsed_value(argument: str) -> str:
    """What Hydra makes of ``argument`` after the shell has split it (one word)."""
    (word,) = shlex.split(argument)
    return OverridesParser.create().parse_overrides([word])[0].value()


def test_a_dangling_link_says_so_and_names_the_files_there_newest_first(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    older, newer = folder / "epoch=13-step=56.ckpt", folder / "epoch=14-step=60.ckpt"
    torch.save({}, older)
    torch.save({}, newer)
    os.utime(older, (1, 1))
    (folder / "last.ckpt").symlink_to("epoch=12-step=52.ckpt")
    said = not_a_checkpoint(folder / "last.ckpt", key="ckpt_path")
    assert said.startswith("is a link to epoch=12-step=52.ckpt, which no longer exists; that folder holds ")
    held = said.split("that folder holds ")[1].removesuffix(" (newest first)").split(", ")
    assert [parsed_value(arg) for arg in held] == [str(newer), str(older)]  # each argument parses to its file


def test_a_missing_file_names_the_checkpoints_beside_it_or_nothing(tmp_path):
    assert not_a_checkpoint(tmp_path / "lats.ckpt") == "no such file"
    (tmp_path / "epoch=0-step=4.ckpt").write_bytes(b"PK\x03\x04")  # cut short: not offered
    torch.save({}, tmp_path / "last.ckpt")
    said = not_a_checkpoint(tmp_path / "lats.ckpt")
    assert said == f"no such file; that folder holds checkpoint={tmp_path / 'last.ckpt'} (newest first)"
    assert not_a_checkpoint(tmp_path / "x.ckpt", key=None).endswith(f"holds {tmp_path / 'last.ckpt'} (newest first)")


def test_folders_point_to_the_checkpoint_or_the_export_they_hold(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert not_a_checkpoint(run, key="ckpt_path") == f"is a run folder: use ckpt_path={run}/checkpoints/last.ckpt"
    assert not_a_checkpoint(run / "checkpoints") == f"is a folder: use checkpoint={run}/checkpoints/last.ckpt"
    (run / "trained").mkdir()
    (run / "trained" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    assert not_a_checkpoint(run / "trained").startswith("is an exported folder (weights for diffusers)")
    assert not_a_checkpoint(tmp_path).startswith("is a folder, not a checkpoint file")
