"""Lightning's bar made for runs of one batch per epoch, and sub-bars for the phases inside one iteration.

Lightning's bar ticks once per iteration (one epoch = one SDPO iteration), so its time and speed columns described
that one batch: "0:00:01 • 0:00:00 0.00it/s" on every iteration. ``RunPaceBar`` shows the run's instead: time
spent • time left (from the mean iteration so far and ``trainer.max_epochs``), seconds per iteration.

At the paper's settings an iteration is
100 UNet sampling calls and 100 training steps: about 37 s on an H100, minutes on smaller GPUs, and the first one
also compiles for minutes with ``algo.compile``. So the sampling steps and the optimizer steps get a bar each,
shown while their phase runs and removed after it. Nothing is shown where Lightning's bar is off (tests, other
ranks), and the bars never wait on the GPU: they advance as work is queued, which the UNet's kernel count keeps
close to when it runs.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from lightning.pytorch.callbacks import Callback, RichProgressBar
from rich.progress import ProgressColumn, Task
from rich.text import Text
from tqdm.auto import tqdm

REDRAW_SECONDS = 0.2

log = logging.getLogger(__name__)


def _nothing() -> None:
    return None


class PhaseProgress:
    """``with PhaseProgress(trainer).phase("sampling", total) as advance: ... advance()``."""

    def __init__(self, trainer: Any | None) -> None:
        bar = getattr(trainer, "progress_bar_callback", None) if trainer is not None else None
        self.bar = bar if bar is not None and bar.is_enabled else None

    @contextmanager
    def phase(self, name: str, total: int) -> Iterator[Callable[[], None]]:
        """A bar of ``total`` ticks named ``name`` for the duration of the block; yields the function that ticks."""
        if self.bar is None or total <= 0:
            yield _nothing
            return
        rich = getattr(self.bar, "progress", None) if isinstance(self.bar, RichProgressBar) else None
        if rich is not None:
            task = rich.add_task(f"  {name}", total=total)
            bar, shown = self.bar, [time.monotonic()]

            def advance() -> None:  # redrawn at most 5 times a second: redraws run on the thread launching GPU work
                rich.update(task, advance=1)
                if time.monotonic() - shown[0] >= REDRAW_SECONDS:
                    bar.refresh()
                    shown[0] = time.monotonic()

            try:
                yield advance
            finally:
                rich.remove_task(task)
                bar.refresh()
            return
        steps = tqdm(total=total, desc=f"  {name}", leave=False, dynamic_ncols=True, mininterval=REDRAW_SECONDS,
                     file=sys.stdout)
        try:
            yield lambda: steps.update(1)
        finally:
            steps.close()


class RunPace:
    """The pace of a run in this process: when fitting started, how many iterations a resumed run had done, when
    each iteration since ended."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.done_before = 0
        self.ended: list[float] = []

    def start(self, done_before: int) -> None:
        self.started, self.done_before, self.ended = time.monotonic(), done_before, []

    def iteration_ended(self) -> None:
        self.ended.append(time.monotonic())

    @property
    def done(self) -> int:
        """Iterations done in all, a resumed run's earlier ones included."""
        return self.done_before + len(self.ended)

    def at(self, now: float, max_epochs: int | None) -> tuple[float, float | None, float | None]:
        """Seconds since fitting started, seconds per iteration (the mean of those that ended; None before the
        first) and seconds left to ``max_epochs`` at that pace (None without such a limit)."""
        if self.started is None:
            return 0.0, None, None
        elapsed = now - self.started
        if not self.ended:
            return elapsed, None, None
        per_iteration = (self.ended[-1] - self.started) / len(self.ended)
        if max_epochs is None or max_epochs < 0:
            return elapsed, per_iteration, None
        to_go = max(max_epochs - self.done, 0)
        into_this_one = now - self.ended[-1] if to_go else 0.0
        return elapsed, per_iteration, max(per_iteration * to_go - into_this_one, 0.0)


class RunPaceBar(RichProgressBar):
    """Lightning's Rich bar whose iteration line shows the run's pace: ``Epoch 20/99 ... 0:00:41 • 0:02:38 2.0 s/it``
    (time spent • time left to ``trainer.max_epochs``, seconds per iteration so far). The phase sub-bars keep
    Lightning's columns (a phase's own time and steps per second)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pace = RunPace()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        self.pace.start(trainer.current_epoch)  # a resumed run: its own pace

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.pace.iteration_ended()
        super().on_train_epoch_end(trainer, pl_module)

    def run_pace(self, now: float | None = None) -> tuple[float, float | None, float | None]:
        """``RunPace.at`` now (or at ``now``) for this run's ``trainer.max_epochs``."""
        return self.pace.at(time.monotonic() if now is None else now, self._trainer.max_epochs)

    def configure_columns(self, trainer: Any) -> list:
        columns = super().configure_columns(trainer)
        return [column if type(column).__name__ not in ("CustomTimeColumn", "ProcessingSpeedColumn")
                else _RunColumn(self, column) for column in columns]


