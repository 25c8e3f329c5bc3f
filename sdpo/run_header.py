"""What a run is about to do, printed once when fitting starts.

The numbers a researcher checks before leaving a job to run: which weights train and how many, what stays frozen
and in which dtype, one iteration's work (prompts, trajectories, steps, reward queries, optimizer steps), and how
many iterations the run makes (which limit ends it).
It replaces Lightning's model summary by default: that table's FLOPs column reads 0 without an example input,
and its count of modules "in eval mode" reads like a bug, although the policy samples and trains in eval mode on
purpose (no dropout, so the recomputed log-probs match the sampled ones).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities import rank_zero_only

from sdpo.algo.shuffle import count_update_groups
from sdpo.run_log import report


def count(n: int) -> str:
    """A parameter count as people read it: 866.7 M, 829.9 K, 12."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f} {suffix}"
    return str(n)


def optimizer_steps_per_iteration(pairs_per_rank: int, algo: dict[str, Any]) -> int:
    """One optimizer step per update group, per step column, per inner epoch (``count_update_groups``)."""
    return count_update_groups(pairs_per_rank, algo["num_steps"], algo["micro_batch_pairs"],
                               algo["gradient_accumulation_steps"], algo.get("num_inner_epochs", 1))


def update_sizes(pairs_per_rank: int, micro: int, accumulation: int, world: int) -> str:
    """How many pairs each optimizer step covers: micro-batch x accumulation (x ranks), except where a step column
    has fewer pairs left (``sdpo.algo.shuffle.update_groups`` cuts each column's pairs into such groups)."""
    group = micro * accumulation
    split = f"micro-batch {micro} x {accumulation} accumulation" + (f" x {world} ranks" if world > 1 else "")
    if pairs_per_rank % group == 0:
        return f"each on {group * world} pairs ({split})"
    if pairs_per_rank < group:
        return (f"each on the {pairs_per_rank * world} pairs of a step column (all of them: fewer than {split} = "
                f"{group * world})")
    return (f"each on {group * world} pairs ({split}), the last of each step column on "
            f"{pairs_per_rank % group * world}")


def queried_steps(algo: dict[str, Any]) -> str:
    """Which steps of each trajectory get an exact reward (the rest are interpolated), in words."""
    t, dense = algo["num_steps"], algo["dense"]
    if dense["anchor"] == "all" or t <= 2:
        return f"all {t} steps (exact dense rewards)"
    anchors = min(dense["num_anchors"], t - 2)
    return f"first, last and {anchors} {dense['anchor']} anchor step(s) of {t}; the rest interpolated"


