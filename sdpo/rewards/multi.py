"""Weighted sum of registered rewards, keeping each component's score for logging."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from torch import Tensor, nn

from sdpo.rewards.base import RewardModel, WeightSource
from sdpo.rewards.registry import build_reward, register_reward, reward_factory


def parse_components(components: Any) -> list[tuple[str, str, float, dict[str, Any]]]:
    """``(label, registry name, weight, kwargs)`` per component, from the mapping or the list form."""
    entries: list[tuple[str, Mapping[str, Any]]] = []
    if isinstance(components, Mapping):
        for label, spec in components.items():
            spec = {} if spec is None else spec
            if not isinstance(spec, Mapping):
                raise TypeError(f"multi: component {label!r} must be a mapping, got {type(spec).__name__}")
            entries.append((str(label), spec))
    elif isinstance(components, Sequence) and not isinstance(components, str):
        for i, spec in enumerate(components):
            if not isinstance(spec, Mapping) or "name" not in spec:
                raise TypeError(f"multi: list entry {i} must be a mapping with a 'name', got {spec!r}")
            entries.append((str(spec.get("label", spec["name"])), spec))
    else:
        raise TypeError(f"multi: components must be a mapping or a list of mappings, got {type(components).__name__}")
    if not entries:
        raise ValueError("multi: needs at least one component")

    parsed = []
    seen: set[str] = set()
    for label, spec in entries:
        kwargs = dict(spec)
        name = str(kwargs.pop("name", label))
        kwargs.pop("label", None)
        weight = float(kwargs.pop("weight", 1.0))
        if not math.isfinite(weight):
            raise ValueError(f"multi: component {label!r} has a non-finite weight {weight}")
        if not label or "." in label:
            raise ValueError(f"multi: component label {label!r} must be non-empty and contain no '.'")
        if label in seen:
            raise ValueError(f"multi: component {label!r} appears twice; give each repeated reward its own 'label'")
        seen.add(label)
        parsed.append((label, name, weight, kwargs))
    return parsed


@register_reward("multi")
class MultiReward(RewardModel):
    """``sum_i weight_i * reward_i(images, prompts)`` over rewards built through the registry.

    ``components`` is either a mapping ``{registry_name: {weight: w, **kwargs}}`` or a list
    ``[{name: registry_name, weight: w, **kwargs}, ...]``. ``weight`` defaults to 1. To use one reward twice
    (say with different models), give the entries distinct labels: the mapping's key is the label when the
    entry also has a ``name``; list entries take an optional ``label``.

    After each call, ``last_components`` maps every label to that component's *unweighted* float32 ``[B]``
    scores (detached), so the trainer can log each on its own. The sub-rewards live in an ``nn.ModuleDict``
    and move with ``.to()``.
    """

    def __init__(self, components: Any) -> None:
        super().__init__()
        parsed = parse_components(components)
        self.rewards = nn.ModuleDict({label: build_reward(name, **kwargs) for label, name, _, kwargs in parsed})
        self.weights: dict[str, float] = {label: weight for label, _, weight, _ in parsed}
        self.requires_prompts = any(reward.requires_prompts for reward in self.rewards.values())
        self.last_components: dict[str, Tensor] = {}

    @classmethod
    def weight_sources(cls, settings: Mapping[str, Any]) -> list[WeightSource]:
        """Its parts' weights, each under ``components.<label>.<setting>``."""
        from sdpo.rewards.preflight import reward_settings

        try:
            parts = parse_components(settings["components"])
        except (ValueError, TypeError):
            return []  # building the reward says what is wrong
        return [replace(weights, key=f"components.{label}.{weights.key}") for label, name, _, kwargs in parts
                if (part := reward_settings(name, kwargs)) is not None
                for weights in reward_factory(name).weight_sources(part)]

    @classmethod
    def prompt_problem(cls, settings: Mapping[str, Any], prompts: Sequence[str], where: str) -> str | None:
        from sdpo.rewards.preflight import reward_prompt_problem

        try:
            parts = parse_components(settings["components"])
        except (ValueError, TypeError):
            return None  # building the reward says what is wrong
        said = [problem for _, name, _, kwargs in parts
                if (problem := reward_prompt_problem(name, kwargs, list(prompts), where)) is not None]
        return "\n".join(said) or None

    def check_prompts(self, prompts: Sequence[str], where: str = "prompts") -> None:
        for reward in self.rewards.values():
            reward.check_prompts(prompts, where)

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        components = {label: reward(images, prompts) for label, reward in self.rewards.items()}
        self.last_components = {label: scores.detach() for label, scores in components.items()}
        total = None
        for label, scores in components.items():
            term = self.weights[label] * scores
            total = term if total is None else total + term
        return total

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weights={self.weights}"
