"""Export what a training checkpoint learned, in the format diffusers loads.

``python -m sdpo.export outputs/<run>/checkpoints/last.ckpt outputs/<run>/lora``

LoRA runs give a folder for ``pipe.load_lora_weights(folder)``; full fine-tuning runs give a folder for
``UNet2DConditionModel.from_pretrained(folder)``. Both come with a model card (README.md). The base model is loaded
from the checkpoint's own config. A folder that already holds files is refused unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdpo.commands import program_name

# torch, peft and diffusers load inside the functions, so that ``--help`` answers at once, and the output folder and
# the checkpoint are checked before the models load


def check_out_dir(out_dir: str | Path, overwrite: bool) -> None:
    """Refuse a folder that holds files: an export mixed into another (a LoRA next to a full UNet) loads the wrong
    weights without a word. ``overwrite`` replaces an earlier export there, and only that."""
    from sdpo.export_files import earlier_export

    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file: give a folder to write the weights into")
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    others = sorted(set(present) - {p.name for p in earlier_export(folder)})
    if present and not overwrite:
        raise ValueError(f"{folder} already holds {', '.join(present[:5])}{' ...' if len(present) > 5 else ''}: "
                         f"choose a new folder, or pass --overwrite to replace an earlier export there")
    if others:
        raise ValueError(f"{folder} holds files that are not an earlier export ({', '.join(others[:5])}): "
                         f"choose a new folder")


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    """Write the checkpoint's LoRA (or UNet) into ``out_dir`` with its model card, as a finished run does. Only the
    policy is rebuilt: the training reward's model is neither loaded nor needed here."""
    from sdpo.callbacks import RewardSummary
    from sdpo.checkpoint_files import read_checkpoint
    from sdpo.model_card import write_model_card
    from sdpo.policy.lora import save_trained_unet
    from sdpo.prompts import stored_prompts
    from sdpo.resume import iterations_done
    from sdpo.saved_policy import policy_from_checkpoint

    checkpoint = read_checkpoint(ckpt_path, key=None)  # other checkpoints named as paths: the CLI takes them so
    policy = policy_from_checkpoint(checkpoint, ckpt_path, current={})
    path = save_trained_unet(policy.unet, out_dir)
    history = checkpoint.get("callbacks", {}).get(RewardSummary.__qualname__, {}).get("history", [])
    write_model_card(path, checkpoint["hyper_parameters"], policy.components.source, policy.components.step_kind,
                     iterations_done(checkpoint), int(checkpoint.get("global_step", 0)), history,
                     stored_prompts(checkpoint), str(ckpt_path))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=program_name("sdpo.export"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a .ckpt written by sdpo.train")
    parser.add_argument("out_dir", help="folder to write the LoRA (or full UNet) into; new or empty")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in out_dir")
    args = parser.parse_args(argv)
    try:
        check_out_dir(args.out_dir, args.overwrite)
        from sdpo.checkpoint_files import read_checkpoint

        read_checkpoint(args.checkpoint, mmap=True, key=None)  # is it one (its tensors are not read): in seconds
        from sdpo.library_output import quiet_libraries

        quiet_libraries()
        path = export_checkpoint(args.checkpoint, args.out_dir)
    except (FileNotFoundError, ValueError) as error:  # nothing written yet: say what to fix, without a traceback
        sys.exit(f"sdpo.export: {error}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
