"""The argument checks of sdpo's own callbacks, as plain functions: each callback raises what they find when it is
built, and the config check runs them on ``callbacks.<name>`` first, so a bad value is refused before Lightning
and the models load. Imports nothing heavy."""

from __future__ import annotations

import signal as signals
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def _not_integers(key: str, **values: Any) -> list[str]:
    """``<key>.<name>=<value>: use an integer`` for each value that is not one (a bool is not)."""
    return [f"{key}.{name}={value!r}: use an integer" for name, value in values.items()
            if not isinstance(value, int) or isinstance(value, bool)]


def sample_grid_problems(every_n_epochs: int = 5, max_prompts: int = 8, key: str = "callbacks.sample_grid",
                         **_: Any) -> list[str]:
    wrong = _not_integers(key, every_n_epochs=every_n_epochs, max_prompts=max_prompts)
    if wrong:
        return wrong
    if every_n_epochs < 1 or max_prompts < 1:
        return [f"{key}.every_n_epochs={every_n_epochs} and max_prompts={max_prompts}: need >= 1 each "
                f"({key}=null writes no grids)"]
    return []


def eval_problems(every_n_epochs: int = 25, steps: Sequence[int] = (1, 2, 4), images_per_prompt: int = 2,
                  batch_size: int = 16, key: str = "callbacks.eval", **_: Any) -> list[str]:
    steps = list(steps) if isinstance(steps, Sequence) and not isinstance(steps, str) else [steps]
    wrong = _not_integers(key, every_n_epochs=every_n_epochs, images_per_prompt=images_per_prompt,
                          batch_size=batch_size)
    if any(not isinstance(k, int) or isinstance(k, bool) for k in steps):
        wrong.append(f"{key}.steps={steps}: use a list of integers, e.g. [1, 2, 4]")
    if wrong:
        return wrong
    problems = []
    if every_n_epochs < 1:
        problems.append(f"{key}.every_n_epochs={every_n_epochs}: need >= 1")
    if not steps or min(steps) < 1 or len(set(steps)) != len(steps):
        problems.append(f"{key}.steps={steps}: need distinct step counts >= 1")
    if images_per_prompt < 1 or batch_size < 1:
        problems.append(f"{key}.images_per_prompt and {key}.batch_size must be >= 1")
    return problems


def requeue_signal(signal: str) -> signals.Signals | None:
    """The signal named ``signal`` (``USR1``, ``SIGUSR1``, ``usr1``), or None."""
    found = getattr(signals, f"SIG{str(signal).upper().removeprefix('SIG')}", None)
    return found if isinstance(found, signals.Signals) else None


def requeue_problems(signal: str = "USR1", key: str = "callbacks.requeue", **_: Any) -> list[str]:
    if requeue_signal(signal) is None:
        return [f"{key}.signal={signal!r}: use a signal name such as USR1 (the one given to sbatch --signal)"]
    return []


def pace_problems(every_seconds: float = 60.0, key: str = "callbacks.pace", **_: Any) -> list[str]:
    if isinstance(every_seconds, bool) or not isinstance(every_seconds, (int, float)) or every_seconds < 0:
        return [f"{key}.every_seconds={every_seconds!r}: need a number of seconds >= 0 (0: a line per iteration)"]
    return []


CHECKS: dict[str, Callable[..., list[str]]] = {  # a callback's _target_ -> its argument check
    "sdpo.callbacks.SampleGrid": sample_grid_problems,
    "sdpo.callbacks.EvalDuringTraining": eval_problems,
    "sdpo.cluster.RequeueOnSignal": requeue_problems,
    "sdpo.progress.PaceLog": pace_problems,
}


def callback_problems(callbacks: Mapping[str, Any] | None) -> list[str]:
    """The argument checks of every sdpo callback in ``callbacks`` (the ``callbacks`` config node as a dict), under
    whatever name the config gives it."""
    problems = []
    for name, node in (callbacks or {}).items():
        check = CHECKS.get(node.get("_target_")) if isinstance(node, Mapping) else None
        if check is None:
            continue
        kwargs = {k: v for k, v in node.items() if k not in ("_target_", "key")}
        try:
            problems += check(**kwargs, key=f"callbacks.{name}")
        except (TypeError, ValueError):
            continue
    return problems


def raise_problems(problems: list[str]) -> None:
    """What a callback's ``__init__`` does with its check's findings."""
    if problems:
        raise ValueError("; ".join(problems))
