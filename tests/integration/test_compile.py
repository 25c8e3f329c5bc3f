"""torch.compile in a real run: the whole UNet compiles one static graph per (grad mode, batch shape) whatever the
order it meets them in, the held-out evaluation compiles nothing, and inductor's gradients are eager's."""

from __future__ import annotations

import logging
import os
import re

import pytest
import torch
from torch import Tensor

from sdpo.train_run import train
from tests.conftest import FAST, ZERO_GRADIENT_BACKEND, compose, read_metrics

# (grad mode, any symbolic size, rows of the latent input) of every graph the backend is handed
COMPILED: list[tuple[bool, bool, object]] = []
LATENT = (4, 8, 8)  # the tiny default's latents


def _symbolic(value: object) -> bool:
    return isinstance(value, torch.SymInt)


@torch._dynamo.register_backend(name="sdpo_test_recording")
def recording_backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
    """Runs the captured graph as it is (eager), noting what dynamo captured."""
    tensors = [x for x in example_inputs if isinstance(x, Tensor)]
    dynamic = any(_symbolic(x) for x in example_inputs) or any(_symbolic(d) for x in tensors for d in x.shape)
    rows = [x.shape[0] for x in tensors if x.dim() == 4 and tuple(x.shape[1:]) == LATENT]
    COMPILED.append((torch.is_grad_enabled(), dynamic, rows[0] if rows else None))
    return graph.forward


@pytest.mark.parametrize(("attention", "lora"), [("auto", False), ("math", True)])
def test_whole_unet_compiles_static_graphs_and_evaluation_compiles_none(attention, lora, tmp_path, cache_dir,
                                                                        caplog):
    """Sampling meets the UNet first with 8 rows (4 prompts x 2), training then with 4 (2 pairs x 2): torch's
    default would compile the training graph with a symbolic batch. The held-out evaluation (3 images x 4 prompts
    = 12 rows, after both epochs) would compile two more graphs; it runs eagerly instead. With a pinned attention
    kernel, evaluation swaps in torch's processors and back; the graphs' guards still hold: nothing recompiles.

    algo.compile_check compares the compiled gradients with eager ones, compiling nothing more: a full fine-tune's
    once, a fresh LoRA's twice (its A factors' gradients are zero until B has taken a step)."""
    caplog.set_level(logging.INFO, logger="sdpo.policy.compile_check")
    torch._dynamo.reset()  # no cache entries or seen sizes left by other tests
    COMPILED.clear()
    cfg = compose([*FAST, "algo.num_steps=2", "trainer.max_epochs=2", "algo.compile=true",
                   "algo.compile_backend=sdpo_test_recording", "callbacks.eval.every_n_epochs=1",
                   "callbacks.eval.images_per_prompt=3", "callbacks.eval.steps=[1,2]",
                   f"algo.attention_backend={attention}", f"model.lora.enabled={str(lora).lower()}"],
                  tmp_path, cache_dir)
    train(cfg)
    torch._dynamo.reset()
    assert len(COMPILED) == 2, COMPILED  # one graph per grad mode, compiled once in the first epoch
    assert {(grad, rows) for grad, _, rows in COMPILED} == {(False, 8), (True, 4)}, COMPILED
    assert not any(dynamic for _, dynamic, _ in COMPILED), COMPILED
    evaluated = [row for row in read_metrics(tmp_path) if "eval/brightness/2step" in row]
    assert len(evaluated) == 2  # both epochs were evaluated, by the compiled UNet run eagerly
    checks = [r.getMessage() for r in caplog.records if r.name == "sdpo.policy.compile_check"]
    assert [c.split(":")[0] for c in checks] == ["compile check 1", "compile check 2"][:1 + lora], checks
    assert ("had zero gradient, compared again at the next step" in checks[0]) is lora, checks


class BatchedScores(torch.nn.Module):
    """Attention's score product alone: a batched matmul, which inductor can autotune on CPU (a Linear it cannot)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.bmm(x, x.transpose(1, 2))


def autotuned_choices(mode: str | None) -> int:
    """How many times inductor benchmarked kernel choices compiling ``BatchedScores`` under ``mode`` (fresh caches)."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    from sdpo.policy.speed import apply_speed_options

    torch._dynamo.reset()
    counters.clear()
    module = BatchedScores()
    apply_speed_options(module, channels_last=False, compile=True, inductor_mode=mode)
    with fresh_cache(), torch.no_grad():
        module(torch.randn(4, 64, 64))
    return counters["inductor"]["select_algorithm_autotune"]


def test_compile_mode_reaches_inductor():
    """compile_mode max-autotune-no-cudagraphs makes inductor benchmark its kernel choices; the default does not."""
    assert autotuned_choices("max-autotune-no-cudagraphs") > 0
    assert autotuned_choices(None) == 0


@pytest.mark.parametrize(("overrides", "expected"), [
    (["algo.compile_mode=max-autotune"], "algo.compile_mode='max-autotune': use one of default, "),
    (["algo.compile_mode=max-autotune-no-cudagraphs"], "needs algo.compile=true"),
    (["algo.compile=true", "algo.compile_backend=aot_eager", "algo.compile_mode=max-autotune-no-cudagraphs"],
     "set algo.compile_backend=inductor"),
])
def test_a_compile_mode_that_would_do_nothing_is_refused(tmp_path, cache_dir, overrides, expected):
    from sdpo.config_checks import ConfigError, validate_config

    with pytest.raises(ConfigError, match=re.escape(expected)):
        validate_config(compose([*FAST, *overrides], tmp_path, cache_dir))


