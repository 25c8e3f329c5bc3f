"""Callbacks that turn an iteration into things a researcher looks at: sample grids, a reward summary, and
held-out evaluation at several step counts during training."""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from PIL import Image

from sdpo.callback_args import eval_problems, raise_problems, sample_grid_problems
from sdpo.commands import cli_arg
from sdpo.eval_results import cells_legend
from sdpo.grids import fit_to_grid, image_grid
from sdpo.policy.attention import torch_attention
from sdpo.rewards.base import UnscorablePrompts
from sdpo.run_log import log_file_paths, report_at_end


def is_final_iteration(trainer: L.Trainer) -> bool:
    """Whether the iteration that just ended (``on_train_epoch_end``) is the run's last.

    Any limit can end a run: ``max_epochs`` (-1: none), ``max_steps`` (optimizer steps, which Lightning checks after
    the iteration), or a stop already requested this iteration (``max_time``'s Timer, which checks after each
    batch, i.e. before this hook; early stopping). The "after the last epoch" work (checkpoint, grid, evaluation)
    must follow whichever it is.
    """
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    if max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs:
        return True
    if max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps:
        return True
    return bool(trainer.should_stop)


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that also saves after the final epoch (``is_final_iteration``), and never
    lets ``last.ckpt`` name a file that is gone.

    With ``every_n_epochs=N`` (worth raising when each checkpoint is a big full fine-tune), the stock callback skips
    the last epochs when N does not divide the run's length, and ``last.ckpt`` would silently hold an older policy
    than ``trained/``. Resuming or exporting from it must give the final weights.

    The stock order is: write the new file, delete the previous one, then move the ``last.ckpt`` link. Under DDP the
    ranks meet between those steps, so a rank that died while rank 0 wrote the checkpoint (every iteration, seconds
    for a big full fine-tune) left ``last.ckpt`` pointing at a deleted file: no restart, and a stop notice naming a
    file that does not exist. Here a superseded file is deleted only once ``last.ckpt`` names its successor, and
    ``linked_epoch`` (what the stop notice reports) moves at the same moment.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._superseded: list[str] = []  # files to delete once last.ckpt no longer names them
        self._written_epoch = -1
        self.linked_epoch = -1  # the epoch of the newest complete checkpoint that last.ckpt names (-1: none)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.linked_epoch = self._written_epoch = trainer.current_epoch - 1  # resumed: its checkpoint's epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # the stock skip: this step already saved (on schedule, just above), or fast_dev_run
        if is_final_iteration(trainer) and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.fast_dev_run:  # the stock hook writes last.ckpt even then, though fast_dev_run means none
            super().on_train_end(trainer, pl_module)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._written_epoch = trainer.current_epoch

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        self._superseded.append(filepath)  # deleted by _settle, once last.ckpt names its successor

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)  # with save_last=false: nothing to link
        self._settle(trainer)

    def _settle(self, trainer: L.Trainer) -> None:
        """``last.ckpt`` (or, without it, the newest file) now names the file just written: count its epoch as
        saved, and only now delete the files it replaced."""
        self.linked_epoch = self._written_epoch
        while self._superseded:
            super()._remove_checkpoint(trainer, self._superseded.pop(0))


def scalar_step(trainer: L.Trainer) -> int:
    """The step Lightning logs this epoch's scalars at, for images and tables logged from ``on_train_epoch_end``:
    the index of the epoch's last batch (one per iteration here). ``trainer.global_step`` counts optimizer steps,
    several per iteration, so W&B drew the sample grid of iteration 5 at step 24 next to scalars that end at 5.
    Lightning has no public name for this counter."""
    return max(0, trainer.fit_loop.epoch_loop._batches_that_stepped - 1)


