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

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from lightning.pytorch.callbacks import RichProgressBar
from rich.progress import ProgressColumn, Task
from rich.text import Text
from tqdm.auto import tqdm

REDRAW_SECONDS = 0.2


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


class RunPaceBar(RichProgressBar):
    """Lightning's Rich bar whose iteration line shows the run's pace: ``Epoch 20/99 ... 0:00:41 • 0:02:40 2.0 s/it``
    (time spent • time left to ``trainer.max_epochs``, seconds per iteration so far). The phase sub-bars keep
    Lightning's columns (a phase's own time and steps per second)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._started: float | None = None  # fit start (a resumed run: its own pace)
        self._ended: list[float] = []  # when each iteration of this process ended
        self._done_before = 0  # iterations a resumed run had done

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        self._started, self._ended, self._done_before = time.monotonic(), [], trainer.current_epoch

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._ended.append(time.monotonic())
        super().on_train_epoch_end(trainer, pl_module)

    def run_pace(self, now: float | None = None) -> tuple[float, float | None, float | None]:
        """Seconds since fitting started, seconds per iteration (the mean of those that ended; None before the
        first) and seconds left to ``trainer.max_epochs`` at that pace (None without such a limit)."""
        now = time.monotonic() if now is None else now
        if self._started is None:
            return 0.0, None, None
        elapsed = now - self._started
        if not self._ended:
            return elapsed, None, None
        per_iteration = (self._ended[-1] - self._started) / len(self._ended)
        max_epochs = self._trainer.max_epochs
        if max_epochs is None or max_epochs < 0:
            return elapsed, per_iteration, None
        to_go = max(max_epochs - self._done_before - len(self._ended), 0)
        into_this_one = now - self._ended[-1] if to_go else 0.0
        return elapsed, per_iteration, max(per_iteration * to_go - into_this_one, 0.0)

    def configure_columns(self, trainer: Any) -> list:
        columns = super().configure_columns(trainer)
        return [column if type(column).__name__ not in ("CustomTimeColumn", "ProcessingSpeedColumn")
                else _RunColumn(self, column) for column in columns]


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
