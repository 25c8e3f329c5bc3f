"""The LightningDataModule that streams one iteration's prompts per rank.

One SDPO iteration (a Lightning "epoch") consumes one batch: the list of prompts this rank samples pairs for.
The iteration's global prompt list is drawn with a generator seeded by (seed, epoch) alone and rank r takes its
contiguous slice, so ranks draw different prompts, W processes with n prompts each see exactly the prompts of one
process with W x n (what the distributed equivalence test relies on), and a resumed run draws exactly what an
uninterrupted run would.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from sdpo.prompts import load_prompts

log = logging.getLogger(__name__)


def iteration_seed(seed: int, epoch: int, index: int, purpose: int) -> int:
    """A 63-bit seed for one (run seed, epoch, index, purpose): independent streams, reproducible on resume.

    ``index`` is a global sample index (a pair, a trajectory or a shuffle shard), never a rank: streams defined
    by global indices make a W-process run equal a 1-process run that sees the same global batch.
    """
    return int(np.random.SeedSequence([seed, epoch, index, purpose]).generate_state(2, np.uint64)[0] >> 1)


class IterationPrompts(Dataset):
    """Item ``epoch`` is the list of prompts this rank samples in that iteration (uniform with replacement).

    The global list of an iteration is the first W x n draws of the (seed, epoch) stream; rank r takes draws
    [r·n, (r+1)·n). numpy draws the integers one after another, so that slice does not depend on W (tested), and
    the rank needs no world size: it draws (r+1)·n and keeps the last n.
    """

    PURPOSE = 1

    def __init__(self, prompts: list[str], prompts_per_iteration: int, seed: int, rank: int) -> None:
        self.prompts = prompts
        self.prompts_per_iteration = prompts_per_iteration
        self.seed = seed
        self.rank = rank

    def __len__(self) -> int:  # an upper bound; the sampler picks one index per epoch
        return 2**31 - 1

    def __getitem__(self, epoch: int) -> list[str]:
        rng = np.random.default_rng(iteration_seed(self.seed, epoch, 0, self.PURPOSE))
        n = self.prompts_per_iteration
        picks = rng.integers(0, len(self.prompts), size=(self.rank + 1) * n)[self.rank * n :]
        return [self.prompts[i] for i in picks]


class EpochSampler(Sampler[int]):
    """Yields the current epoch index once; Lightning calls ``set_epoch`` before every epoch."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        yield self.epoch

    def __len__(self) -> int:
        return 1


class PromptDataModule(L.LightningDataModule):
    """Streams ``prompts_per_batch x batches_per_epoch`` prompts per rank per iteration (equal on every rank)."""

    def __init__(self, source: str | Sequence[str], prompts_per_batch: int, batches_per_epoch: int,
                 seed: int = 0) -> None:
        super().__init__()
        if prompts_per_batch < 1 or batches_per_epoch < 1:
            raise ValueError(
                f"data.prompts_per_batch ({prompts_per_batch}) and data.batches_per_epoch ({batches_per_epoch}) "
                f"must be >= 1"
            )
        self.source = source
        self.prompts_per_batch = prompts_per_batch
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self.prompts = load_prompts(source)
        distinct = len(set(self.prompts))
        if distinct < len(self.prompts):
            log.info("data.source: %d prompts, %d distinct; a prompt listed k times is drawn k times as often",
                     len(self.prompts), distinct)

    @property
    def prompts_per_iteration(self) -> int:
        return self.prompts_per_batch * self.batches_per_epoch

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint (plain containers, weights_only-safe) under the class name, which
        ``sdpo.prompts.STATE_KEY`` names: ``sdpo.evaluate prompts=training`` reads the resolved list, so it works where
        the prompt file is not."""
        source = self.source if isinstance(self.source, str) else [str(p) for p in self.source]
        return {"source": source, "training_prompts": list(self.prompts)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore (the prompt draws are keyed by seed and epoch); say so when the prompts changed."""
        if state_dict.get("training_prompts", self.prompts) != self.prompts:
            log.warning("resuming with other training prompts than the checkpoint's (data.source=%s; it had %s)",
                        self.source, state_dict.get("source"))

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        dataset = IterationPrompts(self.prompts, self.prompts_per_iteration, self.seed, rank)
        return DataLoader(dataset, batch_size=None, sampler=EpochSampler(), num_workers=0)
