"""Entry point: ``python -m sdpo.train [+experiment=NAME] [key=value ...]``; the run itself is ``sdpo.train_run``.

Distributed runs use Lightning's own launchers and cluster environments (``trainer=ddp``; torchrun, SLURM's srun
or one command per node). Every process runs this entry point; ``launch_overrides`` makes them share one run
folder in which only global rank 0 writes the config copy, logs, checkpoints and images.

Start-up imports only Hydra and omegaconf: Hydra answers ``--help``, ``--cfg`` and shell completion (one process per
TAB) in about a second. A run's config is checked with torch alone loaded, so a bad value is refused in a few
seconds; Lightning and diffusers load once the config is known to be good.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence

import hydra
from omegaconf import DictConfig

from sdpo.app_config import CONFIG_DIR


class LaunchError(RuntimeError):
    """A distributed launch that would scatter one run over several folders."""


def launch_overrides(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """Hydra overrides for a process started by an external launcher (torchrun, srun, one command per node).

    Each such process composes its own config, so (1) all must use one run folder: an explicit
    ``hydra.run.dir=...``, or one derived from the SLURM job id / torchrun run id; and (2) ranks > 0 must not
    write a second config copy: they get ``hydra.output_subdir=null`` and a job name of their own (their log file
    in the shared folder: ``train_rank_<R>.log``, or ``train_node<N>_local<L>.log`` for ranks Lightning starts
    itself). Lightning's own re-launch of local ranks already passes rank 0's folder. Returns [] for a plain
    single-process start.
    """
    given_dir = any(arg.startswith("hydra.run.dir=") for arg in argv)
    if "RANK" in env and int(env.get("WORLD_SIZE", "1")) > 1:  # torchrun (Lightning: TorchElasticEnvironment)
        rank, run_id = int(env["RANK"]), env.get("TORCHELASTIC_RUN_ID", "none")
        job, name = (None if run_id in ("", "none") else f"torchrun-{run_id}"), f"train_rank_{rank}"
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:  # srun (Lightning: SLURMEnvironment)
        rank = int(env["SLURM_PROCID"])
        job, name = f"slurm-{env.get('SLURM_JOB_ID', 'job')}", f"train_rank_{rank}"
    elif "NODE_RANK" in env and int(env.get("WORLD_SIZE", "1")) > 1:  # per-node commands, Lightning's own ranks
        node, local = int(env["NODE_RANK"]), int(env.get("LOCAL_RANK", "0"))
        rank, job, name = node + local, None, f"train_node{node}_local{local}"  # rank > 0 unless both are 0
    else:
        return []
    overrides = []
    if not given_dir:
        if job is None:
            raise LaunchError(
                "this process is one of several started by a launcher, and they would each create their own run "
                "folder: pass the same hydra.run.dir=<folder> to every process (e.g. outputs/train/<job id>)"
            )
        overrides.append(f"hydra.run.dir=outputs/${{task_name}}/{job}")
    if rank > 0:
        overrides += ["hydra.output_subdir=null", f"hydra.job.name={name}"]
    return overrides


def run_training(cfg: DictConfig) -> None:
    """``train(cfg)``, imported only now (Lightning and diffusers: ~8 s), with Lightning's exit on SIGTERM made a
    failure: its SystemExit without a code would exit 0, and a killed run must not read as a finished one."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from sdpo.run_log import to_log_files
    from sdpo.train_run import train

    try:
        train(cfg)
    except SIGTERMException:
        to_log_files("run stopped by SIGTERM", logging.WARNING)
        raise SystemExit(128 + signal.SIGTERM) from None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> None:
    from sdpo.config_checks import check_distributed, validate_config
    from sdpo.resume import check_resume_before_loading
    from sdpo.run_folder import REFUSALS, refuse
    from sdpo.run_log import log_fatal_error

    try:
        validate_config(cfg)  # the config alone, before the run's imports: a mistyped key is refused in seconds
        check_distributed(cfg)
        check_resume_before_loading(cfg, os.environ)
        run_training(cfg)
    except REFUSALS as error:
        raise refuse(error) from None
    except Exception:
        log_fatal_error()
        raise


def main() -> None:
    """``python -m sdpo.train``: the Hydra app, with the overrides an externally launched rank needs."""
    try:
        sys.argv += launch_overrides(sys.argv[1:], os.environ)
    except LaunchError as err:
        sys.exit(f"error: {err}")
    hydra_main()


if __name__ == "__main__":
    main()
