"""A test-only callback that records, per rank and iteration, what the distributed tests compare."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class RankProbe(L.Callback):
    """After every iteration, save this rank's prompts, 1-step images, tracker and trainable weights.

    Runs on every rank on purpose (unlike the real callbacks), writing ``rank<R>_epoch<E>.pt`` into ``dirpath``.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.latest_image_pairs = 1 << 30  # every pair's images, on every rank

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        latest = pl_module.latest
        state = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "prompts": list(latest["prompts"]),
            "first_images": latest["first_images"],
            "tracker": pl_module.tracker.state_dict(),
            "weights": {n: p.detach().cpu().clone() for n, p in pl_module.named_parameters() if p.requires_grad},
            "total_queries": pl_module.total_queries,
        }
        torch.save(state, self.dirpath / f"rank{trainer.global_rank}_epoch{trainer.current_epoch}.pt")
