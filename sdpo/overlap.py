"""Score chunks of pairs in the background while the next chunk samples (``algo.overlap_scoring``).

Sampling a chunk of pairs and decoding + scoring its queried x̂0 use different networks and do not depend on each
other, and neither fills a GPU on its own at the batch sizes that fit beside training. The scorer runs each
chunk's scoring on one worker thread and, on CUDA, on a side stream, so its kernels fill the gaps the sampling
loop leaves; the caller's thread goes on launching the next chunk's UNet calls.

What it keeps exact:
- every chunk is scored by the same function on the same tensors, so the rewards equal the sequential ones up to
  the decode batch boundaries (tests/integration/test_train.py);
- one worker, so the reward model is never called from two threads at once (a multi-reward keeps per-call state);
- the worker runs under the caller's autocast settings (they are thread-local and would otherwise be lost), so the
  scoring function sees what it sees in line (it runs the VAE and the reward outside autocast either way);
- CUDA: the side stream waits for the chunk's sampling (an event), the caller's stream waits for the scoring
  (events) before it reads a reward, and every tensor that crosses streams is marked with ``record_stream`` so the
  caching allocator cannot hand its memory out while the other stream still reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from types import TracebackType

import torch

from sdpo.policy.rollout import PairTrajectories
from sdpo.scoring import PairRewards

ScoreFn = Callable[[PairTrajectories, dict[str, float], int], PairRewards]


class BackgroundScorer:
    """Submit chunks as they finish sampling; ``results()`` returns their rewards joined, in submission order.

    ``score(chunk, timings, first_pair)`` scores one chunk whose first pair has the global index ``first_pair``
    (random query anchors are keyed by it), and fills ``timings`` with its "decode" and "reward" seconds, measured
    on its own stream.
    """

    def __init__(self, score: ScoreFn, device: torch.device) -> None:
        self.score = score
        self.device = device
        self.cuda = device.type == "cuda"
        self.side_stream = torch.cuda.Stream(device) if self.cuda else None
        self.autocast = {kind: (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
                         for kind in ("cpu", "cuda") if kind == "cpu" or self.cuda}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdpo-scoring")
        self._futures: list[Future] = []
        self.timings: dict[str, float] = {"decode": 0.0, "reward": 0.0}

    def __enter__(self) -> BackgroundScorer:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._pool.shutdown(wait=True, cancel_futures=error is not None)

    def submit(self, chunk: PairTrajectories, first_pair: int) -> None:
        """Queue ``chunk`` for scoring once the caller's stream has produced it."""
        ready = None
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
            chunk.x0_latents.record_stream(self.side_stream)  # read on the side stream
        self._futures.append(self._pool.submit(self._score, chunk, first_pair, ready))

    def _score(self, chunk: PairTrajectories, first_pair: int,
               ready: torch.cuda.Event | None) -> tuple[PairRewards, torch.cuda.Event | None]:
        with ExitStack() as stack:
            for kind, (enabled, dtype) in self.autocast.items():
                stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))
            done = None
            if self.cuda:  # a new thread starts on cuda:0, whichever GPU this rank uses
                stack.enter_context(torch.cuda.device(self.device))
                stack.enter_context(torch.cuda.stream(self.side_stream))
                self.side_stream.wait_event(ready)
            timings: dict[str, float] = {}
            rewards = self.score(chunk, timings, first_pair)
            if self.cuda:
                done = torch.cuda.Event()
                done.record(self.side_stream)
        for name in self.timings:
            self.timings[name] += timings.get(name, 0.0)
        return rewards, done

    def results(self) -> PairRewards:
        """Wait for every submitted chunk; the caller's stream then waits for their kernels too."""
        parts = []
        for future in self._futures:
            rewards, done = future.result()
            if done is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(done)
                for tensor in rewards.tensors():
                    if tensor.device.type == "cuda":
                        tensor.record_stream(current)  # made on the side stream, read on this one
            parts.append(rewards)
        self._futures.clear()
        return PairRewards.concat(parts)
