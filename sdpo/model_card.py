"""The README.md written next to shipped weights: what they are, how they were trained, and how to load them.

A LoRA folder passed around without its run folder says nothing about its base model, reward or training length,
and a wrong base model fails only as a shape error deep in ``load_lora_weights``. The card states all of it, with
Hugging Face's front matter (``base_model``, ``library_name``, ``tags``) so the hub lists it under its base model,
and a loading snippet that runs as written (tested on the tiny model).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sdpo.commands import cli_arg

CARD_NAME = "README.md"
TRAINING_FILE = "sdpo_training.json"  # the settings the card summarises, whole: model, algo, reward, optim, seed


def _card_fact(folder: str | Path, fact: str) -> str | None:
    """The value of the facts table's ``fact`` row, as ``model_card`` writes it, in the card in ``folder`` (None: no
    card there, or not one of ours)."""
    card = Path(folder) / CARD_NAME
    found = re.search(rf"^\| {re.escape(fact)} \| (.+?) \|$", card.read_text(), re.M) if card.is_file() else None
    return found.group(1) if found else None


def recorded_base_model(folder: str | Path) -> str | None:
    """The base model the card in ``folder`` names."""
    return _card_fact(folder, "base model")


def recorded_reward(folder: str | Path) -> str | None:
    """The training reward's name the card in ``folder`` states (an export without ``TRAINING_FILE``)."""
    return _card_fact(folder, "reward")


def _is_local(source: str) -> bool:
    return Path(source).expanduser().exists()


def usage_snippet(source: str, folder: str, lora: bool, step_kind: str, guidance_scale: float | None,
                  revision: str | None = None, vae_source: str | None = None) -> str:
    """Python that loads the base pipeline, applies the trained weights and samples one image with the model's own
    scheduler (what ``sdpo.evaluate`` measures)."""
    steps, guidance = (4, guidance_scale or 8.0) if step_kind == "lcm" else (1, 0.0)
    classes = ["AutoPipelineForText2Image", *(["AutoencoderKL"] if vae_source else []),
               *([] if lora else ["UNet2DConditionModel"])]
    lines = ["import torch", f"from diffusers import {', '.join(classes)}", "",
             'device = "cuda" if torch.cuda.is_available() else "cpu"',
             'dtype = torch.float16 if device == "cuda" else torch.float32']
    extra = f", revision={revision!r}" if revision else ""
    if vae_source:  # the VAE training decoded with (SDXL's own overflows in fp16)
        lines.append(f"vae = AutoencoderKL.from_pretrained({vae_source!r}, torch_dtype=dtype)")
        extra += ", vae=vae"
    if not lora:
        lines.append(f"unet = UNet2DConditionModel.from_pretrained({folder!r}, torch_dtype=dtype)")
        extra += ", unet=unet"
    lines.append(f"pipe = AutoPipelineForText2Image.from_pretrained({source!r}{extra}, torch_dtype=dtype).to(device)")
    if lora:
        lines.append(f"pipe.load_lora_weights({folder!r})")
    lines.append(f'image = pipe("a photo of a cat", num_inference_steps={steps}, guidance_scale={guidance}).images[0]')
    return "\n".join(lines)


def reward_table(history: Sequence[Mapping[str, float]], num_steps: int) -> str:
    """The training reward of the first and last iteration, as ``RewardSummary`` records them."""
    if not history:
        return "No complete iteration was recorded."
    first, last = history[0], history[-1]
    rows = ["| image | first iteration | last iteration | change |", "|---|---:|---:|---:|"]
    for label, key in (("1-step", "train/reward_1step"), (f"{num_steps}-step", "train/reward_last")):
        if key in first and key in last:
            rows.append(f"| {label} | {first[key]:.4f} | {last[key]:.4f} | {last[key] - first[key]:+.4f} |")
    return "\n".join(rows) + f"\n\nIterations {int(first['epoch'])} and {int(last['epoch'])}, on the training prompts."


