"""SDPO at SD-Turbo scale with random weights: per-phase times and peak GPU memory.

Builds, with random weights, a pipeline at the real SD-Turbo sizes (SD 2.1 UNet of ~865 M parameters, 64x64x4
latents -> 512 px through an SD AutoencoderKL, a 23-layer 1024-wide CLIP text encoder) and the aesthetic reward's
real architecture (CLIP ViT-L/14 + the LAION MLP head), saves them in diffusers layout, and runs SDPO through the
normal entry point (``sdpo.train_run.train`` with a composed Hydra config) for a few iterations.

    python benchmarks/sd_turbo_scale.py                       # GPU: full sizes, bf16, LoRA r4
    python benchmarks/sd_turbo_scale.py --scale tiny --device cpu   # a minute-long dry run of the same path

Prints one line per run: per-phase seconds (sampling, rewards, advantages, training) per iteration, peak memory,
images/s and reward queries/s. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SIZES = {
    # SD 2.1 / SD-Turbo UNet, SD VAE, OpenCLIP-H text tower (hidden 1024, 23 layers), CLIP ViT-L/14 for aesthetic
    "full": dict(unet_channels=(320, 640, 1280, 1280), heads=(5, 10, 20, 20), latent=64, cross=1024, text_layers=23,
                 text_hidden=1024, text_ff=4096, vae_channels=(128, 256, 512, 512), clip_hidden=1024, clip_layers=24,
                 clip_patch=14, clip_image=224, clip_proj=768, clip_text_hidden=768, clip_text_layers=12),
    # tiny: latents of 16, so the deepest map is 2 x 2 (at 1 x 1, inductor on CPU, torch 2.13, fails to compile the
    # nearest upsampling's backward with its layout optimization off, sdpo's setting)
    "tiny": dict(unet_channels=(32, 64, 64, 64), heads=(2, 2, 2, 2), latent=16, cross=32, text_layers=2,
                 text_hidden=32, text_ff=64, vae_channels=(16, 16, 16, 16), clip_hidden=32, clip_layers=2,
                 clip_patch=8, clip_image=32, clip_proj=16, clip_text_hidden=32, clip_text_layers=2),
}


def unet_config(s: dict) -> dict:
    """The SD 2.1 / SD-Turbo UNet's constructor arguments at sizes ``s`` (also used by ``unet_flops.py``)."""
    return dict(
        sample_size=s["latent"], in_channels=4, out_channels=4, block_out_channels=s["unet_channels"],
        layers_per_block=2, cross_attention_dim=s["cross"], attention_head_dim=s["heads"], use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        norm_num_groups=32 if s["unet_channels"][0] >= 64 else 8,
    )


