"""Shared test setup: offline, single-threaded-friendly, one tiny pipeline built per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = str(REPO / "conf")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where tiny pipelines are built once for the whole session (also exported for subprocesses)."""
    path = tmp_path_factory.mktemp("sdpo-cache")
    os.environ["SDPO_CACHE"] = str(path)
    return path


def compose(overrides: list[str], output_dir: Path, cache_dir: Path):
    """The training config exactly as ``python -m sdpo.train <overrides>`` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(
            "train",
            overrides=[f"paths.output_dir={output_dir}", f"paths.cache_dir={cache_dir}", *overrides],
        )


# Small and fast: a few prompts, the default tiny model; progress bars off to keep logs short.
FAST = [
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "data.prompts_per_batch=4",
    "algo.micro_batch_pairs=2",
]
