"""What a reward's settings need, checked before any model loads: the weights it would load, and prompts it can score.

Each reward names the weights its settings would load (``RewardModel.weight_sources``), and a path that does not
exist, a hub repo missing from the Hugging Face cache while downloads are off, or a model there only in part (its
config without its weights, or some shards of them) is refused with the ``hf download`` command; a reward that
cannot score some prompts (``RewardModel.prompt_problem``: color_match needs a colour word) says which. Both in
seconds, rather than after the policy, the training stack and the other models have loaded. Imports
huggingface_hub's cache lookup only.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdpo.model_sources import FileLookup, cached_file_lookup, downloads_off, is_hub_id, missing_files, uncached_offline
from sdpo.rewards.base import WeightSource
from sdpo.rewards.hub import offline_hint
from sdpo.rewards.registry import reward_factory

# a from_pretrained repo counts as present when either file is cached: a CLIP model has config.json, a
# tokenizer-only download tokenizer_config.json
PRETRAINED_MARKERS = ("config.json", "tokenizer_config.json")


def reward_settings(name: str, kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
    """The reward's ``__init__`` arguments with its defaults filled in; None when ``kwargs`` do not fit them (the
    key check and the reward's own build say which)."""
    factory = reward_factory(name)
    if factory is None:
        return None
    try:  # __init__'s: the rewards' metaclass defines a __call__ of (*args, **kwargs)
        bound = inspect.signature(factory.__init__).bind_partial(None, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return {key: value for key, value in list(bound.arguments.items())[1:]}  # without self


def missing_weights(weights: WeightSource, setting: str | None = None) -> str | None:
    """Why ``weights`` cannot load here (None when they can, or may be downloaded as they load); ``setting`` says
    how to point the config at a local copy instead."""
    path = Path(weights.source).expanduser()
    if path.is_file():
        return None
    if path.is_dir():
        if weights.filename is not None and not (path / weights.filename).is_file():
            return f"that folder has no {weights.filename!r}: give the file's path, or the folder that holds it"
        lacks = missing_model_weights(weights, lambda name: path / name if (path / name).is_file() else None)
        return None if lacks is None else f"that folder lacks {lacks} (a copy that did not finish?)"
    if not is_hub_id(weights.source):
        return "no such file or folder, and not a hub id (org/name): give a local path or a hub repo"
    files = (weights.filename,) if weights.filename else PRETRAINED_MARKERS
    uncached = uncached_offline(weights.source, files, cache_dir=weights.cache_dir)
    hint = offline_hint(weights.source, weights.filename, weights.key, setting)
    if uncached is not None:
        return f"{uncached}. {hint}"
    why = downloads_off()
    lacks = None if why is None else missing_model_weights(
        weights, cached_file_lookup(weights.source, None, weights.cache_dir))
    if lacks is None:
        return None
    return (f"the local Hugging Face cache holds only part of it (a download that did not finish?), and downloads "
            f"are off ({why}): no {lacks}. {hint}")


def missing_model_weights(weights: WeightSource, find: FileLookup) -> str | None:
    """Which weights of a from_pretrained model (``weights.weights``) ``find`` does not find: none of their forms,
    or shards their index names; None when they are there (or ``weights`` is not such a model)."""
    if not weights.weights:
        return None
    first, *others = weights.weights
    if all(find(name) is None for name in weights.weights):
        return f"{first} (nor {', '.join(others)})"
    return missing_files(find, [weights.weights], None)  # the shards a sharded index names


def reward_weight_problems(name: str, kwargs: Mapping[str, Any], where: str, label: str | None = None) -> list[str]:
    """Each weight source of reward ``name`` built with ``kwargs`` that cannot load here, with what to set.
    ``where``: the config node of its settings (``reward``, ``reward.components.<label>``), or with ``label`` the
    reward list it is entry ``label`` of (``callbacks.eval.rewards``, evaluate's ``rewards``)."""
    settings = reward_settings(name, kwargs)
    if settings is None:
        return []
    problems = []
    for weights in reward_factory(name).weight_sources(settings):
        if label is None:
            named, setting = f"{where}.{weights.key}", f"{where}.{weights.key}=<local path>"
        else:
            named = f"{where}: {label}'s {weights.key}"
            setting = f"{where}=[{{{label}: {{{weights.key}: <local path>}}}}, ...]"
        problem = missing_weights(weights, setting)
        if problem is not None:
            problems.append(f"{named}={weights.source}: {problem}")
    return problems


def reward_prompt_problem(name: str, kwargs: Mapping[str, Any], prompts: list[str], where: str) -> str | None:
    """Why reward ``name`` with ``kwargs`` cannot score some of ``prompts`` (the config key ``where`` gives them),
    or None."""
    settings = reward_settings(name, kwargs)
    return None if settings is None else reward_factory(name).prompt_problem(settings, prompts, where)
