"""Validate a composed config before any model loads: bad values fail in a second, with what to change."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from sdpo.algo.dense import STRATEGIES
from sdpo.app_config import CONFIG_DIR
from sdpo.callback_args import callback_problems
from sdpo.checkpoint_files import not_a_checkpoint, run_last_checkpoint
from sdpo.commands import cli_arg
from sdpo.config_keys import unknown_keys
from sdpo.model_sources import model_source_problems
from sdpo.policy.sdpa_backends import CUDA_ONLY, attention_backend
from sdpo.policy.speed import compile_mode, compiled_by_inductor, inductor_mode, resolve_fused_lora
from sdpo.policy.steps import SPACINGS
from sdpo.prompts import load_prompts
from sdpo.rewards import available_rewards

PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed")
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")  # ckpt_path values Lightning resolves itself


def runs_on_cpu(accelerator: str | None) -> bool:
    """Whether ``trainer.accelerator`` puts the run on the CPU here (``auto`` does on a machine without CUDA)."""
    return accelerator == "cpu" or (accelerator in (None, "auto") and not torch.cuda.is_available())


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says which key to change."""


def pairs_per_rank(cfg: DictConfig) -> int:
    """Prompt pairs one rank samples per iteration: data.prompts_per_batch x data.batches_per_epoch."""
    return cfg.data.prompts_per_batch * cfg.data.batches_per_epoch


# LoRA inits that start the adapter at B = 0 on the stock base weights: the first update is then exactly on-policy,
# and the exported LoRA loads onto the stock pipeline. peft's others draw B (false) or rewrite the base (pissa, ...)
LORA_INITS = ("gaussian", True)


def check_lora(lora: DictConfig, need: Callable[[bool, str], None]) -> None:
    """The adapter's settings that would fail (or silently train nothing) only after the models load."""
    rank, alpha, init = lora.rank, lora.get("alpha"), lora.get("init", "gaussian")
    need(isinstance(rank, int) and rank >= 1, f"model.lora.rank={rank}: need an integer >= 1 (the reference: 4)")
    need(alpha is None or alpha > 0,
         f"model.lora.alpha={alpha}: the adapter's output is scaled by alpha / rank, so alpha <= 0 trains nothing "
         f"(0) or flips its sign; use a value > 0 (the reference: alpha = rank), or null for alpha = rank")
    need(init in LORA_INITS,
         f"model.lora.init={init!r}: use gaussian (A Gaussian, B zero) or true (peft's default: A Kaiming-uniform, "
         f"B zero). Both start at B = 0, so the first update is on-policy and the exported LoRA loads onto the "
         f"stock weights; peft's other inits draw B or rewrite the base weights")
    targets = lora.get("targets")
    need(bool(targets), f"model.lora.targets={targets}: name at least one module (the reference: "
                        f"[to_q, to_k, to_v, to_out.0])")


# Settings whose type the value checks below rely on: a string or a float where a count belongs would fail there
# with a TypeError, or pass and break deep inside sampling (T = 4.5 steps). Nullable ones may also be null.
INTEGER_KEYS = (
    "algo.num_steps", "algo.sample_batch_size", "algo.decode_batch_size", "algo.dense.num_anchors",
    "algo.tracker.buffer_size", "algo.tracker.min_count", "algo.num_inner_epochs", "algo.micro_batch_pairs",
    "algo.gradient_accumulation_steps", "algo.shuffle_shards", "data.prompts_per_batch", "data.batches_per_epoch",
    "model.lora.rank",
)
NULLABLE_INTEGER_KEYS = ("model.resolution", "model.steps_offset", "trainer.max_epochs", "trainer.max_steps")
NUMBER_KEYS = (
    "algo.eta", "algo.gamma", "algo.adv_clip_max", "algo.clip_range", "algo.temporal_lambda", "algo.temporal_eta",
    "optim.lr", "optim.weight_decay", "optim.eps",
)
NULLABLE_NUMBER_KEYS = ("algo.max_grad_norm", "model.guidance_scale", "model.lora.alpha")


