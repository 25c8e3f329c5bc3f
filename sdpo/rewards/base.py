"""Abstract reward model: the one interface the RL loop scores images through.

Rewards are ``nn.Module`` s so that model-based rewards (CLIP, aesthetic heads, ...) can hold
weights and follow the policy across devices with ``.to()``. They are *evaluators*, never trained:
every instance is frozen (``requires_grad_(False)``) and kept in eval mode after construction, so
being attached as a submodule of a trainable module can neither leak parameters into the optimizer
nor switch dropout on.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


class _FrozenAfterInit(abc.ABCMeta):
    """Freeze the instance once the *whole* subclass ``__init__`` ran, i.e. after it built its weights."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        instance = super().__call__(*args, **kwargs)
        instance.requires_grad_(False)
        instance.eval()
        return instance


def optional_package_hint(reward: str, module: str, extra: str) -> str:
    """What a reward without its optional package says, wherever that is found (config check or build)."""
    return f"reward {reward!r} needs the optional package {module}: pip install -e \".[{extra}]\""


@dataclass(frozen=True)
class WeightSource:
    """Weights a reward loads when built: what the config check looks for before any model loads."""

    key: str  # the reward's setting that names them (clip_model, head_source, ...)
    source: str  # a local path, or a hub repo id
    filename: str | None = None  # a file of that folder or repo (fetch_file); None: a from_pretrained folder or repo
    cache_dir: str | None = None  # the Hugging Face cache it is looked up in (None: the default)
    weights: tuple[str, ...] = ()  # a from_pretrained model's weights: the names they may have, one of them needed


class UnscorablePrompts(ValueError):
    """Some of a run's prompts cannot be scored by its reward: raised before any sampling, and reported by the
    entry points as a message (no traceback), like a config error."""


class RewardModel(nn.Module, metaclass=_FrozenAfterInit):
    """Base class of every reward: ``reward(images[B,3,H,W] in [0,1], prompts) -> float32[B]``.

    Subclasses implement :meth:`score`, which receives validated float32 images clamped to [0, 1]
    and a list of exactly ``B`` prompts. ``forward`` does the checks once for all rewards, so a
    broken decoder (NaNs) fails loudly with the reward's name instead of silently poisoning the
    advantages. Gradients are never needed; wrapping calls in ``torch.no_grad()`` is the caller's job.
    ``score`` runs outside any autocast the caller is under (the policy's, in training), so a reward computes in
    the dtype it is stored in (``reward.dtype``): under 16-mixed an fp32 reward would otherwise score in fp16.
    """

    #: Registry name; set by ``register_reward`` unless the class defines it itself.
    name: str = "reward"
    #: Whether the score depends on the prompt (text conditioning must matter for it).
    requires_prompts: bool = False
    #: (module, pip extra) of each optional package the reward imports when built (``import_optional``): the config
    #: check looks for them before any model loads, rather than after the policy has been downloaded and built.
    optional_modules: tuple[tuple[str, str], ...] = ()

    @classmethod
    def prompt_problem(cls, settings: Mapping[str, Any], prompts: Sequence[str], where: str) -> str | None:
        """What ``check_prompts`` would say of ``prompts`` for a reward built with ``settings``, found without
        loading any weights (the config check runs it before anything loads); None: every prompt can be scored."""
        return None

    @classmethod
    def weight_sources(cls, settings: Mapping[str, Any]) -> list[WeightSource]:
        """The weights this reward would load with ``settings`` (its ``__init__`` arguments, defaults filled in):
        the config check makes sure each is here or downloadable before any model loads. None by default."""
        return []

    @classmethod
    def import_optional(cls, module: str) -> Any:
        """``module``, one of ``optional_modules``, or an ``ImportError`` with the line that installs it."""
        try:
            return importlib.import_module(module)
        except ImportError as err:
            raise ImportError(optional_package_hint(cls.name, module, dict(cls.optional_modules)[module])) from err

    def train(self, mode: bool = True) -> RewardModel:
        """Stay in eval mode whatever the parent asks: a reward is a fixed evaluator."""
        return super().train(False)

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Validate the batch, score it, and return float32 ``[B]`` on the images' device."""
        images, prompt_list = self.validate(images, prompts)
        with torch.autocast(images.device.type, enabled=False):
            scores = self.score(images, prompt_list)
        batch = images.shape[0]
        if scores.shape != (batch,):
            raise RuntimeError(
                f"reward {self.name!r} returned shape {tuple(scores.shape)}, expected ({batch},)"
            )
        return scores.to(device=images.device, dtype=torch.float32)

    def validate(self, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, list[str]]:
        """Check shape, finiteness and prompt count; return float32 images clamped to [0, 1].

        Out-of-range values are clamped silently because VAE decoders routinely overshoot a little.
        """
        if not isinstance(images, Tensor):
            raise TypeError(f"reward {self.name!r} expects a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"reward {self.name!r} expects images of shape [B, 3, H, W], got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise TypeError(
                f"reward {self.name!r} expects floating-point images in [0, 1], got dtype {images.dtype}"
            )
        finite = torch.isfinite(images)
        if not bool(finite.all()):
            n_bad = int((~finite).sum())
            n_imgs = int((~finite).flatten(1).any(dim=1).sum())
            raise ValueError(
                f"reward {self.name!r} got {n_bad} non-finite (NaN/inf) values in {n_imgs} of "
                f"{images.shape[0]} images"
            )
        if isinstance(prompts, str):
            raise TypeError(f"reward {self.name!r} expects a sequence of prompts, got a single str")
        prompt_list = list(prompts)
        if len(prompt_list) != images.shape[0]:
            raise ValueError(
                f"reward {self.name!r} got {images.shape[0]} images but {len(prompt_list)} prompts"
            )
        return images.float().clamp(0.0, 1.0), prompt_list

    def check_prompts(self, prompts: Sequence[str], where: str = "prompts") -> None:
        """Raise ``UnscorablePrompts`` if this reward cannot score some of ``prompts`` (the config key ``where``
        names them).
        Called with a run's whole prompt list before any sampling, so such a prompt stops the run at once rather
        than at the first scoring, minutes later; the default accepts every prompt."""

    @abc.abstractmethod
    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Score validated float32 images in [0, 1]; return a ``[B]`` tensor."""

    def extra_repr(self) -> str:
        return f"name={self.name!r}, requires_prompts={self.requires_prompts}"
