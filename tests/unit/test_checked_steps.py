"""``OptimizerSnapshot`` undoes an optimizer step exactly (weights and AdamW state as they were, so the steps after
an undone one equal those of an optimizer that never took it), and ``CheckedSteps`` stops at the first step whose
checks failed with the weights of before it, whether it reads the checks before the step or one step late."""

from __future__ import annotations

import pytest
import torch

from sdpo.algo.checked_steps import CheckedSteps, OptimizerSnapshot


def make(seed: int = 0) -> tuple[list[torch.nn.Parameter], torch.optim.AdamW]:
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    return params, torch.optim.AdamW(params, lr=0.1, weight_decay=0.01)


def step(params, optimizer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_an_undone_step_leaves_no_trace():
    params, optimizer = make()
    twin_params, twin = make()
    snapshot = OptimizerSnapshot(optimizer)
    snapshot.take()  # before any step: no state yet
    step(params, optimizer, seed=1)
    snapshot.restore()
    assert not optimizer.state  # the state the undone step created is gone
    for seed in (2, 3):  # steps the twin takes too
        snapshot.take()
        step(params, optimizer, seed)
        step(twin_params, twin, seed)
    snapshot.take()
    step(params, optimizer, seed=99)  # a step to undo, after state exists
    snapshot.restore()
    for p, q in zip(params, twin_params, strict=True):
        assert torch.equal(p, q)
        state, twin_state = optimizer.state[p], twin.state[q]
        assert state.keys() == twin_state.keys() and state["step"] == twin_state["step"] == 2
        assert all(torch.equal(state[k], twin_state[k]) for k in state)
    step(params, optimizer, seed=4)
    step(twin_params, twin, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(params, twin_params, strict=True))


def test_restore_before_take_is_an_error():
    _, optimizer = make()
    with pytest.raises(RuntimeError, match="before any take"):
        OptimizerSnapshot(optimizer).restore()


def checks_of(ok: bool, label: str) -> list:
    """The queued form of one check (``require_not``): a failed flag and its error."""
    return [(torch.tensor(not ok), lambda: FloatingPointError(f"bad step {label}"))]


@pytest.mark.parametrize("lagged", [True, False])
def test_checked_steps_stop_before_the_first_failed_step(lagged):
    params, optimizer = make()
    twin_params, twin = make()
    taken = []
    with pytest.raises(FloatingPointError, match="bad step 2"):
        with CheckedSteps(optimizer, lagged=lagged) as guard:
            for k, ok in enumerate([True, True, False, False]):  # step 2 fails first, step 3 too
                guard.step(checks_of(ok, str(k)), lambda k=k: (step(params, optimizer, seed=k), taken.append(k)))
    for k in (0, 1):
        step(twin_params, twin, seed=k)
    assert taken == ([0, 1, 2] if lagged else [0, 1])  # lagged: step 2 ran, was undone at step 3's call
    assert all(torch.equal(p, q) for p, q in zip(params, twin_params, strict=True))
    assert all(optimizer.state[p]["step"] == 2 for p in params)


def test_lagged_checks_of_the_last_step_are_read_at_the_end_also_after_another_error():
    params, optimizer = make()
    before = [p.detach().clone() for p in params]
    with pytest.raises(FloatingPointError, match="bad step 0") as caught:
        with CheckedSteps(optimizer, lagged=True) as guard:
            guard.step(checks_of(False, "0"), lambda: step(params, optimizer, seed=0))
            raise MemoryError("what followed the bad step")
    assert isinstance(caught.value.__context__, MemoryError)  # the failed check is raised, the other error kept
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True)) and not optimizer.state
