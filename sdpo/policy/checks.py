"""Input and NaN checks that do not stall the GPU.

``bool(cuda_tensor)`` waits for every queued kernel, so the GPU idles while Python launches the next ones. The
policy steps check their timesteps and their outputs on every call (about five such waits per UNet call), which
matters most when micro-batches are small and the loop is bound by kernel launches. Inside ``deferred_checks()``
each check is queued as a device-side flag instead, and the block's end evaluates all of them with one host sync,
raising the first failure with the same message it would have raised at once. Outside the block (a user calling
a step function directly), checks run immediately.

The code that defers (``sample_pair_chunks``: one check per chunk) closes the block before anything consumes the
checked values (the rewards), so a failure still stops the run before it does damage, and names where the NaN arose.

A LoRA run's training loop avoids even one wait per optimizer step: after each, the GPU would idle while the host
launches the optimizer step and the next micro-batch (about 5 ms, against a ~190 ms compiled SD-Turbo step; an
estimate). It collects each step's checks with ``collected_checks()``, copies their flags to the host without
waiting (``Verdict``), reads them one step later, when the GPU has long computed them, and undoes the step if they
failed (``sdpo.algo.checked_steps``). So checked, an H100 run's training phase took 0.98 of its primitives timed
alone (benchmarks/README.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

Pending = list[tuple[Tensor, Callable[[], Exception]]]  # (failed flag on the device, its error), in queued order
_PENDING: ContextVar[Pending | None] = ContextVar("sdpo_pending_checks", default=None)


def require_not(failed: Tensor, error: Callable[[], Exception]) -> None:
    """Fail with ``error()`` when any element of the bool tensor ``failed`` is True: now, or at the end of the
    enclosing ``deferred_checks`` block. ``error`` builds the exception lazily (reading tensors syncs)."""
    pending = _PENDING.get()
    if pending is None:
        if bool(failed.any()):
            raise error()
        return
    pending.append((failed.detach().any(), error))


@contextmanager
def collected_checks() -> Iterator[Pending]:
    """Queue the checks of the block into the yielded list, evaluating none of them: the caller decides when."""
    pending: Pending = []
    token = _PENDING.set(pending)
    try:
        yield pending
    finally:
        _PENDING.reset(token)


@contextmanager
def deferred_checks() -> Iterator[None]:
    """Queue the checks of the block and evaluate them together when it ends (one host sync per device)."""
    with collected_checks() as pending:
        yield
    raise_first_failure(pending)


def raise_first_failure(pending: Pending) -> None:
    """Raise the error of the first queued check that failed, in the order they were queued."""
    Verdict(pending, wait=True).raise_if_failed()


class Verdict:
    """The outcome of queued checks. On CUDA the flags are copied to pinned host memory without waiting, and an
    event marks when they are there: reading them after the GPU has moved on (``first_failure``) costs no stall."""

    def __init__(self, pending: Pending, wait: bool = False) -> None:
        self.pending = pending
        self._flags: list[tuple[list[int], Tensor, torch.cuda.Event | None]] = []  # (check indices, host flags, event)
        by_device: dict[torch.device, list[int]] = {}
        for i, (flag, _) in enumerate(pending):
            by_device.setdefault(flag.device, []).append(i)
        for device, indices in by_device.items():
            flags = torch.stack([pending[i][0] for i in indices])
            if device.type == "cuda" and not wait:
                host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
                host.copy_(flags, non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(device))
                self._flags.append((indices, host, event))
            else:
                self._flags.append((indices, flags.cpu(), None))  # the one host sync for this device

    def first_failure(self) -> Exception | None:
        """The error of the first queued check that failed, in the order they were queued (None: all passed);
        waits for the flags if the GPU has not computed them yet."""
        failed: list[int] = []
        for indices, host, event in self._flags:
            if event is not None:
                event.synchronize()
            failed += [i for i, bad in zip(indices, host.tolist(), strict=True) if bad]
        return self.pending[min(failed)][1]() if failed else None

    def raise_if_failed(self) -> None:
        error = self.first_failure()
        if error is not None:
            raise error
