"""``algo.attention_backend``: a pinned kernel is the one the UNet's attention really runs, eager and compiled, with
the same numbers as torch's choice; one that cannot run fails early and clearly."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor
from torch.utils._python_dispatch import TorchDispatchMode

from sdpo.policy.attention import check_attention_backend, head_shapes, pin_attention_backend, torch_attention
from sdpo.policy.loading import TinySpec, ensure_tiny_pipeline
from sdpo.policy.lora import make_trainable
from tests.conftest import FAST, compose

CPU_FLASH = "aten._scaled_dot_product_flash_attention_for_cpu"


class AtenOps(TorchDispatchMode):
    """Names of the aten ops a block of code dispatches."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def unet_with_lora(cache_dir, spec: TinySpec) -> UNet2DConditionModel:
    """A tiny UNet with LoRA on its attention projections (what a default run trains)."""
    unet = UNet2DConditionModel.from_pretrained(ensure_tiny_pipeline(cache_dir, spec) / "unet")
    torch.manual_seed(0)
    make_trainable(unet, True, 4, 4, ["to_q", "to_k", "to_v", "to_out.0"], "gaussian")
    for name, p in unet.named_parameters():  # LoRA-B starts at 0; give the adapters something to do
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return unet


@pytest.fixture
def lora_unet(cache_dir) -> UNet2DConditionModel:
    """The tiny default's UNet with LoRA (heads of dim 4 and 8)."""
    return unet_with_lora(cache_dir, TinySpec())


# cuDNN's and the memory-efficient kernel take head dims that are multiples of 8 (SD-Turbo's are 64): the default's
# dim-4 heads are refused by them on a GPU, as check_attention_backend should.
CUDA_KERNEL_SPEC = TinySpec(unet_channels=(64, 128))


