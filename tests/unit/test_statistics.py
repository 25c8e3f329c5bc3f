"""The evaluation's confidence interval: over prompt means, checked on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from sdpo.eval_results import EvalResult
from sdpo.statistics import ci_method, prompt_mean_ci, t_quantile


def test_interval_comes_from_prompt_means_not_images() -> None:
    # two prompts, each scored the same on both of its images: 2 prompt means, not 4 independent draws
    stats = prompt_mean_ci(torch.tensor([[1.0, 1.0], [3.0, 3.0]]))
    half = t_quantile(0.975, 1) * math.sqrt(2.0) / math.sqrt(2.0)  # std of (1, 3) is sqrt(2), over sqrt(2 prompts)
    assert stats["mean"] == 2.0 and stats["n"] == 4 and stats["prompts"] == 2
    assert stats["std"] == pytest.approx(math.sqrt(4 / 3))  # over the 4 images, n-1
    assert (stats["ci95_low"], stats["ci95_high"]) == pytest.approx((2.0 - half, 2.0 + half))
    images_as_independent = t_quantile(0.975, 3) * math.sqrt(4 / 3) / 2
    assert half > 6 * images_as_independent  # what treating the images as independent used to under-state


def test_noise_within_a_prompt_does_not_widen_the_interval() -> None:
    # prompt means 1 and 2 either way; only the spread across prompts counts
    tight = prompt_mean_ci(torch.tensor([[1.0, 1.0], [2.0, 2.0]]))
    noisy = prompt_mean_ci(torch.tensor([[0.0, 2.0], [1.0, 3.0]]))
    assert noisy["std"] > tight["std"]
    assert (noisy["ci95_low"], noisy["ci95_high"]) == pytest.approx((tight["ci95_low"], tight["ci95_high"]))


def test_one_prompt_falls_back_to_its_images() -> None:
    values = torch.tensor([[0.0, 1.0, 2.0]])
    stats = prompt_mean_ci(values)
    half = t_quantile(0.975, 2) * 1.0 / math.sqrt(3)  # std of (0, 1, 2) is 1
    assert stats["prompts"] == 1 and (stats["ci95_low"], stats["ci95_high"]) == pytest.approx((1 - half, 1 + half))
    assert "single prompt" in ci_method(1) and "prompt means" in ci_method(2)


def test_one_image_of_one_prompt_has_no_interval() -> None:
    stats = prompt_mean_ci(torch.tensor([[0.5]]))
    assert stats["mean"] == 0.5 and math.isnan(stats["ci95_low"]) and math.isnan(stats["std"])


def test_results_table_states_how_its_interval_was_built() -> None:
    scores = {"brightness": torch.tensor([[[0.1, 0.2], [0.4, 0.6], [0.3, 0.3]]])}  # [1 step count, 3 prompts, 2]
    result = EvalResult(prompts=["a", "b", "c"], step_counts=(1,), scores=scores,
                        images=torch.zeros(1, 3, 0, 3, 8, 8, dtype=torch.uint8), meta={"seed": 0})
    row = result.table()[0]
    half = t_quantile(0.975, 2) * float(torch.tensor([0.15, 0.5, 0.3]).std()) / math.sqrt(3)
    assert row["ci95_high"] - row["mean"] == pytest.approx(half, rel=1e-6)
    assert "over the prompt means" in result.to_markdown()


def test_rejects_scores_without_a_prompt_axis() -> None:
    with pytest.raises(ValueError, match="prompts, images"):
        prompt_mean_ci(torch.tensor([1.0, 2.0]))
