"""Restarted cluster jobs: which checkpoint a restart continues from, the job id ``scontrol requeue`` gets, and the
requeue command itself (a stand-in ``scontrol`` on PATH records what it was asked)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from sdpo.cluster import RequeueOnSignal, requeue, slurm_job_id
from sdpo.config_checks import ConfigError
from sdpo.restart import restart_checkpoint


def fake_scontrol(folder: Path, exit_code: int = 0) -> Path:
    """An ``scontrol`` that appends its arguments to ``folder/calls`` and exits with ``exit_code``."""
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{folder}/calls"\necho "refused" >&2\nexit {exit_code}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return folder / "calls"


def test_slurm_job_id_names_array_tasks():
    assert slurm_job_id({"SLURM_JOB_ID": "4242"}) == "4242"
    assert slurm_job_id({"SLURM_JOB_ID": "4243", "SLURM_ARRAY_JOB_ID": "4200", "SLURM_ARRAY_TASK_ID": "3"}) == "4200_3"
    assert slurm_job_id({}) is None


def test_only_a_restarted_job_continues_and_an_explicit_checkpoint_wins(tmp_path, caplog):
    checkpoints = tmp_path / "checkpoints"
    cfg = OmegaConf.create({"ckpt_path": None, "callbacks": {"checkpoint": {"dirpath": str(checkpoints)}}})
    requeued, restarted = {"SLURM_RESTART_COUNT": "1"}, {"TORCHELASTIC_RESTART_COUNT": "2"}
    with caplog.at_level(logging.WARNING, logger="sdpo.restart"):
        assert restart_checkpoint(cfg, requeued) is None  # nothing saved (or another folder): base model, and why
    assert "SLURM_RESTART_COUNT=1" in caplog.text and "hydra.run.dir=outputs/<task>/slurm-$SLURM_JOB_ID" in caplog.text
    checkpoints.mkdir()
    (checkpoints / "epoch=1-step=8.ckpt").write_bytes(b"")
    (checkpoints / "last.ckpt").symlink_to("epoch=1-step=8.ckpt")
    assert restart_checkpoint(cfg, requeued) == restart_checkpoint(cfg, restarted) == str(checkpoints / "last.ckpt")
    assert restart_checkpoint(cfg, {"SLURM_RESTART_COUNT": "0", "SLURM_JOB_ID": "1"}) is None  # a first start
    cfg.ckpt_path = "elsewhere.ckpt"
    assert restart_checkpoint(cfg, requeued) is None  # train.py keeps the explicit one


def test_a_restart_whose_last_ckpt_names_a_deleted_file_is_refused_not_trained_from_scratch(tmp_path):
    """Training from the base model would discard the run; the refusal names the checkpoints that are there."""
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    torch.save({}, checkpoints / "epoch=14-step=60.ckpt")
    (checkpoints / "last.ckpt").symlink_to("epoch=13-step=56.ckpt")
    cfg = OmegaConf.create({"ckpt_path": None, "callbacks": {"checkpoint": {"dirpath": str(checkpoints)}}})
    with pytest.raises(ConfigError) as refused:
        restart_checkpoint(cfg, {"TORCHELASTIC_RESTART_COUNT": "1"})
    said = str(refused.value)
    assert "is a link to epoch=13-step=56.ckpt, which no longer exists" in said
    assert f"that folder holds \"ckpt_path='{checkpoints}/epoch=14-step=60.ckpt'\"" in said


def test_requeue_calls_scontrol_and_reports_failure(tmp_path, monkeypatch, caplog):
    calls = fake_scontrol(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert requeue({"SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "1", "SLURM_JOB_ID": "9"})
    assert calls.read_text().splitlines() == ["requeue 7_1"]
    fake_scontrol(tmp_path, exit_code=1)
    with caplog.at_level(logging.ERROR, logger="sdpo.cluster"):
        assert not requeue({"SLURM_JOB_ID": "9"})
    assert "scontrol requeue 9 failed (refused)" in caplog.text and "ckpt_path=" in caplog.text
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert not requeue({"SLURM_JOB_ID": "9"})  # no scontrol at all: logged, not raised
    assert not requeue({})


def test_a_bad_signal_name_fails_early():
    assert RequeueOnSignal("SIGUSR2").signum.name == "SIGUSR2"
    with pytest.raises(ValueError, match="callbacks.requeue.signal='USR9'"):
        RequeueOnSignal("USR9")


def test_a_restart_whose_last_ckpt_is_damaged_says_it_is_the_restarts_and_names_the_readable_ones(tmp_path,
                                                                                                  cache_dir):
    """The restart chose the file, not a ``ckpt_path=`` of the user's: the refusal says so, before anything loads."""
    from sdpo.resume import check_resume_before_loading
    from tests.conftest import compose

    cfg = compose(["trainer.max_epochs=3"], tmp_path, cache_dir)
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    good = checkpoints / "epoch=0-step=4.ckpt"
    torch.save({"hyper_parameters": {}, "state_dict": {}}, good)
    (checkpoints / "epoch=1-step=8.ckpt").write_bytes(good.read_bytes()[:100])  # the newest, cut short
    (checkpoints / "last.ckpt").symlink_to("epoch=1-step=8.ckpt")
    with pytest.raises(ConfigError) as refused:
        check_resume_before_loading(cfg, {"SLURM_RESTART_COUNT": "1"})
    said = str(refused.value)
    assert said.startswith(f"this job is a restart, and the checkpoint it continues from, {checkpoints / 'last.ckpt'}"
                           f", is a torch archive of 100 bytes that cannot be read"), said
    assert said.endswith(f"that folder holds \"ckpt_path='{good}'\" (newest first). Continue from another with the "
                         f"same command and ckpt_path=<file>, rather than train this run from the base model"), said