def type_problems(
    cfg: DictConfig,
    integers: Sequence[str] = INTEGER_KEYS,
    nullable_integers: Sequence[str] = NULLABLE_INTEGER_KEYS,
    numbers: Sequence[str] = NUMBER_KEYS,
    nullable_numbers: Sequence[str] = NULLABLE_NUMBER_KEYS,
) -> list[str]:
    """Keys whose value has the wrong type (``algo.num_steps=four``, ``data.prompts_per_batch=8.0``), each with the
    kind of value it takes. Keys a config does not have are skipped."""
    problems = []
    checks = [(key, False, False) for key in integers] + [(key, True, False) for key in nullable_integers]
    checks += [(key, False, True) for key in numbers] + [(key, True, True) for key in nullable_numbers]
    for key, nullable, real in checks:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
        if not isinstance(node, DictConfig) or leaf not in node or OmegaConf.is_interpolation(node, leaf):
            continue  # absent here, or follows another key (sample_batch_size), which is checked itself
        value = node[leaf]
        if value is None and nullable:
            continue
        kinds = (int, float) if real else (int,)
        if isinstance(value, kinds) and not isinstance(value, bool):
            continue
        want = "a number" if real else "an integer"
        hint = f" (write {int(value)})" if isinstance(value, float) and value.is_integer() else ""
        problems.append(f"{key}={value!r}: need {want}{' or null' if nullable else ''}{hint}")
    return problems


PROMPT_KEYS = ("data.source", "callbacks.eval.prompts")


def prompt_source_problems(cfg: DictConfig, keys: Sequence[str] = PROMPT_KEYS) -> list[str]:
    """Prompt lists, built-in sets or files that cannot be read (a mistyped path), found before any model loads
    rather than by the data module or the evaluation callback after the run folder and models exist."""
    problems = []
    for key in keys:
        source = OmegaConf.select(cfg, key, default=None)
        if source is None:
            continue
        try:
            load_prompts(OmegaConf.to_container(source) if isinstance(source, ListConfig) else str(source))
        except (ValueError, OSError) as error:
            problems.append(f"{key}: {error}")
    return problems


def optional_package_problems(cfg: DictConfig) -> list[str]:
    """Rewards the run would build (training reward, a multi reward's parts, held-out rewards) whose optional package
    is not installed: found now, not after the policy model was downloaded and built."""
    from sdpo.rewards.multi import parse_components
    from sdpo.rewards.registry import missing_packages
    from sdpo.rewards.specs import parse_reward_specs

    used = [("reward.name", cfg.reward.name)]
    if cfg.reward.name == "multi" and cfg.reward.get("components") is not None:
        try:
            parts = parse_components(OmegaConf.to_container(cfg.reward.components, resolve=True))
            used += [(f"reward.components.{label}", name) for label, name, _, _ in parts]
        except (ValueError, TypeError):
            pass  # the multi reward names its own problem when built
    held_out = OmegaConf.select(cfg, "callbacks.eval.rewards", default=None)
    if held_out is not None:
        try:
            used += [("callbacks.eval.rewards", name) for _, name, _ in parse_reward_specs(held_out)]
        except ValueError:
            pass  # the evaluation callback names an unknown reward itself
    return [f"{key}: {problem}" for key, name in used if name in available_rewards()
            for problem in missing_packages(name)]


