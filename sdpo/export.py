"""Export what a training checkpoint learned, in the format diffusers loads.

``python -m sdpo.export outputs/<run>/checkpoints/last.ckpt outputs/<run>/lora``

LoRA runs give a folder for ``pipe.load_lora_weights(folder)``; full fine-tuning runs give a ``unet/`` folder for
``UNet2DConditionModel.from_pretrained``. The base model is loaded from the checkpoint's own config.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sdpo.policy.lora import save_trained_unet


def load_trained_module(ckpt_path: str | Path):
    """Rebuild the SDPOModule a checkpoint was written by, with its trained weights (safe loading only)."""
    from sdpo.module import SDPOModule

    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hp = checkpoint["hyper_parameters"]
    module = SDPOModule(hp["model"], hp["algo"], hp["reward"], hp["optim"], seed=hp.get("seed", 0))
    module.on_load_checkpoint(checkpoint)
    missing, unexpected = module.load_state_dict(checkpoint["state_dict"], strict=False)
    if unexpected:
        raise KeyError(f"checkpoint weights the model does not have: {unexpected[:3]}")
    return module


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    module = load_trained_module(ckpt_path)
    return save_trained_unet(module.unet, out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a .ckpt written by sdpo.train")
    parser.add_argument("out_dir", help="folder to write the LoRA (or full UNet) into")
    args = parser.parse_args(argv)
    path = export_checkpoint(args.checkpoint, args.out_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
