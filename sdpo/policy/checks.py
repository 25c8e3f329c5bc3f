"""Input and NaN checks that do not stall the GPU.

``bool(cuda_tensor)`` waits for every queued kernel, so the GPU idles while Python launches the next ones. The
policy steps check their timesteps and their outputs on every call (about five such waits per UNet call), which
matters most when micro-batches are small and the loop is bound by kernel launches. Inside ``deferred_checks()``
each check is queued as a device-side flag instead, and the block's end evaluates all of them with one host sync,
raising the first failure with the same message it would have raised at once. Outside the block (a user calling
a step function directly), checks run immediately.

The code that defers (``sample_pair_chunks``: one check per chunk; ``SDPOModule``: one per optimizer step) closes the
block before anything consumes the checked values (the optimizer step, the rewards), so a failure still stops the
run before it does damage, and names where the NaN arose.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

_PENDING: ContextVar[list[tuple[Tensor, Callable[[], Exception]]] | None] = ContextVar(
    "sdpo_pending_checks", default=None
)


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
def deferred_checks() -> Iterator[None]:
    """Queue the checks of the block and evaluate them together when it ends (one host sync per device)."""
    pending: list[tuple[Tensor, Callable[[], Exception]]] = []
    token = _PENDING.set(pending)
    try:
        yield
    finally:
        _PENDING.reset(token)
    raise_first_failure(pending)


def raise_first_failure(pending: list[tuple[Tensor, Callable[[], Exception]]]) -> None:
    """Raise the error of the first queued check that failed, in the order they were queued."""
    if not pending:
        return
    by_device: dict[torch.device, list[int]] = {}
    for i, (flag, _) in enumerate(pending):
        by_device.setdefault(flag.device, []).append(i)
    failed: list[int] = []
    for indices in by_device.values():
        flags = torch.stack([pending[i][0] for i in indices]).cpu()  # the one host sync for this device
        failed += [i for i, bad in zip(indices, flags.tolist(), strict=True) if bad]
    if failed:
        raise pending[min(failed)][1]()
