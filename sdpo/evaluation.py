"""Step-generalisation evaluation: rewards of a policy at several sampling step counts, with the model's native
few-step sampler.

SDPO's claim is that one training run improves the 1-, 2-, 4- and 8-step images at once. Training samples with a
stochastic DDIM (or LCM) policy step at a fixed T; a user samples with the scheduler the model ships
(SD-Turbo: Euler, SDXL-Turbo: Euler ancestral, LCM: the LCM scheduler), deterministically where it is
deterministic. So evaluation runs that native sampler, for each step count, on held-out prompts:

- Initial noise comes from one generator per (seed, prompt index, image index), re-seeded for every step count:
  scores do not depend on the batch size or on the other prompts, and a prompt's k-step images share their noise
  across k (paired comparisons). Ancestral/LCM step noise comes from the same per-image generators.
- The loop is diffusers' pipeline loop without classifier-free guidance (SDPO samples with guidance 1):
  ``scale_model_input`` -> UNet -> ``scheduler.step`` (DDIM with eta = 0), then the final latents are decoded
  (for LCM the last step's ``denoised``, as the LCM pipeline does).
- Results are mean, standard deviation and a 95% confidence interval of the mean per (reward, step count), with
  Student's t quantile (scipy when installed, else a built-in quadrature that agrees with it to 1e-6). The
  interval comes from the P prompt means, not the ``P x n`` images: images of one prompt are correlated (a prompt
  that scores high does so on every noise), so treating them as independent draws makes the interval too narrow,
  and the question a researcher asks is whether the result holds on other prompts. With one prompt, the interval
  falls back to its images (it then covers new noise only).

No Hydra here: ``sdpo.evaluate`` (the CLI) and ``sdpo.callbacks.EvalDuringTraining`` both call
``evaluate_policy``.
"""

from __future__ import annotations

import csv
import functools
import inspect
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers import UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from sdpo.grids import fit_to_grid, image_grid, score_captions
from sdpo.policy.conditioning import Conditioning, decode_latents, encode_prompts
from sdpo.policy.loading import TINY, PolicyComponents
from sdpo.rewards import RewardModel

log = logging.getLogger(__name__)

DEFAULT_STEPS: tuple[int, ...] = (1, 2, 4, 8)
NOISE_PURPOSE = 31  # keeps evaluation noise independent of every training stream (sdpo.module uses 11-13)


# ------------------------------------------------------------------------------------------------ statistics


def _t_quantile_builtin(p: float, df: int) -> float:
    """Student-t quantile without scipy: bisection on the CDF, integrated with Simpson's rule on [0, x]."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        grid = np.linspace(0.0, x, 4001)
        pdf = np.exp(log_norm - (df + 1) / 2 * np.log1p(grid**2 / df))
        h = x / 4000
        return 0.5 + h / 3 * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum())

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


try:  # scipy is optional; the built-in quantile matches it to ~1e-6
    from scipy.stats import t as _student_t

    T_QUANTILE_SOURCE = "scipy"

    def t_quantile(p: float, df: int) -> float:
        """Quantile ``p`` of Student's t with ``df`` degrees of freedom."""
        return float(_student_t.ppf(p, df))

except ImportError:
    T_QUANTILE_SOURCE = "built-in quadrature; scipy not installed"

    @functools.lru_cache(maxsize=256)
    def t_quantile(p: float, df: int) -> float:
        """Quantile ``p`` of Student's t with ``df`` degrees of freedom."""
        return _t_quantile_builtin(p, df)


def mean_ci(values: Tensor, level: float = 0.95) -> dict[str, float]:
    """Mean, sample std (n-1) and the ``level`` confidence interval of the mean of ``values`` (any shape)."""
    x = values.double().flatten()
    n = x.numel()
    mean = float(x.mean()) if n else math.nan
    if n < 2:
        return {"mean": mean, "std": math.nan, "ci95_low": math.nan, "ci95_high": math.nan, "n": n}
    std = float(x.std(correction=1))
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci95_low": mean - half, "ci95_high": mean + half, "n": n}


def ci_method(prompts: int) -> str:
    """How ``prompt_mean_ci`` builds its interval for ``prompts`` prompts: the footer of every results table."""
    unit = ("the prompt means, prompts-1 degrees of freedom" if prompts >= 2
            else "the images of the single prompt, images-1 degrees of freedom")
    return f"Student t over {unit} ({T_QUANTILE_SOURCE})"


