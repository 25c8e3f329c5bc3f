"""``algo.compile_check``: a compiled UNet whose gradients are not eager's stops the run before an optimizer step
uses them; one whose gradients are eager's passes, and a fresh LoRA's zero A gradients are compared once non-zero."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from sdpo.policy.compile_check import TOLERANCE, CompiledGradientCheck, CompiledGradientError, relative_difference
from sdpo.policy.fused_lora import fuse_lora_layers
from tests.conftest import ZERO_GRADIENT_BACKEND


@pytest.mark.parametrize(("compiled", "eager", "expected"), [
    ([1.0, 2.0], [1.0, 2.0], 0.0),
    ([0.0, 0.0], [0.0, 0.0], 0.0),
    ([0.0, 0.0], [3.0, 4.0], 1.0),
    ([3.0, 4.0], [0.0, 0.0], 1.0),
    ([-3.0, -4.0], [3.0, 4.0], 2.0),
    ([3.0, 4.0], [3.0, 4.5], 0.5 / (3.0**2 + 4.5**2) ** 0.5),  # |(0, -0.5)| / |(3, 4.5)|
    ([float("inf"), 4.0], [3.0, 4.0], float("inf")),  # only the compiled one overflowed: as wrong as can be
])
def test_relative_difference_by_hand(compiled, eager, expected):
    assert relative_difference(torch.tensor(compiled), torch.tensor(eager)) == pytest.approx(expected, rel=1e-6)


class Adapted(nn.Module):
    """Two LoRA-adapted layers, fused as a run fuses them, with B = 0 as a fresh LoRA starts."""

    def __init__(self) -> None:
        super().__init__()
        self.to_q = nn.Linear(8, 8)
        self.to_out = nn.Linear(8, 4)
        torch.manual_seed(0)
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_out"]), self)
        for name, p in self.named_parameters():
            p.requires_grad_("lora_" in name)
        fuse_lora_layers(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_out(torch.tanh(self.to_q(x)))


def _check(backend: str) -> tuple[CompiledGradientCheck, Adapted, Callable[[], torch.Tensor], dict]:
    torch._dynamo.reset()
    model = Adapted()
    model.compile(backend=backend)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return CompiledGradientCheck("test", max_checks=3), model, lambda: model(x).square().sum(), params


def test_right_gradients_pass_and_zero_ones_are_compared_once_they_are_not():
    check, model, loss, params = _check("aot_eager")
    assert check.due
    check.run(loss, params)
    assert check.pending == {n for n in params if "lora_A" in n}  # B = 0: A's gradients are exactly zero
    assert check.due
    with torch.no_grad():  # what the first optimizer step does to B
        for name, p in params.items():
            if "lora_B" in name:
                p.add_(0.1)
    check.run(loss, params)
    assert check.pending == set() and not check.due and check.checks == 2
    assert check.worst < 1e-5
    torch._dynamo.reset()


def test_zero_compiled_gradients_stop_with_the_tensors_named():
    check, model, loss, params = _check(ZERO_GRADIENT_BACKEND)
    said = f"2 of 4 trainable tensors differ by more than {TOLERANCE:.0%}"
    with pytest.raises(CompiledGradientError, match=re.escape(said)):
        check.run(loss, params)  # the two B factors; the A factors' gradients are zero either way
    torch._dynamo.reset()
    assert all(p.grad is None for p in params.values())  # nothing accumulated, nothing stepped


def test_a_check_that_never_sees_a_gradient_says_so(caplog):
    check, model, loss, params = _check("aot_eager")
    for _ in range(3):
        check.run(loss, params)  # B stays zero: A is never compared
    assert not check.due
    assert "2 trainable tensors still had zero gradients after 3 checks" in caplog.text
    torch._dynamo.reset()
