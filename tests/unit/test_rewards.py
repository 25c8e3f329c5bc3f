"""Unit tests for sdpo.rewards: exact values on known inputs, JPEG vs PIL, batching, validation, registry."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdpo.rewards import RewardModel, UnscorablePrompts, available_rewards, build_reward, jpeg_size_kb
from sdpo.rewards import registry as registry_module
from sdpo.rewards.pixel_stats import COLOR_TARGETS

BUILTINS = [
    "brightness",
    "color_match",
    "colorfulness",
    "darkness",
    "jpeg_compressibility",
    "jpeg_incompressibility",
]


def const(rgb: tuple[float, float, float], batch: int = 1, size: int = 8) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(batch, 3, size, size).clone()


def prompts_for(name: str, batch: int) -> list[str]:
    colours = list(COLOR_TARGETS)
    if name == "color_match":
        return [f"a {colours[i % len(colours)]} thing" for i in range(batch)]
    return ["a photo"] * batch


@pytest.fixture
def mixed_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(2, 3, 16, 16, generator=g)
    flat = torch.full((1, 3, 16, 16), 0.3)
    grad = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(1, 3, 16, 16)
    return torch.cat([noise, flat, grad])


# ---------------------------------------------------------------- pixel statistics


def test_brightness_and_darkness_exact() -> None:
    images = torch.cat([const((0.2, 0.4, 0.9)), const((0.0, 0.0, 0.0)), const((1.0, 1.0, 1.0))])
    prompts = ["x"] * 3
    bright = build_reward("brightness")(images, prompts)
    dark = build_reward("darkness")(images, prompts)
    torch.testing.assert_close(bright, torch.tensor([0.5, 0.0, 1.0]))
    torch.testing.assert_close(dark, 1.0 - bright)


def test_colorfulness_known_values() -> None:
    reward = build_reward("colorfulness")
    grey = const((0.5, 0.5, 0.5))
    red = const((1.0, 0.0, 0.0))
    half = torch.zeros(1, 3, 8, 8)
    half[:, 0, :, :4] = 1.0  # left half pure red, right half black
    scores = reward(torch.cat([grey, red, half]), ["x"] * 3)
    # red: rg = 1, yb = 0.5, no spread -> 0.3 * sqrt(1.25)
    # half: rg in {1, 0} (mean .5, std .5), yb in {.5, 0} (mean .25, std .25) -> 1.3 * sqrt(.3125)
    expected = torch.tensor([0.0, 0.3 * math.sqrt(1.25), 1.3 * math.sqrt(0.3125)])
    torch.testing.assert_close(scores, expected)
    assert scores[1] > scores[0]


def test_color_match_exact() -> None:
    reward = build_reward("color_match")
    assert reward.requires_prompts
    images = torch.cat([const((1.0, 0.0, 0.0)), const((0.2, 0.4, 0.6)), const((1.0, 0.5, 0.0))])
    scores = reward(images, ["A RED car", "a red car on a blue road", "an Orange."])
    # (0.2-1)^2 + (0.4-0)^2 + (0.6-0)^2 = 1.16 -> mean over 3 channels, negated
    expected = torch.tensor([0.0, -1.16 / 3, 0.0])
    torch.testing.assert_close(scores, expected)


def test_color_match_first_colour_word_and_whole_words() -> None:
    reward = build_reward("color_match")
    blue = const((0.0, 0.0, 1.0))
    assert reward(blue, ["blue sky, red sun"]).item() == 0.0
    assert reward(blue, ["a bluebird under a blue sky"]).item() == 0.0  # "bluebird" is not a colour word
    assert reward(blue, ["red then blue"]).item() < 0.0


def test_color_match_unknown_prompt_lists_words() -> None:
    reward = build_reward("color_match")
    with pytest.raises(ValueError, match="magenta") as info:
        reward(const((0.5, 0.5, 0.5)), ["a cat"])
    assert "a cat" in str(info.value)


def test_prompts_a_reward_cannot_score_are_named_before_any_image() -> None:
    reward = build_reward("color_match")
    reward.check_prompts(["a red cat", "Blue sky", "green, then white"], "data.source")  # each names a colour
    with pytest.raises(UnscorablePrompts, match=r"2 prompt\(s\) of data.source name no known colour \('cat', "
                                                 r"'teal dog'\); set data.source to prompts that each name one of"):
        reward.check_prompts(["red cat", "cat", "teal dog", "cat"], "data.source")
    build_reward("brightness").check_prompts(["cat"])  # prompt-free rewards accept any prompt
    mixed = build_reward("multi", components={"brightness": {}, "color_match": {"weight": 0.5}})
    with pytest.raises(UnscorablePrompts, match="of callbacks.eval.prompts name no known colour"):
        mixed.check_prompts(["dog"], "callbacks.eval.prompts")  # a weighted sum asks every part


def test_color_match_custom_table() -> None:
    reward = build_reward("color_match", colors={"Teal": (0.0, 0.5, 0.5)})
    assert reward(const((0.0, 0.5, 0.5)), ["teal"]).item() == 0.0
    with pytest.raises(ValueError):
        reward(const((0.0, 0.5, 0.5)), ["red"])


# ---------------------------------------------------------------- JPEG


def test_jpeg_flat_vs_noise_ordering() -> None:
    flat = const((0.4, 0.5, 0.6), size=64)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    images = torch.cat([flat, noise])
    comp = build_reward("jpeg_compressibility")(images, ["x", "y"])
    incomp = build_reward("jpeg_incompressibility")(images, ["x", "y"])
    assert comp[0] > comp[1]
    assert incomp[0] < incomp[1]
    torch.testing.assert_close(comp, -incomp)
    assert (incomp > 0).all()


def test_jpeg_size_matches_independent_pil_encode() -> None:
    images = torch.rand(2, 3, 24, 32, generator=torch.Generator().manual_seed(2))
    sizes = jpeg_size_kb(images, quality=95)
    assert sizes.shape == (2,) and sizes.dtype == torch.float32
    for i in range(2):
        array = np.round(images[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="JPEG", quality=95)
        assert sizes[i].item() == pytest.approx(len(buf.getvalue()) / 1000.0)
    reward = build_reward("jpeg_incompressibility")
    torch.testing.assert_close(reward(images, ["a", "b"]), sizes)


def test_jpeg_quality_changes_size() -> None:
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    low = build_reward("jpeg_incompressibility", quality=10)(images, ["x"])
    high = build_reward("jpeg_incompressibility", quality=95)(images, ["x"])
    assert low.item() < high.item()
    with pytest.raises(ValueError):
        build_reward("jpeg_compressibility", quality=0)


# ---------------------------------------------------------------- shared contract


@pytest.mark.parametrize("name", BUILTINS)
def test_batch_invariance_shape_dtype(name: str, mixed_batch: torch.Tensor) -> None:
    reward = build_reward(name)
    prompts = prompts_for(name, len(mixed_batch))
    scores = reward(mixed_batch, prompts)
    assert scores.shape == (len(mixed_batch),)
    assert scores.dtype == torch.float32
    assert scores.device == mixed_batch.device
    assert torch.isfinite(scores).all()
    alone = torch.cat([reward(mixed_batch[i : i + 1], prompts[i : i + 1]) for i in range(len(mixed_batch))])
    torch.testing.assert_close(scores, alone)


@pytest.mark.parametrize("name", BUILTINS)
def test_bf16_input(name: str, mixed_batch: torch.Tensor) -> None:
    reward = build_reward(name)
    prompts = prompts_for(name, len(mixed_batch))
    scores = reward(mixed_batch.bfloat16(), prompts)
    assert scores.dtype == torch.float32 and scores.shape == (len(mixed_batch),)
    if not name.startswith("jpeg"):  # bf16 rounding can move a pixel across a uint8 step
        torch.testing.assert_close(scores, reward(mixed_batch.bfloat16().float(), prompts))


@pytest.mark.parametrize("name", BUILTINS)
def test_nan_input_raises_with_name(name: str, mixed_batch: torch.Tensor) -> None:
    images = mixed_batch.clone()
    images[1, 0, 0, 0] = float("nan")
    images[2, 1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match=rf"{name}.*2 non-finite.*2 of 4"):
        build_reward(name)(images, prompts_for(name, 4))


@pytest.mark.parametrize("name", BUILTINS)
def test_wrong_shape_raises(name: str) -> None:
    reward = build_reward(name)
    with pytest.raises(ValueError, match="3, H, W"):
        reward(torch.rand(2, 4, 8, 8), prompts_for(name, 2))
    with pytest.raises(ValueError, match="3, H, W"):
        reward(torch.rand(3, 8, 8), prompts_for(name, 1))
    with pytest.raises(ValueError, match="prompts"):
        reward(torch.rand(2, 3, 8, 8), prompts_for(name, 3))


def test_out_of_range_is_clamped() -> None:
    images = torch.cat([const((1.3, 1.2, 1.1)), const((-0.2, -0.1, -0.3))])
    torch.testing.assert_close(build_reward("brightness")(images, ["x", "y"]), torch.tensor([1.0, 0.0]))


def test_base_is_frozen_and_stays_in_eval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))

    @registry_module.register_reward("_test_linear")
    class LinearReward(RewardModel):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(3, 1)
            self.drop = torch.nn.Dropout(0.5)

        def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
            return self.head(self.drop(images.mean(dim=(2, 3)))).squeeze(1)

    reward = build_reward("_test_linear")
    assert reward.name == "_test_linear"
    assert "_test_linear" in available_rewards()
    assert not any(p.requires_grad for p in reward.parameters())
    assert not reward.training
    parent = torch.nn.Sequential(reward).train()
    assert not reward.training and not reward.drop.training and parent.training
    images = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(reward(images, ["a", "b"]), reward(images, ["a", "b"]))
    with pytest.raises(ValueError, match="already registered"):
        registry_module.register_reward("_test_linear")(LinearReward)


# ---------------------------------------------------------------- registry


def test_registry_lists_builtins_and_names_match() -> None:
    names = available_rewards()
    assert set(BUILTINS) <= set(names)
    assert names == sorted(names)
    for name in BUILTINS:
        reward = build_reward(name)
        assert isinstance(reward, RewardModel)
        assert reward.name == name
        assert isinstance(reward.requires_prompts, bool)
        assert reward.requires_prompts == (name == "color_match")


def test_unknown_reward_lists_available() -> None:
    with pytest.raises(KeyError) as info:
        build_reward("aesthetic_v99")
    message = str(info.value)
    assert "aesthetic_v99" in message
    for name in BUILTINS:
        assert name in message


def test_the_color_match_config_lists_the_colour_words_it_knows():
    """Its prompts must each name one of them, so its config says which (and stays in step with the table)."""
    import re

    from tests.conftest import CONFIG_DIR

    text = (Path(CONFIG_DIR) / "reward" / "color_match.yaml").read_text()
    listed = re.search(r"in any case: ([a-z, ]+)\.", text.replace("\n# ", " ")).group(1).split(", ")
    assert listed == list(COLOR_TARGETS)
