"""The SDPO LightningModule: one training step = one SDPO iteration.

sample pairs (dual state) -> dense rewards (few exact queries) -> stepwise advantages (gathered over ranks)
-> step-shuffled reward-difference updates. Manual optimization: many optimizer steps per iteration, every
backward goes through ``manual_backward`` so Lightning's DDP syncs the LoRA gradients of every micro-batch.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from sdpo.algo.advantages import PerStepPromptStatTracker, discounted_returns
from sdpo.algo.losses import sdpo_loss, temporal_weights
from sdpo.algo.shuffle import micro_batches, shuffled_update_order
from sdpo.data import iteration_seed
from sdpo.policy.conditioning import encode_prompts
from sdpo.policy.loading import TINY, TinySpec, ensure_tiny_pipeline, load_components
from sdpo.policy.lora import make_trainable
from sdpo.policy.rollout import PairTrajectories, sample_pairs, transition_log_prob
from sdpo.policy.steps import make_policy_scheduler, timestep_schedule
from sdpo.rewards import build_reward
from sdpo.scoring import PairRewards, score_pairs

# Independent random streams per (seed, epoch, rank): derived, never stored, so resume is exact by construction.
NOISE_STREAM, QUERY_STREAM, SHUFFLE_STREAM = 11, 12, 13


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
        if self.model_cfg.get("gradient_checkpointing"):
            self.unet.enable_gradient_checkpointing()
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
        size = components.latent_size(self.model_cfg.get("resolution"))
        self.latent_shape = (self.unet.config.in_channels, size, size)

        tracker = self.algo_cfg["tracker"]
        self.tracker = PerStepPromptStatTracker(tracker["buffer_size"], tracker["min_count"])
        self.total_queries = 0  # reward-model calls, all ranks
        self.total_samples = 0  # trajectories (images) generated, all ranks
        self.latest: dict[str, Any] = {}  # last iteration's images and rewards, for callbacks (rank-local, CPU)

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
        o = self.optim_cfg
        params = [p for p in self.unet.parameters() if p.requires_grad]
        return torch.optim.AdamW(
            params, lr=o["lr"], betas=tuple(o["betas"]), weight_decay=o["weight_decay"], eps=o["eps"]
        )

    def on_train_epoch_start(self) -> None:
        # Lightning switches every submodule to train mode; the frozen parts must stay deterministic.
        for frozen in (self.vae, self.text_encoder, self.text_encoder_2, self.reward_fn):
            if frozen is not None:
                frozen.eval()

    def _generator(self, stream: int) -> torch.Generator:
        seed = iteration_seed(self.seed, self.current_epoch, self.global_rank, stream)
        return torch.Generator(device=self.device).manual_seed(seed)

    # ------------------------------------------------------------------------------------ the phases
    def sample(self, prompts: list[str]) -> PairTrajectories:
        """Phase 1: roll out one pair per prompt, ``sample_batch_size`` prompts per UNet call."""
        a = self.algo_cfg
        generator = self._generator(NOISE_STREAM)
        image_size = self.latent_shape[-1] * self.components.vae_scale_factor
        chunks = []
        for start in range(0, len(prompts), a["sample_batch_size"]):
            chunk = prompts[start : start + a["sample_batch_size"]]
            embeds = encode_prompts(self.components, chunk, image_size, self.model_cfg.get("guidance_scale"))
            chunks.append(sample_pairs(self.unet, self.scheduler, chunk, embeds, self.timesteps,
                                       self.latent_shape, a["eta"], generator, step_kind=self.step_kind))
        return PairTrajectories.concat(chunks)

    def score(self, traj: PairTrajectories) -> PairRewards:
        """Phase 2: dense rewards from a few exact reward queries per trajectory."""
        d = self.algo_cfg["dense"]
        return score_pairs(
            traj, self.vae, self.latent_scale, self.reward_fn, d["anchor"], d["num_anchors"],
            d["include_endpoints"], self._generator(QUERY_STREAM), self.algo_cfg["decode_batch_size"],
        )

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
        if self.trainer.world_size == 1 or not dist.is_initialized():
            return prompts, values
        gathered: list[list[str]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, prompts)
        all_values = self.all_gather(values)  # [W, n, T]
        return [p for part in gathered for p in part], all_values.flatten(0, 1)

    def train_on_pairs(self, traj: PairTrajectories, adv: Tensor) -> dict[str, float]:
        """Phase 4: step-shuffled updates; ``adv`` is [P, 2, T]. Returns averaged diagnostics."""
        a = self.algo_cfg
        optimizer = self.optimizers()
        num_pairs, num_steps = traj.num_pairs, traj.num_steps
        generator = torch.Generator().manual_seed(
            iteration_seed(self.seed, self.current_epoch, self.global_rank, SHUFFLE_STREAM)
        )
        accum = a["gradient_accumulation_steps"]
        sums: dict[str, float] = {}
        count = 0
        first_ratio = 0.0
        optimizer_steps = 0
        for _ in range(a["num_inner_epochs"]):
            pair_order, step_order = shuffled_update_order(num_pairs, num_steps, generator)
            batches = micro_batches(pair_order, a["micro_batch_pairs"])
            total = num_steps * len(batches)
            done = 0
            for column in range(num_steps):
                for idx in batches:
                    steps = step_order[idx, column].to(self.device)  # [B] step index per pair
                    idx = idx.to(self.device)
                    log_prob = self._micro_batch_log_probs(traj, idx, steps)  # [B, 2]
                    old = traj.log_probs[idx, :, steps]  # [B, 2]
                    advs = adv[idx, :, steps]  # [B, 2]
                    weights = temporal_weights(steps, a["temporal_lambda"], a["temporal_eta"])
                    loss, info = sdpo_loss(log_prob[:, 0], log_prob[:, 1], old[:, 0], old[:, 1], advs[:, 0],
                                           advs[:, 1], weights, a["clip_range"], a["adv_clip_max"])
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"non-finite SDPO loss at epoch {self.current_epoch}, steps {steps.tolist()}; "
                            f"try trainer.precision=32-true or a lower optim.lr"
                        )
                    group = min(accum, total - (done // accum) * accum)  # micro-batches in this optimizer step
                    self.manual_backward(loss / group)
                    done += 1
                    if optimizer_steps == 0:
                        first_ratio = max(first_ratio, float(info["log_ratio_abs_max"]))
                    if done % accum == 0 or done == total:
                        grad_norm = self._clip_and_norm(optimizer)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        optimizer_steps += 1
                        sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm
                    for key, value in info.items():
                        sums[key] = sums.get(key, 0.0) + float(value)
                    sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                    count += 1
        stats = {k: v / (optimizer_steps if k == "grad_norm" else count) for k, v in sums.items()}
        stats["first_update_log_ratio_abs_max"] = first_ratio
        stats["optimizer_steps"] = float(optimizer_steps)
        return stats

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

    def _clip_and_norm(self, optimizer) -> float:
        max_norm = self.algo_cfg["max_grad_norm"]
        params = [p for p in self.unet.parameters() if p.requires_grad and p.grad is not None]
        self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
        if not params:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params])))

    # ------------------------------------------------------------------------------------ the iteration
    def training_step(self, batch: list[str], batch_idx: int) -> None:
        prompts = list(batch)
        timings: dict[str, float] = {}
        tic = time.perf_counter()
        traj = self.sample(prompts)
        timings["sampling"] = time.perf_counter() - tic

        tic = time.perf_counter()
        rewards = self.score(traj)
        timings["rewards"] = time.perf_counter() - tic

        tic = time.perf_counter()
        adv = self.advantages(prompts, rewards.dense)
        timings["advantages"] = time.perf_counter() - tic

        tic = time.perf_counter()
        stats = self.train_on_pairs(traj, adv)
        timings["training"] = time.perf_counter() - tic
        self._log_iteration(prompts, rewards, stats, timings)

    def _log_iteration(self, prompts: list[str], rewards: PairRewards, stats: dict[str, float],
                       timings: dict[str, float]) -> None:
        num_steps = rewards.dense.shape[-1]
        dense = rewards.dense  # [P, 2, T]
        local = torch.stack([
            dense[:, 0, 0],  # 1-step reward, once per pair (a and b share it)
            dense[:, :, -1].mean(1),  # T-step reward, mean of a and b
        ], dim=1)  # [P, 2]
        _, everything = self._gather(prompts, local)
        counts = torch.tensor([rewards.num_queries, 2 * dense.shape[0]], device=self.device, dtype=torch.float64)
        counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        self.total_queries += int(counts[0])
        self.total_samples += int(counts[1])
        for name, (first, last) in rewards.components.items():  # a multi-reward's parts, each on its own
            _, parts = self._gather(prompts, torch.stack([first, last.mean(1)], dim=1))
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
            "first_images": rewards.first_images.detach().float().cpu(),
            "last_images": rewards.last_images.detach().float().cpu(),
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
        }

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
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])

