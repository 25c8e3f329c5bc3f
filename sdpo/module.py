"""The SDPO LightningModule: one training step = one SDPO iteration.

sample pairs (dual state) -> dense rewards (few exact queries) -> stepwise advantages (gathered over ranks)
-> step-shuffled reward-difference updates. Manual optimization: many optimizer steps per iteration, every
backward goes through ``manual_backward`` so Lightning's DDP averages the gradients over ranks (once per optimizer
step: the other micro-batches of an accumulation group skip the all-reduce).

Distributed equivalence: every random stream is keyed by global indices, never by rank — the prompt list by
(seed, epoch), the noise by the pair's place in one (seed, epoch) stream over the global batch, a trajectory's
random anchors by its global trajectory index, the step shuffle by global shard (``sdpo.algo.shuffle``). So W
processes with n pairs each and micro-batch m train exactly like one process with W·n pairs,
``algo.shuffle_shards=W`` and micro-batch W·m (tests/integration/test_distributed.py).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from sdpo.algo.advantages import PerStepPromptStatTracker, discounted_returns
from sdpo.algo.checked_steps import CheckedSteps
from sdpo.algo.losses import sdpo_loss, temporal_weights
from sdpo.algo.optimizer import build_adamw, clip_gradients, grad_norm_stats
from sdpo.algo.shuffle import count_update_groups, sharded_update_order, update_groups
from sdpo.data import iteration_seed
from sdpo.loggers import wandb_run_id
from sdpo.model_sources import TINY
from sdpo.overlap import BackgroundScorer
from sdpo.policy.attention import check_attention_backend, pin_attention_backend
from sdpo.policy.checks import collected_checks, require_not
from sdpo.policy.compile_check import CompiledGradientCheck
from sdpo.policy.conditioning import Conditioning, encode_prompts, truncated_prompts
from sdpo.policy.fused_lora import fuse_lora_layers
from sdpo.policy.loading import TinySpec, ensure_tiny_pipeline, load_components
from sdpo.policy.lora import make_trainable
from sdpo.policy.rollout import PairTrajectories, sample_pair_chunks, transition_log_prob
from sdpo.policy.speed import (
    apply_speed_options,
    cast_frozen_layers,
    compile_mode,
    inductor_mode,
    resolve_fused_lora,
)
from sdpo.policy.steps import check_training_schedule, make_policy_scheduler, timestep_schedule
from sdpo.progress import PhaseProgress
from sdpo.resume import iterations_done
from sdpo.rewards import build_reward
from sdpo.scoring import PairRewards, score_pairs, synchronize, synchronize_stream

log = logging.getLogger(__name__)

# Independent random streams per (seed, epoch, global index): derived, never stored, so resume is exact by
# construction and the result does not depend on how the global batch is split over processes.
NOISE_STREAM, QUERY_STREAM, SHUFFLE_STREAM = 11, 12, 13
# Diagnostics reduced over ranks with max (the others with mean).
_MAX_STATS = ("log_ratio_abs_max", "first_update_log_ratio_abs_max")


def _plain(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


class SDPOModule(L.LightningModule):
    """Few-step UNet policy + frozen text encoder, decoder and reward model, trained with SDPO."""

    def __init__(self, model: Any, algo: Any, reward: Any, optim: Any, seed: int = 0) -> None:
        super().__init__()
        self.model_cfg, self.algo_cfg = _plain(model), _plain(algo)
        self.reward_cfg, self.optim_cfg = _plain(reward), _plain(optim)
        # plain containers only: checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters({"model": self.model_cfg, "algo": self.algo_cfg, "reward": self.reward_cfg,
                                   "optim": self.optim_cfg, "seed": seed})
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only the trainable weights
        self.seed = seed

        components = self._load_components(self.model_cfg)
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.tokenizer = components.tokenizer
        self.latent_scale = components.latent_scale
        lora = self.model_cfg["lora"]
        with torch.random.fork_rng(devices=[]):  # the adapters' init depends on the seed alone
            torch.manual_seed(seed)
            make_trainable(self.unet, lora["enabled"], lora["rank"], lora["alpha"], lora["targets"], lora["init"])
        backend = self.algo_cfg.get("compile_backend", "inductor")
        fused = self.algo_cfg.get("fused_lora", "auto")
        if lora["enabled"] and resolve_fused_lora(fused, self.algo_cfg.get("compile"), backend):
            log.info("algo.fused_lora=%s: %d LoRA Linear layers run as one autograd node each", str(fused).lower(),
                     fuse_lora_layers(self.unet))
        elif lora["enabled"] and fused == "auto":
            log.info("algo.fused_lora=auto: PEFT's LoRA forward, which inductor fuses itself (it compiles the UNet)")
        if self.model_cfg.get("gradient_checkpointing"):
            self.unet.enable_gradient_checkpointing()
        pin_attention_backend(self.unet, self.algo_cfg.get("attention_backend"))  # before compiling: graphs trace it
        apply_speed_options(self.unet, bool(self.algo_cfg.get("channels_last")), self.algo_cfg.get("compile"), backend,
                            inductor_mode=inductor_mode(self.algo_cfg.get("compile_mode"),
                                                        self.algo_cfg.get("compile"), backend),
                            layout_optimization=bool(self.algo_cfg.get("compile_layout_optimization", False)))
        compile = self.algo_cfg.get("compile")
        checked = compile_mode(compile) != "off" and self.algo_cfg.get("compile_check", True)
        self.compile_check = (CompiledGradientCheck(f"algo.compile={str(compile).lower()}, "
                                                    f"algo.compile_backend={backend}") if checked else None)
        reward_kwargs = {k: v for k, v in self.reward_cfg.items() if k not in ("name", "_target_")}
        self.reward_fn = build_reward(self.reward_cfg["name"], **reward_kwargs)

        self.components = components  # the same modules, for encode_prompts (family, tokenizers)
        self.text_encoder_2 = components.text_encoder_2  # SDXL (else None): registered, so it moves with the module
        self.step_kind = components.step_kind  # "ddim" | "lcm"
        self.scheduler = make_policy_scheduler(
            components, self.model_cfg["spacing"], self.model_cfg.get("steps_offset")
        )
        self.register_buffer(
            "timesteps", timestep_schedule(self.scheduler, self.algo_cfg["num_steps"]), persistent=False
        )
        check_training_schedule(self.timesteps, self.step_kind, self.model_cfg["spacing"],
                                self.model_cfg.get("steps_offset"))
        size = components.latent_size(self.model_cfg.get("resolution"))
        self.latent_shape = (self.unet.config.in_channels, size, size)

        tracker = self.algo_cfg["tracker"]
        self.tracker = PerStepPromptStatTracker(tracker["buffer_size"], tracker["min_count"])
        self.total_queries = 0  # reward-model calls, all ranks
        self.total_samples = 0  # trajectories (images) generated, all ranks
        self.resumed_iterations: int | None = None  # iterations of the checkpoint this fit resumes (the header says)
        self.resumed_optimizer_steps = 0  # its optimizer steps: the header counts the run's length from them
        self._grad_norms: list[Tensor] = []  # pre-clip gradient norms of this iteration's optimizer steps
        self.last_iteration: dict[str, Any] = {}  # phase times and counts of the last iteration (benchmarks)
        self.latest: dict[str, Any] = {}  # last iteration's images and rewards, for callbacks (rank-local, CPU)
        # pairs whose images ``latest`` keeps: a callback that shows images raises it in its setup. Copying all of
        # them would move ~300 MB per iteration off the GPU at the reference batch for a grid of 8 prompts
        self.latest_image_pairs = 0

    # ------------------------------------------------------------------------------------------ setup
    @staticmethod
    def _load_components(cfg: dict):
        source = cfg["source"]
        if source == TINY:
            spec = TinySpec(**{k: tuple(v) if isinstance(v, list) and k != "words" else v
                               for k, v in cfg["tiny"].items()})
            source = str(ensure_tiny_pipeline(cfg["cache_dir"], spec))
        return load_components(
            source,
            revision=cfg.get("revision"),
            variant=cfg.get("variant"),
            weight_dtype=cfg.get("weight_dtype", "fp32"),
            local_files_only=cfg.get("local_files_only", False),
            vae_source=cfg.get("vae_source"),
            step_kind=cfg.get("step_kind", "auto"),
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_adamw((p for p in self.unet.parameters() if p.requires_grad), self.optim_cfg, self.device)

    def setup(self, stage: str) -> None:
        """Before the model moves to its device: frozen UNet layers in the autocast dtype, when asked."""
        if self.algo_cfg.get("low_precision_base"):  # idempotent: a second fit finds them cast already
            precision = str(self.trainer.precision)
            dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
            layers = cast_frozen_layers(self.unet, dtype)
            log.info("algo.low_precision_base: %d frozen UNet Linear/Conv2d layers stored in %s (trainer.precision=%s)",
                     layers, str(dtype).removeprefix("torch."), precision)

    def on_fit_start(self) -> None:
        # a pinned attention kernel this device cannot run fails here, clearly, before any work
        check_attention_backend(self.unet, self.device, self.trainer.precision_plugin.forward_context)
        prompts = getattr(self.trainer.datamodule, "prompts", None)
        if prompts is not None:  # a prompt the reward cannot score fails now, not at the first scoring
            self.reward_fn.check_prompts(prompts, "data.source")
            distinct = list(dict.fromkeys(prompts))
            long = truncated_prompts(self.tokenizer, distinct) if self.global_rank == 0 else []
            if long:
                log.warning("%d of the %d distinct prompts of data.source exceed the text encoder's %d tokens and are "
                            "cut there, as diffusers' pipelines cut them (e.g. %r)", len(long), len(distinct),
                            self.tokenizer.model_max_length, long[0][:120])
        if self.algo_cfg.get("overlap_scoring") and self.device.type == "cpu" and self.global_rank == 0:
            log.warning("algo.overlap_scoring on CPU: the scoring thread and sampling share the cores (2 cores, 2 "
                        "torch threads: sampling ran 1.75x slower, benchmarks/README.md); it is meant for GPUs")

    def on_train_epoch_start(self) -> None:
        # Lightning switches every submodule to train mode; the frozen parts must stay deterministic.
        for frozen in (self.vae, self.text_encoder, self.text_encoder_2, self.reward_fn):
            if frozen is not None:
                frozen.eval()

    def _generators(self, stream: int, first: int, count: int, device: torch.device | str) -> list[torch.Generator]:
        """One generator per global index ``first .. first+count-1`` of ``stream`` in this epoch."""
        return [torch.Generator(device=device).manual_seed(iteration_seed(self.seed, self.current_epoch, i, stream))
                for i in range(first, first + count)]

    def _rank_and_world(self) -> tuple[int, int]:
        """(global rank, world size); (0, 1) outside a Trainer."""
        return (self.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)

    def _pair_offset(self, num_pairs: int) -> int:
        """Global index of this rank's first pair: every rank holds the same number of pairs (data.py)."""
        return self._rank_and_world()[0] * num_pairs

    # ------------------------------------------------------------------------------------ the phases
    def sample(self, prompts: list[str], on_step: Callable[[], None] | None = None) -> PairTrajectories:
        """Phase 1: roll out one pair per prompt, ``sample_batch_size`` prompts per UNet call."""
        return PairTrajectories.concat(self.sample_chunks(prompts, on_step))

    def sample_chunks(self, prompts: list[str], on_step: Callable[[], None] | None = None
                      ) -> Iterator[PairTrajectories]:
        """Phase 1, a chunk of ``sample_batch_size`` prompts at a time, each yielded when all its steps are done.

        Each pair's noise comes from its own (seed, epoch, global pair index) generator, so this rank draws only
        its own pairs' noise and they get what they would get in one process, whatever the chunk size.
        """
        a = self.algo_cfg
        num_pairs = len(prompts)
        generators = self._generators(NOISE_STREAM, self._pair_offset(num_pairs), num_pairs, self.device)
        image_size = self.latent_shape[-1] * self.components.vae_scale_factor
        cond = Conditioning.cat([
            encode_prompts(self.components, prompts[start : start + a["sample_batch_size"]], image_size,
                           self.model_cfg.get("guidance_scale"))
            for start in range(0, num_pairs, a["sample_batch_size"])
        ])
        return sample_pair_chunks(self.unet, self.scheduler, prompts, cond, self.timesteps, self.latent_shape,
                                  a["eta"], generators, step_kind=self.step_kind,
                                  unet_batch_size=a["sample_batch_size"], on_step=on_step)

    def score(self, traj: PairTrajectories, timings: dict[str, float] | None = None,
              first_pair: int | None = None) -> PairRewards:
        """Phase 2: dense rewards from a few exact reward queries per trajectory (random anchors per global
        trajectory index; ``first_pair``: the global index of ``traj``'s first pair, by default that of this
        rank's whole batch)."""
        d = self.algo_cfg["dense"]
        generators = None
        if d["anchor"] == "random":
            first = 2 * (self._pair_offset(traj.num_pairs) if first_pair is None else first_pair)
            generators = self._generators(QUERY_STREAM, first, 2 * traj.num_pairs, "cpu")
        return score_pairs(
            traj, self.vae, self.latent_scale, self.reward_fn, d["anchor"], d["num_anchors"],
            d["include_endpoints"], generators, self.algo_cfg["decode_batch_size"], timings=timings,
        )

    def sample_and_score(self, prompts: list[str], timings: dict[str, float]) -> tuple[PairTrajectories,
                                                                                        PairRewards]:
        """Phases 1 and 2. With ``algo.overlap_scoring`` each chunk of ``sample_batch_size`` prompts is decoded
        and scored in the background (``sdpo.overlap``) while the next chunk samples; the results are the same.

        Fills ``timings`` with "sampling" and "rewards" wall seconds (with overlap, "rewards" is only the scoring
        left after the last chunk sampled) and the decode and reward-model seconds ("decode", "reward_model").
        """
        tic = self._lap(timings, None, 0.0)
        progress = PhaseProgress(self._trainer)
        unet_calls = self.algo_cfg["num_steps"] * math.ceil(len(prompts) / self.algo_cfg["sample_batch_size"])
        if not self.algo_cfg.get("overlap_scoring", False):
            with progress.phase("sampling", unet_calls) as advance:
                traj = self.sample(prompts, advance)
            tic = self._lap(timings, "sampling", tic)
            parts: dict[str, float] = {}
            rewards = self.score(traj, parts)
            self._lap(timings, "rewards", tic)  # decode + reward model + interpolation
            timings["decode"], timings["reward_model"] = parts["decode"], parts["reward"]
            return traj, rewards
        chunks: list[PairTrajectories] = []
        first_pair = self._pair_offset(len(prompts))  # global index of the next chunk's first pair
        with BackgroundScorer(self.score, self.device) as scorer:
            with progress.phase("sampling", unet_calls) as advance:
                for chunk in self.sample_chunks(prompts, advance):
                    scorer.submit(chunk, first_pair)
                    first_pair += chunk.num_pairs
                    chunks.append(chunk)
            synchronize_stream(self.device)  # this stream only: the clock reads sampling, not the scoring beside it
            timings["sampling"] = time.perf_counter() - tic
            tic = time.perf_counter()
            traj = PairTrajectories.concat(chunks)
            rewards = scorer.results()
        self._lap(timings, "rewards", tic)
        timings["decode"], timings["reward_model"] = scorer.timings["decode"], scorer.timings["reward"]
        return traj, rewards

    def advantages(self, prompts: list[str], dense: Tensor) -> Tensor:
        """Phase 3: returns-to-go, normalised per (prompt, step) over the batch gathered from all ranks.

        ``dense`` is [P, 2, T]; returns advantages [P, 2, T] for this rank's pairs. Every rank updates its
        tracker with the same gathered batch, so the trackers stay identical without broadcasting them.
        """
        returns = discounted_returns(dense.flatten(0, 1), self.algo_cfg["gamma"])  # [2P, T]
        row_prompts = [p for p in prompts for _ in (0, 1)]
        all_prompts, all_returns = self._gather(row_prompts, returns)
        adv = self.tracker.update(all_prompts, all_returns)  # [W*2P, T]
        n = returns.shape[0]
        mine = adv[self.global_rank * n : (self.global_rank + 1) * n]
        return mine.view_as(dense).to(dense.device)

    def _gather(self, prompts: list[str], values: Tensor) -> tuple[list[str], Tensor]:
        """Prompts and ``values`` [n, ...] of all ranks, in rank order (= global pair order)."""
        if self.trainer.world_size == 1 or not dist.is_initialized():
            return prompts, values
        gathered: list[list[str]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, prompts)
        return [p for part in gathered for p in part], self._gather_values(values)

    def _gather_values(self, values: Tensor) -> Tensor:
        """``values`` [n, ...] of all ranks concatenated in rank order, [W*n, ...]."""
        if self.trainer.world_size == 1 or not dist.is_initialized():
            return values
        # torch's collective itself: Lightning's all_gather goes through torch.distributed.nn, deprecated (a
        # FutureWarning per rank), for the gradients these statistics never need
        values = values.contiguous().to(self.device)  # NCCL gathers CUDA tensors only; gloo, CPU ones
        parts = [torch.empty_like(values) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, values)
        return torch.cat(parts)

    def _update_plan(self, num_pairs: int, num_steps: int, generators: list[torch.Generator]):
        """One pass's optimizer steps (see ``sdpo.algo.shuffle.update_groups``) on this rank's shards."""
        a = self.algo_cfg
        num_shards = len(generators)
        if num_pairs % num_shards or a["micro_batch_pairs"] % num_shards:
            raise ValueError(
                f"algo.shuffle_shards={num_shards} must divide the pairs per rank ({num_pairs}) and "
                f"algo.micro_batch_pairs ({a['micro_batch_pairs']})"
            )
        orders, step_order = sharded_update_order(num_pairs // num_shards, num_steps, generators)
        orders = [order.to(self.device) for order in orders]
        return update_groups(orders, step_order.to(self.device), a["micro_batch_pairs"] // num_shards,
                             a["gradient_accumulation_steps"])

    def train_on_pairs(self, traj: PairTrajectories, adv: Tensor) -> dict[str, float]:
        """Phase 4: step-shuffled updates; ``adv`` is [P, 2, T]. Returns diagnostics averaged over micro-batches
        (and over ranks; maxima for the ``*_max`` ones).

        One optimizer step per update group of ``micro_batch_pairs x gradient_accumulation_steps`` pairs: each
        micro-batch's loss is its pairs' summed loss over the group's pair count, so the step is the group's mean
        whatever the split (tests/unit/test_accumulation.py). Only the group's last backward all-reduces.

        A group's checks (finite loss, valid timesteps) never stall the GPU in a LoRA run: they are read one step
        late and a failed step is undone (``sdpo.algo.checked_steps``), so training stops with the weights of
        before the bad step. A full fine-tune reads them before its step.
        """
        a = self.algo_cfg
        optimizer = self.optimizers()
        num_pairs, num_steps = traj.num_pairs, traj.num_steps
        num_shards = a.get("shuffle_shards", 1)
        generators = self._generators(SHUFFLE_STREAM, self.global_rank * num_shards, num_shards, "cpu")
        weight_of_step = temporal_weights(torch.arange(num_steps, device=self.device), a["temporal_lambda"],
                                          a["temporal_eta"])  # [T]
        steps_guard = CheckedSteps(getattr(optimizer, "optimizer", optimizer), lagged=self._lagged_checks())
        sums: dict[str, Tensor] = {}
        count = 0
        first_ratio = torch.zeros((), device=self.device)
        optimizer_steps = 0
        self._grad_norms = []
        total = count_update_groups(num_pairs, num_steps, a["micro_batch_pairs"], a["gradient_accumulation_steps"],
                                    a["num_inner_epochs"])
        with steps_guard, PhaseProgress(self._trainer).phase("training", total) as advance:
            for _ in range(a["num_inner_epochs"]):
                for group in self._update_plan(num_pairs, num_steps, generators):
                    if self.compile_check is not None and self.compile_check.due:
                        self._check_compiled_gradients(traj, *group[0])
                    with collected_checks() as checks:  # the group's step checks, and its loss's
                        ratio = self._group_backward(traj, adv, group, weight_of_step, sums)
                    count += len(group)
                    if optimizer_steps == 0:
                        first_ratio = ratio
                    steps_guard.step(checks, lambda: self._optimizer_step(optimizer))
                    optimizer_steps += 1
                    advance()
        stats = {k: v / count for k, v in sums.items()}
        stats.update(grad_norm_stats(self._grad_norms))
        stats["first_update_log_ratio_abs_max"] = first_ratio
        stats = self._reduce_stats(stats)
        stats["optimizer_steps"] = float(optimizer_steps)
        return stats

    def _group_backward(self, traj: PairTrajectories, adv: Tensor, group: list[tuple[Tensor, Tensor]],
                        weight_of_step: Tensor, sums: dict[str, Tensor]) -> Tensor:
        """Forward and backward of one update group's micro-batches (gradients accumulate, only the last backward
        all-reduces); adds their diagnostics to ``sums``, queues the check of the group's loss, and returns the
        group's largest |log ratio|."""
        a = self.algo_cfg
        no_sync = getattr(self.trainer.strategy, "block_backward_sync", nullcontext)
        group_pairs = sum(idx.shape[0] for idx, _ in group)
        group_loss = torch.zeros((), device=self.device)
        ratio = torch.zeros((), device=self.device)
        for k, (idx, steps) in enumerate(group):
            log_prob = self._micro_batch_log_probs(traj, idx, steps)  # [B, 2]
            old = traj.log_probs[idx, :, steps]  # [B, 2]
            advs = adv[idx, :, steps]  # [B, 2]
            loss, info = sdpo_loss(log_prob[:, 0], log_prob[:, 1], old[:, 0], old[:, 1], advs[:, 0], advs[:, 1],
                                   weight_of_step[steps], a["clip_range"], a["adv_clip_max"])
            with no_sync() if k < len(group) - 1 else nullcontext():
                self.manual_backward(loss * (idx.shape[0] / group_pairs))
            detached = loss.detach()
            group_loss = group_loss + detached
            ratio = torch.maximum(ratio, info["log_ratio_abs_max"])
            for key, value in info.items():
                sums[key] = sums.get(key, 0.0) + value
            sums["loss"] = sums.get("loss", 0.0) + detached
        require_not(~torch.isfinite(group_loss), lambda: FloatingPointError(
            f"non-finite SDPO loss at epoch {self.current_epoch}, steps {torch.cat([s for _, s in group]).tolist()}; "
            f"try trainer.precision=32-true or a lower optim.lr"
        ))
        return ratio

    def _check_compiled_gradients(self, traj: PairTrajectories, idx: Tensor, steps: Tensor) -> None:
        """The compiled UNet's gradients against eager ones on this micro-batch (``sdpo.policy.compile_check``),
        before an optimizer step uses them."""
        params = {name: p for name, p in self.unet.named_parameters() if p.requires_grad}

        def worst_of_all_ranks(worst: float) -> float:
            return float(self._gather_values(torch.tensor([worst], device=self.device)).max())

        # the mean, not the sum: gradients in range under 16-mixed too, where no loss scale applies here
        self.compile_check.run(lambda: self._micro_batch_log_probs(traj, idx, steps).mean(), params,
                               worst_of_all_ranks)

    @staticmethod
    def _optimizer_step(optimizer) -> None:
        optimizer.step()  # clips in on_before_optimizer_step, after AMP has unscaled the gradients
        optimizer.zero_grad(set_to_none=True)

    def _lagged_checks(self) -> bool:
        """Read each step's checks one step late, undoing it if they failed (``sdpo.algo.checked_steps``): LoRA
        runs, whose snapshot is small. A full fine-tune reads them before its step."""
        return bool(self.model_cfg["lora"]["enabled"])

    def _reduce_stats(self, stats: dict[str, Tensor]) -> dict[str, float]:
        """Diagnostics of all ranks: mean, or max for the ``_MAX_STATS``; one gather, one host sync."""
        names = list(stats)
        values = torch.stack([stats[n].detach().float().to(self.device).reshape(()) for n in names])  # [k]
        everything = self._gather_values(values.unsqueeze(0))  # [W, k]
        reduced = [everything[:, i].max() if n in _MAX_STATS else everything[:, i].mean() for i, n in enumerate(names)]
        return dict(zip(names, torch.stack(reduced).tolist(), strict=True))

    def _micro_batch_log_probs(self, traj: PairTrajectories, idx: Tensor, steps: Tensor) -> Tensor:
        """Current log-probs [B, 2] of both trajectories of pairs ``idx`` at their ``steps``, one UNet call."""
        b = idx.shape[0]
        latents = traj.latents[idx, :, steps].flatten(0, 1)  # [2B, C, H, W]
        next_latents = traj.latents[idx, :, steps + 1].flatten(0, 1)  # [2B, C, H, W]
        timesteps = traj.timesteps[steps].repeat_interleave(2)  # [2B]
        cond = traj.cond.select(idx).repeat_pairs()  # [2B, ...]
        log_prob = transition_log_prob(self.unet, self.scheduler, latents, timesteps, next_latents, cond,
                                       self.algo_cfg["eta"], step_kind=self.step_kind)
        return log_prob.view(b, 2)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip the gradient norm here: Lightning calls this hook after AMP has unscaled the gradients of a foreach
        optimizer (clipping before ``optimizer.step()`` would clip the loss-scaled ones under 16-mixed), and
        ``clip_gradients`` unscales those of a fused one. Grads are already averaged over ranks, so every rank clips
        identically. Keeps the pre-clip norm, without a host sync."""
        norm = clip_gradients(optimizer, self.algo_cfg["max_grad_norm"],
                              getattr(self.trainer.precision_plugin, "scaler", None))
        if norm is not None:
            self._grad_norms.append(norm)

    # ------------------------------------------------------------------------------------ the iteration
    def training_step(self, batch: list[str], batch_idx: int) -> None:
        prompts = list(batch)
        timings: dict[str, float] = {}
        with self._diverged_in("sampling"):
            traj, rewards = self.sample_and_score(prompts, timings)
        tic = self._lap(timings, None, 0.0)

        adv = self.advantages(prompts, rewards.dense)
        tic = self._lap(timings, "advantages", tic)

        with self._diverged_in("training"):
            stats = self.train_on_pairs(traj, adv)
        self._lap(timings, "training", tic)
        self._log_iteration(prompts, rewards, stats, timings)
        # what benchmarks/epoch.py needs to time the same work in isolation (this rank's counts)
        self.last_iteration = {"timings": timings, "num_pairs": traj.num_pairs, "num_queries": rewards.num_queries,
                               "optimizer_steps": int(stats["optimizer_steps"])}

    @contextmanager
    def _diverged_in(self, phase: str) -> Iterator[None]:
        """Say where a non-finite value arose: the iteration, its phase, and what the policy was then. A NaN while
        sampling means the weights the last optimizer step left (and so the newest checkpoint) have diverged."""
        try:
            yield
        except FloatingPointError as error:
            epoch, steps, lr = self.current_epoch, self.global_step, self.optim_cfg.get("lr")
            if phase == "sampling":
                where = (f"while sampling iteration {epoch}, with the policy after {steps} optimizer steps: those "
                         f"weights have diverged (so has a checkpoint written after them)")
            else:
                where = (f"while training on iteration {epoch}'s samples, after {steps} optimizer steps: the "
                         f"checkpoint of the iteration before may still be sound")
            raise FloatingPointError(f"{error}; {where}. Lower optim.lr (now {lr}) or algo.max_grad_norm") from error

    def _lap(self, timings: dict[str, float], name: str | None, tic: float) -> float:
        """Record the seconds since ``tic`` as phase ``name`` (GPU work included) and restart the clock."""
        synchronize(self.device)
        now = time.perf_counter()
        if name is not None:
            timings[name] = now - tic
        return now

    def _log_iteration(self, prompts: list[str], rewards: PairRewards, stats: dict[str, float],
                       timings: dict[str, float]) -> None:
        num_steps = rewards.dense.shape[-1]
        dense = rewards.dense  # [P, 2, T]
        local = torch.stack([
            dense[:, 0, 0],  # 1-step reward, once per pair (a and b share it)
            dense[:, :, -1].mean(1),  # T-step reward, mean of a and b
        ], dim=1)  # [P, 2]
        everything = self._gather_values(local)  # [W*P, 2]
        counts = torch.tensor([rewards.num_queries, 2 * dense.shape[0]], device=self.device, dtype=torch.float64)
        counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        self.total_queries += int(counts[0])
        self.total_samples += int(counts[1])
        for name, (first, last) in rewards.components.items():  # a multi-reward's parts, each on its own
            parts = self._gather_values(torch.stack([first, last.mean(1)], dim=1))
            stats[f"reward_{name}_1step"] = float(parts[:, 0].mean())
            stats[f"reward_{name}_last"] = float(parts[:, 1].mean())
        metrics = {
            "train/reward_1step": everything[:, 0].mean(),
            "train/reward_1step_std": everything[:, 0].std(unbiased=False),
            f"train/reward_{num_steps}step": everything[:, 1].mean(),
            "train/reward_last": everything[:, 1].mean(),
            "train/reward_last_std": everything[:, 1].std(unbiased=False),
            "train/reward_queries": float(self.total_queries),
            "train/samples": float(self.total_samples),
            "train/queries_per_trajectory": float(counts[0] / counts[1]),
            **{f"train/{k}": v for k, v in stats.items()},
            **{f"tracker/{k}": v for k, v in self.tracker.stats().items()},
            **{f"time/{k}": v for k, v in timings.items()},
        }
        self.log_dict({k: float(v) for k, v in metrics.items()}, on_step=False, on_epoch=True, sync_dist=False,
                      batch_size=1)
        self.log_dict({"reward_1step": float(metrics["train/reward_1step"]),
                       "reward_last": float(metrics["train/reward_last"])}, prog_bar=True, logger=False,
                      on_step=False, on_epoch=True, batch_size=1)
        self.latest = {
            "prompts": prompts,
            "first_images": rewards.first_images[:self.latest_image_pairs].detach().float().cpu(),  # [k, 3, H, W]
            "last_images": rewards.last_images[:self.latest_image_pairs].detach().float().cpu(),  # [k, 2, 3, H, W]
            "first_rewards": dense[:, 0, 0].detach().cpu(),
            "last_rewards": dense[:, :, -1].detach().cpu(),
            "num_steps": num_steps,
        }

    # ------------------------------------------------------------------------------------ checkpoints
    def _trainable_names(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable weights (LoRA or full UNet) plus the state that makes resume exact."""
        keep = self._trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["sdpo"] = {
            "tracker": self.tracker.state_dict(),
            "total_queries": self.total_queries,
            "total_samples": self.total_samples,
            "torch_rng": torch.get_rng_state(),
            "wandb_run_id": wandb_run_id(self.trainer.loggers),  # a resumed run logs into the same W&B run
            "global_pairs": self._global_pairs(),  # a resume with another global batch is told it differs
        }

    def _global_pairs(self) -> int | None:
        """Prompt pairs per iteration over all processes (None outside a Trainer, e.g. in ``sdpo.export``, or
        without the framework's datamodule)."""
        trainer = self._trainer
        per_rank = getattr(getattr(trainer, "datamodule", None), "prompts_per_iteration", None)
        return None if trainer is None or per_rank is None else int(per_rank) * trainer.world_size

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = self._trainable_names() - set(checkpoint["state_dict"])
        if missing:
            raise KeyError(
                f"checkpoint lacks {len(missing)} trainable weights (e.g. {sorted(missing)[:3]}); it was written "
                f"with a different model.lora setting — resume with the config it was trained with"
            )
        state = checkpoint.get("sdpo", {})
        if "tracker" in state:
            self.tracker.load_state_dict(state["tracker"])
        self.total_queries = int(state.get("total_queries", 0))
        self.total_samples = int(state.get("total_samples", 0))
        self.resumed_iterations = iterations_done(checkpoint)
        self.resumed_optimizer_steps = int(checkpoint.get("global_step", 0))
        saved_pairs, pairs = state.get("global_pairs"), self._global_pairs()
        if saved_pairs and pairs and saved_pairs != pairs and self._trainer.global_rank == 0:
            log.warning("the checkpoint trained on %d prompt pairs per iteration over all processes, this run draws %d "
                        "(data.prompts_per_batch x data.batches_per_epoch x processes): it continues, but not as the "
                        "original run would have; keep the product equal to resume exactly", saved_pairs, pairs)
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])

