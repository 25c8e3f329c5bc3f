"""Pixel-statistic rewards: differentiable-free, instant, and movable even by a tiny random model.

They let the embedded offline default (and tests) show that optimisation moves a reward, without
downloading any reward model. ``color_match`` depends on the prompt, so it also checks that text
conditioning reaches the policy.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from sdpo.rewards.base import RewardModel, UnscorablePrompts
from sdpo.rewards.registry import register_reward

#: Target RGB (in [0, 1]) of each colour word ``color_match`` understands.
COLOR_TARGETS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "orange": (1.0, 0.5, 0.0),
    "purple": (0.5, 0.0, 0.5),
}

_WORD = re.compile(r"[a-z]+")


def _brightness(images: Tensor) -> Tensor:
    return images.mean(dim=(1, 2, 3))


@register_reward("brightness")
class Brightness(RewardModel):
    """Mean pixel value over channels and pixels, in [0, 1]."""

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return _brightness(images)


@register_reward("darkness")
class Darkness(RewardModel):
    """``1 - brightness``: the mirror reward, so tests can check that optimisation follows the sign."""

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return 1.0 - _brightness(images)


@register_reward("colorfulness")
class Colorfulness(RewardModel):
    """Hasler & Süsstrunk (2003) colorfulness on the [0, 1] scale (0 for any grey image).

    ``rg = R - G``, ``yb = (R + G) / 2 - B``; score = ``sqrt(std_rg² + std_yb²) + 0.3 sqrt(mean_rg² +
    mean_yb²)`` with population standard deviations over each image's pixels.
    """

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        red, green, blue = images.unbind(dim=1)
        rg = (red - green).flatten(1)
        yb = (0.5 * (red + green) - blue).flatten(1)
        std_rg, mean_rg = torch.std_mean(rg, dim=1, correction=0)
        std_yb, mean_yb = torch.std_mean(yb, dim=1, correction=0)
        return torch.sqrt(std_rg**2 + std_yb**2) + 0.3 * torch.sqrt(mean_rg**2 + mean_yb**2)


@register_reward("color_match")
class ColorMatch(RewardModel):
    """Minus the mean squared distance between the image's mean RGB and the colour the prompt names.

    The target is the first known colour word of the prompt (case-insensitive, whole words only).
    """

    requires_prompts = True

    def __init__(self, colors: Mapping[str, tuple[float, float, float]] | None = None) -> None:
        super().__init__()
        table = dict(COLOR_TARGETS if colors is None else colors)
        if not table:
            raise ValueError("color_match needs at least one colour")
        self.colors = {word.lower(): tuple(float(c) for c in rgb) for word, rgb in table.items()}
        for word, rgb in self.colors.items():
            if len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
                raise ValueError(f"colour {word!r} must be three values in [0, 1], got {rgb}")

    def colour_word(self, prompt: str) -> str | None:
        """The first known colour word of ``prompt`` (whole words, any case), or None."""
        return next((word for word in _WORD.findall(prompt.lower()) if word in self.colors), None)

    def target_color(self, prompt: str) -> tuple[float, float, float]:
        """RGB of the first known colour word in ``prompt``; ValueError if it names none."""
        word = self.colour_word(prompt)
        if word is not None:
            return self.colors[word]
        raise ValueError(
            f"reward {self.name!r}: prompt {prompt!r} names no known colour; "
            f"use one of: {', '.join(self.colors)}"
        )

    @classmethod
    def prompt_problem(cls, settings: Mapping[str, Any], prompts: Sequence[str], where: str) -> str | None:
        try:
            cls(**settings).check_prompts(prompts, where)  # no weights: built in microseconds
        except UnscorablePrompts as error:
            return str(error)
        except (ValueError, TypeError):
            return None  # a bad colour table: building the reward says so
        return None

    def check_prompts(self, prompts: Sequence[str], where: str = "prompts") -> None:
        colourless = [p for p in dict.fromkeys(prompts) if self.colour_word(p) is None]
        if colourless:
            shown = ", ".join(repr(p) for p in colourless[:5]) + (" ..." if len(colourless) > 5 else "")
            raise UnscorablePrompts(
                f"reward {self.name!r}: {len(colourless)} prompt(s) of {where} name no known colour ({shown}); "
                f"set {where} to prompts that each name one of: {', '.join(self.colors)}")

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        targets = torch.tensor(
            [self.target_color(p) for p in prompts], dtype=images.dtype, device=images.device
        )
        mean_rgb = images.mean(dim=(2, 3))
        return -((mean_rgb - targets) ** 2).mean(dim=1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, colors={list(self.colors)}"
