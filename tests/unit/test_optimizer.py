"""``clip_gradients`` under a loss scaler: a fused AdamW (which Lightning leaves unscaled) clips and steps as a
foreach AdamW that Lightning unscaled, and both skip a step whose gradients overflowed."""

from __future__ import annotations

import math

import pytest
import torch

from sdpo.algo.optimizer import build_adamw, clip_gradients, grad_norm_stats

CFG = {"lr": 0.1, "betas": [0.9, 0.999], "weight_decay": 0.01, "eps": 1e-8}


def scaled_step(fused: bool, grads: list[torch.Tensor], max_norm: float) -> tuple[list[torch.Tensor], float, float]:
    """One 16-mixed-style step as Lightning runs it: the loss scaler multiplies the gradients, Lightning unscales a
    foreach optimizer before the clipping hook, the scaler steps and updates. Returns weights, pre-clip norm and
    the scale after the update."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    optimizer = build_adamw(params, {**CFG, "fused": fused}, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loss = sum((p * g).sum() for p, g in zip(params, grads, strict=True))  # d loss / d p = g
    scaler.scale(loss).backward()
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        scaler.unscale_(optimizer)  # what Lightning's MixedPrecision does before the hook
    norm = clip_gradients(optimizer, max_norm, scaler)
    scaler.step(optimizer)
    scaler.update()
    return [p.detach().clone() for p in params], float(norm), scaler.get_scale()


@pytest.mark.parametrize("max_norm", [100.0, 0.5])  # no clipping, clipping
def test_fused_adamw_clips_and_steps_like_foreach_under_a_loss_scaler(max_norm):
    generator = torch.Generator().manual_seed(1)
    grads = [torch.randn(4, 3, generator=generator), torch.randn(3, generator=generator)]
    true_norm = float(torch.cat([g.reshape(-1) for g in grads]).norm())
    (foreach, foreach_norm, _), (fused, fused_norm, _) = scaled_step(False, grads, max_norm), scaled_step(
        True, grads, max_norm)
    assert foreach_norm == pytest.approx(true_norm, rel=1e-6) and fused_norm == pytest.approx(true_norm, rel=1e-6)
    for a, b in zip(foreach, fused, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.manual_seed(0)
    initial = [torch.randn(4, 3), torch.randn(3)]
    assert not torch.equal(fused[0], initial[0])  # it stepped


@pytest.mark.parametrize("fused", [False, True])
def test_an_overflowed_step_is_skipped_and_the_scale_backs_off(fused):
    grads = [torch.full((4, 3), float("inf")), torch.zeros(3)]
    weights, _, scale = scaled_step(fused, grads, max_norm=1.0)
    torch.manual_seed(0)
    initial = [torch.randn(4, 3), torch.randn(3)]
    assert all(torch.equal(w, i) for w, i in zip(weights, initial, strict=True))
    assert scale == 512.0


def test_fused_is_the_cuda_default():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert not build_adamw(params, {**CFG, "fused": None}, torch.device("cpu")).defaults["fused"]
    assert build_adamw(params, {**CFG, "fused": True}, torch.device("cpu")).defaults["fused"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (16-mixed)")
def test_fused_adamw_under_lightning_16_mixed_trains_what_foreach_trains(tmp_path, cache_dir):
    """Lightning's 16-mixed leaves a fused optimizer's gradients scaled before the clipping hook; the hook unscales
    them, so the fused run (the CUDA default) clips, logs its gradient norm and steps as the foreach one.

    The two AdamW implementations differ in their last bits, and both the training and the comparison have to
    leave room for that without hiding a scale error (a factor of 2^16, the scaler's initial scale):
    - the learning rate is small: at 0.1 Adam's sign-like steps turn last-bit differences into weights 0.06 apart
      (fp32 on CPU); at 1e-3, 3e-7 apart;
    - fp16 forward passes amplify the differences: on an H100 the second epoch's logged norms were 0.13% apart,
      hence a 1% tolerance on the norms;
    - a gradient unscaled twice (divided by 2^16 again) falls below Adam's eps and the LoRA would barely move; the
      weights are compared as the distance between the two runs' LoRA-B (zero at the start) against its size, which
      an element whose tiny gradient took another sign in one run cannot swing."""
    from sdpo.train_run import train
    from tests.conftest import FAST, compose, read_metrics, trainable_state

    runs, norms, skipped = {}, {}, {}
    for fused in (False, True):
        cfg = compose([*FAST, "model.lora.enabled=true", "optim.lr=1e-3", "algo.max_grad_norm=0.01",
                       "trainer.max_epochs=2", "trainer.accelerator=gpu", "trainer.devices=1",
                       "trainer.precision=16-mixed", "++callbacks.eval=null", f"optim.fused={str(fused).lower()}"],
                      tmp_path / str(fused), cache_dir)
        trainer = train(cfg)
        assert trainer.optimizers[0].defaults["fused"] == fused
        runs[fused] = {n: v.float() for n, v in trainable_state(trainer.lightning_module).items() if "lora_B" in n}
        rows = read_metrics(tmp_path / str(fused))
        norms[fused] = [row["train/grad_norm"] for row in rows]
        skipped[fused] = [row["train/nonfinite_grad_steps"] for row in rows]
    # the logged norm is the clip's: it must be the true one in both. Steps that overflowed at the scaler's
    # initial scale are skipped in both runs, counted apart and left out of the mean (NaN only if all were)
    assert skipped[True] == skipped[False]
    assert len(norms[True]) == 2 and any(math.isfinite(n) for n in norms[True])
    assert norms[True] == pytest.approx(norms[False], rel=1e-2, nan_ok=True)
    size = math.sqrt(sum(float(v.square().sum()) for v in runs[False].values()))
    apart = math.sqrt(sum(float((runs[True][n] - v).square().sum()) for n, v in runs[False].items()))
    assert size > 1e-3, f"the foreach run's LoRA-B barely moved ({size:.2e}): nothing to compare"
    assert apart < 0.05 * size, f"fused and foreach LoRA-B are {apart:.2e} apart, against a size of {size:.2e}"


def test_grad_norm_stats_average_the_steps_taken_and_count_the_rest():
    """A step whose gradients overflowed (skipped by the loss scaler) is counted, not averaged into a NaN."""
    t = torch.tensor
    stats = grad_norm_stats([t(1.0), t(float("inf")), t(3.0), t(float("nan"))])
    assert stats["grad_norm"].item() == 2.0 and stats["nonfinite_grad_steps"].item() == 2
    none_taken = grad_norm_stats([t(float("inf"))])
    assert math.isnan(none_taken["grad_norm"].item()) and none_taken["nonfinite_grad_steps"].item() == 1
    assert grad_norm_stats([t(0.5), t(1.5)])["grad_norm"].item() == 1.0
    assert {k: v.item() for k, v in grad_norm_stats([]).items()} == {"grad_norm": 0.0, "nonfinite_grad_steps": 0.0}



def test_no_clipping_leaves_gradients_alone_and_still_measures_them():
    """``algo.max_grad_norm=null``: the norm is logged, the gradients are not scaled (0 or < 0 would zero or flip
    them, so those are refused)."""
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([param], lr=1.0)
    param.grad = torch.tensor([30.0, 40.0, 0.0])
    assert float(clip_gradients(optimizer, None)) == pytest.approx(50.0)
    assert param.grad.tolist() == [30.0, 40.0, 0.0]
    assert float(clip_gradients(optimizer, 5.0)) == pytest.approx(50.0)
    torch.testing.assert_close(param.grad, torch.tensor([3.0, 4.0, 0.0]), rtol=1e-5, atol=0)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=f"max_norm={bad}: use a value > 0, or None"):
            clip_gradients(optimizer, bad)
