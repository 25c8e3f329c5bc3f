"""Callbacks that turn an iteration into things a researcher looks at: sample grids and a reward summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image, ImageDraw


def image_grid(rows: list[list[torch.Tensor]], captions: list[str], header: list[str], scale: int = 4) -> Image.Image:
    """A labelled grid: one row per prompt, one column per image kind. Images are [3, H, W] in [0, 1]."""
    h, w = rows[0][0].shape[-2:]
    cell_h, cell_w = h * scale, w * scale
    label_w, head_h = 150, 16
    grid = Image.new("RGB", (label_w + cell_w * len(header), head_h + cell_h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, title in enumerate(header):
        draw.text((label_w + j * cell_w + 2, 2), title, fill="black")
    for i, (row, caption) in enumerate(zip(rows, captions, strict=True)):
        draw.text((2, head_h + i * cell_h + 2), caption, fill="black")
        for j, image in enumerate(row):
            array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(array).resize((cell_w, cell_h), Image.NEAREST)
            grid.paste(tile, (label_w + j * cell_w, head_h + i * cell_h))
    return grid


class SampleGrid(L.Callback):
    """Every N epochs (and after the last), save the iteration's 1-step and T-step images with their rewards."""

    def __init__(self, dirpath: str, every_n_epochs: int = 5, max_prompts: int = 8) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_epochs = every_n_epochs
        self.max_prompts = max_prompts

    @rank_zero_only
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        last = epoch + 1 >= (trainer.max_epochs or 0)
        latest = getattr(pl_module, "latest", None)
        if not latest or not (epoch % self.every_n_epochs == 0 or last):
            return
        grid = self.make_grid(latest)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"epoch_{epoch:04d}.png"
        grid.save(path)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="samples", images=[grid], step=trainer.global_step,
                                 caption=[f"epoch {epoch}"])

    def make_grid(self, latest: dict[str, Any]) -> Image.Image:
        n = min(self.max_prompts, len(latest["prompts"]))
        t = latest["num_steps"]
        rows, captions = [], []
        for p in range(n):
            first, last = latest["first_images"][p], latest["last_images"][p]  # [3,H,W], [2,3,H,W]
            rows.append([first, last[0], last[1]])
            r1, rl = latest["first_rewards"][p], latest["last_rewards"][p]
            captions.append(f"{latest['prompts'][p][:18]}\n1:{r1:.3f} {t}:{rl[0]:.3f}/{rl[1]:.3f}")
        return image_grid(rows, captions, ["1-step x0", f"{t}-step a", f"{t}-step b"])


class RewardSummary(L.Callback):
    """Record the rewards of every epoch; at the end print first-vs-last and write them as JSON."""

    KEYS = ("train/reward_1step", "train/reward_last")
    SPREAD = ("train/reward_1step_std", "train/reward_last_std")

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.history: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        if all(k in metrics for k in self.KEYS):
            row = {"epoch": trainer.current_epoch}
            row.update({k: float(metrics[k]) for k in self.KEYS + self.SPREAD if k in metrics})
            row["train/reward_queries"] = float(metrics.get("train/reward_queries", float("nan")))
            self.history.append(row)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.history:
            return
        first, last = self.history[0], self.history[-1]
        t = getattr(pl_module, "algo_cfg", {}).get("num_steps", "T")
        lines = [
            f"SDPO reward ({getattr(pl_module, 'reward_cfg', {}).get('name', 'reward')}), "
            f"epoch {first['epoch']} -> epoch {last['epoch']}",
            f"{'image':<10}{'first':>10}{'last':>10}{'change':>10}{'spread':>10}",
        ]
        rows = (("1-step", self.KEYS[0], self.SPREAD[0]), (f"{t}-step", self.KEYS[1], self.SPREAD[1]))
        for label, key, spread in rows:
            change = last[key] - first[key]
            values = f"{first[key]:>10.4f}{last[key]:>10.4f}{change:>+10.4f}{first.get(spread, 0):>10.4f}"
            lines.append(f"{label:<10}{values}")
        lines.append("(spread: std of the reward across the first epoch's samples)")
        table = "\n".join(lines)
        print("\n" + table + "\n")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"first": first, "last": last, "history": self.history}, indent=1))


class ExportTrained(L.Callback):
    """At the end of training, write the LoRA in diffusers' format (or the full UNet) next to the checkpoints."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from sdpo.policy.lora import save_trained_unet

        path = save_trained_unet(pl_module.unet, self.dirpath)
        print(f"trained weights for diffusers: {path}")
