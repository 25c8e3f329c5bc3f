"""Sub-bars for the phases inside one iteration, under Lightning's bar.

Lightning's bar ticks once per iteration (one epoch = one SDPO iteration). At the paper's settings an iteration is
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
from typing import Any

from lightning.pytorch.callbacks import RichProgressBar
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
