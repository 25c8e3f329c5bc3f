"""Reward lists as configs give them (``[name, ...]``, ``{name: {kwargs}}`` or a mix), checked against the registry
before any model loads, and built into labelled reward models: what evaluation and held-out scoring take."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sdpo.rewards.base import RewardModel


def _plain(value: Any) -> Any:
    """OmegaConf containers (what Hydra passes) as plain Python ones."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def parse_reward_specs(spec: Any, key: str = "rewards") -> list[tuple[str, str, dict]]:
    """(label, registry name, kwargs) per reward, from ``[name, ...]``, ``{name: {kwargs}}`` or a list mixing both.

    A ``name`` entry in the kwargs lets the label differ from the registry name (two settings of one reward).
    Unknown names fail here, before any model loads; ``key`` names the config key in the message.
    """
    from sdpo.rewards import available_rewards

    spec = _plain(spec)
    if isinstance(spec, str):
        spec = [spec]
    entries: list[tuple[Any, Any]] = []
    if isinstance(spec, Mapping):
        entries = list(spec.items())
    elif isinstance(spec, Sequence):
        for item in spec:
            if isinstance(item, str):
                entries.append((item, {}))
            elif isinstance(item, Mapping):
                entries.extend(item.items())
            else:
                raise ValueError(f"{key}: each reward is a name or {{name: {{kwargs}}}}, got {item!r}")
    else:
        raise ValueError(f"{key}: give a list of reward names or a {{name: {{kwargs}}}} mapping, got {spec!r}")
    out: list[tuple[str, str, dict]] = []
    for label, kwargs in entries:
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise ValueError(f"{key}.{label}: the reward's settings must be a mapping, got {kwargs!r}")
        kwargs = dict(kwargs or {})
        name = str(kwargs.pop("name", label))
        if name not in available_rewards():
            raise ValueError(f"{key}: unknown reward {name!r}; available rewards: {', '.join(available_rewards())}")
        if any(label == seen for seen, _, _ in out):
            raise ValueError(f"{key}: reward {label!r} is listed twice")
        out.append((str(label), name, kwargs))
    if not out:
        raise ValueError(f"{key}: list at least one reward")
    return out


def build_rewards(specs: list[tuple[str, str, dict]]) -> dict[str, RewardModel]:
    """Label -> a built reward model, for ``parse_reward_specs``'s output."""
    from sdpo.rewards import build_reward

    return {label: build_reward(name, **kwargs) for label, name, kwargs in specs}
