"""Reward models: ``build_reward(name, **kwargs)(images[B,3,H,W] in [0,1], prompts) -> float32[B]``.

Importing this package registers every built-in reward.
"""

from sdpo.rewards import jpeg, pixel_stats  # noqa: F401  (imported to register the built-ins)
from sdpo.rewards.base import RewardModel
from sdpo.rewards.jpeg import jpeg_size_kb
from sdpo.rewards.pixel_stats import COLOR_TARGETS
from sdpo.rewards.registry import available_rewards, build_reward, register_reward

__all__ = [
    "COLOR_TARGETS",
    "RewardModel",
    "available_rewards",
    "build_reward",
    "jpeg_size_kb",
    "register_reward",
]