def model_card(hparams: Mapping[str, Any], source: str, step_kind: str, iterations: int, optimizer_steps: int,
               history: Sequence[Mapping[str, float]], folder: str, prompts: Sequence[str] = (),
               checkpoint: str | None = None) -> str:
    """The card's Markdown. ``hparams``: the module's (model, algo, reward, optim, seed); ``source``: the base model
    as loaded (a hub id, or the local folder of a tiny model); ``folder``: where the weights are, for the snippet."""
    model, algo, reward, optim = (hparams[k] for k in ("model", "algo", "reward", "optim"))
    lora = model.get("lora") or {}
    hub = not _is_local(source)
    tags = ["text-to-image", "diffusers", *(["lora"] if lora.get("enabled") else []), "sdpo", "reinforcement-learning"]
    front = ["---", *([f"base_model: {source}"] if hub else []), "library_name: diffusers", "tags:",
             *(f"- {t}" for t in tags), "---"]
    if lora.get("enabled"):
        alpha = lora.get("alpha") if lora.get("alpha") is not None else lora.get("rank")
        weights = f"LoRA r{lora.get('rank')} (alpha {alpha}) on {', '.join(lora.get('targets') or [])}"
    else:
        weights = "the whole UNet (full fine-tune)"
    base = source + (f" (revision {model['revision']})" if model.get("revision") else "")
    if not hub:
        base += " (a local folder, not on the hub)"
    pairs = ""
    if prompts:
        pairs = f"{len(prompts)} prompts (e.g. {', '.join(repr(p) for p in list(prompts)[:3])})"
    facts = [
        ("base model", base),
        ("weights", weights),
        ("reward", str(reward.get("name"))),
        ("training", f"{iterations} iteration{'' if iterations == 1 else 's'}, {optimizer_steps} optimizer "
                     f"step{'' if optimizer_steps == 1 else 's'}, T = {algo.get('num_steps')} "
                     f"{step_kind} steps (η = {algo.get('eta')}), {model.get('spacing')} spacing, lr "
                     f"{optim.get('lr')}, seed {hparams.get('seed', 0)}"),
        *([("prompts", pairs)] if pairs else []),
        *([("checkpoint", checkpoint)] if checkpoint else []),
    ]
    snippet = usage_snippet(source, folder, bool(lora.get("enabled")), step_kind, model.get("guidance_scale"),
                            model.get("revision"), model.get("vae_source"))
    compare = (f"\n\nTo compare it with its base model at 1, 2, 4 and 8 steps, image by image:\n\n```bash\n"
               f"python -m sdpo.evaluate {cli_arg('checkpoint', checkpoint)} baseline=true\n```") if checkpoint else ""
    return "\n".join([
        *front, "",
        f"# SDPO-aligned {'LoRA' if lora.get('enabled') else 'UNet'} for {source}", "",
        f"Trained with sdpo, an implementation of SDPO (Stepwise Diffusion Policy Optimization, "
        f"[arXiv 2411.11727](https://arxiv.org/abs/2411.11727)): online reinforcement learning of a few-step "
        f"diffusion model on the `{reward.get('name')}` reward, from dense reward differences at every step.", "",
        "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in facts), "",
        "## Training reward", "", reward_table(history, int(algo.get("num_steps", 0))), "",
        "## Use", "", "```python", snippet, "```" + compare, "",
    ])


def write_model_card(folder: str | Path, hparams: Mapping[str, Any], source: str, step_kind: str, iterations: int,
                     optimizer_steps: int, history: Sequence[Mapping[str, float]], prompts: Sequence[str] = (),
                     checkpoint: str | None = None) -> Path:
    """Write ``README.md`` into ``folder`` after ``iterations``, and the training settings it summarises, whole, as
    ``TRAINING_FILE`` (what ``sdpo.evaluate lora=`` reads). ``hparams``: the run's model, algo, reward, optim and
    seed (a checkpoint's ``hyper_parameters``); ``source`` and ``step_kind`` as in ``model_card``."""
    hparams = {key: hparams[key] for key in ("model", "algo", "reward", "optim")} | {"seed": hparams.get("seed", 0)}
    folder = Path(folder).expanduser().absolute()  # the card's commands then work from any directory
    checkpoint = str(Path(checkpoint).expanduser().absolute()) if checkpoint else None
    path = folder / CARD_NAME
    path.write_text(model_card(hparams, source, step_kind, iterations, optimizer_steps, history, str(folder), prompts,
                               checkpoint))
    record = {**hparams, "base_model": source, "iterations": iterations,
              "optimizer_steps": optimizer_steps, "checkpoint": checkpoint}
    (folder / TRAINING_FILE).write_text(json.dumps(record, indent=1, default=str) + "\n")
    return path


def recorded_training(folder: str | Path) -> dict[str, Any] | None:
    """The training settings an export in ``folder`` carries (None: none there, e.g. an export of an older version
    or one made elsewhere)."""
    path = Path(folder) / TRAINING_FILE
    return json.loads(path.read_text()) if path.is_file() else None