def run_length(trainer: L.Trainer, steps_per_iteration: int, trajectories_per_iteration: int,
               done: int | None = None, done_trajectories: int = 0, done_steps: int = 0) -> str:
    """How long the run is, in iterations, trajectories (the paper's sample count) and optimizer steps.

    ``trainer.max_steps`` counts optimizer steps (the module steps its optimizer by hand), but Lightning checks it
    only between iterations, so a limit inside an iteration ends the run at that iteration's end: say so. ``done``:
    the iterations a resumed checkpoint has completed, which both limits count, with its trajectories and optimizer
    steps (the checkpoint may have made them at another batch size).
    """
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    if done is None:
        done_trajectories = done_steps = 0
    limits = []
    if max_epochs is not None and max_epochs >= 0:
        limits.append((max_epochs, "trainer.max_epochs"))
    if max_steps is not None and max_steps >= 0:
        to_go = -(-max(max_steps - done_steps, 0) // steps_per_iteration)
        limits.append(((done or 0) + to_go, "trainer.max_steps"))
    or_time = " (or trainer.max_time, if sooner)" if any(isinstance(c, Timer) for c in trainer.callbacks) else ""
    if not limits:
        return f"no iteration limit (trainer.max_epochs=-1): the run goes on until stopped{or_time}"
    iterations, limit = min(limits)
    if trainer.fast_dev_run:  # Lightning sets max_epochs and max_steps from it
        limit = "trainer.fast_dev_run"
    to_go = max(iterations - (done or 0), 0)
    steps = done_steps + to_go * steps_per_iteration
    text = (f"{iterations} iteration{'' if iterations == 1 else 's'} ({limit}) = "
            f"{count(done_trajectories + to_go * trajectories_per_iteration)} trajectories, "
            f"{steps} optimizer steps{or_time}")
    if done is not None:
        text += f"; resumed after {done}: {to_go} to go"
    if limit == "trainer.max_steps" and steps != max_steps:
        text += (f"; trainer.max_steps={max_steps} falls inside an iteration and is checked only at its end, "
                 f"so the run makes {steps}")
    return text


def _dtype(module: torch.nn.Module) -> str:
    first = next(module.parameters(), None)
    return str(first.dtype).removeprefix("torch.") if first is not None else "no weights"


def precision_text(precision: str, device: str) -> str:
    """The run's precision, and on a GPU in full fp32 that TF32 is off on purpose (``sdpo.train_run.train``):
    Lightning's notice recommending it is dropped, so say why here."""
    text = f"precision {precision}"
    if precision.startswith("32") and device == "cuda":
        text += " (TF32 off: it moves log-probs by about 1e-4, the clip range)"
    return text


def run_header(module: Any, trainer: L.Trainer, pairs_per_rank: int) -> str:
    """The header's lines for ``module`` (an ``SDPOModule``) about to be fitted by ``trainer``."""
    a, lora = module.algo_cfg, module.model_cfg["lora"]
    unet = module.unet
    total = sum(p.numel() for p in unet.parameters())
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    if lora["enabled"]:
        policy = (f"LoRA r{lora['rank']} (alpha {lora['alpha']}) on {', '.join(lora['targets'])}: "
                  f"{count(trainable)} of {count(total)} params train")
    else:
        policy = f"all {count(trainable)} params train (full fine-tune)"
    frozen = [(name, part) for name in ("vae", "text_encoder", "text_encoder_2")
              if isinstance(part := getattr(module, name, None), torch.nn.Module)]
    frozen_text = " · ".join(f"{name} {type(part).__name__} {count(sum(p.numel() for p in part.parameters()))} "
                             f"{_dtype(part)}" for name, part in frozen)
    reward = module.reward_fn
    reward_params = sum(p.numel() for p in reward.parameters()) if isinstance(reward, torch.nn.Module) else 0
    parts = getattr(reward, "weights", None)  # a weighted sum (MultiReward): label -> weight
    name = module.reward_cfg["name"] + (" = " + " + ".join(f"{w:g} x {label}" for label, w in parts.items())
                                        if isinstance(parts, dict) else "")
    reward_text = (f"reward {name} ({type(reward).__name__}, "
                   f"{count(reward_params) + ' ' + _dtype(reward) if reward_params else 'no parameters'})")
    world, device = trainer.world_size, trainer.strategy.root_device.type
    timesteps = module.timesteps.tolist()
    steps = a["num_steps"]
    micro, accumulation = a["micro_batch_pairs"], a["gradient_accumulation_steps"]
    steps_per_iteration = optimizer_steps_per_iteration(pairs_per_rank, a)
    length = run_length(trainer, steps_per_iteration, 2 * world * pairs_per_rank, module.resumed_iterations,
                        module.total_samples, module.resumed_optimizer_steps)
    return "\n".join([
        f"SDPO run: {trainer.default_root_dir} · {world} process{'es' if world > 1 else ''} on {device} · "
        f"{precision_text(str(trainer.precision), device)}",
        f"  policy      {type(unet).__name__}, {module.step_kind} step: {policy}",
        f"  frozen      {frozen_text} · {reward_text}",
        f"  iteration   per rank: {pairs_per_rank} prompts x 2 trajectories x T = {steps} steps "
        f"(timesteps {timesteps[0]}..{timesteps[-1]}), {world * pairs_per_rank} prompts over all ranks",
        f"  rewards     exact at {queried_steps(a)}",
        f"  updates     {steps_per_iteration} optimizer steps per iteration, "
        f"{update_sizes(pairs_per_rank, micro, accumulation, world)}, lr {module.optim_cfg.get('lr')}",
        f"  length      {length}",
    ])


class RunHeader(L.Callback):
    """Print ``run_header`` once, on global rank 0, as fitting starts (after the models are on their device)."""

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pairs = getattr(trainer.datamodule, "prompts_per_iteration", None)  # sdpo.data.PromptDataModule
        if pairs is not None:
            report(run_header(pl_module, trainer, pairs) + "\n")
