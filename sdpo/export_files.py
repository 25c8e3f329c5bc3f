"""The files an export writes (``trained/`` of a run, ``sdpo.export``), known without torch or diffusers: the
export command checks its output folder before anything heavy loads, and a new export replaces exactly these."""

from __future__ import annotations

from pathlib import Path

# What save_trained_unet (and the model card) write: a LoRA file, or a full UNet's config and (sharded) weights
EXPORT_PATTERNS = ("pytorch_lora_weights.safetensors", "config.json", "diffusion_pytorch_model*.safetensors",
                   "diffusion_pytorch_model.safetensors.index.json", "README.md", "sdpo_training.json")


def earlier_export(directory: str | Path) -> list[Path]:
    """The files of an earlier export in ``directory``."""
    return sorted({f for pattern in EXPORT_PATTERNS for f in Path(directory).glob(pattern)})