def prompt_mean_ci(values: Tensor, level: float = 0.95) -> dict[str, float]:
    """Mean and std over all images of ``values`` [P, n] (prompt, image), with the ``level`` confidence interval
    from the P prompt means (t with P-1 degrees of freedom): the prompt is the sampled unit, so its images do not
    count as independent evidence. One prompt: the interval of its images. Adds ``prompts`` = P."""
    if values.dim() != 2:
        raise ValueError(f"expected scores [prompts, images], got shape {tuple(values.shape)}")
    stats = mean_ci(values)
    if values.shape[0] >= 2:
        over_prompts = mean_ci(values.double().mean(dim=1), level)
        stats["ci95_low"], stats["ci95_high"] = over_prompts["ci95_low"], over_prompts["ci95_high"]
    stats["prompts"] = values.shape[0]
    return stats


# ------------------------------------------------------------------------------------------------ sampling


def native_scheduler(scheduler_config: Mapping[str, Any]) -> SchedulerMixin:
    """A fresh instance of the scheduler class the model ships (``_class_name``), from its saved config."""
    name = scheduler_config.get("_class_name")
    cls = getattr(diffusers, str(name), None) if name else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"the model's scheduler config names {name!r}, which is not a diffusers scheduler class")
    return cls.from_config(dict(scheduler_config))


def check_step_counts(scheduler_config: Mapping[str, Any], steps: Sequence[int], key: str = "steps") -> None:
    """Refuse, before any sampling, a step count the model's own scheduler cannot run: an LCM samples on the grid
    it was distilled on, so at most ``original_inference_steps`` steps (diffusers would fail only at that count,
    after the smaller ones had been sampled)."""
    limit = scheduler_config.get("original_inference_steps")
    if limit and max(steps) > int(limit):
        raise ValueError(f"{key}={list(steps)}: this model's {scheduler_config.get('_class_name')} samples at most "
                         f"{limit} steps (original_inference_steps); drop the larger step counts")


def item_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """A 63-bit seed for one evaluation image: independent of batching and of the other prompts."""
    state = np.random.SeedSequence([seed, prompt_index, image_index, NOISE_PURPOSE]).generate_state(2, np.uint64)
    return int(state[0] >> 1)


def item_generators(seed: int, items: Sequence[tuple[int, int]]) -> list[torch.Generator]:
    """One CPU generator per (prompt index, image index): portable across devices."""
    return [torch.Generator().manual_seed(item_seed(seed, p, i)) for p, i in items]


@torch.no_grad()
def sample_native(
    components: PolicyComponents,
    unet: UNet2DConditionModel,
    scheduler: SchedulerMixin,
    cond: Conditioning,
    generators: list[torch.Generator],
    num_steps: int,
    latent_shape: tuple[int, int, int],
) -> Tensor:
    """Images [B, 3, H, W] in [0, 1] from ``num_steps`` steps of ``scheduler``: one image per generator.

    Each generator first draws its image's initial noise, then (ancestral/LCM schedulers) its step noise, exactly
    as diffusers' pipelines use a list of generators.
    """
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    noise = torch.stack([torch.randn(latent_shape, generator=g, dtype=torch.float32) for g in generators])
    scheduler.set_timesteps(num_steps, device=device)  # also resets stateful schedulers (Euler's step index)
    x = noise.to(device) * scheduler.init_noise_sigma
    accepts = inspect.signature(scheduler.step).parameters
    extra: dict[str, Any] = {}
    if "eta" in accepts:
        extra["eta"] = 0.0  # deterministic DDIM
    if "generator" in accepts:
        extra["generator"] = generators
    unet_kwargs = cond.to(device).unet_kwargs()
    final = x
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        model_output = unet(model_input.to(dtype), t, **unet_kwargs, return_dict=False)[0]
        # fp32 scheduler math even if the UNet ran in low precision (a no-op for the fp32 UNets loaded here)
        out = scheduler.step(model_output.float(), t, x, **extra, return_dict=True)
        x = out.prev_sample
        denoised = getattr(out, "denoised", None)  # LCM: the consistency output, what its pipeline decodes
        final = x if denoised is None else denoised
    return decode_latents(components.vae, final.float(), components.latent_scale)


def _device_of(module: torch.nn.Module, default: torch.device) -> torch.device:
    param = next(module.parameters(), None)
    return default if param is None else param.device


# ------------------------------------------------------------------------------------------------ results


