"""Where the policy's weights come from, checked before anything loads.

A local folder that is not there, or a hub model that is not in the local Hugging Face cache while downloads are
off (``HF_HUB_OFFLINE=1``, ``model.local_files_only=true``: a cluster's compute nodes), would otherwise be found
only as the model loads, after Lightning and diffusers were imported and the run folder was made. Imports
``huggingface_hub``'s cache lookup only (no diffusers), so the config checks stay light.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

TINY = "tiny"  # model.source of the embedded random-weight stand-ins, built in code
PIPELINE_LAYOUT = "model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/"


def unavailable_advice(source: str, key: str) -> str:
    """How to provide a model that cannot be loaded here (shared with the loader's own error)."""
    return (f"With no network: pre-download it on a connected machine with `hf download {source}` (then set "
            f"HF_HUB_OFFLINE=1), or point `{key}` at a local diffusers-layout copy.")


def is_hub_id(source: str) -> bool:
    """Whether ``source`` has the shape of a hub repository id (``name`` or ``org/name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def downloads_off(local_files_only: bool = False) -> str | None:
    """Why nothing may be downloaded (the setting that says so), or None when downloads are allowed."""
    from huggingface_hub import is_offline_mode

    if local_files_only:
        return "model.local_files_only=true"
    return "HF_HUB_OFFLINE=1" if is_offline_mode() else None


def uncached_offline(repo: str, files: tuple[str, ...], *, revision: str | None = None,
                     cache_dir: str | Path | None = None, local_files_only: bool = False) -> str | None:
    """Why hub ``repo`` cannot load here: downloads are off and none of ``files`` (what every copy of it has) is in
    the Hugging Face cache at ``revision``; None when one is, or when it may be downloaded as it loads."""
    why = downloads_off(local_files_only)
    if why is None:
        return None
    from huggingface_hub import try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(repo, name, cache_dir=cache_dir, revision=revision), str)
           for name in files):
        return None
    at = f" at revision {revision}" if revision else ""
    return f"not in the local Hugging Face cache{at} while downloads are off ({why})"


def source_problem(source: str, key: str, *, revision: str | None = None, local_files_only: bool = False,
                   index_file: str = "model_index.json", hub_cache: str | Path | None = None,
                   advice: str | None = None) -> str | None:
    """What stops ``source`` (a local folder or a hub id, given as config key ``key``) from loading, found without
    loading it, with what to do (``advice`` replaces the usual "point ``key`` at ..."); None when it may load.
    ``index_file`` is the file every copy of it has at its root (a pipeline's ``model_index.json``, a VAE's
    ``config.json``); ``hub_cache`` defaults to Hugging Face's own cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return None  # what the folder holds is the loader's to check, file by file
    elsewhere = f"Point `{key}` at a diffusers-layout folder ({PIPELINE_LAYOUT}), or give a hub id (org/name)"
    if path.exists():
        return f"{key}={source} is a file, not a folder. {advice or elsewhere}"
    if not is_hub_id(source):
        return f"{key}={source}: no such folder, and not a hub id (org/name). {advice or elsewhere}"
    uncached = uncached_offline(source, (index_file,), revision=revision, cache_dir=hub_cache,
                                local_files_only=local_files_only)
    if uncached is None:
        return None
    return (f"{key}={source}: no such folder here, and as a hub id it is {uncached}. "
            f"{advice or unavailable_advice(source, key)}")


def model_source_problems(model: dict, hub_cache: str | Path | None = None,
                          advice: Callable[[str], str] | None = None) -> list[str]:
    """``source_problem`` for a model config's ``source`` (unless the tiny stand-in) and ``vae_source``;
    ``advice(source)`` replaces the usual advice (a checkpoint's recorded model, which ``model.*`` cannot change)."""
    problems = []
    local_only = bool(model.get("local_files_only", False))
    source, vae = model.get("source"), model.get("vae_source")
    if source is not None and str(source) != TINY:
        problems.append(source_problem(str(source), "model.source", revision=model.get("revision"),
                                       local_files_only=local_only, hub_cache=hub_cache,
                                       advice=advice(str(source)) if advice else None))
    if vae is not None:
        problems.append(source_problem(str(vae), "model.vae_source", local_files_only=local_only,
                                       index_file="config.json", hub_cache=hub_cache,
                                       advice=advice(str(vae)) if advice else None))
    return [problem for problem in problems if problem is not None]
