"""Tests for sdpo.algo.advantages: returns-to-go and the per-(prompt, step) stat tracker."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sdpo.algo.advantages import PerStepPromptStatTracker, discounted_returns

EPS = 1e-6


def _norm(x: float, values: list[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return (x - arr.mean()) / (arr.std() + EPS)


# ---------------------------------------------------------------- discounted_returns


def test_discounted_returns_hand_case_torch() -> None:
    r = torch.tensor([[1.0, 2.0, 4.0], [0.0, 0.0, 8.0]])
    # row 0: G2 = 4, G1 = 2 + 0.5*4 = 4, G0 = 1 + 0.5*4 = 3; row 1: 8, 4, 2
    g = discounted_returns(r, 0.5)
    assert isinstance(g, torch.Tensor) and g.dtype == torch.float32
    torch.testing.assert_close(g, torch.tensor([[3.0, 4.0, 4.0], [2.0, 4.0, 8.0]]))


def test_discounted_returns_hand_case_numpy_and_dtypes() -> None:
    r = np.array([[1.0, 2.0, 4.0]], dtype=np.float64)
    g = discounted_returns(r, 0.5)
    assert isinstance(g, np.ndarray) and g.dtype == np.float64
    np.testing.assert_allclose(g, [[3.0, 4.0, 4.0]])
    assert discounted_returns(r.astype(np.float32), 0.5).dtype == np.float32
    g_bf16 = discounted_returns(torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.bfloat16), 0.5)
    assert g_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(g_bf16.float(), torch.tensor([[3.0, 4.0, 4.0]]))


def test_discounted_returns_gamma_edge_cases() -> None:
    r = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(discounted_returns(r, 0.0), r)
    torch.testing.assert_close(discounted_returns(r, 1.0), r.flip(1).cumsum(1).flip(1))
    torch.testing.assert_close(discounted_returns(r, 0.99)[:, -1], r[:, -1])
    with pytest.raises(ValueError):
        discounted_returns(torch.zeros(3), 0.9)


# ---------------------------------------------------------------- tracker


def test_tracker_hand_stream_batch_then_buffer_then_fifo() -> None:
    tr = PerStepPromptStatTracker(buffer_size=4, min_count=3)

    # update 1: every buffer has < 3 values -> whole-batch column stats
    r1 = np.array([[1.0, 10.0], [3.0, 20.0], [5.0, 30.0]])
    a1 = tr.update(["a", "a", "b"], r1)
    expected1 = np.array([[_norm(r1[n, t], r1[:, t].tolist()) for t in range(2)] for n in range(3)])
    np.testing.assert_allclose(expected1[:, 0], np.array([-2.0, 0.0, 2.0]) / (np.sqrt(8 / 3) + EPS))
    np.testing.assert_allclose(a1, expected1, rtol=1e-12)
    assert tr.num_keys == 4  # (a,0) (a,1) (b,0) (b,1)

    # update 2: (a,t) buffers reach 3 values -> buffer stats; (b,t) still batch stats
    r2 = np.array([[7.0, 0.0], [100.0, 1.0]])
    a2 = tr.update(["a", "b"], r2)
    np.testing.assert_allclose(a2[0, 0], _norm(7.0, [1.0, 3.0, 7.0]), rtol=1e-12)
    np.testing.assert_allclose(a2[0, 1], _norm(0.0, [10.0, 20.0, 0.0]), rtol=1e-12)
    np.testing.assert_allclose(a2[1, 0], _norm(100.0, [7.0, 100.0]), rtol=1e-12)  # batch column
    np.testing.assert_allclose(a2[1, 1], _norm(1.0, [0.0, 1.0]), rtol=1e-12)

    # update 3: (a,0) gets 2 more values, max length 4 -> the oldest (1.0) is evicted
    r3 = np.array([[2.0, 5.0], [4.0, 6.0]])
    a3 = tr.update(["a", "a"], r3)
    buf_a0 = [3.0, 7.0, 2.0, 4.0]
    np.testing.assert_allclose(a3[:, 0], [_norm(2.0, buf_a0), _norm(4.0, buf_a0)], rtol=1e-12)
    buf_a1 = [20.0, 0.0, 5.0, 6.0]
    np.testing.assert_allclose(a3[:, 1], [_norm(5.0, buf_a1), _norm(6.0, buf_a1)], rtol=1e-12)

    state = {(e["prompt"], e["step"]): e["values"] for e in tr.state_dict()["buffers"]}
    assert state[("a", 0)] == buf_a0
    assert state[("b", 0)] == [5.0, 100.0]
    st = tr.stats()
    assert st["num_keys"] == 4.0
    assert st["buffer_len_mean"] == pytest.approx((4 + 4 + 2 + 2) / 4)
    assert st["frac_keys_ready"] == pytest.approx(0.5)
    assert st["last_frac_batch_stats"] == 0.0


def test_tracker_key_ready_uses_buffer_not_batch() -> None:
    # once (p, t) is ready, other prompts in the batch must not affect p's advantages
    tr = PerStepPromptStatTracker(buffer_size=8, min_count=2)
    tr.update(["p", "p"], np.array([[0.0], [2.0]]))
    out_a = tr.state_dict()
    tr_b = PerStepPromptStatTracker()
    tr_b.load_state_dict(out_a)
    adv_alone = tr.update(["p"], np.array([[4.0]]))
    adv_mixed = tr_b.update(["p", "q"], np.array([[4.0], [1000.0]]))
    assert adv_alone[0, 0] == pytest.approx(_norm(4.0, [0.0, 2.0, 4.0]))
    assert adv_mixed[0, 0] == adv_alone[0, 0]


def test_tracker_torch_in_torch_out() -> None:
    tr = PerStepPromptStatTracker(buffer_size=4, min_count=2)
    r = torch.tensor([[1.0, 2.0], [3.0, 5.0]], dtype=torch.float32)
    a = tr.update(["x", "y"], r)
    assert isinstance(a, torch.Tensor) and a.dtype == torch.float32 and a.shape == (2, 2)
    torch.testing.assert_close(a, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]), rtol=1e-5, atol=1e-5)
    a16 = PerStepPromptStatTracker(4, 2).update(["x", "y"], r.bfloat16())
    assert a16.dtype == torch.bfloat16
    a_np = PerStepPromptStatTracker(4, 2).update(["x", "y"], r.numpy())
    assert isinstance(a_np, np.ndarray) and a_np.dtype == np.float32


def _stream(seed: int, steps: int = 5):
    rng = np.random.default_rng(seed)
    prompts = ["cat", "dog", "cow"]
    for _ in range(steps):
        ps = [prompts[i] for i in rng.integers(0, 3, size=6)]
        yield ps, rng.normal(size=(6, 4))


def test_tracker_state_dict_round_trip_identical_future(tmp_path) -> None:
    a = PerStepPromptStatTracker(buffer_size=5, min_count=3)
    for ps, r in _stream(0):
        a.update(ps, r)
    state = a.state_dict()
    json.loads(json.dumps(state))  # plain python types only

    path = tmp_path / "tracker.pt"
    torch.save({"tracker": state}, path)
    loaded = torch.load(path, weights_only=True)["tracker"]

    b = PerStepPromptStatTracker()  # different defaults: the state carries the config
    b.load_state_dict(loaded)
    assert b.num_keys == a.num_keys
    assert b.buffer_size == 5 and b.min_count == 3
    for ps, r in _stream(1, steps=3):
        np.testing.assert_array_equal(a.update(ps, r), b.update(ps, r))
    assert a.state_dict() == b.state_dict()


def test_tracker_bad_inputs() -> None:
    tr = PerStepPromptStatTracker(buffer_size=4, min_count=2)
    with pytest.raises(ValueError, match=r"3.*2"):
        tr.update(["a", "b", "c"], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="2-D"):
        tr.update(["a", "b"], np.zeros(2))
    bad = np.zeros((2, 3))
    bad[0, 1] = np.nan
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match="2 non-finite"):
        tr.update(["a", "b"], bad)
    assert tr.num_keys == 0  # nothing was pushed by the failed calls
    with pytest.raises(ValueError):
        PerStepPromptStatTracker(buffer_size=4, min_count=5)
    with pytest.raises(ValueError):
        PerStepPromptStatTracker(buffer_size=0, min_count=0)
