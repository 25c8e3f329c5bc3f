"""Per-phase time of SDPO iterations run through the normal entry point, and their overhead over the primitives.

Runs ``sdpo.train_run.train`` on a composed Hydra config (the default callbacks, CSV logger and a checkpoint every
iteration; the held-out evaluation callback off) for a few iterations and prints, per iteration:

- the module's phase times (sampling, decode, reward model, advantages, training) and the rest of the iteration
  (dense-reward bookkeeping, logging, checkpoint, sample grids, Lightning's loop);
- samples/s, reward queries/s and peak memory (CPU: max RSS; GPU: ``torch.cuda.max_memory_allocated``);
- the primitives of that same iteration timed in isolation (text encoder, UNet forward at the sampling batch, VAE
  decode, reward model, UNet forward+backward at the training micro-batch, clip + AdamW step), each multiplied by
  the number of times the iteration calls it, and the overhead ratio = iteration time / their sum;
- on GPU, the MFU of sampling and training (model FLOPs of one call, ``sdpo.flops``).

With ``algo.overlap_scoring=true`` decode and reward model run beside sampling: they are printed as the worker's
seconds, and sampling + rewards is compared with all four of their primitives (below 1.00: the overlap paid).

    python benchmarks/epoch.py                       # the tiny default (0.8 M-param UNet, 8x8 latents)
    python benchmarks/epoch.py --preset small        # 18.9 M-param UNet, 32x32 latents -> 64 px
    python benchmarks/epoch.py --preset small trainer.precision=bf16-mixed algo.channels_last=true
    python benchmarks/epoch.py --preset sd_turbo     # GPU: SD-Turbo sizes, random weights, the reference batch
    python benchmarks/epoch.py --preset sd_turbo_dry --device cpu   # the same path at toy sizes (a CPU check)
    python benchmarks/epoch.py --preset small algo.overlap_scoring=true algo.sample_batch_size=4

``sd_turbo`` builds (random weights, in a temp folder) the SD-Turbo pipeline and the aesthetic reward's
architecture of ``sd_turbo_scale.py`` and runs ``+experiment=sd_turbo_aesthetic`` on them: 866 M-param UNet,
512 px, T = 50, 8 x 4 prompt pairs per GPU, LoRA r4, micro-batch 2 x 8, bf16 autocast with bf16 frozen parts.

Not a test: nothing here asserts. Extra arguments are Hydra overrides.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sdpo.scoring import synchronize  # noqa: E402

PRESETS: dict[str, list[str]] = {
    "tiny": [],  # python -m sdpo.train's default: 16 pairs, T = 4, micro-batch 8 x 2, full fine-tuning
    "small": [  # ~18.9 M-param UNet, 32x32x4 latents -> 64 px, 8 pairs, T = 4, micro-batch 2 x 2
        "model.tiny.latent_size=32", "model.tiny.unet_channels=[64,160,320]", "data.prompts_per_batch=8",
        "algo.num_steps=4", "algo.micro_batch_pairs=2", "algo.gradient_accumulation_steps=2",
    ],
}
# Presets at the real SD-Turbo architecture, random weights (built per run): name -> sd_turbo_scale.SIZES key
MODEL_PRESETS: dict[str, str] = {"sd_turbo": "full", "sd_turbo_dry": "tiny"}
PRESETS.update({name: [] for name in MODEL_PRESETS})
PHASES = ("sampling", "decode", "reward_model", "advantages", "training")


class IterationTimer(L.Callback):
    """Wall time between consecutive epoch starts (everything one iteration costs) and the module's phase times.

    The last iteration ends when training ends: its checkpoint counts, as does the final export of the trained
    weights (milliseconds for a LoRA), and no extra iteration runs only to close the timing (a minute at T = 50)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.iterations: list[dict] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(pl_module.device)
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(pl_module.device)
        self.starts.append(time.perf_counter())  # closes the last iteration without running another

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        self.iterations.append(dict(pl_module.last_iteration))