@dataclass
class EvalResult:
    """Scores of every (reward, step count, prompt, image) and the first images of every prompt."""

    prompts: list[str]
    step_counts: tuple[int, ...]
    scores: dict[str, Tensor]  # reward -> [S, P, n] float32
    images: Tensor  # uint8 [S, K, m, 3, H, W]: the first m images of the first K prompts at each step count
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ci_method(self) -> str:
        return ci_method(len(self.prompts))

    @property
    def reward_names(self) -> list[str]:
        return list(self.scores)

    def scores_for(self, reward: str, steps: int) -> Tensor:
        """Scores [P, n] of ``reward`` at ``steps`` sampling steps."""
        return self.scores[reward][self.step_counts.index(steps)]

    def image(self, steps: int, prompt_index: int, image_index: int = 0) -> Tensor:
        """One kept image [3, H, W] in [0, 1]."""
        return self.images[self.step_counts.index(steps), prompt_index, image_index].float() / 255

    def table(self) -> list[dict[str, Any]]:
        """One row per (reward, step count): mean and std over images, 95% CI of the mean over prompts, n images,
        the number of prompts."""
        return [
            {"reward": name, "steps": k, **prompt_mean_ci(values[s])}
            for name, values in self.scores.items()
            for s, k in enumerate(self.step_counts)
        ]

    def means(self) -> dict[str, float]:
        """``eval/<reward>/<k>step`` -> mean: the scalar names logged during training."""
        return {f"eval/{r['reward']}/{r['steps']}step": r["mean"] for r in self.table()}

    def to_markdown(self) -> str:
        lines = ["| reward | steps | mean | std | 95% CI of the mean | n |", "|---|---:|---:|---:|---|---:|"]
        for r in self.table():
            lines.append(f"| {r['reward']} | {r['steps']} | {r['mean']:.4f} | {r['std']:.4f} | "
                         f"[{r['ci95_low']:.4f}, {r['ci95_high']:.4f}] | {r['n']} |")
        n = self.images_per_prompt
        lines.append("")
        lines.append(f"{len(self.prompts)} prompts x {n} images per step count, seed {self.meta.get('seed')}, "
                     f"sampler {self.meta.get('scheduler')}; CI: {self.ci_method}.")
        return "\n".join(lines)

    @property
    def images_per_prompt(self) -> int:
        return next(iter(self.scores.values())).shape[-1] if self.scores else 0

    def grid(self, max_prompts: int = 16, max_images: int | None = None) -> Image.Image:
        """Prompts (rows) x step counts x each prompt's kept images (up to ``max_images``, default all), every
        image captioned with each reward's score."""
        if self.images.shape[2] == 0 or self.images.shape[1] == 0:
            raise ValueError("no images were kept (keep_images=0 or keep_prompts=0): nothing to draw")
        n_rows = min(max_prompts, self.images.shape[1])
        n_images = min(max_images or self.images.shape[2], self.images.shape[2])
        images, scale = fit_to_grid(self.images[:, :n_rows, :n_images].float() / 255)  # [S, R, m, 3, H, W]
        columns = [(s, i) for s in range(len(self.step_counts)) for i in range(n_images)]
        rows = [[images[s, p, i] for s, i in columns] for p in range(n_rows)]
        cells = [[score_captions(self.scores, (s, p, i)) for s, i in columns] for p in range(n_rows)]
        captions = self.prompts[:n_rows]  # wrapped to fit by image_grid
        header = [f"{self.step_counts[s]} step{'s' if self.step_counts[s] > 1 else ''}"
                  + (f" #{i + 1}" if n_images > 1 else "") for s, i in columns]
        return image_grid(rows, captions, header, scale=scale, cell_captions=cells,
                          corner=cells_legend(self.reward_names))

    def to_json(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "ci_method": self.ci_method,
            "prompts": self.prompts,
            "step_counts": list(self.step_counts),
            "table": json_rows(self.table()),
            "scores": {name: {str(k): values[s].tolist() for s, k in enumerate(self.step_counts)}
                       for name, values in self.scores.items()},  # [P][n] per step count
        }

    def save(self, out_dir: str | Path, grid_prompts: int = 16) -> dict[str, Path]:
        """Write results.csv, results.json, results.md and grid.png (the first ``grid_prompts`` prompts) into
        ``out_dir``; returns their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {name: out / name for name in ("results.csv", "results.json", "results.md", "grid.png")}
        write_csv(paths["results.csv"], self.table())
        paths["results.json"].write_text(json.dumps(self.to_json(), indent=1))
        meta = "\n".join(f"- {k}: {v}" for k, v in self.meta.items())
        paths["results.md"].write_text(f"# Evaluation\n\n{meta}\n\n{self.to_markdown()}\n")
        if self.images.shape[2]:
            self.grid(max_prompts=grid_prompts).save(paths["grid.png"])
        else:
            del paths["grid.png"]
        return paths


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``rows`` (dicts with the same keys) as a CSV file with a header."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def cells_legend(rewards: Sequence[str]) -> str:
    """What a grid's cell captions are: the reward, or the rewards in the order of their lines."""
    return f"cells: {rewards[0]}" if len(rewards) == 1 else f"cells, line by line: {', '.join(rewards)}"


