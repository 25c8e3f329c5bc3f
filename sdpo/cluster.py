"""Preempted and restarted cluster jobs continue their run exactly.

A SLURM job that is requeued (preemption with ``--requeue``, or ``RequeueOnSignal`` before its time limit) and
torchrun workers restarted after a failure (``--max-restarts``) start again with the same command line, so
``sdpo.train.launch_overrides`` gives them the same run folder (``slurm-<job id>``, ``torchrun-<rdzv id>``).
``sdpo.restart.restart_checkpoint`` then resumes from that folder's ``checkpoints/last.ckpt``: the last completed
iteration, from which a resumed run equals an uninterrupted one (tests/integration/test_train.py). Without it the
restarted job would start over from the base model, writing into the same folder.

Lightning's own SLURM requeue handler is switched off (``slurm_plugins``): it saves a checkpoint the moment the
signal arrives, in the middle of an iteration, and a run resumed from there repeats that iteration's sampling on
partly updated weights and counts its returns twice in the stat tracker.
"""

from __future__ import annotations

import logging
import os
import signal as signals
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning as L

from sdpo.callback_args import raise_problems, requeue_problems, requeue_signal

log = logging.getLogger(__name__)

def slurm_plugins() -> list:
    """Inside a SLURM job step: Lightning's SLURM environment without its mid-iteration requeue checkpoint."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def slurm_job_id(env: Mapping[str, str]) -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for an array task, else the job id."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


class RequeueOnSignal(L.Callback):
    """In a SLURM job, requeue it when ``signal`` arrives (``sbatch --signal=USR1@120``: two minutes before the
    time limit): the requeued job continues from the last completed iteration (``restart_checkpoint``).

    Requeueing at once, rather than after the current iteration, keeps the job from ending as a timeout when the
    iteration outlasts the warning; the partial iteration is redone. Only global rank 0 calls ``scontrol``; the other
    ranks ignore the signal.
    """

    def __init__(self, signal: str = "USR1") -> None:
        raise_problems(requeue_problems(signal))
        self.signum: signals.Signals = requeue_signal(signal)
        self._previous: list[Any] = []  # the handler this one replaced, while registered

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if slurm_job_id(os.environ) is None or threading.current_thread() is not threading.main_thread():
            return  # (Python lets only the main thread set signal handlers)
        # every task of the job step gets the signal, whose default action would end the process: ranks > 0
        # ignore it, rank 0 requeues
        handler = self._requeue if trainer.global_rank == 0 else signals.SIG_IGN
        self._previous = [signals.signal(self.signum, handler)]
        if trainer.global_rank == 0:
            log.info("SLURM job %s: %s requeues it; the requeued job continues from checkpoints/last.ckpt",
                     slurm_job_id(os.environ), self.signum.name)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous:
            previous = self._previous.pop()
            signals.signal(self.signum, previous if previous is not None else signals.SIG_DFL)

    def _requeue(self, signum: int, frame: object) -> None:
        requeue(os.environ)


def requeue(env: Mapping[str, str]) -> bool:
    """``scontrol requeue <job>``; logs (rather than raises) a failure: a signal handler must not end the run."""
    job = slurm_job_id(env)
    if job is None:
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        log.error("could not requeue SLURM job %s (%s): resume it with ckpt_path=<run>/checkpoints/last.ckpt",
                  job, error)
        return False
    if result.returncode != 0:
        log.error("scontrol requeue %s failed (%s): resume it with ckpt_path=<run>/checkpoints/last.ckpt", job,
                  result.stderr.strip() or result.returncode)
        return False
    log.info("requeued SLURM job %s; it will continue from checkpoints/last.ckpt", job)
    return True


def stop_local_ranks(trainer: L.Trainer) -> int:
    """Kill the processes this one started for the run's other local ranks (Lightning's launcher of
    ``trainer.devices=N``); returns how many were still running.

    A rank that fails alone (an out-of-memory error in the held-out evaluation only rank 0 runs, a refusal only it
    makes) leaves the others waiting in their next collective for the process group's timeout, 30 minutes, holding
    their GPUs. Lightning kills its children only on Ctrl-C. They are taken off the launcher's list first: its
    watchdog kills this process too when a child ends with an error, which would cut short this rank's report.
    """
    children = getattr(getattr(trainer.strategy, "launcher", None), "procs", None)
    if not children:
        return 0
    running = [proc for proc in children if proc.poll() is None]
    children.clear()  # the watchdog's list too: it now sees no child to avenge
    for proc in running:
        proc.kill()
        proc.wait(timeout=30)
    if running:
        log.error("this rank failed: stopped the %d other local process(es) of the run, which would otherwise wait "
                  "for it in their next collective until the process group's timeout", len(running))
    return len(running)


def exit_with_a_failed_ranks_status() -> None:
    """When a rank Lightning started fails, its watchdog (``_ChildProcessObserver``, in rank 0's process) kills the
    other ranks and then rank 0 itself with SIGKILL, so the run's command exited 137: what schedulers and people
    read as "killed for memory". Now rank 0 exits with the failed rank's own status (1 for an error), its printed
    output flushed first. The rank's stop notice still comes from the failed rank. Without that Lightning class (a
    version that changed it), Lightning's behaviour stays."""
    try:
        from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
    except ImportError:
        return
    lightnings = getattr(_ChildProcessObserver, "_terminate_all", None)
    if lightnings is None or getattr(lightnings, "exits_with_failed_status", False):
        return

    def terminate_all(observer: Any) -> None:
        if observer._main_pid != os.getpid():
            return lightnings(observer)
        failed = next((proc.returncode for proc in observer._child_processes if proc.returncode), 1)
        for proc in observer._child_processes:
            proc.send_signal(observer._termination_signal)
        flushing = threading.Thread(target=_flush_output, daemon=True)  # not forever: the main thread may hold a lock
        flushing.start()
        flushing.join(timeout=2)
        os._exit(failed if failed > 0 else 128 - failed)  # killed by signal N: 128 + N, as a shell reports it

    terminate_all.exits_with_failed_status = True  # type: ignore[attr-defined]
    _ChildProcessObserver._terminate_all = terminate_all


def _flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a broken pipe
            pass


@contextmanager
def local_ranks_stopped_on_failure(trainer: L.Trainer) -> Iterator[None]:
    """Around ``trainer.fit``: if it raises here, stop this node's other ranks (``stop_local_ranks``). A signal
    (Ctrl-C, SIGTERM) reaches every rank by itself and is left to Lightning."""
    try:
        yield
    except Exception:
        stop_local_ranks(trainer)
        raise