def time_call(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        tic = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def chunk_sizes(total: int, size: int) -> dict[int, int]:
    """How many calls of each batch size splitting ``total`` items into chunks of ``size`` makes."""
    sizes: dict[int, int] = {}
    for start in range(0, total, size):
        k = min(size, total - start)
        sizes[k] = sizes.get(k, 0) + 1
    return sizes


def flops_of(fn: Callable[[], object]) -> int:
    """Model FLOPs of one call (``sdpo.flops``: attention without the fused kernels' recomputation, whichever
    kernel runs), counted eagerly: under the counter a compiled UNet would compile again (minutes)."""
    from sdpo.flops import model_flops

    with torch.compiler.set_stance("force_eager"):
        return model_flops(fn)


def primitives(trainer: L.Trainer, cfg, counts: dict, device: torch.device, repeats: int) -> dict[str, dict]:
    """Each primitive of one iteration timed alone: seconds per call, calls per iteration, FLOPs of one call.

    The UNet calls run under the trainer's own autocast (``forward_context``): a compiled UNet guards on autocast's
    settings, and any other autocast (``torch.autocast``'s default caches casts, Lightning's does not) would make
    it compile again, minutes per graph on a GPU."""
    from sdpo.algo.optimizer import build_adamw, clip_gradients
    from sdpo.policy.conditioning import decode_latents, encode_prompts
    from sdpo.policy.rollout import predict_model_output

    module = trainer.lightning_module
    a = module.algo_cfg
    prompts = list(cfg.data.source) if not isinstance(cfg.data.source, str) else ["cat", "dog", "horse"]
    num_pairs, num_steps = counts["num_pairs"], a["num_steps"]
    image_size = module.latent_shape[-1] * module.components.vae_scale_factor
    amp = trainer.precision_plugin.forward_context
    out: dict[str, dict] = {}

    def add(name: str, fn: Callable[[], object], calls: int, key: str, flops: bool = False) -> None:
        seconds = time_call(fn, device, repeats)
        entry = out.setdefault(name, {"seconds": 0.0, "calls": 0, "flops": 0, "detail": []})
        entry["seconds"] += seconds * calls
        entry["calls"] += calls
        entry["detail"].append(f"{calls} x {key}: {seconds * 1e3:.2f} ms")
        if flops:
            entry["flops"] += flops_of(fn) * calls

    def rows(n: int) -> list[str]:
        return [prompts[i % len(prompts)] for i in range(n)]

    for size, calls in chunk_sizes(num_pairs, a["sample_batch_size"]).items():
        add("text encoder", lambda size=size: encode_prompts(module.components, rows(size), image_size,
                                                             module.model_cfg.get("guidance_scale")),
            calls, f"{size} prompts")
        cond = encode_prompts(module.components, rows(size), image_size, module.model_cfg.get("guidance_scale"))
        cond = cond.repeat_pairs()
        x = torch.randn(2 * size, *module.latent_shape, device=device)
        t = module.timesteps[0].expand(2 * size)

        def unet_forward(x=x, t=t, cond=cond) -> None:
            with torch.no_grad(), amp():
                predict_model_output(module.unet, x, t, cond)

        add("UNet forward (sampling)", unet_forward, calls * num_steps, f"{2 * size} rows", flops=True)

    latents = torch.randn(counts["num_queries"], *module.latent_shape, device=device)
    images = decode_latents(module.vae, latents, module.latent_scale, a["decode_batch_size"])
    for size, calls in chunk_sizes(counts["num_queries"], a["decode_batch_size"]).items():
        add("VAE decode", lambda size=size: decode_latents(module.vae, latents[:size], module.latent_scale, size),
            calls, f"{size} latents")
        with torch.no_grad():
            add("reward model", lambda size=size: module.reward_fn(images[:size], rows(size)), calls, f"{size} images")

    generators = [torch.Generator().manual_seed(0) for _ in range(a.get("shuffle_shards", 1))]
    plan = module._update_plan(num_pairs, num_steps, generators)
    micro: dict[int, int] = {}
    for group in plan:
        for idx, _ in group:
            micro[idx.shape[0]] = micro.get(idx.shape[0], 0) + 1
    params = [p for p in module.unet.parameters() if p.requires_grad]
    for size, calls in micro.items():
        cond = encode_prompts(module.components, rows(size), image_size, module.model_cfg.get("guidance_scale"))
        cond = cond.repeat_pairs()
        x = torch.randn(2 * size, *module.latent_shape, device=device)
        t = module.timesteps[torch.arange(2 * size, device=device) % num_steps]

        def forward_backward(x=x, t=t, cond=cond) -> None:
            with amp():
                output = predict_model_output(module.unet, x, t, cond)
            output.float().square().mean().backward()

        add("UNet forward+backward (training)", forward_backward, calls * a["num_inner_epochs"],
            f"{2 * size} rows", flops=True)
    optimizer = build_adamw(params, {**module.optim_cfg, "lr": 1e-12}, device)  # the run's AdamW (fused on CUDA)
    for p in params:
        p.grad = torch.randn_like(p)

    def optimizer_step() -> None:
        clip_gradients(optimizer, a["max_grad_norm"])
        optimizer.step()

    add("clip + AdamW step", optimizer_step, counts["optimizer_steps"], f"{sum(p.numel() for p in params)} params")
    return out


def model_preset_overrides(preset: str, folder: Path, device: torch.device) -> list[str]:
    """Build the preset's random SD-Turbo-architecture pipeline and aesthetic reward under ``folder``; returns the
    overrides that train ``sd_turbo_aesthetic`` on them (bf16 on GPU, fp32 on CPU)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sd_turbo_scale import SIZES, build_random_aesthetic, build_random_sd_turbo

    sizes = SIZES[MODEL_PRESETS[preset]]
    head = folder / "aesthetic" / "aesthetic_head.pth"
    if head.is_file() and (folder / "sd_turbo" / "unet").is_dir():
        print(f"reusing the random {preset} models in {folder}", flush=True)
    else:
        tic = time.perf_counter()
        build_random_sd_turbo(folder / "sd_turbo", sizes)
        head = build_random_aesthetic(folder / "aesthetic", sizes)
        print(f"built random {preset} models in {time.perf_counter() - tic:.1f} s", flush=True)
    gpu = device.type == "cuda"
    dtype = "bf16" if gpu else "fp32"
    return [
        "+experiment=sd_turbo_aesthetic", f"model.source={folder / 'sd_turbo'}", "model.variant=null",
        f"reward.clip_model={folder / 'aesthetic' / 'clip'}", f"reward.head_source={head}",
        f"model.resolution={sizes['latent'] * 8}", f"model.weight_dtype={dtype}", f"reward.dtype={dtype}",
        f"trainer.precision={'bf16-mixed' if gpu else '32-true'}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations (after the warm-up ones)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=5, help="timings per primitive (median)")
    parser.add_argument("--peak-flops", type=float, default=989e12, help="peak FLOP/s for MFU (H100/H200 dense bf16)")
    parser.add_argument("--keep", action="store_true", help="keep the run folder (deleted by default)")
    parser.add_argument("--models", type=Path, default=None,
                        help="sd_turbo presets: where the random models are built, or reused when already there")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.precision=bf16-mixed")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # sdpo's own notes (what it fused, compiled, and the compile check's verdict) as a Hydra run would show them
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("sdpo").setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["SDPO_NUM_THREADS"] = str(args.threads)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    from hydra import compose, initialize_config_dir

    from sdpo.app_config import CONFIG_DIR
    from sdpo.train_run import train

    epochs = args.warmup + args.iterations
    out = Path(tempfile.mkdtemp(prefix="sdpo-bench-"))
    preset = PRESETS[args.preset]
    if args.preset in MODEL_PRESETS:
        preset = model_preset_overrides(args.preset, args.models or out / "models", device)
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            print(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB", flush=True)
    overrides = [
        *preset, f"trainer.max_epochs={epochs}", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "++callbacks.eval=null", f"paths.output_dir={out}",
        "+callbacks.timer._target_=__main__.IterationTimer",
        f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}", *args.overrides,
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    wall = time.perf_counter()
    trainer = train(cfg)
    wall = time.perf_counter() - wall
    timer = next(c for c in trainer.callbacks if type(c).__name__ == "IterationTimer")
    module = trainer.lightning_module.to(device)
    timed = range(args.warmup, args.warmup + args.iterations)
    seconds = [timer.starts[e + 1] - timer.starts[e] for e in timed]
    # the median iteration, broken down by its own phases (which then add up to it): like the primitives' medians,
    # one iteration slowed by another process on the machine does not set the figures
    typical = sorted(timed, key=lambda e: seconds[e - args.warmup])[(len(seconds) - 1) // 2]
    phases = {name: timer.iterations[typical]["timings"][name] for name in PHASES}
    rewards_phase = timer.iterations[typical]["timings"]["rewards"]
    iteration = seconds[typical - args.warmup]
    counts = timer.iterations[args.warmup]
    world = trainer.world_size
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (torch.cuda.max_memory_allocated)"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB (max RSS)"
    unet_params = sum(p.numel() for p in module.unet.parameters())

    print(f"\nSDPO iteration benchmark: preset {args.preset}, {device.type}"
          f"{'' if device.type == 'cuda' else f', {torch.get_num_threads()} threads'}, torch {torch.__version__}")
    a = module.algo_cfg
    print(f"UNet {unet_params / 1e6:.1f} M params, latents {list(module.latent_shape)}, T = {a['num_steps']}, "
          f"{counts['num_pairs']} pairs/rank, {world} rank(s), micro-batch {a['micro_batch_pairs']} x "
          f"{a['gradient_accumulation_steps']}, {counts['optimizer_steps']} optimizer steps, "
          f"precision {cfg.trainer.precision}, compile {a.get('compile')} ({a.get('compile_mode', 'default')}), "
          f"attention {a.get('attention_backend', 'auto')}; run of {epochs} iterations took {wall:.1f} s")
    print(f"iterations timed: {args.iterations} (after {args.warmup} warm-up): "
          + ", ".join(f"{s:.3f}" for s in seconds) + f" s; below: the median one (iteration {typical})")
    if max(seconds) > 1.5 * min(seconds):
        print(f"note: the timed iterations vary {max(seconds) / min(seconds):.1f}x: another process may share "
              f"this machine")
    overlap = bool(a.get("overlap_scoring"))
    print(f"\n{'phase':<38} s/iter   share")
    rest = iteration - sum(phases[p] for p in ("sampling", "advantages", "training")) - rewards_phase
    if overlap:  # decode and reward model ran on the worker thread, beside sampling: not shares of the iteration
        rows = [("sampling (+ scoring of earlier chunks)", phases["sampling"]),
                ("rewards: scoring left after sampling", rewards_phase),
                *((p, phases[p]) for p in ("advantages", "training")), ("logging, checkpoint, loop", rest)]
    else:
        rows = [*((p, phases[p]) for p in PHASES),
                ("rewards: query plan, interpolation", rewards_phase - phases["decode"] - phases["reward_model"]),
                ("logging, checkpoint, loop", rest)]
    for name, value in rows:
        print(f"{name:<38} {value:8.4f} {100 * value / iteration:6.1f}%")
    if overlap:
        print(f"{'(worker thread: decode, reward model)':<38} {phases['decode']:8.4f} {phases['reward_model']:8.4f}"
              "  overlapped with sampling")
    print(f"{'iteration':<38} {iteration:8.4f}")
    samples = 2 * counts["num_pairs"] * world
    print(f"\nsamples/s {samples / iteration:.1f}   reward queries/s {counts['num_queries'] * world / iteration:.1f}   "
          f"peak memory {peak}")

    # the primitives must time the graphs the run compiled: a recompile would cost minutes and time another graph
    stance = "fail_on_recompile" if a.get("compile") else "default"
    with torch.compiler.set_stance(stance):
        prims = primitives(trainer, cfg, counts, device, args.repeats)
    total = sum(p["seconds"] for p in prims.values())
    print("\nprimitive (same iteration, in isolation)   s/iter   calls")
    for name, p in prims.items():
        print(f"{name:<40} {p['seconds']:8.4f} {p['calls']:6d}   ({'; '.join(p['detail'])})")
    print(f"{'sum of primitives':<40} {total:8.4f}")
    print(f"overhead ratio = iteration / primitives = {iteration / total:.2f}")
    # where the overhead sits: each phase against the primitives it is made of
    phase_parts = {
        "sampling": (phases["sampling"], ["text encoder", "UNet forward (sampling)"]),
        "rewards": (rewards_phase, ["VAE decode", "reward model"]),
        "training": (phases["training"], ["UNet forward+backward (training)", "clip + AdamW step"]),
    }
    if overlap:  # below 1.00: the overlap hid part of the scoring
        phase_parts = {"sampling + rewards": (phases["sampling"] + rewards_phase,
                                              [*phase_parts["sampling"][1], *phase_parts["rewards"][1]]),
                       "training": phase_parts["training"]}
    print("phase / its primitives: " + ", ".join(
        f"{name} {seconds / sum(prims[p]['seconds'] for p in parts):.2f}"
        for name, (seconds, parts) in phase_parts.items()))

    sample_flops = prims["UNet forward (sampling)"]["flops"]
    train_flops = prims["UNet forward+backward (training)"]["flops"]
    print(f"\nFLOPs per iteration: sampling {sample_flops / 1e9:.2f} GFLOP, training {train_flops / 1e9:.2f} GFLOP "
          f"({sample_flops / phases['sampling'] / 1e9:.1f} and {train_flops / phases['training'] / 1e9:.1f} GFLOP/s)")
    if device.type == "cuda":
        mfu_sampling = sample_flops / phases["sampling"] / args.peak_flops
        mfu_training = train_flops / phases["training"] / args.peak_flops
        print(f"MFU (peak {args.peak_flops:.3g} FLOP/s): sampling {mfu_sampling:.1%}, training {mfu_training:.1%}")
    else:
        print("MFU: n/a on the CPU (--peak-flops is a GPU's bf16 peak); the GFLOP/s above are what it did")
    if not math.isfinite(iteration / total):
        print("warning: a primitive took no measurable time")
    if args.keep:
        print(f"run folder: {out}")
    else:
        print(f"run folder {out} deleted (--keep keeps it)")
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