def json_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with NaN and inf as null: JSON has neither (a std of one image is NaN)."""
    return [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()} for row in rows]


def shorten(text: str, n: int) -> str:
    """``text`` cut to ``n`` characters with an ellipsis: a grid's row caption."""
    return text if len(text) <= n else text[: n - 1] + "…"


# ------------------------------------------------------------------------------------------------ evaluation


def evaluate_policy(
    components: PolicyComponents,
    unet: UNet2DConditionModel | None,
    prompts: Sequence[str],
    step_counts: Sequence[int] = DEFAULT_STEPS,
    *,
    rewards: Mapping[str, RewardModel],
    images_per_prompt: int = 4,
    seed: int = 0,
    batch_size: int = 16,
    resolution: int | None = None,
    guidance_scale: float | None = None,
    progress: bool = True,
    keep_images: int = 1,
    keep_prompts: int | None = None,
) -> EvalResult:
    """Sample ``images_per_prompt`` images per prompt at each step count with the model's native scheduler and
    score them with every reward.

    ``unet`` defaults to ``components.unet`` (pass the policy's, e.g. a LoRA'd or training UNet). It is put in
    eval mode and restored. Nothing here draws from the global RNG. The first ``keep_images`` images of the first
    ``keep_prompts`` prompts (default: all) are kept (uint8) for grids: only those a grid draws, since at 512 px
    and more every kept image costs megabytes of memory.
    """
    prompts = [str(p) for p in prompts]
    steps = tuple(int(k) for k in step_counts)
    if not prompts:
        raise ValueError("evaluate_policy needs at least one prompt")
    if not steps or min(steps) < 1 or len(set(steps)) != len(steps):
        raise ValueError(f"step counts must be distinct integers >= 1, got {list(step_counts)}")
    if images_per_prompt < 1 or batch_size < 1:
        raise ValueError(f"images_per_prompt ({images_per_prompt}) and batch_size ({batch_size}) must be >= 1")
    if not rewards:
        raise ValueError("evaluate_policy needs at least one reward")
    unet = components.unet if unet is None else unet
    device = next(unet.parameters()).device
    side = components.latent_size(resolution)
    latent_shape = (int(unet.config.in_channels), side, side)
    image_size = side * components.vae_scale_factor
    keep = max(0, min(keep_images, images_per_prompt))
    keep_rows = len(prompts) if keep_prompts is None else max(0, min(keep_prompts, len(prompts)))
    scheduler = native_scheduler(components.scheduler_config)

    cond_all = Conditioning.cat([
        encode_prompts(components, prompts[i : i + batch_size], image_size, guidance_scale).to(device)
        for i in range(0, len(prompts), batch_size)
    ])
    items = [(p, i) for p in range(len(prompts)) for i in range(images_per_prompt)]
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    scores = {name: torch.full((len(steps), len(prompts), images_per_prompt), math.nan) for name in rewards}
    kept: Tensor | None = None
    was_training = unet.training
    unet.eval()
    bar = tqdm(total=len(steps) * len(chunks), desc="evaluate", unit="batch", disable=not progress, leave=False)
    try:
        with torch.no_grad():
            for s, k in enumerate(steps):
                for chunk in chunks:
                    p_idx = torch.tensor([p for p, _ in chunk])
                    i_idx = torch.tensor([i for _, i in chunk])
                    images = sample_native(components, unet, scheduler, cond_all.select(p_idx),
                                           item_generators(seed, chunk), k, latent_shape)
                    chunk_prompts = [prompts[p] for p, _ in chunk]
                    for name, reward in rewards.items():
                        values = reward(images.to(_device_of(reward, device)), chunk_prompts)
                        scores[name][s, p_idx, i_idx] = values.detach().float().cpu()
                    if keep and keep_rows:
                        if kept is None:
                            kept = torch.zeros((len(steps), keep_rows, keep, *images.shape[1:]), dtype=torch.uint8)
                        mask = (i_idx < keep) & (p_idx < keep_rows)
                        as_uint8 = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
                        kept[s, p_idx[mask], i_idx[mask]] = as_uint8[mask]
                    bar.update(1)
    finally:
        unet.train(was_training)
        bar.close()
    meta = {
        "source": components.source,
        "scheduler": type(scheduler).__name__,
        "seed": seed,
        "images_per_prompt": images_per_prompt,
        "image_size": image_size,
        "guidance_scale": guidance_scale,
    }
    if kept is None:
        kept = torch.zeros((len(steps), keep_rows, 0, 3, image_size, image_size), dtype=torch.uint8)
    return EvalResult(prompts, steps, scores, kept, meta)


