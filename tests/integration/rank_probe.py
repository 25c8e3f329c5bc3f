"""A test-only callback that records, per rank and iteration, what the distributed tests compare."""

from __future__ import annotations

import time
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


class FailOnRank(L.Callback):
    """Raise on one rank alone as epoch ``epoch`` starts, as an out-of-memory error in rank 0's evaluation would,
    while every other rank blocks as it would in an NCCL collective waiting for the failed one (gloo would notice
    the closed connection; NCCL waits for the process group's timeout)."""

    def __init__(self, rank: int, epoch: int) -> None:
        self.rank, self.epoch = rank, epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch != self.epoch:
            return
        if trainer.global_rank == self.rank:
            raise RuntimeError(f"rank {self.rank} failed alone")
        time.sleep(600)
