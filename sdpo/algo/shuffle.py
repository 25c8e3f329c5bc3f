"""Step-shuffled update order: each micro-batch mixes pairs at different denoising steps.

Shards make the order independent of how pairs are spread over processes. A rank's pairs form one or more
equal shards; each shard is shuffled by its own generator (seeded by its global shard index), and every
micro-batch takes the same number of pairs from each shard. W processes with one shard each and micro-batch m
therefore train, micro-batch by micro-batch, on exactly the pairs of one process that splits its W times larger
batch into W shards with micro-batch W·m: DDP's gradient average over ranks equals that process's mean.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# One micro-batch: local pair indices [B] and the step each pair is trained at [B].
MicroBatch = tuple[Tensor, Tensor]


def shuffled_update_order(num_pairs: int, num_steps: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A pair permutation [P] and, per pair, an independent step permutation [P, T].

    The update loop walks ``for column in range(T): for micro-batch of pairs:`` and trains pair
    ``pair_order[j]`` at step ``step_order[pair_order[j], column]`` — both trajectories of a pair share the
    step, since the loss compares them at the same step.
    """
    pair_order = torch.randperm(num_pairs, generator=generator)  # [P]
    step_order = torch.stack([torch.randperm(num_steps, generator=generator) for _ in range(num_pairs)])  # [P, T]
    return pair_order, step_order


def sharded_update_order(
    shard_size: int, num_steps: int, generators: list[torch.Generator]
) -> tuple[list[Tensor], Tensor]:
    """Shuffle each of ``len(generators)`` consecutive shards of ``shard_size`` pairs with its own generator.

    Returns the pair order of every shard (local pair indices, shard v holding v·S .. (v+1)·S-1) and the step
    permutation of every pair [V·S, T].
    """
    orders, steps = [], []
    for shard, generator in enumerate(generators):
        pair_order, step_order = shuffled_update_order(shard_size, num_steps, generator)
        orders.append(pair_order + shard * shard_size)
        steps.append(step_order)
    return orders, torch.cat(steps)


def count_update_groups(num_pairs: int, num_steps: int, micro_batch_pairs: int, accumulation: int,
                        passes: int = 1) -> int:
    """How many optimizer steps ``update_groups`` makes of ``passes`` passes (``algo.num_inner_epochs``) over
    ``num_pairs`` pairs of a rank: per step column, one per ``micro_batch_pairs x accumulation`` pairs (a column's
    last group may be smaller). Shards divide both sizes, so they do not change the count."""
    return passes * num_steps * math.ceil(num_pairs / (micro_batch_pairs * accumulation))


def update_groups(
    shard_orders: list[Tensor], step_order: Tensor, pairs_per_shard: int, accumulation: int
) -> list[list[MicroBatch]]:
    """The optimizer steps of one pass: each is a list of ``accumulation`` micro-batches (fewer at a column's end).

    Per column (``for column in range(T)``) every shard's permuted pairs are cut into update groups of
    ``pairs_per_shard x accumulation`` pairs, and each group into micro-batches of ``pairs_per_shard`` pairs per
    shard (shard pieces concatenated in shard order). An optimizer step thus covers the same pairs whatever the
    split into micro-batch x accumulation, so the update depends only on their product.
    """
    num_steps = step_order.shape[1]
    shard_size = shard_orders[0].numel()
    group_size = pairs_per_shard * accumulation
    groups: list[list[MicroBatch]] = []
    for column in range(num_steps):
        for start in range(0, shard_size, group_size):
            stop = min(start + group_size, shard_size)
            group = []
            for first in range(start, stop, pairs_per_shard):
                last = min(first + pairs_per_shard, stop)
                pairs = torch.cat([order[first:last] for order in shard_orders])  # [B]
                group.append((pairs, step_order[pairs, column]))
            groups.append(group)
    return groups
