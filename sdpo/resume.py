"""Refuse a resume whose settings differ from those the checkpoint's state was built under.

A checkpoint carries more than weights: the per-(prompt, step) reward statistics, the step count the first
epoch's rewards were measured at, and adapters whose output depends on the LoRA scale. Resuming it with another
``algo.num_steps``, reward or base model would silently mix statistics of different steps or reward scales (and
the end-of-run summary would compare two rewards); another ``model.lora.alpha`` would rescale every adapter. Lightning
restores such a checkpoint without complaint, so ``train`` compares the settings first, before any model loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sdpo.checkpoint_files import read_checkpoint
from sdpo.config_checks import ConfigError


class ResumeMismatch(ValueError):
    """``ckpt_path`` was written under settings its state depends on, and this run changes them."""


class NothingToResume(ValueError):
    """``ckpt_path`` has already reached this run's iteration or optimizer-step limit: fitting would do nothing."""


def reward_identity(reward: Mapping[str, Any]) -> Any:
    """What sets a reward's scale: its name, and for a weighted sum each part's reward and weight. Paths, dtypes and
    cache folders may differ between machines without changing the scores, so they are left out."""
    if reward.get("name") != "multi":
        return reward.get("name")
    parts = reward.get("components") or {}
    return {label: [(part or {}).get("name", label), float((part or {}).get("weight", 1.0))]
            for label, part in sorted(parts.items())}


def resume_settings(model: Mapping[str, Any], algo: Mapping[str, Any], reward: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a checkpoint's state depends on, by config key (plain values, comparable across runs)."""
    lora = model.get("lora") or {}
    settings: dict[str, Any] = {
        "algo.num_steps": algo.get("num_steps"),
        "reward": reward_identity(reward),
        "model.source": model.get("source"),
        "model.revision": model.get("revision"),
        "model.step_kind": model.get("step_kind", "auto"),
        "model.spacing": model.get("spacing"),
        "model.steps_offset": model.get("steps_offset"),
        "model.lora.enabled": bool(lora.get("enabled")),
    }
    if lora.get("enabled"):
        settings["model.lora.rank"] = lora.get("rank")
        alpha = lora.get("alpha")
        settings["model.lora.alpha"] = lora.get("rank") if alpha is None else alpha  # null means alpha = rank
        settings["model.lora.targets"] = sorted(lora.get("targets") or [])
    if model.get("source") == "tiny":
        settings["model.tiny"] = model.get("tiny")
    return settings


def _plain(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})


def resume_differences(checkpoint_hparams: Mapping[str, Any], cfg: DictConfig) -> list[str]:
    """``"<key>: <checkpoint's value> in the checkpoint, <this run's> here"`` for every setting they disagree on."""
    saved = resume_settings(*(_plain(checkpoint_hparams.get(k)) for k in ("model", "algo", "reward")))
    now = resume_settings(_plain(cfg.model), _plain(cfg.algo), _plain(cfg.reward))
    changed = [f"{key}: {saved[key]!r} in the checkpoint, {now.get(key)!r} here"
               for key in saved if saved[key] != now.get(key)]
    return changed + [f"{key}: unset in the checkpoint, {now[key]!r} here" for key in now if key not in saved]


def read_resume_state(ckpt_path: str | Path | None, restarted: bool = False) -> dict[str, Any] | None:
    """The checkpoint a run resumes from, memory-mapped (its weights are not read here), or None without one; a
    ``ConfigError`` saying what the file is when it is not a readable checkpoint of ``sdpo.train`` (``restarted``: it
    is the ``last.ckpt`` a restarted job found, not a ``ckpt_path=`` the user gave). A path Lightning resolves
    itself (``last``, a URL) is not read here."""
    if not ckpt_path or not Path(str(ckpt_path)).is_file():
        return None
    try:
        return read_checkpoint(ckpt_path, mmap=True, key="ckpt_path")
    except ValueError as error:  # a damaged file, or not one of our checkpoints: Lightning would fail on it later
        reason = str(error).removeprefix(f"{Path(str(ckpt_path))}: ")
        if restarted:
            raise ConfigError(f"this job is a restart, and the checkpoint it continues from, {ckpt_path}, is {reason}."
                              f" Continue from another with the same command and ckpt_path=<file>, rather than "
                              f"train this run from the base model") from None
        raise ConfigError(f"ckpt_path={ckpt_path}: {reason}") from None


