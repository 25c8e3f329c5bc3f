"""Printed commands and sweep folder names survive Hydra's override grammar and the shell."""

from __future__ import annotations

import shlex

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from sdpo.commands import cli_arg
from sdpo.run_folder import safe_dirname

PATHS = [
    "/runs/plain-path_1.ckpt",
    "outputs/train-multirun/2026-11-27/0_algo.num_steps=2,seed=0/checkpoints/last.ckpt",  # Hydra's own sweep names
    "/tmp/my runs/it's [best]/last.ckpt",
    "/tmp/$HOME/`x`/a:b.ckpt",
]


@pytest.mark.parametrize("path", PATHS)
def test_a_printed_argument_reaches_hydra_as_the_same_path(path: str) -> None:
    words = shlex.split(f"python -m sdpo.train {cli_arg('ckpt_path', path)}")
    assert len(words) == 4  # one shell word
    override = OverridesParser.create().parse_override(words[-1])
    assert override.key_or_group == "ckpt_path" and override.value() == path


def test_plain_paths_stay_unquoted() -> None:
    assert cli_arg("checkpoint", "/runs/a/last.ckpt") == "checkpoint=/runs/a/last.ckpt"


def test_sweep_folder_names_need_no_quoting() -> None:
    name = safe_dirname("algo.num_steps-2_data.source-/tmp/p q.txt_optim.lr-1e-4")
    assert name == "algo.num_steps-2_data.source--tmp-p-q.txt_optim.lr-1e-4"
    assert cli_arg("ckpt_path", f"/x/0_{name}/last.ckpt") == f"ckpt_path=/x/0_{name}/last.ckpt"
