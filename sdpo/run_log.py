"""What a run prints for people (its header, the reward table, a stop notice, a fatal error) also goes into the
run folder's log file.

Hydra gives every run a ``<job>.log``, but these texts are printed, not logged (a log format would wrap every line
of a table), so the file stayed empty and a dead run's folder held no trace of what it did or why it stopped.
``report`` prints the text as is and hands it to the file handlers of the root logger alone, which leaves the
console exactly as before.

What a run reports as it ends (the reward table, where the weights went, a stop notice) is held back while
``reports_after_fit`` is active and printed when fitting returns: Lightning's progress bar draws itself one last
time as it stops, after anything printed before, so the table would otherwise sit above a final redraw of the bar.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

log = logging.getLogger("sdpo")


def to_log_files(text: str, level: int = logging.INFO,
                 exc_info: tuple[type[BaseException], BaseException, TracebackType | None] | None = None) -> None:
    """Write ``text`` (and a traceback, if given) to the root logger's file handlers only, not to the console."""
    record = log.makeRecord(log.name, level, __file__, 0, text, None, exc_info)
    for handler in _file_handlers():
        if record.levelno >= handler.level:
            handler.handle(record)


def _file_handlers() -> list[logging.FileHandler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


def log_file_paths() -> list[str]:
    """The files the root logger writes to: Hydra's ``<job>.log`` in the run folder (one per rank)."""
    return [h.baseFilename for h in _file_handlers()]


def report(text: str) -> None:
    """Print ``text`` for the person watching, and keep it in the run's log file."""
    print(text, flush=True)
    to_log_files(text)


_held_back: list[str] | None = None  # end-of-run reports waiting for fitting to return (None: print at once)


def report_at_end(text: str) -> None:
    """``report`` once fitting has returned, after the progress bar's last redraw (at once outside ``train``)."""
    if _held_back is None:
        report(text)
    else:
        _held_back.append(text)


@contextmanager
def reports_after_fit() -> Iterator[None]:
    """Hold back ``report_at_end`` texts while the body (``trainer.fit``) runs, then report them in order, also when
    it ends by an exception (Ctrl-C, SIGTERM, divergence)."""
    global _held_back
    outer, _held_back = _held_back, []
    try:
        yield
    finally:
        texts, _held_back = _held_back, outer
        for text in texts:
            report(text)


def log_fatal_error() -> None:
    """Put the exception being handled, with its traceback, into the run's log file (the console gets it anyway)."""
    kind, error, trace = sys.exc_info()
    if kind is not None and error is not None:
        to_log_files(f"run failed: {kind.__name__}: {error}", logging.ERROR, (kind, error, trace))
