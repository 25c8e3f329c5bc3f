"""Stepwise advantage estimates (method.md section 3).

Returns-to-go along denoising order give the first step a signal even though paired trajectories share
x_T (their first-step rewards are equal). Returns are then normalised per (prompt, step) with a FIFO
buffer that outlives a single batch, so the baseline of rare prompts is not dominated by one batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["PerStepPromptStatTracker", "discounted_returns"]

_STD_EPS = 1e-6
_STATE_VERSION = 1

ArrayLike = Tensor | np.ndarray


def discounted_returns(rewards: ArrayLike, gamma: float) -> ArrayLike:
    """Return-to-go ``G[:, i] = R[:, i] + gamma * G[:, i+1]``, ``G[:, T-1] = R[:, T-1]``; ``[N, T]`` in/out.

    Torch in -> torch out (same device; same dtype for floating inputs), numpy in -> numpy out.
    Accumulation runs in at least float32 (float64 for numpy) so bf16 rewards do not lose the tail;
    integer inputs come back as float32 (torch) / float64 (numpy).
    """
    if isinstance(rewards, Tensor):
        if rewards.dim() != 2:
            raise ValueError(f"rewards must be [N, T], got shape {tuple(rewards.shape)}")
        out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
        work = rewards.detach().to(torch.promote_types(out_dtype, torch.float32))  # [N, T]
        returns = torch.empty_like(work)
        running = torch.zeros_like(work[:, 0])  # [N]
        for i in range(work.shape[1] - 1, -1, -1):
            running = work[:, i] + gamma * running
            returns[:, i] = running
        return returns.to(out_dtype)

    arr = np.asarray(rewards)
    if arr.ndim != 2:
        raise ValueError(f"rewards must be [N, T], got shape {arr.shape}")
    out_np_dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.dtype(np.float64)
    work_np = arr.astype(np.float64)
    returns_np = np.empty_like(work_np)
    running_np = np.zeros(work_np.shape[0], dtype=np.float64)
    for i in range(work_np.shape[1] - 1, -1, -1):
        running_np = work_np[:, i] + gamma * running_np
        returns_np[:, i] = running_np
    return returns_np.astype(out_np_dtype)


class PerStepPromptStatTracker:
    """Normalises returns ``[N, T]`` per (prompt, step) with FIFO buffers kept across calls.

    For each step t and distinct prompt p, the batch values ``returns[rows of p, t]`` are first pushed
    into the buffer of key (p, t) (max length ``buffer_size``). Then, if that buffer holds fewer than
    ``min_count`` values, the whole batch column ``returns[:, t]`` provides mean/std (a fresh key's few
    values would give a useless std); otherwise the buffer does. ``A = (G - mean) / (std + 1e-6)``,
    population std, float64 internally. Callers gather returns over all ranks before calling.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16) -> None:
        self._check_config(buffer_size, min_count)
        self.buffer_size = int(buffer_size)
        self.min_count = int(min_count)
        self._buffers: dict[tuple[str, int], deque[float]] = {}
        self._last_frac_batch_stats = float("nan")

    @staticmethod
    def _check_config(buffer_size: int, min_count: int) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        if min_count > buffer_size:
            # The buffer could never reach min_count, so buffer stats would silently never be used.
            raise ValueError(f"min_count ({min_count}) must be <= buffer_size ({buffer_size})")

    def update(self, prompts: Sequence[str], returns: ArrayLike) -> ArrayLike:
        """Push ``returns`` ``[N, T]`` and return advantages of the same type/shape (torch: dtype/device)."""
        is_torch = isinstance(returns, Tensor)
        values = returns.detach().cpu().to(torch.float64).numpy() if is_torch else np.asarray(returns)
        if values.ndim != 2:
            raise ValueError(f"returns must be 2-D [N, T], got shape {tuple(values.shape)}")
        values = values.astype(np.float64)  # [N, T]
        prompts = list(prompts)
        n, t_steps = values.shape
        if len(prompts) != n:
            raise ValueError(f"got {len(prompts)} prompts but returns has {n} rows")
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must be str, got {type(bad[0]).__name__}")
        n_bad = int((~np.isfinite(values)).sum())
        if n_bad:
            raise ValueError(f"returns contain {n_bad} non-finite value(s) out of {values.size}")

        groups: dict[str, np.ndarray] = {}
        for p in dict.fromkeys(prompts):  # first-appearance order, deterministic
            groups[p] = np.array([i for i, q in enumerate(prompts) if q == p], dtype=np.int64)

        adv = np.empty_like(values)  # [N, T]
        used_batch = 0
        for t in range(t_steps):
            column = values[:, t]  # [N]
            for p, rows in groups.items():
                buf = self._buffers.get((p, t))
                if buf is None:
                    buf = self._buffers[(p, t)] = deque(maxlen=self.buffer_size)
                buf.extend(float(v) for v in column[rows])
            batch_mean, batch_std = float(column.mean()), float(column.std())
            for p, rows in groups.items():
                buf = self._buffers[(p, t)]
                if len(buf) < self.min_count:
                    mean, std = batch_mean, batch_std
                    used_batch += 1
                else:
                    arr = np.fromiter(buf, dtype=np.float64, count=len(buf))
                    mean, std = float(arr.mean()), float(arr.std())
                adv[rows, t] = (column[rows] - mean) / (std + _STD_EPS)
        self._last_frac_batch_stats = used_batch / max(1, t_steps * len(groups))

        if is_torch:
            out_dtype = returns.dtype if returns.is_floating_point() else torch.float32
            return torch.from_numpy(adv).to(device=returns.device, dtype=out_dtype)
        in_dtype = np.asarray(returns).dtype
        return adv.astype(in_dtype if np.issubdtype(in_dtype, np.floating) else np.float64)

    @property
    def num_keys(self) -> int:
        """Number of (prompt, step) buffers seen so far."""
        return len(self._buffers)

    def stats(self) -> dict[str, float]:
        """Logging summary: how full the buffers are and how often batch stats were the fallback."""
        lengths = [len(b) for b in self._buffers.values()]
        if not lengths:
            return {
                "num_keys": 0.0,
                "buffer_len_mean": 0.0,
                "buffer_fill_mean": 0.0,
                "frac_keys_ready": 0.0,
                "last_frac_batch_stats": self._last_frac_batch_stats,
            }
        mean_len = float(np.mean(lengths))
        return {
            "num_keys": float(len(lengths)),
            "buffer_len_mean": mean_len,
            "buffer_fill_mean": mean_len / self.buffer_size,
            "frac_keys_ready": float(np.mean([n >= self.min_count for n in lengths])),
            "last_frac_batch_stats": self._last_frac_batch_stats,
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain-python state (str/int/float/list/dict): safe for ``torch.load(weights_only=True)`` and JSON."""
        return {
            "version": _STATE_VERSION,
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": [
                {"prompt": p, "step": int(t), "values": [float(v) for v in buf]}
                for (p, t), buf in self._buffers.items()
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore buffers and config (buffer_size/min_count from the state win, for identical behaviour)."""
        version = state.get("version", _STATE_VERSION)
        if version != _STATE_VERSION:
            raise ValueError(f"unsupported tracker state version {version}, expected {_STATE_VERSION}")
        buffer_size, min_count = int(state["buffer_size"]), int(state["min_count"])
        self._check_config(buffer_size, min_count)
        buffers: dict[tuple[str, int], deque[float]] = {}
        for entry in state["buffers"]:
            key = (str(entry["prompt"]), int(entry["step"]))
            buffers[key] = deque((float(v) for v in entry["values"]), maxlen=buffer_size)
        self.buffer_size, self.min_count = buffer_size, min_count
        self._buffers = buffers
