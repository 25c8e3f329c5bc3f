"""Keys no part of the run reads: a mistyped ``+algo.num_step=8`` would otherwise train silently at the default.

Hydra refuses an unknown key without ``+``, and then suggests the ``+`` form, which it accepts for any name. The
settings of ``algo``, ``model``, ``data`` and ``optim`` are exactly the keys their ``conf/<group>/*.yaml`` files
hold; the trainer's are ``lightning.Trainer``'s arguments, a reward's are its class's arguments.

The command line checks the config before it imports Lightning (about 8 s): ``lightning.Trainer``'s arguments are
then read from its installed source, so that a mistyped key is refused in seconds.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

FILE_GROUPS = ("algo", "model", "data", "optim")


def flat_keys(tree: Any, prefix: str = "") -> set[str]:
    """Dotted paths of every key in nested mappings (lists are values, not nested keys)."""
    keys: set[str] = set()
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            if key == "defaults":
                continue
            path = f"{prefix}{key}"
            keys.add(path)
            keys |= flat_keys(value, path + ".")
    return keys


@cache
def group_keys(config_dir: str, group: str) -> frozenset[str]:
    """Every key some option of ``conf/<group>/`` sets."""
    keys: set[str] = set()
    for path in sorted(Path(config_dir, group).glob("*.yaml")):
        keys |= flat_keys(yaml.safe_load(path.read_text()) or {})
    return frozenset(keys)


def _arguments(factory: Callable[..., Any]) -> set[str] | None:
    """The keyword arguments ``factory`` accepts; None when it takes ``**kwargs`` (anything goes)."""
    import torch

    if isinstance(factory, type):  # its __init__: a metaclass __call__ (RewardModel's) hides the class's signature
        if factory.__init__ is torch.nn.Module.__init__:
            return set()  # a module class without an __init__ of its own takes no settings
        params = list(inspect.signature(factory.__init__).parameters.values())[1:]  # without self
    else:
        params = list(inspect.signature(factory).parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _trainer_source_arguments() -> set[str] | None:
    """``lightning.Trainer.__init__``'s keyword arguments, parsed from the installed source without importing it;
    None where that file or definition is not where Lightning 2 keeps it (or takes ``**kwargs``)."""
    spec = importlib.util.find_spec("lightning")  # a top-level name: finding it imports nothing
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(next(iter(spec.submodule_search_locations)), "pytorch", "trainer", "trainer.py")
    if not source.is_file():
        return None
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ClassDef) and node.name == "Trainer":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    args = item.args
                    if args.kwarg is not None:
                        return None
                    return {a.arg for a in [*args.posonlyargs, *args.args][1:] + args.kwonlyargs}
    return None


@cache
def trainer_arguments() -> set[str] | None:
    """``lightning.Trainer``'s keyword arguments (None: it takes any). Read from the source while Lightning is not
    imported yet (the command line's config check), else from the class itself."""
    if "lightning" not in sys.modules:
        parsed = _trainer_source_arguments()
        if parsed is not None:
            return parsed
    import lightning as L

    return _arguments(L.Trainer)


def _unknown(keys: Iterable[str], known: Iterable[str] | None, where: str, source: str) -> list[str]:
    """``source`` completes "... is not a setting (<source>)", e.g. "conf/algo/ has no such key"; ``where`` is the
    keys' parent (a config group), or the primary config's name for top-level keys."""
    if known is None:
        return []
    known = set(known)
    top = where in ("train", "evaluate")
    messages = []
    for key in sorted(set(keys) - known):
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"; did you mean {close[0] if top else f'{where}.{close[0]}'}?" if close else ""
        messages.append(f"{key if top else f'{where}.{key}'} is not a setting ({source}{hint}); nothing would read "
                        f"it")
    return messages


def top_level_keys(config_dir: str, primary: str) -> set[str]:
    """What ``conf/<primary>.yaml`` sets itself, and the groups its defaults list name."""
    tree = yaml.safe_load(Path(config_dir, f"{primary}.yaml").read_text()) or {}
    groups = {next(iter(entry)) for entry in tree.get("defaults", []) if isinstance(entry, Mapping)}
    return (set(tree) - {"defaults"}) | groups


def unknown_keys(cfg: DictConfig, config_dir: str, primary: str = "train") -> list[str]:
    """A message per key of ``cfg`` (composed from ``conf/<primary>.yaml``) that nothing reads."""
    problems = _unknown(cfg.keys(), top_level_keys(config_dir, primary), primary, f"conf/{primary}.yaml has no "
                        f"such key")
    for group in FILE_GROUPS:
        if cfg.get(group) is not None:
            present = flat_keys(OmegaConf.to_container(cfg[group], resolve=False))
            problems += _unknown(present, group_keys(config_dir, group), group, f"conf/{group}/ has no such key")
    trainer = cfg.get("trainer")
    if trainer is not None:
        known = trainer_arguments()
        problems += _unknown(trainer.keys(), None if known is None else known | {"_target_"}, "trainer",
                             "lightning.Trainer takes no such argument")
    reward = cfg.get("reward")
    if reward is not None:
        problems += _reward_keys(reward, "reward")
        components = reward.get("components") if reward.get("name") == "multi" else None
        if isinstance(components, Mapping):  # {name: {weight, **settings}}; the list form has its own checks
            for label, part in components.items():
                if isinstance(part, Mapping):
                    named = {"name": part.get("name", label), **{k: v for k, v in part.items() if k != "weight"}}
                    problems += _reward_keys(named, f"reward.components.{label}")
    return problems


def _reward_keys(reward: Mapping[str, Any], where: str) -> list[str]:
    """Keys of one reward's settings that its class does not take."""
    from sdpo.rewards.registry import reward_factory

    factory = reward_factory(reward.get("name"))
    if factory is None:
        return []  # an unknown reward name has a message of its own
    known = _arguments(factory)
    return _unknown(reward.keys(), None if known is None else known | {"name", "_target_"}, where,
                    f"reward {reward.get('name')} takes no such argument")
