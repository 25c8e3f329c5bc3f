"""Tests for sdpo.algo.losses: the clipped dense reward-difference loss and temporal weights."""

from __future__ import annotations

import pytest
import torch

from sdpo.algo.losses import sdpo_loss, temporal_weights


def _t(*values: float, grad: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


def test_hand_case_both_branches() -> None:
    # pair 0: rho_a = 0.3, rho_b = 0 -> d_rho = 0.3, clipped d_rho = 0.1, dA = 0.1
    #         unclipped (0.3-0.1)^2 = 0.04 > clipped 0 -> unclipped branch
    # pair 1: same ratios, dA = 0.5: unclipped 0.04 < clipped (0.1-0.5)^2 = 0.16 -> clipped branch
    lp_a = _t(0.3, 0.3, grad=True)
    lp_b = _t(0.0, 0.0, grad=True)
    old = _t(0.0, 0.0)
    loss, info = sdpo_loss(lp_a, lp_b, old, old, _t(0.1, 0.5), _t(0.0, 0.0), _t(1.0, 1.0), 0.1, 5.0)
    assert loss.shape == () and loss.dtype == torch.float32
    assert loss.item() == pytest.approx((0.04 + 0.16) / 2, rel=1e-5)
    assert info["loss_unclipped"].item() == pytest.approx(0.04, rel=1e-5)
    assert info["clipfrac"].item() == pytest.approx(0.5)  # ratios [0.3, 0.3, 0, 0]
    assert info["clip_branch_frac"].item() == pytest.approx(0.5)
    assert info["approx_kl"].item() == pytest.approx(0.5 * (0.09 + 0.09) / 4, rel=1e-5)
    assert info["log_ratio_abs_max"].item() == pytest.approx(0.3)
    assert info["log_ratio_abs_mean"].item() == pytest.approx(0.15)
    assert info["adv_diff_abs_mean"].item() == pytest.approx(0.3)

    loss.backward()
    # pair 0 (unclipped): d/dlp_a = 2*(0.3-0.1)/B = 0.2, d/dlp_b = -0.2
    # pair 1 (clipped; lp_a outside the clip so its gradient is cut): d/dlp_a = 0,
    #         d/dlp_b = 2*(0.1-0.5)*(-1)/B = 0.4
    torch.testing.assert_close(lp_a.grad, torch.tensor([0.2, 0.0]))
    torch.testing.assert_close(lp_b.grad, torch.tensor([-0.2, 0.4]))


def test_weights_scale_log_ratio_difference() -> None:
    # w = 3, d_rho = 0.02 (inside clip 0.05), dA = 0 -> (0.06)^2
    loss, info = sdpo_loss(_t(0.01), _t(-0.01), _t(0.0), _t(0.0), _t(0.0), _t(0.0), _t(3.0), 0.05, 5.0)
    assert loss.item() == pytest.approx(0.0036, rel=1e-4)
    assert info["clipfrac"].item() == 0.0
    assert info["clip_branch_frac"].item() == 0.0


def test_zero_loss_when_weighted_ratio_diff_matches_adv_diff() -> None:
    lp_a = _t(-1.00, 0.50, grad=True)
    lp_b = _t(-2.00, 0.25, grad=True)
    old_a = _t(-1.05, 0.52)
    old_b = _t(-1.98, 0.24)
    w = _t(2.0, 0.5)
    # rho_a = [0.05, -0.02], rho_b = [-0.02, 0.01] -> d_rho = [0.07, -0.03], all |rho| < clip 0.1
    adv_a = w * torch.tensor([0.07, -0.03])
    adv_b = torch.zeros(2)
    loss, info = sdpo_loss(lp_a, lp_b, old_a, old_b, adv_a, adv_b, w, 0.1, 5.0)
    assert loss.item() < 1e-10
    assert info["clipfrac"].item() == 0.0


def test_advantages_clipped_before_differencing() -> None:
    zero = _t(0.0)
    loss, info = sdpo_loss(zero, zero, zero, zero, _t(10.0), _t(-10.0), _t(1.0), 0.1, 5.0)
    # clipped to 5 and -5 -> dA = 10 -> loss 100 (unclipped advantages would give 400)
    assert loss.item() == pytest.approx(100.0)
    assert info["adv_diff_abs_mean"].item() == pytest.approx(10.0)
    loss_same_side, _ = sdpo_loss(zero, zero, zero, zero, _t(10.0), _t(7.0), _t(1.0), 0.1, 5.0)
    assert loss_same_side.item() == 0.0  # both clip to 5


def test_gradient_matches_finite_differences_and_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    b = 5
    old_a = torch.randn(b, generator=gen)
    old_b = torch.randn(b, generator=gen)
    lp_a = (old_a + 0.05 * torch.randn(b, generator=gen)).requires_grad_()
    lp_b = (old_b + 0.05 * torch.randn(b, generator=gen)).requires_grad_()
    adv_a, adv_b = torch.randn(b, generator=gen), torch.randn(b, generator=gen)
    w = torch.rand(b, generator=gen) + 0.5
    clip = 0.04

    loss, _ = sdpo_loss(lp_a, lp_b, old_a, old_b, adv_a, adv_b, w, clip, 5.0)
    ga, gb = torch.autograd.grad(loss, [lp_a, lp_b])
    assert ga.abs().sum() > 0 and gb.abs().sum() > 0

    # independent float64 reference written element by element
    def ref(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
        terms = []
        for i in range(b):
            ra, rb = la[i] - old_a[i].double(), lb[i] - old_b[i].double()
            da = adv_a[i].double() - adv_b[i].double()
            u = (w[i].double() * (ra - rb) - da) ** 2
            c = (w[i].double() * (ra.clamp(-clip, clip) - rb.clamp(-clip, clip)) - da) ** 2
            terms.append(torch.maximum(u, c))
        return torch.stack(terms).mean()

    la64 = lp_a.detach().double().requires_grad_()
    lb64 = lp_b.detach().double().requires_grad_()
    ref_loss = ref(la64, lb64)
    ra, rb = torch.autograd.grad(ref_loss, [la64, lb64])
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-4)
    torch.testing.assert_close(ga.double(), ra, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(gb.double(), rb, rtol=1e-3, atol=1e-5)

    # central finite differences on the float64 reference at a point
    h = 1e-6
    for i in range(b):
        e = torch.zeros(b, dtype=torch.float64)
        e[i] = h
        with torch.no_grad():
            fd = (ref(la64 + e, lb64) - ref(la64 - e, lb64)) / (2 * h)
        assert ra[i].item() == pytest.approx(fd.item(), abs=1e-5)


def test_old_logprobs_and_advantages_get_no_gradient() -> None:
    old_a = _t(0.0, grad=True)
    adv_a = _t(1.0, grad=True)
    lp_a = _t(0.01, grad=True)
    loss, info = sdpo_loss(lp_a, _t(0.0), old_a, _t(0.0), adv_a, _t(0.0), _t(1.0), 0.1, 5.0)
    loss.backward()
    assert lp_a.grad is not None and lp_a.grad.item() != 0.0
    assert old_a.grad is None and adv_a.grad is None
    assert all(not v.requires_grad for v in info.values())


def test_bf16_inputs_give_float32_loss_and_bf16_grads() -> None:
    lp_a = _t(0.5, 0.25, grad=True, dtype=torch.bfloat16)
    lp_b = _t(0.25, 0.0, grad=True, dtype=torch.bfloat16)
    z = torch.zeros(2, dtype=torch.bfloat16)
    one = torch.ones(2, dtype=torch.bfloat16)
    loss, info = sdpo_loss(lp_a, lp_b, z, z, one, z, one, 0.1, 5.0)
    assert loss.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in info.values())
    loss.backward()
    assert lp_a.grad is not None and lp_a.grad.dtype == torch.bfloat16
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss_ac, _ = sdpo_loss(lp_a.float(), lp_b.float(), z, z, one, z, one, 0.1, 5.0)
    assert loss_ac.dtype == torch.float32
    assert loss_ac.item() == loss.item()


def test_small_clip_range_resolved_in_float32() -> None:
    # a 5e-5 log-ratio on a log-prob of ~-1 is below bf16 resolution; the loss must still see it
    old = torch.tensor([-1.0], dtype=torch.float32)
    lp = (old + 5e-5).requires_grad_()
    loss, info = sdpo_loss(lp, old.clone(), old, old, _t(0.0), _t(0.0), _t(1.0), 1e-4, 5.0)
    assert loss.item() == pytest.approx(2.5e-9, rel=1e-2)
    assert info["clipfrac"].item() == 0.0


def test_shape_and_argument_validation() -> None:
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="weights"):
        sdpo_loss(x, x, x, x, x, x, torch.zeros(2), 0.1, 5.0)
    with pytest.raises(ValueError):
        sdpo_loss(x, x, x, x, x, x, x, 0.0, 5.0)
    with pytest.raises(ValueError):
        sdpo_loss(torch.zeros(2, 2), *[torch.zeros(2, 2)] * 6, 0.1, 5.0)


def test_temporal_weights() -> None:
    w = temporal_weights(torch.tensor([0, 1, 2, 3]), lam=0.5, eta=2.0)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, torch.tensor([0.5, 0.25, 0.125, 0.0625]))
    w99 = temporal_weights(torch.tensor([[0, 49]]), lam=0.99, eta=1.0)
    assert w99.shape == (1, 2)
    assert w99[0, 1].item() == pytest.approx(0.99**49, rel=1e-6)
    with pytest.raises(ValueError):
        temporal_weights(torch.tensor([0]), lam=0.99, eta=0.0)