class PaceLog(Callback):
    """A log line at most every ``every_seconds`` and after the last iteration: ``iteration 20/100: 0:00:41 spent,
    0:02:38 left, 2.0 s/it, reward 1-step 0.4861, 4-step 0.4702``. Rich draws its bar only on a terminal, so a
    cluster job's output file showed nothing between the header and the end; there the line is printed (through
    the run's logging). On a terminal the bar says it, and the line goes to the run's log file alone."""

    def __init__(self, every_seconds: float = 60.0) -> None:
        from sdpo.callback_args import pace_problems, raise_problems

        raise_problems(pace_problems(every_seconds))
        self.every_seconds = float(every_seconds)
        self.pace = RunPace()
        self._said = 0.0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.pace.start(trainer.current_epoch)
        self._said = time.monotonic()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.pace.iteration_ended()
        now = self.pace.ended[-1]
        last = trainer.max_epochs is not None and 0 <= trainer.max_epochs <= self.pace.done
        if trainer.global_rank != 0 or (now - self._said < self.every_seconds and not last):
            return
        self._said = now
        line = pace_line(self.pace.done, trainer.max_epochs, self.pace.at(now, trainer.max_epochs),
                         trainer.callback_metrics, pl_module.algo_cfg.get("num_steps", "T"))
        if sys.stdout.isatty():
            from sdpo.run_log import to_log_files

            to_log_files(line)
        else:
            log.info(line)


def pace_line(done: int, max_epochs: int | None, pace: tuple[float, float | None, float | None],
              metrics: Any, num_steps: int | str = "T") -> str:
    """``iteration 20/100: 0:00:41 spent, 0:02:38 left, 2.0 s/it, reward 1-step 0.4861, 4-step 0.4702``."""
    elapsed, per_iteration, left = pace
    parts = [f"{timedelta(seconds=int(elapsed))} spent"]
    if left is not None:
        parts.append(f"{timedelta(seconds=round(left))} left")
    if per_iteration is not None:
        parts.append(f"{per_iteration:.1f} s/it")
    rewards = [f"{label} {float(metrics[key]):.4f}" for label, key in (("1-step", "train/reward_1step"),
                                                                         (f"{num_steps}-step", "train/reward_last"))
               if key in metrics]
    if rewards:
        parts.append("reward " + ", ".join(rewards))
    total = f"/{max_epochs}" if max_epochs is not None and max_epochs >= 0 else ""
    return f"iteration {done}{total}: " + ", ".join(parts)


class _RunColumn(ProgressColumn):
    """Lightning's time or speed column for the phase bars; for the iteration bar, the run's time or pace."""

    max_refresh = 0.5  # as Lightning's time column: no jitter

    def __init__(self, bar: RunPaceBar, lightnings: ProgressColumn) -> None:
        super().__init__()
        self.bar, self.lightnings = bar, lightnings
        self.speed = type(lightnings).__name__ == "ProcessingSpeedColumn"

    def render(self, task: Task) -> Text:
        if task.id != self.bar.train_progress_bar_id:
            return self.lightnings.render(task)
        return Text(run_pace_text(*self.bar.run_pace(), speed=self.speed), style=self.lightnings.style)


def run_pace_text(elapsed: float, per_iteration: float | None, left: float | None, speed: bool) -> str:
    """The iteration line's time column (``0:00:41 • 0:02:40``: spent • left) or speed column (``2.0 s/it``)."""
    if speed:
        return "-- s/it" if per_iteration is None else f"{per_iteration:.1f} s/it"
    return f"{timedelta(seconds=int(elapsed))} • {'-:--:--' if left is None else timedelta(seconds=round(left))}"


def default_progress_bar(callbacks: list, enabled: bool) -> list:
    """``RunPaceBar`` when the run shows a bar and its config names none (Lightning would add its Rich bar)."""
    from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

    return [RunPaceBar()] if enabled and not any(isinstance(c, ProgressBar) for c in callbacks) else []