# ------------------------------------------------------------------------------------------------ rewards


def _plain(value: Any) -> Any:
    """OmegaConf containers (what Hydra passes) as plain Python ones."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def parse_reward_specs(spec: Any, key: str = "rewards") -> list[tuple[str, str, dict]]:
    """(label, registry name, kwargs) per reward, from ``[name, ...]``, ``{name: {kwargs}}`` or a list mixing both.

    A ``name`` entry in the kwargs lets the label differ from the registry name (two settings of one reward).
    Unknown names fail here, before any model loads; ``key`` names the config key in the message.
    """
    from sdpo.rewards import available_rewards

    spec = _plain(spec)
    if isinstance(spec, str):
        spec = [spec]
    entries: list[tuple[Any, Any]] = []
    if isinstance(spec, Mapping):
        entries = list(spec.items())
    elif isinstance(spec, Sequence):
        for item in spec:
            if isinstance(item, str):
                entries.append((item, {}))
            elif isinstance(item, Mapping):
                entries.extend(item.items())
            else:
                raise ValueError(f"{key}: each reward is a name or {{name: {{kwargs}}}}, got {item!r}")
    else:
        raise ValueError(f"{key}: give a list of reward names or a {{name: {{kwargs}}}} mapping, got {spec!r}")
    out: list[tuple[str, str, dict]] = []
    for label, kwargs in entries:
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise ValueError(f"{key}.{label}: the reward's settings must be a mapping, got {kwargs!r}")
        kwargs = dict(kwargs or {})
        name = str(kwargs.pop("name", label))
        if name not in available_rewards():
            raise ValueError(f"{key}: unknown reward {name!r}; available rewards: {', '.join(available_rewards())}")
        if any(label == seen for seen, _, _ in out):
            raise ValueError(f"{key}: reward {label!r} is listed twice")
        out.append((str(label), name, kwargs))
    if not out:
        raise ValueError(f"{key}: list at least one reward")
    return out


def build_rewards(specs: list[tuple[str, str, dict]]) -> dict[str, RewardModel]:
    """Label -> a built reward model, for ``parse_reward_specs``'s output."""
    from sdpo.rewards import build_reward

    return {label: build_reward(name, **kwargs) for label, name, kwargs in specs}


# ------------------------------------------------------------------------------------------------ loading


@dataclass
class LoadedPolicy:
    """What to evaluate: components whose ``unet`` is the policy, the model config it was built from, and how."""

    components: PolicyComponents
    model_cfg: dict
    origin: str

    @property
    def unet(self) -> UNet2DConditionModel:
        return self.components.unet


def load_policy(model_cfg: Mapping[str, Any], checkpoint: str | Path | None = None,
                lora: str | Path | None = None) -> LoadedPolicy:
    """The base model of ``model_cfg``; or a training checkpoint (with the model config stored in it); or the base
    model plus an exported folder: a diffusers-format LoRA (``pytorch_lora_weights.safetensors``) or a full UNet
    (``config.json`` + safetensors, what a full fine-tune exports)."""
    from sdpo.module import SDPOModule

    if checkpoint is not None and lora is not None:
        raise ValueError("give either a checkpoint or an exported LoRA/UNet folder, not both")
    model_cfg = dict(model_cfg)
    if checkpoint is not None:
        return _load_checkpoint(Path(checkpoint), model_cfg)
    components = SDPOModule._load_components(model_cfg)
    if lora is None:
        return LoadedPolicy(components, model_cfg, f"base model {model_cfg['source']}")
    path = Path(lora).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no LoRA/UNet at {path}")
    folder = path if path.is_dir() else path.parent
    config = folder / "config.json"
    if path.is_dir() and config.exists() and not list(folder.glob("*lora*.safetensors")):
        components.unet = _load_full_unet(folder, components.unet)
        return LoadedPolicy(components, model_cfg, f"full UNet {folder}")
    load_lora_into(components, path)
    return LoadedPolicy(components, model_cfg, f"LoRA {path}")


