"""Which checkpoint a restarted cluster job continues from (a requeued SLURM job, a torchrun worker restarted after a
failure): its run folder's ``last.ckpt``. Light (torch only), so the command line checks it before the training stack
loads; ``sdpo.cluster`` holds the rest of the cluster support."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from sdpo.checkpoint_files import not_a_checkpoint, run_last_checkpoint
from sdpo.config_checks import ConfigError

log = logging.getLogger(__name__)

RESTART_COUNTS = ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT")  # > 0 in a requeued / restarted job


def restart_checkpoint(cfg: Any, env: Mapping[str, str], warn: bool = True) -> str | None:
    """The checkpoint a restarted job continues from: its run folder's ``last.ckpt`` when the scheduler says this is
    a restart and no ``ckpt_path`` was given; None otherwise (a first start trains from the base model). ``warn``:
    log why a restart found no checkpoint (once per run: the preflight asks quietly)."""
    restarts = {name: env[name] for name in RESTART_COUNTS if int(env.get(name) or 0) > 0}
    if cfg.get("ckpt_path") or not restarts:
        return None
    last = run_last_checkpoint(cfg)
    if last is None:
        return None
    if last.exists():
        return str(last)
    if last.is_symlink():  # a link to a deleted file: training from the base model would discard the run
        raise ConfigError(f"this job is a restart ({', '.join(f'{k}={v}' for k, v in restarts.items())}), but its "
                          f"{last} {not_a_checkpoint(last, key='ckpt_path')}: continue from one of those with the "
                          f"same command and ckpt_path=<file>, rather than train this run from the base model")
    if warn:
        log.warning(
            "this job is a restart (%s) but %s does not exist, so it trains from the base model. A restart finds its "
            "checkpoint only in the run folder it first ran in: multi-task SLURM jobs and torchrun runs get one from "
            "their job / rendezvous id, a single-task SLURM job needs hydra.run.dir=outputs/<task>/slurm-$SLURM_JOB_ID "
            "(or it was stopped before its first iteration ended)",
            ", ".join(f"{k}={v}" for k, v in restarts.items()), last,
        )
    return None
