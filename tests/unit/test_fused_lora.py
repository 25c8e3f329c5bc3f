"""``algo.fused_lora``: the fused LoRA layers compute PEFT's function (against an fp64 oracle, forward and every
gradient), fall back to PEFT wherever they would not, keep PEFT's parameters and exports, and compile whole."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sdpo.flops import model_flops
from sdpo.policy.fused_lora import FusedLoraLinear, fuse_lora_layers, has_fused_lora
from sdpo.policy.loading import TinySpec, ensure_tiny_pipeline
from sdpo.policy.lora import make_trainable
from sdpo.policy.speed import resolve_fused_lora


class Projection(nn.Module):
    """One attention-style projection with a bias (as ``to_out.0``)."""

    def __init__(self, width: int = 24, out: int = 16) -> None:
        super().__init__()
        self.to_out = nn.Linear(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_out(x)


def adapted(module: nn.Module, rank: int = 4, alpha: float = 8.0, dropout: float = 0.0,
            use_dora: bool = False) -> nn.Module:
    """``module`` with a LoRA of scale alpha/rank (2 by default: the scale must reach both factors' gradients) and
    a non-zero B, so the adapter contributes to the output."""
    torch.manual_seed(0)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, use_dora=use_dora, target_modules=["to_out"])
    inject_adapter_in_model(config, module)
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_B" in name:
            nn.init.normal_(p, std=0.3)
    return module


def forward_backward(module: nn.Module, x: torch.Tensor, amp: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and the gradients of the input and the adapters under a fixed random cotangent (returned on the CPU)."""
    module.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = module(x)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (out.double() * cotangent.to(out.device)).sum().backward()
    grads = {"input": x.grad} | {n.removeprefix("_orig_mod."): p.grad for n, p in module.named_parameters()
                                 if p.requires_grad}
    return out.detach().double().cpu(), {n: g.double().cpu() for n, g in grads.items()}


def relative_error(value: torch.Tensor, oracle: torch.Tensor) -> float:
    return float((value - oracle).abs().max() / oracle.abs().max())


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_fused_layer_computes_peft_lora_against_an_fp64_oracle(amp, device, monkeypatch):
    """Output, input gradient and both adapter gradients of a biased 3-D-input layer with scale 2: fp32 agrees with
    fp64 to fp32 rounding; under bf16 autocast the fused layer is about as far from fp64 as PEFT's."""
    if device == "cuda":  # fp32 means fp32 (as under Lightning's 32-true), whatever an earlier test set
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    peft_layer = adapted(Projection())
    fused = copy.deepcopy(peft_layer)
    assert fuse_lora_layers(fused) == 1 and isinstance(fused.to_out, FusedLoraLinear)
    oracle = copy.deepcopy(peft_layer).double()
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(1))
    expected_out, expected = forward_backward(oracle, x.double(), amp=False)
    # the oracle is PEFT's layer in fp64; check it is LoRA's formula, by hand: x W^T + b + s (x A^T) B^T
    layer = oracle.to_out
    w, b = layer.base_layer.weight, layer.base_layer.bias
    a, bb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(expected_out, x.double() @ w.T + b + 2.0 * (x.double() @ a.T) @ bb.T)

    peft_out, peft_grads = forward_backward(peft_layer.to(device), x.to(device), amp)
    fused_out, fused_grads = forward_backward(fused.to(device), x.to(device), amp)
    assert fused_out.shape == expected_out.shape and fused_grads.keys() == expected.keys() and len(expected) == 3
    if not amp:
        assert relative_error(fused_out, expected_out) < 1e-6
        for name in expected:
            assert relative_error(fused_grads[name], expected[name]) < 1e-6, name
    else:
        pairs = [(fused_out, peft_out, expected_out)]
        pairs += [(fused_grads[name], peft_grads[name], expected[name]) for name in expected]
        for fused_value, peft_value, oracle in pairs:  # bf16 rounding (not fp32's), about as much as PEFT's
            assert 1e-5 < relative_error(fused_value, oracle) <= 1.5 * relative_error(peft_value, oracle)


def test_fused_unet_trains_the_gradients_peft_trains(cache_dir):
    """The tiny SD UNet with LoRA on its attention projections (self- and cross-attention, biased to_out.0, a first
    layer whose input needs no gradient): every LoRA gradient agrees with PEFT's UNet to fp32 rounding, for the same
    model FLOPs."""
    unet = UNet2DConditionModel.from_pretrained(ensure_tiny_pipeline(cache_dir, TinySpec()) / "unet")
    torch.manual_seed(0)
    make_trainable(unet, True, 4, 8, ["to_q", "to_k", "to_v", "to_out.0"], "gaussian")
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    fused = copy.deepcopy(unet)
    assert fuse_lora_layers(fused) == sum(type(m).__name__ == "Linear" and hasattr(m, "lora_A")
                                          for m in unet.modules()) > 8
    g = torch.Generator().manual_seed(1)
    size = unet.config.sample_size
    args = (torch.randn(2, 4, size, size, generator=g), torch.tensor([999, 400]),
            torch.randn(2, 77, unet.config.cross_attention_dim, generator=g))
    grads, flops = [], []
    for model in (unet, fused):
        flops.append(model_flops(lambda model=model: model(*args).sample.square().mean().backward()))
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert flops[0] == flops[1]  # the same model FLOPs (what MFU divides by), in-place sums included
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[1].items():
        torch.testing.assert_close(grad, grads[0][name], rtol=1e-4, atol=1e-7, msg=name)
    assert max(float(g.abs().max()) for n, g in grads[1].items() if "lora_A" in n) > 0