class SampleGrid(L.Callback):
    """Every N epochs (and after the last), save the iteration's 1-step and T-step images with their rewards."""

    def __init__(self, dirpath: str, every_n_epochs: int = 5, max_prompts: int = 8) -> None:
        raise_problems(sample_grid_problems(every_n_epochs, max_prompts))
        self.dirpath = Path(dirpath)
        self.every_n_epochs = every_n_epochs
        self.max_prompts = max_prompts

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:  # the module keeps the images of this many pairs (it keeps none by default)
            pl_module.latest_image_pairs = max(getattr(pl_module, "latest_image_pairs", 0), self.max_prompts)

    @rank_zero_only
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        last = is_final_iteration(trainer)
        latest = getattr(pl_module, "latest", None)
        if not latest or not (epoch % self.every_n_epochs == 0 or last):
            return
        grid = self.make_grid(latest)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"epoch_{epoch:04d}.png"
        grid.save(path)
        caption = self.caption(latest, epoch)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):  # JPEG: a fraction of a PNG's size in the run's media folder
                logger.log_image(key="samples", images=[grid], step=scalar_step(trainer), caption=[caption],
                                 file_type=["jpg"])
            elif hasattr(logger, "log_image"):
                logger.log_image(key="samples", images=[grid], step=scalar_step(trainer), caption=[caption])

    def caption(self, latest: dict[str, Any], epoch: int) -> str:
        """The grid's rewards as text: W&B shows it under the image, searchable, legible at any zoom."""
        n = min(self.max_prompts, len(latest["prompts"]))
        t = latest["num_steps"]
        parts = []
        for p in range(n):
            r1, rl = float(latest["first_rewards"][p]), latest["last_rewards"][p]
            parts.append(f"{latest['prompts'][p]}: 1-step {r1:.3f}, {t}-step {float(rl[0]):.3f}/{float(rl[1]):.3f}")
        shown = f" (first {n} of {len(latest['prompts'])} prompts)" if n < len(latest["prompts"]) else ""
        return f"epoch {epoch}{shown} | " + "; ".join(parts)

    def make_grid(self, latest: dict[str, Any]) -> Image.Image:
        n = min(self.max_prompts, len(latest["prompts"]), len(latest["first_images"]))
        t = latest["num_steps"]
        firsts, scale = fit_to_grid(latest["first_images"][:n])  # [n,3,H,W]
        lasts, _ = fit_to_grid(latest["last_images"][:n])  # [n,2,3,H,W]
        rows, captions = [], []
        for p in range(n):
            rows.append([firsts[p], lasts[p, 0], lasts[p, 1]])
            r1, rl = latest["first_rewards"][p], latest["last_rewards"][p]
            captions.append(f"{latest['prompts'][p]}\n1:{r1:.3f} {t}:{rl[0]:.3f}/{rl[1]:.3f}")
        total = len(latest["prompts"])  # this rank's: the grid says when it shows fewer (callbacks max_prompts)
        corner = f"first {n} of {total} prompts" if n < total else ""
        return image_grid(rows, captions, ["1-step x0", f"{t}-step a", f"{t}-step b"], scale=scale, corner=corner)


class RewardSummary(L.Callback):
    """Record the rewards of every epoch; at the end print first-vs-last and write them as JSON.

    A run that stops early (Ctrl-C, an error) gets the same table and JSON over its complete iterations, and says
    which checkpoint holds the last of them and how to continue or export from it: the end-of-training callbacks
    (the table, ``trained/``) do not run then, and the weights in memory may be partway through an iteration.
    """

    KEYS = ("train/reward_1step", "train/reward_last")
    SPREAD = ("train/reward_1step_std", "train/reward_last_std")

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.history: list[dict[str, float]] = []
        self.checkpointed_epoch = -1  # the newest epoch a checkpoint holds (-1: none)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.checkpointed_epoch = trainer.current_epoch - 1  # a resumed run starts after its checkpoint's epoch

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.checkpointed_epoch = int(checkpoint.get("epoch", self.checkpointed_epoch))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        if all(k in metrics for k in self.KEYS):
            row = {"epoch": trainer.current_epoch}
            row.update({k: float(metrics[k]) for k in self.KEYS + self.SPREAD if k in metrics})
            row["train/reward_queries"] = float(metrics.get("train/reward_queries", float("nan")))
            self.history.append(row)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(pl_module, stopped=None)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        signal = isinstance(exception, KeyboardInterrupt | SIGTERMException)
        if trainer.global_rank != 0:
            # A rank that fails alone: Lightning's launcher then kills rank 0 (SIGKILL) before it can say anything,
            # so this rank gives the stop notice. A signal reaches rank 0 too, which reports it.
            if not signal:
                where = f"{stop_cause(exception)} on rank {trainer.global_rank} during epoch {trainer.current_epoch}"
                notice = stop_notice(trainer, where, exception, self._unsaved(trainer))
                logs = log_file_paths()
                report_at_end(notice + (f"\n  this rank's log (the error): {logs[0]}" if logs else ""))
            return
        stopped = f"{stop_cause(exception)} during epoch {trainer.current_epoch}"
        self._report(pl_module, stopped)  # nothing without a complete iteration
        if self.history or signal:  # a signal: say so anyway
            report_at_end(stop_notice(trainer, stopped, exception, self._unsaved(trainer)))

    def _unsaved(self, trainer: L.Trainer) -> list[int]:
        """Epochs of the table that ended after the checkpoint ``last.ckpt`` names (RunCheckpoint knows what it
        names, not just what was written)."""
        saved = trainer.checkpoint_callback
        newest = saved.linked_epoch if isinstance(saved, RunCheckpoint) else self.checkpointed_epoch
        return [int(h["epoch"]) for h in self.history if h["epoch"] > newest]

    def _report(self, pl_module: L.LightningModule, stopped: str | None) -> None:
        if not self.history:
            return
        first, last = self.history[0], self.history[-1]
        t = getattr(pl_module, "algo_cfg", {}).get("num_steps", "T")
        lines = [
            f"SDPO reward ({getattr(pl_module, 'reward_cfg', {}).get('name', 'reward')}), "
            f"epoch {first['epoch']} -> epoch {last['epoch']}" + (f" (stopped by {stopped})" if stopped else ""),
            f"{'image':<10}{'first':>10}{'last':>10}{'change':>10}{'spread':>10}",
        ]
        rows = (("1-step", self.KEYS[0], self.SPREAD[0]), (f"{t}-step", self.KEYS[1], self.SPREAD[1]))
        for label, key, spread in rows:
            change = last[key] - first[key]
            values = f"{first[key]:>10.4f}{last[key]:>10.4f}{change:>+10.4f}{first.get(spread, 0):>10.4f}"
            lines.append(f"{label:<10}{values}")
        lines.append("(spread: std of the reward over the first epoch's prompts; T-step: of each pair's mean)")
        table = "\n".join(lines)
        report_at_end("\n" + table + "\n")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        summary = {"first": first, "last": last, "history": self.history, **({"stopped": stopped} if stopped else {})}
        self.path.write_text(json.dumps(summary, indent=1))


