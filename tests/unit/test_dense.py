"""Tests for sdpo.algo.dense: anchor selection, query planning, similarity interpolation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdpo.algo.dense import (
    count_queries,
    interpolate_rewards,
    plan_queries,
    select_anchor_steps,
    select_anchors,
    step_similarities,
)


def _unit2d(deg: float) -> list[float]:
    rad = math.radians(deg)
    return [math.cos(rad), math.sin(rad)]


def _traj(angles: list[float]) -> torch.Tensor:
    """One trajectory of 2-D unit latents at the given angles -> [1, T, 2]."""
    return torch.tensor([[_unit2d(a) for a in angles]], dtype=torch.float32)


# T=5: first at 0°, last at 90°. Scores cos(θ)+cos(θ-90°): step1 (30°) 1.366, step2 (135°) 0.0,
# step3 (200°) -1.282. Endpoints both score 1 + cos 90° = 1. Known anchor: step 3.
ANCHOR3 = _traj([0.0, 30.0, 135.0, 200.0, 90.0])

# Built so an endpoint wins when allowed: first (1,0), last (0,1) exactly (score 1.0 each, a tie broken
# towards step 0), intermediates all between them in angle (scores > 1); best intermediate is step 3 (75°).
ENDPOINT_WINS = torch.tensor([[[1.0, 0.0], _unit2d(30), _unit2d(45), _unit2d(75), [0.0, 1.0]]])


def test_step_similarities_hand_values() -> None:
    x = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]])  # [1, 3, 2]; magnitude must not matter
    sims = step_similarities(x, torch.tensor([2]))
    assert sims.shape == (1, 3)
    assert sims.dtype == torch.float32
    torch.testing.assert_close(sims, torch.tensor([[0.0, 1 / math.sqrt(2), 1.0]]))


def test_step_similarities_bf16_matches_fp32_shape_and_dtype() -> None:
    x = torch.randn(3, 4, 2, 5, 5)
    sims = step_similarities(x.bfloat16(), torch.tensor([0, 1, 3]))
    assert sims.shape == (3, 4) and sims.dtype == torch.float32
    # self-similarity at the reference step is 1
    torch.testing.assert_close(sims[torch.arange(3), torch.tensor([0, 1, 3])], torch.ones(3))


def test_select_anchors_known_answer() -> None:
    assert select_anchors(ANCHOR3).tolist() == [3]
    assert select_anchors(ANCHOR3, include_endpoints=True).tolist() == [3]


def test_select_anchors_include_endpoints_changes_answer() -> None:
    assert select_anchors(ENDPOINT_WINS).tolist() == [3]
    assert select_anchors(ENDPOINT_WINS, include_endpoints=True).tolist() == [0]


def test_select_anchors_batched_rows_independent() -> None:
    x = torch.cat([ANCHOR3, ENDPOINT_WINS], dim=0)  # [2, 5, 2]
    assert select_anchors(x).tolist() == [3, 3]
    assert select_anchors(x, include_endpoints=True).tolist() == [3, 0]


@pytest.mark.parametrize("t", [1, 2])
def test_select_anchors_short_trajectory_raises(t: int) -> None:
    x = torch.randn(2, t, 4)
    with pytest.raises(ValueError, match="num_steps>=3|include_endpoints=True"):
        select_anchors(x)
    # allowed when the end points may be searched
    assert select_anchors(x, include_endpoints=True).shape == (2,)


def test_select_anchor_steps_order_and_k1() -> None:
    # intermediate scores: step1 1.366, step2 0.0, step3 -1.282 -> increasing order 3, 2, 1
    assert select_anchor_steps(ANCHOR3, num_anchors=3).tolist() == [[3, 2, 1]]
    assert select_anchor_steps(ANCHOR3, num_anchors=2).tolist() == [[3, 2]]
    # capped at the number of candidates
    assert select_anchor_steps(ANCHOR3, num_anchors=10).tolist() == [[3, 2, 1]]
    x = torch.randn(6, 7, 3, 2)
    assert torch.equal(select_anchor_steps(x, 1)[:, 0], select_anchors(x))
    with pytest.raises(ValueError):
        select_anchor_steps(x, num_anchors=0)


def test_plan_queries_argmin() -> None:
    plan = plan_queries(ANCHOR3, "argmin")
    assert plan.tolist() == [[0, 4, 3]]
    assert plan.dtype == torch.long
    plan2 = plan_queries(ANCHOR3, "argmin", num_anchors=2)
    assert plan2.tolist() == [[0, 4, 3, 2]]


def test_plan_queries_uniform_deterministic_and_spread() -> None:
    x = torch.randn(3, 10, 4)  # intermediate steps 1..8
    plan = plan_queries(x, "uniform", num_anchors=1)
    assert plan.shape == (3, 3)
    assert plan[:, :2].tolist() == [[0, 9]] * 3
    anchor = int(plan[0, 2])
    assert 4 <= anchor <= 5  # the middle of 1..8
    plan4 = plan_queries(x, "uniform", num_anchors=4)
    assert plan4.shape == (3, 6)
    anchors = plan4[0, 2:].tolist()
    assert anchors == sorted(set(anchors)) and all(1 <= a <= 8 for a in anchors)
    assert (plan4 == plan4[0]).all()  # same for every row
    # asking for every intermediate step gives exactly 1..T-2
    assert plan_queries(x, "uniform", num_anchors=8)[0, 2:].tolist() == list(range(1, 9))
    assert plan_queries(x, "uniform", num_anchors=50)[0, 2:].tolist() == list(range(1, 9))


def test_plan_queries_random_reproducible_distinct() -> None:
    x = torch.randn(16, 8, 3)
    p1 = plan_queries(x, "random", num_anchors=3, generator=torch.Generator().manual_seed(7))
    p2 = plan_queries(x, "random", num_anchors=3, generator=torch.Generator().manual_seed(7))
    p3 = plan_queries(x, "random", num_anchors=3, generator=torch.Generator().manual_seed(8))
    assert p1.shape == (16, 5)
    assert torch.equal(p1, p2)
    assert not torch.equal(p1, p3)
    assert (p1[:, 0] == 0).all() and (p1[:, 1] == 7).all()
    anchors = p1[:, 2:]
    assert ((anchors >= 1) & (anchors <= 6)).all()
    for row in p1.tolist():
        assert len(set(row)) == len(row)
    # capped: all 6 intermediates, each exactly once
    full = plan_queries(x, "random", num_anchors=99, generator=torch.Generator().manual_seed(0))
    assert full.shape == (16, 8)
    assert (full.sort(dim=1).values == torch.arange(8)).all()


def test_plan_queries_all_and_degenerate_lengths() -> None:
    x = torch.randn(2, 6, 3)
    assert plan_queries(x, "all").tolist() == [list(range(6))] * 2
    for strategy in ("argmin", "uniform", "random", "all"):
        assert plan_queries(torch.randn(3, 1, 2), strategy).tolist() == [[0]] * 3
        assert plan_queries(torch.randn(3, 2, 2), strategy).tolist() == [[0, 1]] * 3


def test_plan_queries_bad_arguments() -> None:
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="argmin.*uniform.*random.*all"):
        plan_queries(x, "best")
    for strategy in ("argmin", "uniform", "random"):
        with pytest.raises(ValueError):
            plan_queries(x, strategy, num_anchors=0)


def test_interpolate_rewards_hand_computed() -> None:
    # cos(x1, x0) = 2/sqrt(5), cos(x1, x2) = 1/sqrt(5): weights 2:1 -> (2*1 + 1*4) / 3 = 2
    x = torch.tensor([[[1.0, 0.0], [2.0, 1.0], [0.0, 1.0]]])
    steps = torch.tensor([[0, 2]])
    rewards = torch.tensor([[1.0, 4.0]])
    dense = interpolate_rewards(x, steps, rewards)
    assert dense.dtype == torch.float32
    torch.testing.assert_close(dense, torch.tensor([[1.0, 2.0, 4.0]]))


def test_interpolate_rewards_matches_numpy_formula_and_exact_at_queries() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 4, generator=gen) + 3.0  # positive offset -> all similarities positive
    steps = torch.tensor([[0, 5, 2], [0, 5, 3], [0, 5, 1]])
    rewards = torch.randn(3, 3, generator=gen)
    dense = interpolate_rewards(x, steps, rewards)

    xf = x.reshape(3, 6, -1).double().numpy()
    unit = xf / np.linalg.norm(xf, axis=-1, keepdims=True)
    expected = np.zeros((3, 6))
    for n in range(3):
        sims = np.stack([unit[n] @ unit[n, s] for s in steps[n].tolist()])  # [K, T]
        assert (sims > 1e-6).all()
        expected[n] = (sims * rewards[n].double().numpy()[:, None]).sum(0) / sims.sum(0)
        for k, s in enumerate(steps[n].tolist()):
            expected[n, s] = rewards[n, k].item()
    np.testing.assert_allclose(dense.numpy(), expected, rtol=1e-5, atol=1e-6)
    # exact at queried steps (not merely close)
    assert torch.equal(dense.gather(1, steps), rewards)


def test_interpolate_rewards_duplicate_step_later_column_wins() -> None:
    x = torch.randn(2, 4, 3)
    steps = torch.tensor([[0, 3, 0], [0, 3, 3]])
    rewards = torch.tensor([[1.0, 2.0, 9.0], [1.0, 2.0, -5.0]])
    dense = interpolate_rewards(x, steps, rewards)
    assert dense[0, 0].item() == 9.0 and dense[0, 3].item() == 2.0
    assert dense[1, 3].item() == -5.0 and dense[1, 0].item() == 1.0


def test_interpolate_rewards_negative_similarity_guard() -> None:
    # step 1 is orthogonal to both queried steps and the queried steps are opposite: the raw formula
    # would divide by ~0. With the weight floor the value is the plain average.
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    dense = interpolate_rewards(x, torch.tensor([[0, 2]]), torch.tensor([[1.0, 3.0]]))
    assert torch.isfinite(dense).all()
    torch.testing.assert_close(dense, torch.tensor([[1.0, 2.0, 3.0]]))
    # random latents (many negative cosines): finite and inside [min, max] of the queried rewards
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 8, 2, generator=gen)
    steps = plan_queries(x, "argmin")
    rewards = torch.randn(32, 3, generator=gen)
    dense = interpolate_rewards(x, steps, rewards)
    assert torch.isfinite(dense).all()
    lo, hi = rewards.min(1, keepdim=True).values, rewards.max(1, keepdim=True).values
    assert ((dense >= lo - 1e-5) & (dense <= hi + 1e-5)).all()


def test_interpolate_rewards_all_queried_is_exact() -> None:
    x = torch.randn(4, 5, 3)
    steps = plan_queries(x, "all")
    rewards = torch.randn(4, 5)
    assert torch.equal(interpolate_rewards(x, steps, rewards), rewards)


def test_interpolate_rewards_shape_checks() -> None:
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError):
        interpolate_rewards(x, torch.tensor([[0, 4], [0, 3]]), torch.zeros(2, 2))  # step out of range
    with pytest.raises(ValueError):
        interpolate_rewards(x, torch.tensor([[0, 3], [0, 3]]), torch.zeros(2, 3))  # reward shape mismatch


def test_count_queries() -> None:
    assert count_queries(torch.tensor([[0, 4, 2], [0, 4, 4], [0, 0, 0]])) == 3 + 2 + 1
    assert count_queries(torch.tensor([[0]])) == 1
    x = torch.randn(5, 6, 2)
    assert count_queries(plan_queries(x, "all")) == 30
    assert count_queries(plan_queries(x, "argmin")) == 15
    # including endpoints can make an anchor coincide with an end point: cost drops accordingly
    assert count_queries(plan_queries(ENDPOINT_WINS, "argmin", include_endpoints=True)) == 2