def trained_reward(cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    """The training reward's registry name and the settings it is built with."""
    reward = OmegaConf.to_container(cfg.reward, resolve=True)
    return str(reward.get("name")), {k: v for k, v in reward.items() if k not in ("name", "_target_")}


def weight_problems(cfg: DictConfig, callbacks: dict[str, Any]) -> list[str]:
    """Reward weights the run would load (training reward, a multi reward's parts, held-out rewards) that are neither
    here nor downloadable, and the policy model's (``sdpo.model_sources``): found now, not as each model loads.
    ``callbacks``: ``resolved_callbacks(cfg)``."""
    from sdpo.rewards.preflight import reward_weight_problems
    from sdpo.rewards.specs import parse_reward_specs

    problems = model_source_problems(OmegaConf.to_container(cfg.model, resolve=True))
    problems += reward_weight_problems(*trained_reward(cfg), "reward")
    for node_name, node in evaluation_callbacks(callbacks).items():
        try:
            for label, name, kwargs in parse_reward_specs(node.get("rewards")):
                problems += reward_weight_problems(name, kwargs, f"callbacks.{node_name}.rewards", label)
        except ValueError:
            pass  # the evaluation callback names an unknown reward itself
    return problems


def _prompts_of(source: Any) -> list[str] | None:
    """The prompts of a prompt source as configs give it, or None when it cannot be read (said elsewhere)."""
    try:
        return load_prompts(source if isinstance(source, Sequence) else str(source))  # a ListConfig is one too
    except (ValueError, OSError):
        return None


def unscorable_prompt_problems(cfg: DictConfig, callbacks: dict[str, Any]) -> list[str]:
    """Prompts a reward of the run cannot score (color_match's prompts must name a colour): the training reward on
    ``data.source``, and every reward the evaluation callback scores on its prompts. Found before any model loads,
    not as fitting starts. ``callbacks``: ``resolved_callbacks(cfg)``."""
    from sdpo.rewards.preflight import reward_prompt_problem
    from sdpo.rewards.specs import parse_reward_specs

    trained = trained_reward(cfg)
    said = []
    training_prompts = _prompts_of(cfg.data.source)
    if training_prompts is not None:
        said.append(reward_prompt_problem(*trained, training_prompts, "data.source"))
    for name, node in evaluation_callbacks(callbacks).items():
        prompts = _prompts_of(node.get("prompts"))
        try:
            specs = parse_reward_specs(node.get("rewards"), key=f"callbacks.{name}.rewards")
        except ValueError:
            continue  # the callback names it as it is built
        if node.get("include_training_reward", True) and trained[0] not in {label for label, _, _ in specs}:
            specs.append((trained[0], *trained))
        if prompts is not None:
            said += [reward_prompt_problem(reward_name, kwargs, prompts, f"callbacks.{name}.prompts")
                     for _, reward_name, kwargs in specs]
    return list(dict.fromkeys(problem for problem in said if problem is not None))


def resolved_callbacks(cfg: DictConfig) -> dict[str, Any]:
    """``callbacks.<name>`` as plain dicts, each that resolves (one that does not fails as Hydra builds it)."""
    nodes = {}
    for name, node in (cfg.get("callbacks") or {}).items():
        try:
            nodes[str(name)] = OmegaConf.to_container(node, resolve=True) if node is not None else None
        except Exception:  # noqa: BLE001 - an interpolation only the Hydra app can resolve, or a broken one
            continue
    return nodes


def evaluation_callbacks(callbacks: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The held-out evaluation callbacks (``sdpo.callbacks.EvalDuringTraining``) among ``resolved_callbacks``' nodes,
    by their name under ``callbacks``."""
    return {name: node for name, node in callbacks.items()
            if isinstance(node, dict) and node.get("_target_") == "sdpo.callbacks.EvalDuringTraining"}


def ckpt_path_problems(cfg: DictConfig) -> list[str]:
    """``ckpt_path`` must name a checkpoint file. Lightning's own names ("last", "best", ...) are refused: it looks
    for them in this run's own folder, which Hydra has just created empty, and without one it trains from the base
    model after a mere warning; the resume checks need the file too."""
    ckpt = cfg.get("ckpt_path")
    if ckpt is None or "://" in str(ckpt):
        return []
    example = "ckpt_path=outputs/train/<run>/checkpoints/last.ckpt"
    if str(ckpt) in LIGHTNING_CKPT_NAMES:
        here = run_last_checkpoint(cfg)  # a run continued in its own folder has one
        use = cli_arg("ckpt_path", here) if here is not None and here.is_file() else example
        return [f"ckpt_path={ckpt}: give the checkpoint's path ({use}); Lightning would look for '{ckpt}' only in "
                f"this run's own folder and, finding none, train from the base model"]
    path = Path(str(ckpt)).expanduser()
    if path.is_file():
        return []
    return [f"ckpt_path={ckpt}: {not_a_checkpoint(path, key='ckpt_path')} (resume from a run's checkpoint, e.g. "
            f"{example})"]


def validate_config(cfg: DictConfig) -> None:
    problems = type_problems(cfg)
    if problems:  # the value checks below compare these settings with numbers
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    a, m = cfg.algo, cfg.model
    need(a.num_steps >= 2,
         f"algo.num_steps={a.num_steps}: SDPO trains on T >= 2 denoising steps. Both trajectories of a pair start "
         f"from the same noise, so at T = 1 their only x̂0 (and reward) are the same and every pair's reward "
         f"difference is 0: nothing to learn. Train at T >= 2 (the paper: 50) and evaluate at 1 step; the dense "
         f"rewards on x̂0 already supervise 1-step generation")
    need(a.eta > 0, f"algo.eta={a.eta}: the DDIM policy needs eta > 0 to have a log-prob (SDPO uses 1.0)")
    need(a.dense.anchor in STRATEGIES, f"algo.dense.anchor={a.dense.anchor!r}: use one of {list(STRATEGIES)}")
    need(a.dense.anchor == "all" or a.dense.num_anchors >= 1,
         f"algo.dense.num_anchors={a.dense.num_anchors}: need >= 1")
    need(a.clip_range > 0, f"algo.clip_range={a.clip_range}: must be > 0 (paper: 1e-4)")
    need(a.adv_clip_max > 0, f"algo.adv_clip_max={a.adv_clip_max}: must be > 0")
    need(0 < a.gamma <= 1, f"algo.gamma={a.gamma}: must be in (0, 1]")
    need(a.temporal_eta != 0, "algo.temporal_eta must be non-zero")
    need(a.micro_batch_pairs >= 1, f"algo.micro_batch_pairs={a.micro_batch_pairs}: need >= 1")
    need(a.gradient_accumulation_steps >= 1,
         f"algo.gradient_accumulation_steps={a.gradient_accumulation_steps}: need >= 1")
    need(a.num_inner_epochs >= 1, f"algo.num_inner_epochs={a.num_inner_epochs}: need >= 1")
    # by default sample_batch_size follows data.prompts_per_batch, whose own check below names the key to change
    derived = OmegaConf.is_interpolation(a, "sample_batch_size")
    need(a.sample_batch_size >= 1 or derived, f"algo.sample_batch_size={a.sample_batch_size}: need >= 1")
    need(a.decode_batch_size >= 1, f"algo.decode_batch_size={a.decode_batch_size}: need >= 1")
    need(a.tracker.buffer_size >= 1, f"algo.tracker.buffer_size={a.tracker.buffer_size}: need >= 1 (the paper: 32)")
    clip = a.get("max_grad_norm")
    need(clip is None or clip > 0,
         f"algo.max_grad_norm={clip}: clipping to {clip} would zero every gradient (0) or flip its sign (< 0); use a "
         f"value > 0 (the paper: 1.0), or null for no clipping")
    need(a.tracker.min_count <= a.tracker.buffer_size,
         f"algo.tracker.min_count={a.tracker.min_count} > buffer_size={a.tracker.buffer_size}: "
         "the buffer statistics could never be used")
    need(m.spacing in SPACINGS, f"model.spacing={m.spacing!r}: use one of {list(SPACINGS)}")
    need(m.spacing != "linspace" or m.get("step_kind", "auto") == "lcm",
         "model.spacing=linspace ends every schedule at t=0, where the DDIM step is deterministic and has no "
         "log-prob: use trailing (SD-Turbo's own) or leading with model.steps_offset=1 (an LCM ignores the spacing: "
         "model.step_kind=lcm)")
    need(m.spacing != "leading" or m.get("steps_offset") != 0 or m.get("step_kind", "auto") == "lcm",
         "model.spacing=leading with model.steps_offset=0 ends every schedule at t=0, where the DDIM step is "
         "deterministic and has no log-prob: use model.steps_offset=1 (the reference's 981..1) or trailing")
    need(m.weight_dtype in ("fp32", "bf16", "fp16", "float32", "bfloat16", "float16"),
         f"model.weight_dtype={m.weight_dtype!r}: use fp32, bf16 or fp16")
    need(m.get("step_kind", "auto") in ("auto", "ddim", "lcm"),
         f"model.step_kind={m.get('step_kind')!r}: use auto, ddim or lcm")
    resolution = m.get("resolution")
    need(resolution is None or (resolution > 0 and resolution % 8 == 0),
         f"model.resolution={resolution}: use a positive multiple of 8 (the VAE downsamples by 8), or null")
    guidance = m.get("guidance_scale")
    need(guidance is None or guidance >= 1, f"model.guidance_scale={guidance}: use null or a value >= 1")
    need(cfg.reward.name in available_rewards(),
         f"reward.name={cfg.reward.name!r}: available rewards are {available_rewards()}")
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if (accelerator == "cuda" and not torch.cuda.is_available()) or (
            accelerator == "gpu" and not torch.cuda.is_available() and not mps):  # Lightning's gpu: CUDA or MPS
        follows = OmegaConf.is_interpolation(cfg.trainer, "precision")  # trainer=ddp: 32-true once on the CPU
        cpu_precision = (" and trainer.precision=bf16-mixed (16-mixed autocast needs a GPU)"
                         if str(cfg.trainer.get("precision")) == "16-mixed" and not follows else "")
        problems.append(f"trainer.accelerator={accelerator} (trainer=gpu and trainer=ddp ask for one), but this "
                        f"machine has no GPU: add trainer.accelerator=cpu{cpu_precision} (with trainer=ddp also "
                        f"trainer.devices=<processes>, e.g. 2), or run it where there is a GPU")
    precision = str(cfg.trainer.get("precision", "32-true"))
    need(precision in PRECISIONS, f"trainer.precision={precision}: use one of {list(PRECISIONS)}")
    if precision == "16-mixed" and runs_on_cpu(cfg.trainer.get("accelerator")):  # Lightning would switch to bf16
        problems.append(f"trainer.precision=16-mixed needs a GPU, and trainer.accelerator="
                        f"{cfg.trainer.get('accelerator')} runs on the CPU here: use bf16-mixed or 32-true")
    need(cfg.optim.lr > 0, f"optim.lr={cfg.optim.lr}: must be > 0")
    need(cfg.optim.get("weight_decay", 0) >= 0, f"optim.weight_decay={cfg.optim.get('weight_decay')}: must be >= 0")
    # SDPO steps its optimizer itself (many updates per iteration), so Lightning's automatic versions do not apply
    accumulate, lightning_clip = cfg.trainer.get("accumulate_grad_batches"), cfg.trainer.get("gradient_clip_val")
    need(accumulate in (None, 1), f"trainer.accumulate_grad_batches={accumulate}: SDPO steps its optimizer itself, "
                                  f"many times per iteration; set algo.gradient_accumulation_steps instead")
    need(lightning_clip is None, f"trainer.gradient_clip_val={lightning_clip}: SDPO steps its optimizer itself, "
                                 f"many times per iteration; set algo.max_grad_norm instead")
    for key in ("max_epochs", "max_steps"):  # Lightning accepts 0 and fits nothing, then the run exports its base
        limit = cfg.trainer.get(key)
        need(limit != 0, f"trainer.{key}=0 trains nothing: use a positive limit, or -1 for none (the base model "
                         f"needs no training run to be evaluated: python -m sdpo.evaluate)")
    problems += ckpt_path_problems(cfg)
    seed = cfg.get("seed", 0)
    need(isinstance(seed, int) and 0 <= seed < 2**32, f"seed={seed!r}: use an integer in [0, 2**32)")
    if m.lora.enabled:
        check_lora(m.lora, need)
    for key in ("prompts_per_batch", "batches_per_epoch"):
        need(cfg.data[key] >= 1, f"data.{key}={cfg.data[key]}: need >= 1")
    problems += prompt_source_problems(cfg)
    problems += optional_package_problems(cfg)
    callbacks = resolved_callbacks(cfg)
    problems += weight_problems(cfg, callbacks)
    problems += callback_problems(callbacks)
    problems += unscorable_prompt_problems(cfg, callbacks)
    overlap = a.get("overlap_scoring", False)
    need(isinstance(overlap, bool), f"algo.overlap_scoring={overlap!r}: use true or false")
    pairs = pairs_per_rank(cfg)
    need(overlap is not True or a.sample_batch_size < pairs,
         f"algo.overlap_scoring=true overlaps scoring a chunk of algo.sample_batch_size prompts with sampling the "
         f"next, but algo.sample_batch_size={a.sample_batch_size} covers all {pairs} prompts of an iteration "
         f"(data.prompts_per_batch x data.batches_per_epoch): set algo.sample_batch_size lower, e.g. "
         f"{max(1, pairs // 2)}, or algo.overlap_scoring=false")
    low = a.get("low_precision_base", False)
    need(isinstance(low, bool), f"algo.low_precision_base={low!r}: use true or false")
    need(low is not True or precision in ("bf16-mixed", "16-mixed"),
         f"algo.low_precision_base=true stores frozen UNet layers in the autocast dtype, but trainer.precision="
         f"{precision} has no autocast: use trainer.precision=bf16-mixed (or 16-mixed), or "
         f"algo.low_precision_base=false")
    need(low is not True or bool(m.lora.enabled),
         "algo.low_precision_base=true needs a frozen base (model.lora.enabled=true): a full fine-tune trains every "
         "UNet weight, which stays fp32")
    layouts = a.get("compile_layout_optimization", False)
    need(isinstance(layouts, bool), f"algo.compile_layout_optimization={layouts!r}: use true or false")
    compile_check = a.get("compile_check", True)
    need(isinstance(compile_check, bool), f"algo.compile_check={compile_check!r}: use true or false")
    attention = a.get("attention_backend", "auto")
    need(attention not in CUDA_ONLY or cfg.trainer.get("accelerator") != "cpu",
         f"algo.attention_backend={attention} is a CUDA kernel, but trainer.accelerator=cpu: use auto, flash or math")
    try:
        attention_backend(attention)
        compile_mode(a.get("compile"))
        inductor_mode(a.get("compile_mode"), a.get("compile"), a.get("compile_backend", "inductor"))
        resolve_fused_lora(a.get("fused_lora", "auto"), a.get("compile"), a.get("compile_backend", "inductor"))
        need(layouts is not True or compiled_by_inductor(a.get("compile"), a.get("compile_backend", "inductor")),
             "algo.compile_layout_optimization=true needs the UNet compiled by inductor (algo.compile=true or "
             "regional, algo.compile_backend=inductor): nothing would change")
    except ValueError as error:
        problems.append(str(error))
    problems += unknown_keys(cfg, CONFIG_DIR)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def several_processes(trainer_cfg: Any) -> bool:
    """Whether Lightning will start more than one process for these trainer settings, whatever the strategy:
    ``strategy: auto`` with several devices is DDP too. ``devices: auto`` / -1 means every GPU here (one CPU)."""
    devices, nodes = str(trainer_cfg.get("devices", 1)), str(trainer_cfg.get("num_nodes", 1))
    if nodes != "1":
        return True
    if devices in ("auto", "-1"):
        return not runs_on_cpu(trainer_cfg.get("accelerator")) and torch.cuda.device_count() > 1
    if devices.isdigit():
        return int(devices) > 1
    return len([d for d in devices.strip("[]").split(",") if d.strip()]) > 1  # a list of device indices


def check_distributed(cfg: DictConfig) -> None:
    """Before any model loads: no multi-process job inside a Hydra multirun, and shuffle shards that fit."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    t = cfg.trainer
    if several_processes(t) and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ConfigError(
            f"a Hydra multirun (-m) cannot run jobs of several processes (trainer.devices={t.get('devices')}, "
            f"trainer.num_nodes={t.get('num_nodes', 1)}): Lightning re-launches the other ranks with the sweep's "
            f"command line, so they would run the whole sweep again. Launch one job per sweep point instead "
            f"(README.md, 'Multi-GPU and multi-node'), or sweep with trainer.devices=1"
        )
    shards, micro = cfg.algo.get("shuffle_shards", 1), cfg.algo.micro_batch_pairs
    pairs = pairs_per_rank(cfg)
    if shards < 1 or pairs % shards or micro % shards:
        raise ConfigError(
            f"algo.shuffle_shards={shards} must be >= 1 and divide the pairs per rank ({pairs} = "
            f"data.prompts_per_batch x data.batches_per_epoch) and algo.micro_batch_pairs ({micro})"
        )
