"""Dense rewards for rolled-out pairs: plan the exact queries, decode only those x̂0, interpolate the rest.

This is where the policy's latents meet the reward model. The pure math (anchor choice, interpolation) lives
in ``sdpo.algo.dense``; here we decode the queried x̂0 in large batches and call the reward once per batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sdpo.algo.dense import interpolate_rewards, plan_queries
from sdpo.policy.conditioning import decode_latents
from sdpo.policy.rollout import PairTrajectories

RewardFn = Callable[[Tensor, list[str]], Tensor]


@dataclass
class PairRewards:
    """Dense rewards of P pairs and what they cost."""

    dense: Tensor  # [P, 2, T] R̂, exact at queried steps (fp32)
    query_steps: Tensor  # [2P, K] steps queried per trajectory (rows 2p, 2p+1 = pair p)
    num_queries: int  # reward-model calls spent (the shared first step of a pair is scored once)
    first_images: Tensor  # [P, 3, H, W] the 1-step image (x̂0 at step 0, shared by a and b)
    last_images: Tensor  # [P, 2, 3, H, W] the T-step images of a and b
    # a multi-reward's unweighted parts: name -> (1-step scores [P], T-step scores [P, 2])
    components: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    @staticmethod
    def concat(parts: list[PairRewards]) -> PairRewards:
        """Join the rewards of consecutive chunks of pairs (scored one chunk at a time) into one batch."""
        if len(parts) == 1:
            return parts[0]
        return PairRewards(
            dense=torch.cat([part.dense for part in parts]),
            query_steps=torch.cat([part.query_steps for part in parts]),
            num_queries=sum(part.num_queries for part in parts),
            first_images=torch.cat([part.first_images for part in parts]),
            last_images=torch.cat([part.last_images for part in parts]),
            components={name: (torch.cat([part.components[name][0] for part in parts]),
                               torch.cat([part.components[name][1] for part in parts]))
                        for name in parts[0].components},
        )

    def tensors(self) -> list[Tensor]:
        """Every tensor it holds (for handing them from one CUDA stream to another)."""
        parts = [t for pair in self.components.values() for t in pair]
        return [self.dense, self.query_steps, self.first_images, self.last_images, *parts]


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a phase's wall time is its own (only when timings are asked for)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronize_stream(device: torch.device) -> None:
    """Wait for the work queued on the current CUDA stream only: scoring on a side stream times itself without
    waiting for the sampling that runs beside it (``sdpo.overlap``)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


@torch.no_grad()
def score_pairs(
    traj: PairTrajectories,
    vae: torch.nn.Module,
    latent_scale: float,
    reward_fn: RewardFn,
    strategy: str,
    num_anchors: int,
    include_endpoints: bool,
    generator: torch.Generator | Sequence[torch.Generator] | None,
    batch_size: int,
    timings: dict[str, float] | None = None,
) -> PairRewards:
    """Score every step of every trajectory with ``K`` exact reward queries per trajectory.

    ``generator`` drives the "random" anchor strategy: one for the batch, or one per trajectory (2P, row 2p+j
    = trajectory j of pair p), which makes a trajectory's anchors independent of the batch it is scored in.
    ``timings``, when given, receives the seconds spent decoding ("decode") and in the reward model ("reward").

    The VAE (``decode_latents``) and the reward model (``RewardModel.forward``) run in the dtype they are stored in
    (``model.weight_dtype``, ``reward.dtype``), outside the policy's autocast, as in evaluation.
    """
    num_pairs, num_steps = traj.num_pairs, traj.num_steps
    x0 = traj.x0_latents.flatten(0, 1)  # [N=2P, T, C, H, W]
    if strategy == "random" and generator is not None and not isinstance(generator, torch.Generator):
        rows = list(generator)
        if len(rows) != x0.shape[0]:
            raise ValueError(f"got {len(rows)} generators for {x0.shape[0]} trajectories")
        plan = torch.cat([plan_queries(x0[r : r + 1], strategy, num_anchors, include_endpoints, g)
                          for r, g in enumerate(rows)])  # [N, K]
    else:
        single = generator if isinstance(generator, torch.Generator) else None
        plan = plan_queries(x0, strategy, num_anchors, include_endpoints, single)  # [N, K]

    # Unique (trajectory, step) queries. Both trajectories of a pair start from the same x_T, so their
    # first-step x̂0 (and reward) are the same: score it once, on trajectory a. Every plan holds the first
    # and the last step, so the 1-step and T-step images below are always among the decoded ones.
    def key(row: int, step: int) -> tuple[int, int]:
        return (row - row % 2, 0) if step == 0 else (row, step)

    plan_rows = plan.tolist()
    keys: dict[tuple[int, int], int] = {}
    for row, steps in enumerate(plan_rows):
        for step in steps:
            keys.setdefault(key(row, step), len(keys))
    queried = list(keys)
    query_rows = torch.tensor([r for r, _ in queried], device=x0.device)
    query_steps = torch.tensor([s for _, s in queried], device=x0.device)
    latents = x0[query_rows, query_steps]  # [Q, C, H, W]
    prompts = [traj.prompts[r // 2] for r, _ in queried]
    if timings is not None:
        synchronize_stream(x0.device)
        tic = time.perf_counter()
    images = decode_latents(vae, latents, latent_scale, batch_size)  # [Q, 3, H, W]
    if timings is not None:
        synchronize_stream(x0.device)
        timings["decode"] = time.perf_counter() - tic
        tic = time.perf_counter()
    chunks, parts = [], []
    for i in range(0, len(queried), batch_size):
        chunks.append(reward_fn(images[i : i + batch_size], prompts[i : i + batch_size]))
        parts.append(dict(getattr(reward_fn, "last_components", None) or {}))
    scores = torch.cat(chunks).float()  # [Q]
    if timings is not None:
        synchronize_stream(scores.device)
        timings["reward"] = time.perf_counter() - tic

    index = torch.tensor([[keys[key(r, s)] for s in steps] for r, steps in enumerate(plan_rows)])  # [N, K]
    dense = interpolate_rewards(x0, plan, scores[index.to(scores.device)])  # [N, T]
    last = num_steps - 1
    first_index = [keys[(2 * p, 0)] for p in range(num_pairs)]
    last_index = [keys[(r, last)] for r in range(2 * num_pairs)]
    first_images = images[first_index]  # [P, 3, H, W]
    last_images = images[last_index]  # [2P, 3, H, W]
    components = {}
    for name in parts[0]:
        values = torch.cat([part[name] for part in parts]).float()  # [Q]
        components[name] = (values[first_index], values[last_index].view(num_pairs, 2))
    return PairRewards(
        dense=dense.view(num_pairs, 2, num_steps),
        query_steps=plan,
        num_queries=len(queried),
        first_images=first_images,
        last_images=last_images.view(num_pairs, 2, *last_images.shape[1:]),
        components=components,
    )