def _load_checkpoint(path: Path, current: dict) -> LoadedPolicy:
    """Rebuild the checkpoint's UNet (its own model config, its LoRA layout, its trained weights).

    Mirrors ``sdpo.export.load_trained_module`` without building the training reward model (a CLIP reward would
    be loaded just to be dropped). A tiny model is built in the current cache, not the training run's.
    """
    from sdpo.export import read_checkpoint
    from sdpo.module import SDPOModule
    from sdpo.policy.lora import make_trainable

    ckpt = read_checkpoint(path)
    if "model" not in ckpt["hyper_parameters"]:
        raise ValueError(f"{path} is not a checkpoint written by sdpo.train (no hyper_parameters.model)")
    hp = ckpt["hyper_parameters"]
    model_cfg = dict(hp["model"])
    if model_cfg.get("source") == TINY and current.get("cache_dir"):
        model_cfg["cache_dir"] = current["cache_dir"]
    components = SDPOModule._load_components(model_cfg)
    lora = model_cfg["lora"]
    with torch.random.fork_rng(devices=[]):  # LoRA init draws; its A matrices are overwritten below anyway
        torch.manual_seed(int(hp.get("seed", 0)))
        make_trainable(components.unet, lora["enabled"], lora["rank"], lora["alpha"], lora["targets"], lora["init"])
    unet = components.unet
    state = {k.removeprefix("unet."): v for k, v in ckpt["state_dict"].items() if k.startswith("unet.")}
    others = [k for k in ckpt["state_dict"] if not k.startswith("unet.")]
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    missing = sorted(trainable - set(state))
    if missing or others:
        raise KeyError(f"checkpoint {path} does not match its model config: missing {missing[:3]}, "
                       f"unexpected {others[:3]}")
    _, unexpected = unet.load_state_dict(state, strict=False)
    if unexpected:
        raise KeyError(f"checkpoint weights the UNet does not have: {unexpected[:3]}")
    unet.requires_grad_(False).eval()
    return LoadedPolicy(components, model_cfg, f"checkpoint {path}")


def _load_full_unet(folder: Path, base: UNet2DConditionModel) -> UNet2DConditionModel:
    unet = UNet2DConditionModel.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    for key in ("in_channels", "cross_attention_dim", "sample_size"):
        if unet.config[key] != base.config[key]:
            raise ValueError(f"the UNet in {folder} has {key}={unet.config[key]}, the base model "
                             f"{base.config[key]}: it was not fine-tuned from this model")
    return unet.to(next(base.parameters()).device).requires_grad_(False).eval()


def load_lora_into(components: PolicyComponents, path: str | Path) -> None:
    """Load a diffusers-format LoRA (a folder or the .safetensors file) into ``components.unet``, the way
    ``pipe.load_lora_weights`` does (same state-dict conversion, metadata-driven rank and alpha)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    path = Path(path).expanduser()
    folder, weight_name = (path, None) if path.is_dir() else (path.parent, path.name)
    mixin = StableDiffusionXLLoraLoaderMixin if components.is_sdxl else StableDiffusionLoraLoaderMixin
    state_dict, alphas, metadata = mixin.lora_state_dict(
        str(folder), weight_name=weight_name, unet_config=components.unet.config, use_safetensors=True,
        local_files_only=True, return_lora_metadata=True,
    )
    if not any(k.startswith("unet.") for k in state_dict):
        raise ValueError(f"{path} holds no UNet LoRA weights (keys like 'unet.*')")
    if any(not k.startswith("unet.") for k in state_dict):
        log.warning("%s also holds text-encoder LoRA weights: only the UNet's are loaded", path)
    try:
        mixin.load_lora_into_unet(state_dict, alphas, components.unet, metadata=metadata)
    except RuntimeError as error:  # torch lists every mismatched tensor: a screenful that hides the cause
        mismatch = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), str(error))
        from sdpo.model_card import CARD_NAME, recorded_base_model

        named = recorded_base_model(folder)  # the card sdpo writes next to the weights it exports
        trained_on = f" ({CARD_NAME} says: {named})" if named else ""
        raise ValueError(
            f"the LoRA in {path} does not fit the UNet of {components.source}: {mismatch}. Evaluate it on the "
            f"base model it was trained from{trained_on}, with model=<that model's config> or model.source=..."
        ) from None
    components.unet.requires_grad_(False).eval()