def stop_cause(exception: BaseException) -> str:
    """What stopped a run, in words: the signal rather than Lightning's exception class for it."""
    if isinstance(exception, KeyboardInterrupt):
        return "Ctrl-C"
    if isinstance(exception, SIGTERMException):
        return "SIGTERM"
    if isinstance(exception, FloatingPointError):
        return "non-finite values"
    return type(exception).__name__


def stop_notice(
    trainer: L.Trainer, stopped: str, exception: BaseException | None = None, unsaved: list[int] = ()
) -> str:
    """What a run that stopped early kept, and the commands that continue or export it. A run that diverged is not
    told to run the same command again, which would diverge the same way. ``unsaved``: epochs in the reward table
    that ended after the newest checkpoint (a stop while the epoch's checkpoint was being written, or one not due),
    which continuing from it runs again."""
    saved = trainer.checkpoint_callback
    path = (getattr(saved, "last_model_path", "") or getattr(saved, "best_model_path", "")) if saved else ""
    if not path:
        why = ("callbacks.checkpoint is off" if saved is None
               else "none was due yet (callbacks.checkpoint.every_n_epochs)" if trainer.current_epoch
               else "the first iteration had not ended")
        return f"run stopped ({stopped}) with no checkpoint written ({why}): nothing to continue from"
    resume, trained = cli_arg("ckpt_path", path), Path(path).parent.parent / "trained"
    lines = [f"run stopped ({stopped}); newest checkpoint: {path} ({Path(path).resolve().stem})"]
    if unsaved:
        epochs = ", ".join(map(str, unsaved))
        many = len(unsaved) > 1
        lines.append(f"  the table's epoch{'s' * many} {epochs} ended after that checkpoint: "
                     f"continuing from it runs {'them' if many else 'it'} again")
    if isinstance(exception, FloatingPointError):
        lr = getattr(trainer.lightning_module, "optim_cfg", {}).get("lr", "?")
        lines += [
            "  the run diverged (the error below says where): the same command would diverge the same way.",
            f"  continue: the same command with a lower optim.lr (now {lr}) and {resume}",
            f"  check first that checkpoint's policy still samples finite images: python -m sdpo.evaluate "
            f"{cli_arg('checkpoint', path)}",
        ]
    else:
        lines.append(f"  continue: the same command with {resume}")
    lines.append(f"  export:   python -m sdpo.export {shlex.quote(path)} {shlex.quote(str(trained))}")
    return "\n".join(lines)