def build_random_sd_turbo(folder: Path, s: dict) -> None:
    """SD-Turbo's architecture with random weights, saved in diffusers layout (fp16 files, like the hub's)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdpo.policy.tokenizer import build_clip_tokenizer, save_tokenizer
    from sdpo.prompts import SIMPLE_ANIMALS

    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer(SIMPLE_ANIMALS)
    save_tokenizer(tokenizer, folder / "tokenizer")
    CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=s["text_hidden"], intermediate_size=s["text_ff"],
        num_hidden_layers=s["text_layers"], num_attention_heads=16 if s["text_hidden"] >= 256 else 4,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=s["text_hidden"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )).half().save_pretrained(folder / "text_encoder")
    UNet2DConditionModel(**unet_config(s)).half().save_pretrained(folder / "unet")
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=s["vae_channels"], layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32 if s["vae_channels"][0] >= 64 else 8, sample_size=s["latent"] * 8, scaling_factor=0.18215,
    ).half().save_pretrained(folder / "vae")
    EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="epsilon", timestep_spacing="trailing", steps_offset=1,
    ).save_pretrained(folder / "scheduler")


def build_random_aesthetic(folder: Path, s: dict) -> Path:
    """CLIP ViT-L/14 (random) + the LAION aesthetic head layout (random), as local files the reward loads."""
    from transformers import CLIPConfig, CLIPModel

    from sdpo.policy.tokenizer import build_clip_tokenizer, save_tokenizer

    torch.manual_seed(1)
    config = CLIPConfig(
        text_config=dict(hidden_size=s["clip_text_hidden"], num_hidden_layers=s["clip_text_layers"],
                         intermediate_size=4 * s["clip_text_hidden"], num_attention_heads=4, vocab_size=1000,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=s["clip_hidden"], num_hidden_layers=s["clip_layers"],
                           intermediate_size=4 * s["clip_hidden"], num_attention_heads=16 if s["clip_hidden"] >= 256
                           else 4, patch_size=s["clip_patch"], image_size=s["clip_image"]),
        projection_dim=s["clip_proj"],
    )
    CLIPModel(config).save_pretrained(folder / "clip")
    save_tokenizer(build_clip_tokenizer(["cat"]), folder / "clip")
    d = s["clip_proj"]
    head = torch.nn.Sequential(torch.nn.Linear(d, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                               torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                               torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
    head_file = folder / "aesthetic_head.pth"
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, head_file)
    return head_file


def run_sdpo(name: str, model_dir: Path, clip_dir: Path, head: Path, out: Path, overrides: list[str]) -> dict:
    """Train through the real entry point and return per-iteration phase times and peak memory."""
    from hydra import compose, initialize_config_dir

    from sdpo.train_run import train

    run_dir = out / name
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            "+experiment=sd_turbo_aesthetic", f"model.source={model_dir}", "model.variant=null",
            f"reward.clip_model={clip_dir}", f"reward.head_source={head}", f"paths.output_dir={run_dir}",
            "trainer.enable_progress_bar=false", "~callbacks.sample_grid", *overrides,
        ])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - tic
    rows = [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(open(run_dir / "csv" / "metrics.csv"))]
    last = rows[-1]
    phases = {k.split("/")[1]: last[k] for k in last if k.startswith("time/")}
    iteration = sum(phases.values())
    images = 2 * cfg.data.prompts_per_batch * cfg.data.batches_per_epoch
    result = {
        "run": name, "overrides": overrides, "wall_s": round(wall, 1), "iteration_s": round(iteration, 2),
        **{f"{k}_s": round(v, 3) for k, v in phases.items()},
        "images_per_s": round(images / iteration, 2),
        "reward_queries_per_s": round(last["train/queries_per_trajectory"] * images / iteration, 2),
        "optimizer_steps": last.get("train/optimizer_steps"),
        "first_update_log_ratio_abs_max": last.get("train/first_update_log_ratio_abs_max"),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SIZES), default="full")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--steps", type=int, default=50, help="training denoising steps T (reference: 50)")
    parser.add_argument("--out", default=None, help="where to write run folders and results.json")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. algo.decode_batch_size=8")
    parser.add_argument("--reference-batch", action="store_true",
                        help="also one iteration with the reference per-GPU batch (8x4 prompts, micro-batch 2)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out or tempfile.mkdtemp(prefix="sdpo-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    s = SIZES[args.scale]
    tic = time.perf_counter()
    models = out / "models"
    build_random_sd_turbo(models / "sd_turbo", s)
    head = build_random_aesthetic(models / "aesthetic", s)
    print(f"built random {args.scale} models in {time.perf_counter() - tic:.1f}s", flush=True)
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        print(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB", flush=True)
    frozen_dtype = "bf16" if "bf16" in args.precision else "fp16" if "16" in args.precision else "fp32"
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    common = [f"trainer.accelerator={accelerator}", f"trainer.precision={args.precision}",
              f"algo.num_steps={args.steps}", f"model.weight_dtype={frozen_dtype}", f"reward.dtype={frozen_dtype}",
              f"model.resolution={s['latent'] * 8}", *args.overrides]
    results = [run_sdpo("two_iterations", models / "sd_turbo", models / "aesthetic" / "clip", head, out, [
        *common, "trainer.max_epochs=2", "data.batches_per_epoch=1", "algo.micro_batch_pairs=8",
        "algo.gradient_accumulation_steps=1"])]
    if args.reference_batch:
        results.append(run_sdpo("reference_batch", models / "sd_turbo", models / "aesthetic" / "clip", head, out,
                                [*common, "trainer.max_epochs=1"]))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
