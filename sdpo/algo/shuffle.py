"""Step-shuffled update order: each micro-batch mixes pairs at different denoising steps."""

from __future__ import annotations

import torch
from torch import Tensor


def shuffled_update_order(num_pairs: int, num_steps: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A pair permutation [P] and, per pair, an independent step permutation [P, T].

    The update loop walks ``for column in range(T): for micro-batch of pairs:`` and trains pair
    ``pair_order[j]`` at step ``step_order[pair_order[j], column]`` — both trajectories of a pair share the
    step, since the loss compares them at the same step.
    """
    pair_order = torch.randperm(num_pairs, generator=generator)  # [P]
    step_order = torch.stack([torch.randperm(num_steps, generator=generator) for _ in range(num_pairs)])  # [P, T]
    return pair_order, step_order


def micro_batches(pair_order: Tensor, micro_batch_size: int) -> list[Tensor]:
    """Split the permuted pairs into consecutive micro-batches (the last one may be smaller)."""
    return list(pair_order.split(micro_batch_size))