def test_outside_plain_lora_the_layer_runs_peft(monkeypatch):
    """Adapters disabled or merged, dropout and DoRA run PEFT's forward, with PEFT's numbers."""
    calls = []
    original = FusedLoraLinear._plain_lora_adapter

    def spy(self, *args):
        name = original(self, *args)
        calls.append(name)
        return name

    monkeypatch.setattr(FusedLoraLinear, "_plain_lora_adapter", spy)
    x = torch.randn(4, 24)
    model = adapted(Projection())
    fuse_lora_layers(model)
    model(x)
    assert calls == ["default"]

    model.to_out.enable_adapters(False)  # e.g. a reference pass on the base model
    torch.testing.assert_close(model(x), model.to_out.base_layer(x))
    assert calls[-1] is None
    model.to_out.enable_adapters(True)

    expected = model(x)
    model.to_out.merge()
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    assert calls[-1] is None
    model.to_out.unmerge()

    with_dropout = adapted(Projection(), dropout=0.5)
    fuse_lora_layers(with_dropout)
    with_dropout.eval()  # dropout off in eval, but still PEFT's path: the fused node has no dropout
    with_dropout(x)
    assert calls[-1] is None

    dora = adapted(Projection(), use_dora=True)
    expected = dora(x)
    fuse_lora_layers(dora)
    torch.testing.assert_close(dora(x), expected, rtol=0, atol=0)
    assert calls[-1] is None


def test_fusing_changes_no_parameter_and_no_export():
    """Same parameter objects, state_dict keys and PEFT (diffusers export) state; idempotent."""
    model = adapted(Projection())
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    assert not has_fused_lora(model)
    assert fuse_lora_layers(model) == 1 and fuse_lora_layers(model) == 0 and has_fused_lora(model)
    assert {n: p for n, p in model.named_parameters()} == params  # the very same Parameter objects
    fused_state = get_peft_model_state_dict(model)
    assert fused_state.keys() == state.keys() and len(state) == 2
    for key, value in state.items():
        assert torch.equal(fused_state[key], value)


def test_fused_layer_compiles_as_one_graph_with_eager_gradients():
    """fullgraph: no graph break inside the layer (a break would split a compiled UNet around every adapter)."""
    model = adapted(Projection())
    fuse_lora_layers(model)
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 6, 24, generator=torch.Generator().manual_seed(3))
    for amp in (False, True):
        eager_out, eager_grads = forward_backward(model, x, amp)
        compiled_out, compiled_grads = forward_backward(compiled, x, amp)
        torch.testing.assert_close(compiled_out, eager_out)
        assert compiled_grads.keys() == eager_grads.keys()
        for name, grad in eager_grads.items():
            torch.testing.assert_close(compiled_grads[name], grad)


class MutatingOps(TorchDispatchMode):
    """Records every aten op that writes into one of its arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.is_mutable:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_fused_forward_writes_into_no_tensor():
    """torch 2.11's dynamo routes the gradient of an autograd.Function whose forward mutates its output to the wrong
    slot (pytorch/pytorch#180642): compiled, every gradient came back zero, which voided an H100 run whose forward
    accumulated the adapter in place. torch 2.13 has the fix, so this checks the cause, not the symptom."""
    model = adapted(Projection())
    fuse_lora_layers(model)
    x = torch.randn(2, 6, 24, requires_grad=True)
    for amp in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp), MutatingOps() as ops:
            out = model(x)
        assert type(out.grad_fn.next_functions[0][0]).__name__ == "_LoraLinearBackward"  # the fused path ran
        assert ops.seen == [], f"in-place ops in the fused forward (amp={amp}): {ops.seen}"


@pytest.mark.parametrize(("setting", "compile", "backend", "fused"), [
    ("auto", False, "inductor", True),
    ("auto", True, "inductor", False),
    ("auto", "regional", "inductor", False),
    ("auto", True, "aot_eager", True),
    (True, False, "inductor", True),
    (True, True, "inductor", True),  # allowed again: compiled, the layers' gradients are eager's
    (True, "regional", "aot_eager", True),
    (False, False, "inductor", False),
    (False, True, "inductor", False),
])
def test_fused_lora_setting_resolves_by_what_compiles_the_unet(setting, compile, backend, fused):
    assert resolve_fused_lora(setting, compile, backend) is fused


@pytest.mark.parametrize(("setting", "expected"), [
    ("yes", "algo.fused_lora='yes': use auto, true or false"),
    (1, "algo.fused_lora=1: use auto, true or false"),
])
def test_fused_lora_setting_that_is_not_one_of_the_three_is_refused(setting, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        resolve_fused_lora(setting, False, "inductor")