class ExportTrained(L.Callback):
    """At the end of training, write the LoRA in diffusers' format (or the full UNet) next to the checkpoints."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from sdpo.model_card import write_model_card
        from sdpo.policy.lora import save_trained_unet

        path = save_trained_unet(pl_module.unet, self.dirpath)
        summary = next((c for c in trainer.callbacks if isinstance(c, RewardSummary)), None)
        saved = trainer.checkpoint_callback
        write_model_card(path, pl_module.hparams, pl_module.components.source, pl_module.step_kind,
                         trainer.fit_loop.epoch_progress.current.processed, trainer.global_step,
                         summary.history if summary else [], getattr(trainer.datamodule, "prompts", ()),
                         (getattr(saved, "last_model_path", "") or None) if saved else None)
        report_at_end(f"trained weights for diffusers: {path} (README.md: how they were trained, how to load them)")


class EvalDuringTraining(L.Callback):
    """Every N epochs (and after the last), evaluate the current UNet the way users will sample it: the model's
    native scheduler at several step counts, on held-out prompts, for the training reward and held-out rewards.

    SDPO trains at one T but claims better images at every step count; the training metrics cannot show that,
    and they cannot show over-optimisation either (a held-out reward that falls while the training reward rises).
    Logs ``eval/<reward>/<k>step`` (means over prompts x images) into the epoch's metrics row (CSV, W&B) and
    ``time/eval``; with a W&B logger also the full table (std, 95% CI) as a ``wandb.Table`` and a JPEG grid.

    With ``compare_to_start`` it also evaluates the policy once as training starts (the base model: LoRA adapters
    start at B = 0) and logs ``eval/<reward>/<k>step_change``, the mean paired change since then: the same prompts
    and initial noise, image by image, so the curve shows what training changed without the noise of the prompts
    and images. The start scores travel in the checkpoint, so a resumed run goes on measuring from the same start.

    Runs on rank 0 with its own generators (``sdpo.evaluation``) inside ``fork_rng``: training's RNG, weights
    and train/eval mode are left as they were, so a run with this callback trains exactly as one without. A
    compiled UNet runs eagerly here, so evaluation never compiles a graph.
    ``rewards`` are names or ``{name: kwargs}``; the training reward (``reward.name``) reuses the module's own
    instance, and is added when ``include_training_reward`` and not listed.
    """

    def __init__(
        self,
        every_n_epochs: int = 25,
        prompts: str | Sequence[str] = ("cow", "goat", "lion", "tiger"),
        steps: int | Sequence[int] = (1, 2, 4),
        rewards: Sequence[str | Mapping[str, Any]] | Mapping[str, Any] = ("brightness", "colorfulness"),
        images_per_prompt: int = 2,
        seed: int = 0,
        batch_size: int = 16,
        include_training_reward: bool = True,
        dirpath: str | None = None,
        compare_to_start: bool = True,
    ) -> None:
        from sdpo.prompts import load_prompts
        from sdpo.rewards.specs import parse_reward_specs

        raise_problems(eval_problems(every_n_epochs, steps, images_per_prompt, batch_size))
        steps = (steps,) if isinstance(steps, int) else tuple(int(k) for k in steps)  # steps=4: one count
        self.every_n_epochs = every_n_epochs
        self.prompts = load_prompts(prompts if isinstance(prompts, str) else list(prompts))
        self.steps = steps
        self.specs = parse_reward_specs(rewards, key="callbacks.eval.rewards")
        self.images_per_prompt = images_per_prompt
        self.seed = seed
        self.batch_size = batch_size
        self.include_training_reward = include_training_reward
        self.dirpath = Path(dirpath) if dirpath else None
        self.compare_to_start = compare_to_start
        self._held_out: dict[str, torch.nn.Module] = {}
        self._start: dict[str, torch.Tensor] = {}  # reward -> [S, P, n] scores of the policy as training started

    def state_dict(self) -> dict[str, Any]:
        return {"start_scores": dict(self._start)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._start = {name: torch.as_tensor(scores) for name, scores in state_dict.get("start_scores", {}).items()}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Score the policy before its first update (a resumed run has the scores from its checkpoint)."""
        if trainer.global_rank != 0 or not self.compare_to_start or self._start or trainer.current_epoch > 0:
            return
        result = self.evaluate(pl_module)
        self._start = {name: scores.clone() for name, scores in result.scores.items()}
        if self.dirpath is not None:
            result.save(self.dirpath / "start")

    def changes(self, result: Any) -> dict[str, float]:
        """``eval/<reward>/<k>step_change``: mean over prompts x images of the score minus the start score of the
        same prompt and image (rewards and shapes the start scores do not cover are left out)."""
        out = {}
        for name, scores in result.scores.items():
            start = self._start.get(name)
            if start is None or start.shape != scores.shape:
                continue
            for s, k in enumerate(result.step_counts):
                out[f"eval/{name}/{k}step_change"] = float((scores[s].double() - start[s].double()).mean())
        return out

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from sdpo.evaluation import check_step_counts

        if trainer.global_rank == 0:  # build held-out rewards now (on the CPU): a missing model fails before training
            check_step_counts(pl_module.components.scheduler_config, self.steps, key="callbacks.eval.steps")
            problems = []
            for reward in self.rewards_for(pl_module, device="cpu").values():
                try:
                    reward.check_prompts(self.prompts, "callbacks.eval.prompts")
                except UnscorablePrompts as error:
                    problems.append(str(error))
            training_prompts = getattr(trainer.datamodule, "prompts", None)
            if problems and training_prompts is not None:  # the module checks them next: say both in one refusal
                try:
                    pl_module.reward_fn.check_prompts(training_prompts, "data.source")
                except UnscorablePrompts as error:
                    problems.append(str(error))
            if problems:
                raise UnscorablePrompts("\n".join(problems))

    def rewards_for(self, pl_module: L.LightningModule, device: torch.device | str | None = None
                    ) -> dict[str, torch.nn.Module]:
        """Label -> reward model on ``device`` (default: the module's); held-out ones are built once, the training
        one reused."""
        from sdpo.rewards import build_reward

        train_name = getattr(pl_module, "reward_cfg", {}).get("name")
        train_fn = getattr(pl_module, "reward_fn", None)
        out: dict[str, torch.nn.Module] = {}
        if self.include_training_reward and train_fn is not None and train_name not in {s[0] for s in self.specs}:
            out[train_name] = train_fn
        for label, name, kwargs in self.specs:
            if name == train_name and not kwargs and train_fn is not None:
                out[label] = train_fn
            else:
                if label not in self._held_out:
                    self._held_out[label] = build_reward(name, **kwargs)
                out[label] = self._held_out[label].to(device or pl_module.device)
        return out

    def evaluate(self, pl_module: L.LightningModule):
        """An ``EvalResult`` of the module's current UNet (same resolution and guidance as training)."""
        from sdpo.evaluation import evaluate_policy

        device = pl_module.device
        size = pl_module.latent_shape[-1] * pl_module.components.vae_scale_factor
        devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        # frozen layers stored in the autocast dtype (algo.low_precision_base) only run under training's autocast
        low_precision = bool(getattr(pl_module, "algo_cfg", {}).get("low_precision_base"))
        autocast = pl_module.trainer.precision_plugin.forward_context() if low_precision else nullcontext()
        # a compiled UNet runs eagerly here: held-out shapes would each compile another graph (minutes on a GPU for
        # the whole UNet), and the numbers then match `python -m sdpo.evaluate` on the checkpoint
        eager = getattr(torch.compiler, "set_stance", None)
        try:
            with (torch.random.fork_rng(devices=devices), autocast, eager("force_eager") if eager else nullcontext(),
                  torch_attention(pl_module.unet)):  # a kernel pinned for training's autocast may not run here
                return evaluate_policy(
                    pl_module.components, pl_module.unet, self.prompts, self.steps,
                    rewards=self.rewards_for(pl_module), images_per_prompt=self.images_per_prompt, seed=self.seed,
                    batch_size=self.batch_size, resolution=size,
                    guidance_scale=pl_module.model_cfg.get("guidance_scale"), progress=False,
                    keep_images=self.images_per_prompt,  # the grid shows every image of the few held-out prompts
                )
        finally:  # held-out reward models (PickScore's CLIP-H: ~4 GB in fp32) wait on the CPU between evaluations,
            for reward in self._held_out.values():  # so training keeps the GPU memory it was measured with
                reward.to("cpu")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        epoch = trainer.current_epoch
        last = is_final_iteration(trainer)
        if not (epoch % self.every_n_epochs == 0 or last):
            return
        tic = time.perf_counter()
        result = self.evaluate(pl_module)
        elapsed = time.perf_counter() - tic
        for key, value in {**result.means(), **self.changes(result), "time/eval": elapsed}.items():
            pl_module.log(key, float(value), on_step=False, on_epoch=True, batch_size=1, rank_zero_only=True)
        if self.dirpath is not None:
            result.save(self.dirpath / f"epoch_{epoch:04d}")
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if wandb_loggers:
            rows = result.table()
            columns = ["epoch", *rows[0]]
            data = [[epoch, *row.values()] for row in rows]
            grid = result.grid()
            caption = (f"epoch {epoch}: held-out prompts x step counts, {cells_legend(result.reward_names)} "
                       f"(native {result.meta['scheduler']})")
            import wandb

            for lg in wandb_loggers:  # one history row: the table and its grid side by side
                lg.log_metrics({"eval/table": wandb.Table(columns=columns, data=data),
                                "eval/grid": wandb.Image(grid, caption=caption, file_type="jpg")},
                               step=scalar_step(trainer))