def check_resume(cfg: DictConfig, state: Mapping[str, Any] | None, ckpt_path: str | Path | None) -> list[str]:
    """Raise ``ResumeMismatch`` when resuming ``state`` (``read_resume_state(ckpt_path)``) under ``cfg`` changes
    what it depends on, unless ``resume_check=false``; then return the differences (the caller warns)."""
    hparams = (state or {}).get("hyper_parameters")
    if not hparams:
        return []
    differences = resume_differences(hparams, cfg)
    if differences and cfg.get("resume_check", True):
        listed = "\n  - ".join(differences)
        raise ResumeMismatch(
            f"ckpt_path={ckpt_path} was trained under other settings that its state depends on (reward statistics "
            f"per prompt and step, the adapters' scale, the first epoch's rewards):\n  - {listed}\n"
            f"Resume with the checkpoint's settings (its config is in the run folder's .hydra/config.yaml), start a "
            f"new run, or set resume_check=false to resume anyway (e.g. the same weights under another path)."
        )
    return differences


def iterations_done(state: Mapping[str, Any]) -> int:
    """Iterations a checkpoint has completed, as Lightning counts them against ``trainer.max_epochs`` (the fit
    loop's processed epochs; our checkpoints are written only at iteration ends)."""
    progress = state.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    return int(progress.get("processed", int(state.get("epoch", -1)) + 1))


def check_work_left(cfg: DictConfig, state: Mapping[str, Any] | None, ckpt_path: str | Path | None) -> None:
    """Raise ``NothingToResume`` when ``state`` already meets ``trainer.max_epochs`` or ``trainer.max_steps``.

    Lightning would restore it, print that the limit is reached and return: no iteration, no ``trained/``, no
    summary, after loading every model. Continuing a run usually means raising the limit, so say that instead.
    """
    if not state or cfg.trainer.get("fast_dev_run"):
        return
    done, steps = iterations_done(state), int(state.get("global_step", 0))
    max_epochs, max_steps = cfg.trainer.get("max_epochs"), cfg.trainer.get("max_steps", -1)
    reached = []
    if max_epochs is not None and 0 <= max_epochs <= done:
        again = 2 * max(done, 1)
        reached.append(f"trainer.max_epochs={max_epochs} (raise it, e.g. trainer.max_epochs={again} to train as "
                       f"many again)")
    if max_steps is not None and 0 <= max_steps <= steps:
        reached.append(f"trainer.max_steps={max_steps} (raise it past {steps}, or -1 for no step limit)")
    if reached:
        raise NothingToResume(
            f"ckpt_path={ckpt_path} has done {done} iteration{'' if done == 1 else 's'} ({steps} optimizer steps), "
            f"which already meets {' and '.join(reached)}: resuming would train nothing. To get its weights "
            f"without training: python -m sdpo.export {ckpt_path} <folder>"
        )


def csv_metrics_path(cfg: DictConfig) -> Path | None:
    """Where the CSV logger of ``cfg`` writes metrics.csv (None without one)."""
    csv_cfg = (cfg.get("logger") or {}).get("csv")
    if csv_cfg is None:
        return None
    return Path(str(csv_cfg.save_dir)) / str(csv_cfg.get("name") or "") / str(csv_cfg.get("version") or "") / \
        "metrics.csv"


def foreign_metrics_problem(cfg: DictConfig, ckpt_path: str | Path | None) -> str | None:
    """Why this run would delete the metrics.csv already in its folder: it was written by another run, and this one
    does not continue it from a checkpoint in the same folder (the CSV logger would start the file afresh)."""
    path = csv_metrics_path(cfg)
    if path is None or not path.is_file() or path.stat().st_size == 0:
        return None
    run_dir = Path(str(cfg.paths.output_dir)).resolve()
    if ckpt_path is not None and (str(ckpt_path) in ("last", "hpc")
                                  or Path(str(ckpt_path)).absolute().resolve().is_relative_to(run_dir)):
        return None  # continued in its own folder: appended to
    resume = f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"
    return (f"the run folder {run_dir} already holds a run's metrics ({path}), which this run would delete: choose "
            f"another folder (hydra.run.dir=...), or continue that run with {resume}")


def check_resume_before_loading(cfg: DictConfig, env: Mapping[str, str]) -> None:
    """The resume checks of ``train`` (``check_work_left``, ``check_resume``, another run's metrics in the folder) on
    the checkpoint the run would continue from (``ckpt_path``, or a restarted job's ``last.ckpt``), run by the command
    line before Lightning and the models load: a finished run continued without raising its limit, or a changed
    setting, is refused in seconds."""
    from sdpo.restart import restart_checkpoint

    restart = restart_checkpoint(cfg, env, warn=False)  # None when ckpt_path is given
    ckpt_path = cfg.get("ckpt_path") or restart
    state = read_resume_state(ckpt_path, restarted=restart is not None)
    check_work_left(cfg, state, ckpt_path)
    check_resume(cfg, state, ckpt_path)
    problem = foreign_metrics_problem(cfg, ckpt_path)  # continue_metrics' refusal
    if problem is not None:
        raise ConfigError(problem)
