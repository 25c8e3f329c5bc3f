"""Reward models: ``build_reward(name, **kwargs)(images[B,3,H,W] in [0,1], prompts) -> float32[B]``.

Importing this package registers every built-in reward: model-free ones (pixel statistics, JPEG), CLIP-based
ones (``aesthetic``, ``pickscore``, ``clip_score``), the optional-extra ones (``hpsv2``, ``imagereward``; their
dependency is imported only when built) and ``multi``, a weighted sum of the others.
"""

from sdpo.rewards import (  # noqa: F401  (imported to register the built-ins)
    clip_based,
    hpsv2,
    imagereward,
    jpeg,
    multi,
    pixel_stats,
)
from sdpo.rewards.base import RewardModel, UnscorablePrompts, WeightSource
from sdpo.rewards.clip_based import Aesthetic, AestheticHead, ClipScore, PickScore
from sdpo.rewards.hpsv2 import HPSv2
from sdpo.rewards.hub import fetch_file
from sdpo.rewards.imagereward import ImageRewardScore
from sdpo.rewards.jpeg import jpeg_size_kb
from sdpo.rewards.multi import MultiReward
from sdpo.rewards.pixel_stats import COLOR_TARGETS
from sdpo.rewards.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess
from sdpo.rewards.registry import available_rewards, build_reward, register_reward

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "COLOR_TARGETS",
    "Aesthetic",
    "AestheticHead",
    "ClipScore",
    "HPSv2",
    "ImageRewardScore",
    "MultiReward",
    "PickScore",
    "RewardModel",
    "UnscorablePrompts",
    "WeightSource",
    "available_rewards",
    "build_reward",
    "clip_preprocess",
    "fetch_file",
    "jpeg_size_kb",
    "register_reward",
]