def unet_inputs(unet: UNet2DConditionModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    size = unet.config.sample_size
    latents = torch.randn(2, unet.config.in_channels, size, size, generator=g)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    return latents, torch.tensor([999, 500]), text


def forward_backward(unet: UNet2DConditionModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    unet.zero_grad(set_to_none=True)
    out = unet(*unet_inputs(unet)).sample
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


def test_pinned_kernel_runs_and_matches_torchs_choice(lora_unet):
    keys = set(lora_unet.state_dict())
    auto_out, auto_grads = forward_backward(lora_unet)
    assert pin_attention_backend(lora_unet, "auto") == 0
    layers = sum(type(m).__name__ == "Attention" for m in lora_unet.modules())
    for name, present, absent in (("math", "aten.bmm", CPU_FLASH), ("flash", CPU_FLASH, "aten.bmm")):
        assert pin_attention_backend(lora_unet, name) == layers
        with AtenOps() as ops:
            out, grads = forward_backward(lora_unet)
        assert present in ops.names and absent not in ops.names, (name, sorted(ops.names))
        torch.testing.assert_close(out, auto_out, rtol=1e-5, atol=1e-5)
        assert grads.keys() == auto_grads.keys() and any("lora_A" in k for k in grads)
        for k, grad in grads.items():
            torch.testing.assert_close(grad, auto_grads[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert set(lora_unet.state_dict()) == keys  # checkpoints and LoRA export see the plain UNet


@pytest.mark.parametrize(("name", "present", "absent"), [("math", "aten.bmm", CPU_FLASH),
                                                         ("flash", CPU_FLASH, "aten.bmm")])
def test_compiled_graphs_use_the_pinned_kernel(lora_unet, name, present, absent):
    """What AOTAutograd hands the compiler (forward and backward) holds the pinned kernel, with no graph break."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.utils import counters
    from torch._functorch.aot_autograd import make_boxed_func

    traced: set[str] = set()

    def record(graph: torch.fx.GraphModule, _inputs) -> object:
        traced.update(str(n.target.overloadpacket) for n in graph.graph.nodes
                      if n.op == "call_function" and hasattr(n.target, "overloadpacket"))
        return make_boxed_func(graph.forward)

    torch._dynamo.reset()
    counters.clear()
    pin_attention_backend(lora_unet, name)
    eager_out, eager_grads = forward_backward(lora_unet)
    lora_unet.compile(backend=aot_autograd(fw_compiler=record, bw_compiler=record), dynamic=False)
    out, grads = forward_backward(lora_unet)
    torch._dynamo.reset()
    assert present in traced and absent not in traced, sorted(traced)
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for k, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[k], rtol=1e-4, atol=1e-6)


def test_evaluation_runs_torchs_kernel_and_gets_the_pin_back(lora_unet):
    pin_attention_backend(lora_unet, "math")
    pinned = [m.processor for m in lora_unet.modules() if type(m).__name__ == "Attention"]
    with torch_attention(lora_unet), AtenOps() as ops, torch.no_grad():
        lora_unet(*unet_inputs(lora_unet))
    assert CPU_FLASH in ops.names and "aten.bmm" not in ops.names  # torch's choice on CPU
    after = [m.processor for m in lora_unet.modules() if type(m).__name__ == "Attention"]
    assert all(a is b for a, b in zip(pinned, after, strict=True))  # the very objects compiled graphs were traced with


def test_other_processors_are_refused_not_replaced(lora_unet):
    layer = next(m for m in lora_unet.modules() if type(m).__name__ == "Attention")
    layer.set_processor(AttnProcessor())
    with pytest.raises(ValueError, match="uses AttnProcessor, which a pinned backend would replace"):
        pin_attention_backend(lora_unet, "math")
    assert isinstance(layer.processor, AttnProcessor)
    with pytest.raises(ValueError, match="use one of auto, flash, cudnn, efficient, math"):
        pin_attention_backend(lora_unet, "flash3")


def test_a_kernel_the_device_lacks_fails_before_any_work(lora_unet):
    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    pin_attention_backend(lora_unet, "math")
    check_attention_backend(lora_unet, torch.device("cpu"), bf16)  # runs: nothing raised
    for name in ("cudnn", "efficient"):
        pin_attention_backend(lora_unet, name)
        heads, dim = head_shapes(lora_unet)[0]
        with pytest.raises(ValueError, match=re.escape(f"algo.attention_backend={name} cannot run this UNet's "
                                                       f"attention ({heads} heads of dim {dim}) on cpu")) as error:
            check_attention_backend(lora_unet, torch.device("cpu"), bf16)
        assert "flash or math" in str(error.value)


@pytest.mark.parametrize(("overrides", "expected"), [
    (["algo.attention_backend=flash3"], "algo.attention_backend='flash3': use one of auto, flash, cudnn"),
    (["algo.attention_backend=cudnn", "trainer.accelerator=cpu"], "is a CUDA kernel, but trainer.accelerator=cpu"),
])
def test_config_refuses_an_attention_backend_that_cannot_run(tmp_path, cache_dir, overrides, expected):
    from sdpo.config_checks import ConfigError, validate_config

    with pytest.raises(ConfigError, match=re.escape(expected)):
        validate_config(compose([*FAST, *overrides], tmp_path, cache_dir))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA attention kernels")
@pytest.mark.parametrize("name", ["flash", "cudnn", "efficient"])
def test_cuda_kernels_run_the_unet_and_agree_with_math_under_bf16(cache_dir, name):
    """Each CUDA kernel passes the fit-start probe and gives the math kernel's outputs and LoRA gradients, to bf16
    rounding (the math kernel runs the same bf16 inputs), on a UNet whose head dims every kernel takes."""
    unet = unet_with_lora(cache_dir, CUDA_KERNEL_SPEC).cuda()
    def bf16():
        return torch.autocast("cuda", dtype=torch.bfloat16)

    results = {}
    for backend in ("math", name):
        pin_attention_backend(unet, backend)
        check_attention_backend(unet, torch.device("cuda"), bf16)
        unet.zero_grad(set_to_none=True)
        with bf16():
            out = unet(*(x.cuda() for x in unet_inputs(unet))).sample
        out.float().square().mean().backward()
        results[backend] = (out.float(), {n: p.grad.float() for n, p in unet.named_parameters() if p.grad is not None})
    (ref_out, ref_grads), (out, grads) = results["math"], results[name]
    torch.testing.assert_close(out, ref_out, rtol=0.05, atol=0.05)
    for k, grad in grads.items():  # bf16 noise relative to the gradient's own size
        assert (grad - ref_grads[k]).norm() <= 0.05 * ref_grads[k].norm() + 1e-6, k


def test_the_cuda_kernel_test_unet_has_head_dims_every_kernel_takes(cache_dir):
    """The CUDA test above needs head dims that are multiples of 8; the default's dim-4 heads are not."""
    dims = {dim for _, dim in head_shapes(unet_with_lora(cache_dir, CUDA_KERNEL_SPEC))}
    assert dims and all(dim % 8 == 0 for dim in dims), dims
    assert any(dim % 8 for _, dim in head_shapes(unet_with_lora(cache_dir, TinySpec())))
