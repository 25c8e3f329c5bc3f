"""Name -> reward factory registry, so configs pick rewards by string."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any, TypeVar

from sdpo.rewards.base import RewardModel, optional_package_hint

_REGISTRY: dict[str, Callable[..., RewardModel]] = {}

T = TypeVar("T", bound=type[RewardModel])


def register_reward(name: str) -> Callable[[T], T]:
    """Class decorator registering a ``RewardModel`` subclass under ``name``.

    The class's ``name`` attribute is set to ``name`` unless the class defines its own, so error
    messages and logs use the same string as the config.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")

    def decorator(cls: T) -> T:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is already registered (by {_REGISTRY[name]!r})")
        if not (isinstance(cls, type) and issubclass(cls, RewardModel)):
            raise TypeError(f"@register_reward({name!r}) expects a RewardModel subclass, got {cls!r}")
        if "name" not in cls.__dict__:
            cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_rewards() -> list[str]:
    """Sorted names of all registered rewards."""
    return sorted(_REGISTRY)


def reward_factory(name: str | None) -> Callable[..., RewardModel] | None:
    """The class registered as ``name`` (None if there is none): what its config's keys are passed to."""
    return _REGISTRY.get(name) if isinstance(name, str) else None


def build_reward(name: str, **kwargs: Any) -> RewardModel:
    """Instantiate the reward registered as ``name`` with ``kwargs``."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown reward {name!r}; available rewards: {', '.join(available_rewards())}"
        ) from None
    return factory(**kwargs)


def missing_packages(name: str) -> list[str]:
    """What reward ``name`` would fail to import when built, each with the command that installs it."""
    factory = reward_factory(name)
    return [optional_package_hint(name, module, extra)
            for module, extra in getattr(factory, "optional_modules", ()) if importlib.util.find_spec(module) is None]