def test_compiled_graphs_land_in_compile_cache_dir_and_load_from_it(tmp_path, monkeypatch):
    """``use_compile_cache``: inductor writes its graphs to the folder and, after a reset (a new process, as far as
    dynamo knows), loads them from there instead of compiling again."""
    from torch._dynamo.utils import counters

    from sdpo.policy.speed import apply_speed_options, use_compile_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "torch_default"))  # restored after the test
    assert use_compile_cache(str(tmp_path / "cache")) == str((tmp_path / "cache").resolve())
    hits = []
    for _ in range(2):
        torch._dynamo.reset()
        counters.clear()
        module = BatchedScores()
        apply_speed_options(module, channels_last=False, compile=True)
        with torch.no_grad():
            module(torch.randn(4, 64, 64))
        hits.append((counters["inductor"]["fxgraph_cache_miss"], counters["inductor"]["fxgraph_cache_hit"]))
    assert hits[0][0] >= 1 and hits[1] == (0, hits[0][0]), hits  # compiled once, then every graph from disk
    assert any((tmp_path / "cache").rglob("*")) and not (tmp_path / "torch_default").exists()
    assert use_compile_cache(None) is None


class ModuleBuilt(Exception):
    """Raised where the run would build its module: everything ``train`` sets up before it has happened."""


def test_a_compiled_run_points_inductor_at_the_configured_folder(tmp_path, cache_dir, monkeypatch):
    """Before anything can compile (the module, and DDP's other ranks, come later)."""
    def stop(*args, **kwargs):
        raise ModuleBuilt

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "torch_default"))
    monkeypatch.setattr("sdpo.module.SDPOModule.__init__", stop)
    cfg = compose([*FAST, "algo.compile=true"], tmp_path / "run", cache_dir)
    assert cfg.algo.compile_cache_dir == f"{cache_dir}/inductor"  # the default: under paths.cache_dir
    with pytest.raises(ModuleBuilt):
        train(cfg)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((cache_dir / "inductor").resolve())


class ResnetThenUpsample(torch.nn.Module):
    """A diffusers resnet block with a time embedding, then ``Upsample2D``: the UNet pattern whose compiled backward
    inductor's layout optimization made all zeros (torch 2.13, CPU)."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers.models.resnet import ResnetBlock2D
        from diffusers.models.upsampling import Upsample2D

        self.resnet = ResnetBlock2D(in_channels=96, out_channels=64, temb_channels=128, groups=8)
        self.up = Upsample2D(64, use_conv=True)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        return self.up(self.resnet(x, temb))


def test_inductor_as_sdpo_compiles_gives_eager_gradients():
    """The block compiled by inductor the way a run compiles its UNet (``apply_speed_options``, whose default
    turns inductor's layout optimization off) returns the input gradient eager PyTorch does. With the layout
    optimization on, this torch version returned zeros."""
    import torch._inductor.config as inductor_config

    from sdpo.policy.speed import apply_speed_options

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = ResnetThenUpsample().requires_grad_(False)
    compiled = ResnetThenUpsample().requires_grad_(False)
    compiled.load_state_dict(eager.state_dict())
    torch_default = inductor_config.layout_optimization
    try:
        apply_speed_options(compiled, channels_last=False, compile=True)
        assert inductor_config.layout_optimization is False
        x, temb = torch.randn(2, 96, 8, 8), torch.randn(2, 128)
        grads = []
        for model in (eager, compiled):
            leaf = x.clone().requires_grad_(True)
            model(leaf, temb).square().mean().backward()
            grads.append(leaf.grad)
    finally:
        inductor_config.layout_optimization = torch_default
        torch._dynamo.reset()
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(("overrides", "fused"), [
    ([], True),  # eager: fused
    (["algo.compile=regional"], False),  # inductor: PEFT's forward, which it fuses itself
    (["algo.compile=true", "algo.fused_lora=true"], True),  # asked for: fused under inductor too
])
def test_auto_fused_lora_keeps_peft_forward_where_inductor_compiles(overrides, fused, tmp_path, cache_dir):
    """algo.fused_lora=auto (the default) fuses the LoRA layers unless inductor compiles them; true fuses them
    there too."""
    from sdpo.module import SDPOModule
    from sdpo.policy.fused_lora import has_fused_lora

    cfg = compose([*FAST, "model.lora.enabled=true", *overrides], tmp_path, cache_dir)
    module = SDPOModule(cfg.model, cfg.algo, cfg.reward, cfg.optim, seed=0)
    torch._dynamo.reset()
    assert has_fused_lora(module.unet) is fused


NO_EXTRAS = ["callbacks.eval=null", "callbacks.sample_grid=null", "callbacks.export=null"]


def test_a_compiled_run_whose_gradients_are_not_eager_stops_before_its_first_step(tmp_path, cache_dir):
    """A compiler whose backward is wrong (zeros) and forward right: the run stops at its first optimizer step,
    naming the tensors, and saves nothing trained on them."""
    from sdpo.policy.compile_check import CompiledGradientError

    torch._dynamo.reset()
    cfg = compose([*FAST, "model.lora.enabled=true", "algo.num_steps=2", "algo.compile=true",
                   f"algo.compile_backend={ZERO_GRADIENT_BACKEND}", *NO_EXTRAS], tmp_path, cache_dir)
    with pytest.raises(CompiledGradientError, match=r"the compiled UNet's gradients are not eager PyTorch's "
                       r"\(algo.compile=true, algo.compile_backend=sdpo_test_zero_gradients, .*lora_B"):
        train(cfg)
    torch._dynamo.reset()
    assert not list(tmp_path.rglob("*.ckpt"))
