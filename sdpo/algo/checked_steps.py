"""Optimizer steps that do not wait for their checks: each step's checks are read one step later, and a step
whose checks failed is undone.

Reading a step's checks (finite loss, valid timesteps; ``sdpo.policy.checks``) before the step stalls the GPU once
per step: it idles while the host launches the optimizer step and the next micro-batch, a few ms each time. Read one
step late, the flags were computed long ago and nothing waits. A copy of the trainable weights and the optimizer
state from just before each step (``OptimizerSnapshot``; device-side copies into reused buffers, no host sync)
lets a failed step be undone, so training stops with the weights and optimizer of before the bad step, as if it
had waited. The copy costs one more set of the trainable weights and their optimizer state: small for LoRA, which
is why a full fine-tune reads its checks before each step instead (``CheckedSteps(lagged=False)``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from sdpo.policy.checks import Pending, Verdict, raise_first_failure


def _by_device(targets: list[Tensor], sources: list[Tensor]) -> list[tuple[list[Tensor], list[Tensor]]]:
    """The pairs ``(targets[i], sources[i])`` split by device, one multi-tensor copy each: a list that mixes devices
    (AdamW keeps its step counts on the CPU) would fall back to one copy launch per tensor."""
    groups: dict[torch.device, tuple[list[Tensor], list[Tensor]]] = {}
    for target, source in zip(targets, sources, strict=True):
        group = groups.setdefault(source.device, ([], []))
        group[0].append(target)
        group[1].append(source)
    return list(groups.values())


class OptimizerSnapshot:
    """Parameters of ``optimizer`` and its per-parameter state, as of the last ``take()``.

    ``take()`` runs before every optimizer step, so what to copy where is planned once and re-planned only when
    parameters gain state (the first step); the optimizer must update its state tensors in place, as torch's do.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.params: list[Tensor] = [p for group in optimizer.param_groups for p in group["params"]]
        self._weights: list[Tensor] = [torch.empty_like(p) for p in self.params]
        self._state: dict[int, dict[str, object]] = {}  # param index -> state entry copy (absent: had no state)
        self._copies: list[tuple[list[Tensor], list[Tensor]]] = []  # (buffers, live tensors) per device
        self._planned_for = -1  # how many parameters had state when the copies were planned
        self.taken = False

    def _plan(self) -> None:
        """Buffers for the weights and every state tensor, and the copies that fill them."""
        buffers, sources = list(self._weights), [p.detach() for p in self.params]
        self._state = {}
        for i, p in enumerate(self.params):
            state = self.optimizer.state.get(p)
            if not state:
                continue
            entry: dict[str, object] = {}
            for key, value in state.items():
                if isinstance(value, Tensor):
                    entry[key] = torch.empty_like(value)
                    buffers.append(entry[key])
                    sources.append(value.detach())
                else:
                    entry[key] = value  # re-read at every take()
            self._state[i] = entry
        self._copies = _by_device(buffers, sources)
        self._planned_for = len(self.optimizer.state)

    @torch.no_grad()
    def take(self) -> None:
        """Copy the current weights and state (queued on the device; the buffers are reused)."""
        if len(self.optimizer.state) != self._planned_for:
            self._plan()
        for buffers, sources in self._copies:
            torch._foreach_copy_(buffers, sources)
        for i, entry in self._state.items():
            state = self.optimizer.state[self.params[i]]
            for key, value in entry.items():
                if not isinstance(value, Tensor):
                    entry[key] = state[key]
        self.taken = True

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights and state of the last ``take()``; state created since then is dropped."""
        if not self.taken:
            raise RuntimeError("OptimizerSnapshot.restore() before any take()")
        for weights, params in _by_device([p.detach() for p in self.params], self._weights):
            torch._foreach_copy_(weights, params)
        for i, p in enumerate(self.params):
            entry = self._state.get(i)
            if entry is None:
                self.optimizer.state.pop(p, None)
                continue
            state = self.optimizer.state[p]
            for key in list(state):
                if key not in entry:
                    del state[key]
            for key, value in entry.items():
                if isinstance(value, Tensor) and isinstance(state.get(key), Tensor):
                    state[key].copy_(value)
                else:
                    state[key] = value.clone() if isinstance(value, Tensor) else value


class CheckedSteps:
    """Run optimizer steps guarded by the checks queued for each (``collected_checks``).

    ``lagged``: a step's checks are read at the next ``step`` call or at the block's end, and a failed step is
    undone before its error is raised; otherwise they are read before the step. Use as a context manager, so the
    last step's checks are read too, also when the block fails for another reason (a failed check explains more
    than what followed it).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lagged: bool) -> None:
        self.snapshot = OptimizerSnapshot(optimizer) if lagged else None
        self._unread: Verdict | None = None  # the last step's checks, while not yet read

    def step(self, checks: Pending, do_step: Callable[[], None]) -> None:
        """``do_step()`` (the optimizer step) unless ``checks`` (or, lagged, the previous step's) failed."""
        if self.snapshot is None:
            raise_first_failure(checks)  # before the weights move
            do_step()
            return
        verdict = Verdict(checks)  # flags on their way to the host, no wait
        self._settle()  # the previous step's: computed by now
        self.snapshot.take()
        self._unread = verdict
        do_step()

    def _settle(self) -> None:
        verdict, self._unread = self._unread, None
        error = verdict.first_failure() if verdict is not None else None
        if error is not None:
            self.snapshot.restore()
            raise error

    def __enter__(self) -> CheckedSteps:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._settle()
