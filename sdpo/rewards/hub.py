"""Where reward-model weights come from: a local path, or a file of a Hugging Face Hub repo (cached).

Every config key that names weights accepts either form, so a machine without network runs the same config
once the files were downloaded elsewhere (``hf download <repo> <file>``) or copied to a local path. Failures
are turned into a ``WeightsNotFound`` (a ``FileNotFoundError``) that says exactly that, instead of a long hub
traceback or a hang.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class WeightsNotFound(FileNotFoundError):
    """Weights that are neither a local file nor downloadable here; the message says how to provide them, so the
    entry points print it as a refusal, without a traceback."""


def offline_hint(source: str, filename: str | None, config_key: str | None, setting: str | None = None) -> str:
    """How to provide weights offline; ``setting`` (e.g. ``reward.clip_model=<local path>``) when the caller knows
    where the setting lives, else the places a reward's ``config_key`` setting may live."""
    target = f"{source} {filename}" if filename else source
    if setting is not None:
        where = setting
    elif config_key is not None:
        where = (f"the reward's `{config_key}` setting to a local path (training: reward.{config_key}=<path>; a part "
                 f"of reward=multi: reward.components.<name>.{config_key}=<path>)")
    else:
        where = "the config key to a local path"
    return (
        f"No network here? Pre-download it with `hf download {target}` (it is then found in the Hugging Face "
        f"cache) or set {where}."
    )


def fetch_file(
    source: str | Path,
    filename: str | None = None,
    cache_dir: str | Path | None = None,
    revision: str | None = None,
    *,
    config_key: str | None = None,
) -> Path:
    """Path of a weights file: ``source`` itself if it is a local file, else ``filename`` of hub repo ``source``.

    * ``source`` an existing file: returned as is (``filename`` is ignored).
    * ``source`` an existing directory: ``source / filename``.
    * otherwise ``source`` is a hub repo id and the file comes from ``huggingface_hub.hf_hub_download``. The
      local cache is tried first without any network access, so cached files work offline and without a
      round trip; only a cache miss goes online (and fails immediately when ``HF_HUB_OFFLINE=1``).

    Any failure raises ``WeightsNotFound`` naming the source and how to provide the file offline
    (``config_key`` names the config entry to set in that message).
    """
    source_str = str(source)
    path = Path(source_str).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if filename is None:
            raise WeightsNotFound(f"{source_str!r} is a directory; also give the file name to load from it")
        candidate = path / filename
        if candidate.is_file():
            return candidate
        raise WeightsNotFound(f"{filename!r} not found in local directory {source_str!r}")
    if filename is None:
        raise WeightsNotFound(
            f"{source_str!r} is not an existing local file, and without a file name it cannot be fetched from the "
            f"hub. {offline_hint(source_str, filename, config_key)}"
        )

    from huggingface_hub import hf_hub_download

    kwargs: dict[str, Any] = {"revision": revision, "cache_dir": cache_dir}
    try:
        return Path(hf_hub_download(source_str, filename, local_files_only=True, **kwargs))
    except Exception:  # not cached (or not a valid repo id): try the network below
        pass
    try:
        return Path(hf_hub_download(source_str, filename, **kwargs))
    except Exception as err:  # offline mode, no network, unknown repo/file, invalid id, gated repo, ...
        raise WeightsNotFound(
            f"could not find {filename!r}: {source_str!r} is not a local file and downloading it from the "
            f"Hugging Face Hub failed ({type(err).__name__}: {_first_line(err)}). "
            f"{offline_hint(source_str, filename, config_key)}"
        ) from err


def load_pretrained(loader: Callable[..., T], source: str | Path, *, config_key: str | None = None, **kwargs: Any) -> T:
    """``loader(source, **kwargs)`` (a ``from_pretrained``), with the offline hint on a missing model.

    transformers raises ``OSError`` when a repo is neither cached nor downloadable; that becomes a
    ``WeightsNotFound`` with the same advice as :func:`fetch_file`. Other errors propagate unchanged.
    """
    try:
        return loader(str(source), **kwargs)
    except OSError as err:  # includes FileNotFoundError
        raise WeightsNotFound(
            f"could not load {str(source)!r} ({_first_line(err)}). {offline_hint(str(source), None, config_key)}"
        ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
