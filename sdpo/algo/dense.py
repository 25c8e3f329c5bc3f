"""Dense per-step reward prediction from latent similarity (method.md section 2).

Scoring every predicted clean latent x̂0_t with the reward model costs one VAE decode plus one reward
forward per step. SDPO instead queries a few steps exactly (first, last, and one or more "anchors") and
fills in the rest by a similarity-weighted average of the queried rewards.

Conventions: trajectory tensors are ``[N, T, ...]`` (N trajectories, T denoising steps, step 0 is the
first / noisiest step). Similarity is the cosine between flattened latents, always computed in float32 so
bf16/fp16 latents give the same plan as fp32 ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "STRATEGIES",
    "count_queries",
    "interpolate_rewards",
    "plan_queries",
    "select_anchor_steps",
    "select_anchors",
    "step_similarities",
]

STRATEGIES: tuple[str, ...] = ("argmin", "uniform", "random", "all")

# Norm floor for cosine similarity (avoids 0/0 on an all-zero latent).
_NORM_EPS = 1e-12
# Floor applied to interpolation weights; see interpolate_rewards.
_WEIGHT_EPS = 1e-6


def _unit_latents(x0_latents: Tensor) -> Tensor:
    """Flatten ``[N, T, ...]`` to ``[N, T, D]`` float32 unit vectors, so cosines become dot products."""
    if x0_latents.dim() < 2:
        raise ValueError(f"x0_latents must be [N, T, ...], got shape {tuple(x0_latents.shape)}")
    n, t = x0_latents.shape[:2]
    flat = x0_latents.detach().reshape(n, t, -1).float()  # [N, T, D]
    return flat / flat.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)


def _gather_steps(unit: Tensor, steps: Tensor) -> Tensor:
    """unit ``[N, T, D]``, steps ``[N, K]`` -> ``[N, K, D]`` (the latents at the given steps)."""
    idx = steps.to(device=unit.device, dtype=torch.long)
    return torch.gather(unit, 1, idx.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))


def _check_steps(steps: Tensor, n: int, t: int, name: str) -> None:
    if steps.dim() != 2 or steps.shape[0] != n:
        raise ValueError(f"{name} must be [N={n}, K], got shape {tuple(steps.shape)}")
    if steps.numel() and (int(steps.min()) < 0 or int(steps.max()) >= t):
        raise ValueError(f"{name} must lie in [0, {t - 1}], got range [{int(steps.min())}, {int(steps.max())}]")


def step_similarities(x0_latents: Tensor, ref_steps: Tensor) -> Tensor:
    """Cosine of every step's latent to one reference step per trajectory.

    x0_latents ``[N, T, ...]``, ref_steps ``[N]`` -> ``[N, T]`` float32 with
    ``out[n, t] = cos(x0[n, t], x0[n, ref_steps[n]])``.
    """
    unit = _unit_latents(x0_latents)  # [N, T, D]
    n, t = unit.shape[:2]
    ref = ref_steps.reshape(-1)
    if ref.shape[0] != n:
        raise ValueError(f"ref_steps must be [N={n}], got shape {tuple(ref_steps.shape)}")
    _check_steps(ref.unsqueeze(1), n, t, "ref_steps")
    ref_vec = _gather_steps(unit, ref.unsqueeze(1))  # [N, 1, D]
    return (unit * ref_vec).sum(-1)  # [N, T]


def _endpoint_scores(unit: Tensor) -> Tensor:
    """sim_first + sim_last per step, ``[N, T]``: low means far from both known endpoints."""
    first = unit[:, :1]  # [N, 1, D]
    last = unit[:, -1:]  # [N, 1, D]
    return (unit * first).sum(-1) + (unit * last).sum(-1)


def select_anchor_steps(x0_latents: Tensor, num_anchors: int = 1, include_endpoints: bool = False) -> Tensor:
    """The ``k`` steps least similar to both end points, ``[N, k]`` ordered by increasing score.

    The anchor should carry information the first/last rewards do not, hence the smallest
    ``sim_first + sim_last``. Ties go to the earlier step (stable sort), matching ``torch.argmin``.
    ``k`` is capped at the number of candidate steps.
    """
    if num_anchors < 1:
        raise ValueError(f"num_anchors must be >= 1, got {num_anchors}")
    unit = _unit_latents(x0_latents)
    t = unit.shape[1]
    if include_endpoints:
        lo, hi = 0, t  # candidates 0..T-1
    else:
        if t < 3:
            raise ValueError(
                f"anchor search over intermediate steps needs T >= 3 denoising steps, got T={t}; "
                "use num_steps>=3 or include_endpoints=True"
            )
        lo, hi = 1, t - 1  # candidates 1..T-2
    scores = _endpoint_scores(unit)[:, lo:hi]  # [N, M]
    k = min(num_anchors, hi - lo)
    order = torch.sort(scores, dim=1, stable=True).indices[:, :k]  # [N, k]
    return order + lo


def select_anchors(x0_latents: Tensor, include_endpoints: bool = False) -> Tensor:
    """One anchor per trajectory, ``[N]``: argmin over t of ``sim_first[t] + sim_last[t]``.

    By default (project choice, as in the paper's figure) only intermediate steps 1..T-2 are searched;
    ``include_endpoints=True`` searches 0..T-1 as the reference code does.
    """
    return select_anchor_steps(x0_latents, num_anchors=1, include_endpoints=include_endpoints)[:, 0]


def _uniform_intermediate(t: int, k: int) -> Tensor:
    """``k`` evenly spaced steps among 1..T-2 (centres of k equal bins), ``[k']`` with k' <= k, sorted.

    Bin centres keep k=1 in the middle rather than at an edge. Rounding is half-up (floor(x+0.5)), not
    banker's rounding, so centres at least 1 apart never collide; unique() is a safety net.
    """
    m = t - 2
    k = min(k, m)
    centres = 1.0 + m * (torch.arange(k, dtype=torch.float64) + 0.5) / k - 0.5
    return torch.unique(torch.floor(centres + 0.5).long())


def plan_queries(
    x0_latents: Tensor,
    strategy: str,
    num_anchors: int = 1,
    include_endpoints: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Which steps receive an exact reward query, ``[N, K]`` long on the latents' device.

    Columns are first (0), last (T-1), then the anchors, so that anchors are written last by
    :func:`interpolate_rewards`. Strategies:

    - ``"argmin"``: :func:`select_anchor_steps` (the paper's rule).
    - ``"uniform"``: ``k`` evenly spaced intermediate steps, same for every row, deterministic.
    - ``"random"``: ``k`` distinct intermediate steps per row drawn with ``generator`` (reproducible).
    - ``"all"``: every step (exact dense rewards), ``K = T``, columns ``0..T-1``.

    ``include_endpoints`` only affects ``"argmin"``: the end points are always queried already, so
    uniform/random spend their budget on intermediate steps only. ``k`` is capped at ``T-2``.
    Degenerate lengths: ``T == 1`` -> ``[[0]]``; ``T == 2`` -> ``[[0, 1]]`` (every step is exact).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown query strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if strategy != "all" and num_anchors < 1:
        raise ValueError(f"num_anchors must be >= 1 for strategy {strategy!r}, got {num_anchors}")
    if x0_latents.dim() < 2:
        raise ValueError(f"x0_latents must be [N, T, ...], got shape {tuple(x0_latents.shape)}")
    n, t = x0_latents.shape[:2]
    device = x0_latents.device

    if t <= 2 or strategy == "all":
        return torch.arange(t, device=device, dtype=torch.long).unsqueeze(0).expand(n, t).clone()

    if strategy == "argmin":
        anchors = select_anchor_steps(x0_latents, num_anchors, include_endpoints)  # [N, k]
    elif strategy == "uniform":
        anchors = _uniform_intermediate(t, num_anchors).to(device).unsqueeze(0).expand(n, -1)  # [N, k]
    else:  # random
        k = min(num_anchors, t - 2)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.rand(n, t - 2, generator=generator, device=gen_device)  # [N, T-2]
        anchors = (noise.argsort(dim=1)[:, :k] + 1).to(device)  # [N, k]

    ends = torch.tensor([0, t - 1], device=device, dtype=torch.long).unsqueeze(0).expand(n, 2)
    return torch.cat([ends, anchors.to(torch.long)], dim=1)


def interpolate_rewards(x0_latents: Tensor, query_steps: Tensor, query_rewards: Tensor) -> Tensor:
    """Dense rewards ``[N, T]`` float32 from ``K`` exact queries per trajectory.

    ``R̂[n, t] = Σ_k s_k[t]·R_k / Σ_k s_k[t]`` with ``s_k[t] = cos(x0[n, t], x0[n, query_steps[n, k]])``;
    then the exact reward is written at every queried step, column by column, so a later column wins
    when a step is listed twice (anchors come last in :func:`plan_queries`).

    Project choice: each weight is clamped to at least 1e-6. Cosines can be <= 0 (e.g. random latents),
    where the paper's ratio can blow up or flip sign; with positive weights R̂ is a convex combination of
    the queried rewards. Whenever all similarities are >= 1e-6 this is exactly the paper's formula.
    """
    unit = _unit_latents(x0_latents)  # [N, T, D]
    n, t = unit.shape[:2]
    _check_steps(query_steps, n, t, "query_steps")
    if query_rewards.shape != query_steps.shape:
        raise ValueError(
            f"query_rewards shape {tuple(query_rewards.shape)} != query_steps shape {tuple(query_steps.shape)}"
        )
    steps = query_steps.to(device=unit.device, dtype=torch.long)  # [N, K]
    rewards = query_rewards.detach().to(device=unit.device, dtype=torch.float32)  # [N, K]

    anchors = _gather_steps(unit, steps)  # [N, K, D]
    sims = torch.einsum("nkd,ntd->nkt", anchors, unit)  # [N, K, T]
    weights = sims.clamp_min(_WEIGHT_EPS)
    dense = (weights * rewards.unsqueeze(-1)).sum(1) / weights.sum(1)  # [N, T]

    for col in range(steps.shape[1]):
        dense.scatter_(1, steps[:, col : col + 1], rewards[:, col : col + 1])
    return dense


def count_queries(query_steps: Tensor) -> int:
    """Number of distinct (trajectory, step) pairs in a plan ``[N, K]``: the reward-model calls it costs."""
    if query_steps.dim() != 2:
        raise ValueError(f"query_steps must be [N, K], got shape {tuple(query_steps.shape)}")
    if query_steps.numel() == 0:
        return 0
    steps = query_steps.long()
    if int(steps.min()) < 0:
        raise ValueError(f"query_steps must be >= 0, got min {int(steps.min())}")
    width = int(steps.max()) + 1
    rows = torch.arange(steps.shape[0], device=steps.device).unsqueeze(1)  # [N, 1]
    return int(torch.unique(rows * width + steps).numel())
