"""Where the policy's weights come from, checked before anything loads.

A local folder that is not there, a hub model that is not in the local Hugging Face cache while downloads are
off (``HF_HUB_OFFLINE=1``, ``model.local_files_only=true``: a cluster's compute nodes), or a pipeline there only in
part (a download or copy cut short) would otherwise be found only as the model loads, after Lightning and diffusers
were imported and the run folder was made, the last with diffusers' "does not appear to have a file named
config.json" whichever file was missing. Imports ``huggingface_hub``'s cache lookup only (no diffusers), so the
config checks stay light.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

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
    find = cached_file_lookup(repo, revision, cache_dir)
    if any(find(name) is not None for name in files):
        return None
    at = f" at revision {revision}" if revision else ""
    return f"not in the local Hugging Face cache{at} while downloads are off ({why})"


def source_problem(source: str, key: str, *, revision: str | None = None, local_files_only: bool = False,
                   index_file: str = "model_index.json", hub_cache: str | Path | None = None,
                   advice: str | None = None, variant: str | None = None, with_vae: bool = True) -> str | None:
    """What stops ``source`` (a local folder or a hub id, given as config key ``key``) from loading, found without
    loading it, with what to do (``advice`` replaces the usual "point ``key`` at ..."); None when it may load.
    ``index_file`` is the file every copy of it has at its root (a pipeline's ``model_index.json``, a VAE's
    ``config.json``); ``hub_cache`` defaults to Hugging Face's own cache. A pipeline (a local folder, or a cached
    hub model while downloads are off) must hold every file the loader reads (``variant``: of its weights;
    ``with_vae``: false when ``model.vae_source`` replaces its VAE)."""
    path = Path(source).expanduser()
    if path.is_dir():
        missing = missing_model_files(lambda name: path / name if (path / name).is_file() else None, index_file,
                                      variant, with_vae)
        if missing is None:
            return None
        return (f"{key}={source}: the folder lacks {missing} (a copy that did not finish?). "
                f"{advice or f'Copy what is missing, or point `{key}` at a complete copy'}")
    elsewhere = f"Point `{key}` at a diffusers-layout folder ({PIPELINE_LAYOUT}), or give a hub id (org/name)"
    if path.exists():
        return f"{key}={source} is a file, not a folder. {advice or elsewhere}"
    if not is_hub_id(source):
        return f"{key}={source}: no such folder, and not a hub id (org/name). {advice or elsewhere}"
    uncached = uncached_offline(source, (index_file,), revision=revision, cache_dir=hub_cache,
                                local_files_only=local_files_only)
    if uncached is not None:
        return (f"{key}={source}: no such folder here, and as a hub id it is {uncached}. "
                f"{advice or unavailable_advice(source, key)}")
    why = downloads_off(local_files_only)
    if why is None:
        return None  # what is not cached is downloaded as it loads
    missing = missing_model_files(cached_file_lookup(source, revision, hub_cache), index_file, variant, with_vae)
    if not missing:
        return None
    at = f" at revision {revision}" if revision else ""
    return (f"{key}={source}: the local Hugging Face cache holds only part of it{at} (a download that did not "
            f"finish?), and downloads are off ({why}): no {missing}. {advice or unavailable_advice(source, key)}")


FileLookup = Callable[[str], "Path | None"]  # a file of a model by its name in the repository: its path, or None


def cached_file_lookup(repo: str, revision: str | None, cache_dir: str | Path | None) -> FileLookup:
    """Find the files of hub ``repo`` at ``revision`` in the Hugging Face cache (huggingface_hub's own lookup)."""
    from huggingface_hub import try_to_load_from_cache

    def find(name: str) -> Path | None:
        hit = try_to_load_from_cache(repo, name, cache_dir=cache_dir, revision=revision)
        return Path(hit) if isinstance(hit, str) else None

    return find


def weight_names(folder: str, stem: str, variant: str | None) -> tuple[str, ...]:
    """The names a component's weights may have: one safetensors file or a sharded index, in ``variant`` when one is
    asked for (diffusers and transformers then load nothing else: ``stem.fp16.safetensors``,
    ``stem.safetensors.index.fp16.json``). ``folder`` "": at the repository's root."""
    suffix = f".{variant}" if variant else ""
    base = f"{folder}/{stem}" if folder else stem
    return f"{base}{suffix}.safetensors", f"{base}.safetensors.index{suffix}.json"


def pipeline_needs(index: Mapping[str, Any], variant: str | None, with_vae: bool) -> list[tuple[str, ...]]:
    """What the loader reads from a pipeline whose ``model_index.json`` is ``index``: for each file, the names it
    may have (one of them must be there). Components the index does not list are not asked for."""
    def listed(part: str) -> bool:
        entry = index.get(part)  # diffusers writes [null, null] for an absent optional component
        return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None

    needs: list[tuple[str, ...]] = [("scheduler/scheduler_config.json",)] if listed("scheduler") else []
    models = {"unet": "diffusion_pytorch_model", "text_encoder": "model", "text_encoder_2": "model"}
    if with_vae:
        models["vae"] = "diffusion_pytorch_model"
    for part, stem in models.items():
        if listed(part):
            needs += [(f"{part}/config.json",), weight_names(part, stem, variant)]
    needs += [(f"{part}/vocab.json", f"{part}/tokenizer.json") for part in ("tokenizer", "tokenizer_2")
              if listed(part)]
    return needs


def has_full_precision(find: FileLookup, names: tuple[str, ...], variant: str | None) -> bool:
    """Whether weights missing in ``variant`` (``names``) are there in full precision (a repository or copy without
    fp16 files, which ``model.variant=null`` loads)."""
    return bool(variant) and any(find(name.replace(f".{variant}", "")) is not None for name in names)


def index_shards(index_file: Path) -> list[str]:
    """The shard files a sharded weights index names (none when it cannot be read: the loader then says why)."""
    try:
        weight_map = json.loads(index_file.read_text()).get("weight_map", {})
    except (OSError, ValueError, AttributeError):
        return []
    return sorted({str(shard) for shard in weight_map.values()}) if isinstance(weight_map, dict) else []


def missing_model_files(find: FileLookup, index_file: str, variant: str | None, with_vae: bool) -> str | None:
    """``missing_pipeline_files`` for a pipeline (``index_file`` ``model_index.json``); for a VAE (``config.json``,
    ``model.vae_source``, loaded in full precision): its config and weights, at the root or, in a pipeline's
    folder, under ``vae/``."""
    if index_file == "model_index.json":
        return missing_pipeline_files(find, variant, with_vae)
    folder = "" if find("config.json") is not None or find("vae/config.json") is None else "vae"
    return missing_files(find, [(f"{folder}/config.json" if folder else "config.json",),
                                weight_names(folder, "diffusion_pytorch_model", None)], None)


def missing_pipeline_files(find: FileLookup, variant: str | None = None, with_vae: bool = True) -> str | None:
    """The files of a pipeline that ``find`` does not find (``missing_files``); None when all are there, or when its
    ``model_index.json`` cannot be read (then the loader says what is wrong)."""
    try:
        index = json.loads(find("model_index.json").read_text())  # type: ignore[union-attr]
    except (AttributeError, OSError, ValueError):
        return None
    if not isinstance(index, dict):
        return None
    return missing_files(find, pipeline_needs(index, variant, with_vae), variant)


def missing_files(find: FileLookup, needs: list[tuple[str, ...]], variant: str | None) -> str | None:
    """Which of ``needs`` (for each file, the names it may have) ``find`` does not find, at most four named and
    ``", "``-joined, the shards a sharded index names included, and where only full-precision weights are there
    instead of ``variant``'s, which ``model.variant=null`` loads; None when all are there."""
    missing, full_precision = [], []
    for names in needs:
        found = next((path for path in map(find, names) if path is not None), None)
        folder = names[0].rpartition("/")[0]  # "" at the root
        if found is None:
            missing.append(names[0])
            if has_full_precision(find, names, variant):
                full_precision.append(f"{folder}/" if folder else "the root")
        elif found.name.endswith(".json") and ".index" in found.name:  # a sharded checkpoint's index
            shards = [f"{folder}/{shard}" if folder else shard for shard in index_shards(found)]
            missing += [f"{shard} (a shard its index names)" for shard in shards if find(shard) is None]
    if not missing:
        return None
    listed = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    if full_precision:
        listed += (f" (full-precision weights are there for {', '.join(full_precision)}: model.variant=null "
                   f"loads those)")
    return listed


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
                                       variant=model.get("variant"), with_vae=vae is None,
                                       advice=advice(str(source)) if advice else None))
    if vae is not None:
        problems.append(source_problem(str(vae), "model.vae_source", local_files_only=local_only,
                                       index_file="config.json", hub_cache=hub_cache,
                                       advice=advice(str(vae)) if advice else None))
    return [problem for problem in problems if problem is not None]
