"""Step-generalisation evaluation: numbers equal diffusers' own pipelines, are deterministic and batch-invariant,
the CLI writes its run folder, checkpoints and exported LoRAs evaluate alike, and the training callback logs
held-out rewards (CSV, W&B offline) without changing training."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger
from omegaconf import OmegaConf
from PIL import Image

from sdpo.callbacks import EvalDuringTraining
from sdpo.config_checks import ConfigError
from sdpo.eval_config import validate_eval_config
from sdpo.evaluate_run import evaluate
from sdpo.evaluation import evaluate_policy, item_seed
from sdpo.grids import GRID_HEADER_HEIGHT, GRID_LABEL_WIDTH, grid_scale
from sdpo.rewards.specs import build_rewards, parse_reward_specs
from sdpo.saved_policy import load_policy
from sdpo.statistics import _t_quantile_builtin, t_quantile
from sdpo.train_run import train
from tests.conftest import FAST, REPO, compose, compose_eval, read_metrics

PROMPTS = ["cat", "a red dog"]


def model_cfg(name: str, cache_dir: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose_eval([f"model={name}"], Path("unused"), cache_dir).model, resolve=True)



def stock_pipeline(arch: str, components):
    """diffusers' own pipeline class for the family, with the scheduler class the model ships."""
    import diffusers

    scheduler = getattr(diffusers, components.scheduler_config["_class_name"]).from_config(components.scheduler_config)
    parts = dict(vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
                 unet=components.unet, scheduler=scheduler)
    if arch == "tiny_sdxl":
        return diffusers.StableDiffusionXLPipeline(text_encoder_2=components.text_encoder_2,
                                                   tokenizer_2=components.tokenizer_2, **parts)
    cls = diffusers.LatentConsistencyModelPipeline if arch == "tiny_lcm" else diffusers.StableDiffusionPipeline
    return cls(safety_checker=None, feature_extractor=None, requires_safety_checker=False, **parts)


@pytest.mark.parametrize("arch", ["tiny", "tiny_sdxl", "tiny_lcm"])
def test_scores_equal_the_stock_pipeline(arch, cache_dir):
    """DDIM (eta 0), Euler ancestral (step noise) and LCM: our loop equals diffusers' pipeline fed the same
    per-image generators (it draws the initial noise from them itself); brightness computed by hand."""
    cfg = model_cfg(arch, cache_dir)
    policy = load_policy(cfg)
    steps, n, seed = (1, 2), 2, 3
    guidance = cfg.get("guidance_scale")
    result = evaluate_policy(policy.components, policy.unet, PROMPTS, steps, rewards=build_rewards(
        parse_reward_specs(["brightness"])), images_per_prompt=n, seed=seed, batch_size=3, guidance_scale=guidance,
        progress=False)
    pipe = stock_pipeline(arch, policy.components)
    pipe.set_progress_bar_config(disable=True)
    size = policy.components.native_resolution
    for k in steps:
        for p, prompt in enumerate(PROMPTS):
            generators = [torch.Generator().manual_seed(item_seed(seed, p, i)) for i in range(n)]
            with torch.no_grad():
                images = pipe([prompt] * n, num_inference_steps=k, guidance_scale=guidance or 1.0, height=size,
                              width=size, generator=generators, output_type="pt").images
            expected = images.float().mean(dim=(1, 2, 3))
            torch.testing.assert_close(result.scores_for("brightness", k)[p], expected, rtol=0, atol=2e-6)
    assert result.meta["scheduler"] == policy.components.scheduler_config["_class_name"]
    assert result.images.shape == (2, 2, 1, 3, size, size) and result.images.dtype == torch.uint8


def test_deterministic_and_independent_of_batching(cache_dir):
    policy = load_policy(model_cfg("tiny", cache_dir))
    rewards = build_rewards(parse_reward_specs(["brightness", "colorfulness"]))

    def run(prompts=PROMPTS, **kwargs):
        args = dict(rewards=rewards, images_per_prompt=3, seed=0, batch_size=16, progress=False) | kwargs
        return evaluate_policy(policy.components, policy.unet, prompts, (1, 2), **args)

    base = run()
    for name in ("brightness", "colorfulness"):
        # batching changes BLAS blocking, so equal to float32 rounding rather than bit for bit
        torch.testing.assert_close(run(batch_size=1).scores[name], base.scores[name], rtol=0, atol=1e-6)
        assert torch.equal(run().scores[name], base.scores[name])  # same seed: identical
        assert not torch.allclose(run(seed=1).scores[name], base.scores[name], atol=1e-4)
    alone = run(prompts=PROMPTS[:1])  # the other prompts do not matter
    torch.testing.assert_close(alone.scores["brightness"][:, 0], base.scores["brightness"][:, 0], rtol=0, atol=1e-6)
    # a prompt's k-step images share their initial noise across k; different images of a prompt differ
    assert not torch.equal(base.images[0, 0, 0], base.images[1, 0, 0])
    few = run(keep_images=2, keep_prompts=1)  # only what a grid draws is kept in memory
    assert few.images.shape[1:3] == (1, 2) and torch.equal(few.images[:, :, :1], base.images[:, :1])
    assert not torch.equal(few.images[:, :, 0], few.images[:, :, 1])
    table = base.table()
    expected = [(n, k) for n in ("brightness", "colorfulness") for k in (1, 2)]
    assert [(r["reward"], r["steps"]) for r in table] == expected
    row = table[0]
    values = base.scores["brightness"][0].double()  # [2 prompts, 3 images]
    prompt_means = [float(values[p].sum()) / 3 for p in range(2)]
    half = _t_quantile_builtin(0.975, 1) * abs(prompt_means[0] - prompt_means[1]) / 2  # std of 2 means / sqrt(2)
    assert row["n"] == 6 and row["prompts"] == 2 and row["mean"] == pytest.approx(float(values.mean()))
    assert row["std"] == pytest.approx(float(values.flatten().std()))
    assert row["ci95_high"] - row["mean"] == pytest.approx(half, rel=1e-5)
    assert row["mean"] - row["ci95_low"] == pytest.approx(half, rel=1e-5)


def test_t_quantile_matches_tables():
    for df, value in ((1, 12.7062), (4, 2.7764), (7, 2.3646), (30, 2.0423), (1000, 1.9623)):
        assert _t_quantile_builtin(0.975, df) == pytest.approx(value, abs=1e-4)


def test_cli_writes_run_folder(tmp_path, cache_dir):
    """`python -m sdpo.evaluate` end to end: exit 0, the table printed, the files, the grid's layout, and the same
    numbers as an in-process evaluation."""
    run_dir = tmp_path / "eval"
    args = ["prompts=[cat,dog,zebra]", "steps=[1,2]", "images_per_prompt=2", "rewards=[brightness,colorfulness]"]
    env = {**os.environ, "SDPO_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    result = subprocess.run([sys.executable, "-m", "sdpo.evaluate", f"hydra.run.dir={run_dir}", "progress=false",
                             *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| brightness | 1 |" in result.stdout and "| colorfulness | 2 |" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("| brightness | 1 |"))
    assert "| 95% CI of the mean | images | prompts |" in result.stdout and row.endswith("| 6 | 3 |")  # CI: 3 prompts
    for name in ("results.csv", "results.json", "results.md", ".hydra/config.yaml"):
        assert (run_dir / name).exists(), name
    rows = list(csv.DictReader(open(run_dir / "results.csv")))
    assert [(r["reward"], r["steps"]) for r in rows] == [(n, k) for n in ("brightness", "colorfulness") for k in "12"]
    saved = json.loads((run_dir / "results.json").read_text())
    assert len(saved["scores"]["brightness"]["2"]) == 3 and len(saved["scores"]["brightness"]["2"][0]) == 2
    again = evaluate(compose_eval(args, tmp_path / "in_process", cache_dir))
    assert [r["mean"] for r in again.table()] == pytest.approx([r["mean"] for r in saved["table"]], abs=1e-7)
    # grid.png: 3 prompts x (2 step counts x grid_images=2), each image in its own cell (tiny images are 16 px)
    side = 16 * grid_scale(16)
    grid = np.asarray(Image.open(run_dir / "grid.png").convert("RGB")).astype(int)
    head = grid.shape[0] - 3 * side  # the header grows to fit the two-reward legend in the corner
    assert grid.shape[1] == GRID_LABEL_WIDTH + 4 * side and head > GRID_HEADER_HEIGHT
    for p, s, i in ((0, 0, 0), (2, 1, 1), (1, 0, 1)):
        top, left = head + p * side, GRID_LABEL_WIDTH + (2 * s + i) * side
        cell = grid[top : top + side // 2, left : left + side]  # the half above the score captions
        image = again.images[s, p, i].permute(1, 2, 0).repeat_interleave(grid_scale(16), 0)
        expected = image.repeat_interleave(grid_scale(16), 1)[: side // 2].numpy().astype(int)
        assert np.abs(cell - expected).max() <= 1, (p, s, i)  # the same image, to uint8 rounding


def test_bad_inputs_fail_early(tmp_path, cache_dir):
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"")
    (tmp_path / "w.safetensors").write_bytes(b"")
    run = tmp_path / "finished"  # a finished run's folder, given for its export
    (run / "trained").mkdir(parents=True)
    cases = {
        "rewards=[brightness,sharpness]": "unknown reward 'sharpness'",
        f"checkpoint={ckpt}": f"checkpoint={ckpt}: not a checkpoint torch can load safely",
        f"checkpoint={tmp_path / 'w.safetensors'}": f"exported weights, not a training checkpoint .* lora={tmp_path}",
        "prompts=[cat]": None,  # fine on its own
        "steps=[0,2]": "steps=[0, 2]",
        "steps=[]": "steps=[]: give at least one step count",
        f"lora={run}": f"lora={run}: is a run folder: use lora={run / 'trained'}",
        "checkpoint=/nope.ckpt": "checkpoint=/nope.ckpt: no such file",
        "prompts=/nope.txt": "prompts:",
        "resolution=36": "resolution=36: use null or a positive multiple of 8",
        "grid_prompts=0": "grid_prompts=0: need >= 1",
        "baseline=true": "baseline=true compares a trained policy with its base model: give checkpoint=",
        "+step=[1]": "step is not a setting .conf/evaluate.yaml has no such key; did you mean steps",
        "images_per_prompt=two": "images_per_prompt='two': need an integer",
        "batch_size=8.0": r"batch_size=8.0: need an integer \(write 8\)",
        "guidance_scale=high": "guidance_scale='high': need a number or null",
        f"lora={ckpt}": f"lora={ckpt} is a training checkpoint: evaluate it with checkpoint={ckpt}",
    }
    for override, message in cases.items():
        cfg = compose_eval([override], tmp_path, cache_dir)
        if message is None:
            validate_eval_config(cfg)
            continue
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            validate_eval_config(cfg)
    # a folder where a checkpoint file belongs: the argument that was probably meant
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run / "trained").mkdir()
    (run / "trained" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    last = run / "checkpoints" / "last.ckpt"
    for folder, hint in ((run, f"is a run folder: use checkpoint={last}"),
                         (run / "trained", f"is an exported folder .weights for diffusers.: use lora={run}/trained"),
                         (run / "checkpoints", f"is a folder: use checkpoint={last}")):
        with pytest.raises(ConfigError, match=f"checkpoint={folder}: {hint}"):
            validate_eval_config(compose_eval([f"checkpoint={folder}"], tmp_path, cache_dir))
    with pytest.raises(ConfigError, match="prompts=training needs checkpoint="):
        validate_eval_config(compose_eval(["prompts=training", f"lora={tmp_path}"], tmp_path, cache_dir))
    cfg = compose_eval([f"checkpoint={ckpt}", f"lora={tmp_path}"], tmp_path, cache_dir)
    with pytest.raises(ConfigError, match="checkpoint and lora are both set"):
        evaluate(cfg)
    with pytest.raises(ValueError, match="not both"):
        load_policy(model_cfg("tiny", cache_dir), checkpoint=ckpt, lora=tmp_path)


def test_an_lcm_step_count_beyond_its_grid_fails_before_sampling(tmp_path, cache_dir, monkeypatch):
    """An LCM samples at most original_inference_steps (50) steps: evaluation, the evaluation callback and
    training refuse more before any image is drawn, naming the key."""
    import sdpo.evaluation

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before the step counts were checked")

    monkeypatch.setattr(sdpo.evaluation, "sample_native", no_sampling)
    with pytest.raises(ValueError, match=r"steps=\[1, 51\]: this model's LCMScheduler samples at most 50 steps"):
        evaluate(compose_eval(["model=tiny_lcm", "steps=[1,51]"], tmp_path / "eval", cache_dir))
    with pytest.raises(ValueError, match=r"steps=\[1, 2000\]: this model's DDIMScheduler has 1000 training timesteps"):
        evaluate(compose_eval(["steps=[1,2000]"], tmp_path / "eval", cache_dir))
    with pytest.raises(ValueError, match=r"callbacks.eval.steps=\[1, 60\]: this model's LCMScheduler"):
        train(compose([*FAST, "model=tiny_lcm", "callbacks.eval.steps=[1,60]"], tmp_path / "cb", cache_dir))
    with pytest.raises(ValueError, match="algo.num_steps=60: an LCM's schedule has at most 50 steps"):
        train(compose([*FAST, "model=tiny_lcm", "algo.num_steps=60"], tmp_path / "train", cache_dir))
    for folder in ("eval", "cb", "train"):
        assert not (tmp_path / folder / "checkpoints").exists() and not (tmp_path / folder / "results.csv").exists()


def test_full_unet_folder_is_evaluated_as_the_policy(tmp_path, cache_dir):
    """What a full fine-tune exports (``unet.save_pretrained``) replaces the base UNet; ``baseline=true`` loads the
    base UNet anew to compare with it."""
    tuned_unet = load_policy(model_cfg("tiny", cache_dir)).unet
    with torch.no_grad():
        tuned_unet.conv_out.bias.add_(0.5)
    tuned_unet.save_pretrained(tmp_path / "trained")
    tuned = load_policy(model_cfg("tiny", cache_dir), lora=tmp_path / "trained")
    base = load_policy(model_cfg("tiny", cache_dir))
    assert tuned.origin.startswith("full UNet")
    torch.testing.assert_close(tuned.unet.conv_out.bias, tuned_unet.conv_out.bias, rtol=0, atol=0)
    rewards = build_rewards(parse_reward_specs(["brightness"]))
    scores = [evaluate_policy(p.components, p.unet, PROMPTS, (1, 2), rewards=rewards, images_per_prompt=1,
                              progress=False).scores["brightness"] for p in (base, tuned)]
    assert not torch.allclose(scores[0], scores[1], atol=1e-4)
    args = [f"prompts=[{','.join(PROMPTS)}]", "steps=[1,2]", "images_per_prompt=1", "rewards=[brightness]"]
    comparison = evaluate(compose_eval([*args, f"lora={tmp_path / 'trained'}", "baseline=true"], tmp_path / "cmp",
                                       cache_dir))
    torch.testing.assert_close(comparison.base.scores["brightness"], scores[0], rtol=0, atol=0)
    torch.testing.assert_close(comparison.policy.scores["brightness"], scores[1], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ training


EVAL_EVERY_EPOCH = ["callbacks.eval.every_n_epochs=1"]
LORA_RUN = [*FAST, "model.lora.enabled=true", "optim.lr=3e-2", "trainer.max_epochs=2"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, cache_dir) -> Path:
    """2 epochs of tiny LoRA training at a high lr (the policy visibly changes), held-out eval every epoch."""
    run_dir = tmp_path_factory.mktemp("lora-run")
    train(compose([*LORA_RUN, *EVAL_EVERY_EPOCH], run_dir, cache_dir))
    return run_dir


def test_checkpoint_and_exported_lora_evaluate_alike(lora_run, tmp_path, cache_dir):
    args = ["prompts=[cow,goat,lion,tiger]", "steps=[1,2,4]", "images_per_prompt=2",
            "rewards=[brightness,colorfulness]"]
    from_ckpt = evaluate(compose_eval([*args, f"checkpoint={lora_run / 'checkpoints' / 'last.ckpt'}"],
                                      tmp_path / "ckpt", cache_dir))
    from_lora = evaluate(compose_eval([*args, f"lora={lora_run / 'trained'}"], tmp_path / "lora", cache_dir))
    base = evaluate(compose_eval(args, tmp_path / "base", cache_dir))
    assert "checkpoint" in from_ckpt.meta["policy"] and "LoRA" in from_lora.meta["policy"]
    for name in ("brightness", "colorfulness"):
        torch.testing.assert_close(from_lora.scores[name], from_ckpt.scores[name], rtol=0, atol=1e-6)
        assert not torch.allclose(base.scores[name], from_ckpt.scores[name], atol=1e-4)
    # prompts=training: the checkpoint's own training prompts (data=tiny's list), read from the checkpoint
    trained_on = evaluate(compose_eval(["prompts=training", "steps=[1]", "images_per_prompt=1",
                                        f"checkpoint={lora_run / 'checkpoints' / 'last.ckpt'}"],
                                       tmp_path / "training", cache_dir))
    assert trained_on.prompts == list(OmegaConf.load(REPO / "conf" / "data" / "tiny.yaml").source)
    # the training callback evaluated the same weights with the same settings after the last epoch
    last = read_metrics(lora_run)[-1]
    for key, value in from_ckpt.means().items():
        assert last[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_a_lora_on_another_base_model_names_the_one_it_was_trained_on(lora_run, cache_dir):
    """torch would list every mismatched tensor; the error names the first and the base from the model card."""
    card_base = re.search(r"^\| base model \| (.+?) \|$", (lora_run / "trained" / "README.md").read_text(), re.M)
    with pytest.raises(ValueError, match=r"does not fit the UNet of .*: size mismatch for .*lora.*\. Evaluate it on "
                                         r"the base model it was trained from \(README.md says: ") as error:
        load_policy(model_cfg("tiny_sdxl", cache_dir), lora=lora_run / "trained")
    assert card_base.group(1) in str(error.value) and str(error.value).count("size mismatch") == 1


def test_baseline_compares_image_by_image_with_the_base_model(lora_run, tmp_path, cache_dir):
    """``baseline=true``: the base model (the checkpoint's UNet with its adapters off) is scored exactly as an
    evaluation of the base model alone, the policy exactly as one of the checkpoint alone, and the change is the
    paired difference of the saved scores, image by image."""
    args = ["prompts=[cow,goat,lion]", "steps=[1,4]", "images_per_prompt=3", "rewards=[brightness,colorfulness]"]
    ckpt = lora_run / "checkpoints" / "last.ckpt"
    comparison = evaluate(compose_eval([*args, f"checkpoint={ckpt}", "baseline=true"], tmp_path / "cmp", cache_dir))
    alone = evaluate(compose_eval(args, tmp_path / "base", cache_dir))
    trained = evaluate(compose_eval([*args, f"checkpoint={ckpt}"], tmp_path / "ckpt", cache_dir))
    for name in ("brightness", "colorfulness"):
        torch.testing.assert_close(comparison.base.scores[name], alone.scores[name], rtol=0, atol=0)
        torch.testing.assert_close(comparison.policy.scores[name], trained.scores[name], rtol=0, atol=0)
    out = tmp_path / "cmp"
    policy = json.loads((out / "results.json").read_text())["scores"]
    base = json.loads((out / "baseline" / "results.json").read_text())["scores"]
    rows = list(csv.DictReader(open(out / "comparison.csv")))
    assert [(r["reward"], r["steps"]) for r in rows] == [(n, k) for n in ("brightness", "colorfulness") for k in "14"]
    for row in rows:
        diffs = np.array(policy[row["reward"]][row["steps"]]) - np.array(base[row["reward"]][row["steps"]])  # [3, 3]
        prompt_changes = diffs.mean(axis=1)  # the interval is over the 3 prompts' mean changes
        half = t_quantile(0.975, 2) * prompt_changes.std(ddof=1) / np.sqrt(3)
        diffs = diffs.ravel()
        assert int(row["n"]) == 9 and int(row["prompts"]) == 3
        assert float(row["delta"]) == pytest.approx(diffs.mean(), abs=1e-6)
        assert float(row["delta_ci95_high"]) - float(row["delta_ci95_low"]) == pytest.approx(2 * half, rel=1e-5)
        assert float(row["policy_better"]) == pytest.approx((diffs > 0).mean() + 0.5 * (diffs == 0).mean())
        assert float(row["base"]) == pytest.approx(np.mean(base[row["reward"]][row["steps"]]), abs=1e-6)
    assert any(abs(float(r["delta"])) > 1e-3 for r in rows)  # the trained policy does differ from its base
    by_prompt = list(csv.DictReader(open(out / "comparison_by_prompt.csv")))
    assert len(by_prompt) == 2 * 2 * 3  # rewards x step counts x prompts
    for row in by_prompt:
        p = ["cow", "goat", "lion"].index(row["prompt"])
        change = np.mean(policy[row["reward"]][row["steps"]][p]) - np.mean(base[row["reward"]][row["steps"]][p])
        assert float(row["delta"]) == pytest.approx(change, abs=1e-6)
    report = (out / "comparison.md").read_text()
    assert "| brightness | 4 |" in report and "brightness, all prompts by their mean change" in report
    worst = min(("cow", "goat", "lion"), key=lambda prompt: sum(
        float(r["delta"]) for r in by_prompt if r["prompt"] == prompt and r["reward"] == "colorfulness"))
    assert report.split("colorfulness, all prompts")[1].split("\n| ")[2].startswith(worst)  # lowest change first
    side = 16 * grid_scale(16)  # 3 prompts x (2 step counts x base, policy); a two-line legend in the header
    width, height = Image.open(out / "grid_compare.png").size
    assert width == GRID_LABEL_WIDTH + 4 * side and height - 3 * side > GRID_HEADER_HEIGHT


def test_callback_logs_held_out_rewards_and_leaves_training_alone(lora_run, tmp_path, cache_dir):
    rows = read_metrics(lora_run)
    assert [r["epoch"] for r in rows] == [0, 1]
    for row in rows:
        for key in ("eval/brightness/1step", "eval/brightness/4step", "eval/colorfulness/2step", "time/eval"):
            assert key in row, key
    assert (lora_run / "eval" / "epoch_0001" / "grid.png").exists()
    # the same run without the callback trains identically (RNG, weights, metrics)
    without = train(compose([*LORA_RUN, "callbacks.eval=null"], tmp_path, cache_dir))
    plain = read_metrics(tmp_path)
    assert not any(k.startswith("eval/") for k in plain[-1])
    for a, b in zip(rows, plain, strict=True):
        assert a["train/reward_1step"] == b["train/reward_1step"] and a["train/loss"] == b["train/loss"]
    with_eval = torch.load(lora_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    trained = {f"unet.{n}": p for n, p in without.lightning_module.unet.named_parameters() if p.requires_grad}
    assert with_eval.keys() == trained.keys()
    for name, value in trained.items():
        assert torch.equal(with_eval[name], value.detach()), name


def test_callback_measures_the_change_since_training_started(lora_run, tmp_path, cache_dir):
    """``eval/<reward>/<k>step_change`` is each evaluation's mean minus that of the policy before its first update,
    which for a LoRA run is the base model: checked against ``python -m sdpo.evaluate`` on the base model with the
    callback's settings. A resumed run measures from the same start, from its checkpoint, without a new one."""
    args = ["prompts=[cow,goat,lion,tiger]", "steps=[1,2,4]", "images_per_prompt=2",
            "rewards=[brightness,colorfulness]"]
    base = evaluate(compose_eval(args, tmp_path / "base", cache_dir)).means()
    assert (lora_run / "eval" / "start" / "results.json").exists()

    def check(rows: list[dict[str, float]]) -> None:
        for row in rows:
            for reward in ("brightness", "colorfulness"):
                for k in (1, 2, 4):
                    key = f"eval/{reward}/{k}step"
                    assert row[f"{key}_change"] == pytest.approx(row[key] - base[key], abs=1e-6), (row["epoch"], key)

    rows = read_metrics(lora_run)
    check(rows)
    assert abs(rows[-1]["eval/brightness/1step_change"]) > 1e-3  # training changed the policy
    resumed = tmp_path / "resumed"
    train(compose([*LORA_RUN, *EVAL_EVERY_EPOCH, "trainer.max_epochs=3",
                   f"ckpt_path={lora_run / 'checkpoints' / 'last.ckpt'}"], resumed, cache_dir))
    assert [r["epoch"] for r in read_metrics(resumed)] == [2] and not (resumed / "eval" / "start").exists()
    check(read_metrics(resumed))


def test_callback_reuses_the_training_reward():
    from sdpo.rewards import build_reward

    train_reward = build_reward("darkness")
    module = SimpleNamespace(reward_cfg={"name": "darkness"}, reward_fn=train_reward, device=torch.device("cpu"))
    callback = EvalDuringTraining(rewards=["colorfulness", {"bright": {"name": "brightness"}}])
    rewards = callback.rewards_for(module)
    assert list(rewards) == ["darkness", "colorfulness", "bright"] and rewards["darkness"] is train_reward
    listed = EvalDuringTraining(rewards=["brightness", "darkness"], include_training_reward=True).rewards_for(module)
    assert list(listed) == ["brightness", "darkness"] and listed["darkness"] is train_reward
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        EvalDuringTraining(rewards=["nope"])


def test_wandb_offline_run_holds_eval_table_and_images(tmp_path, cache_dir, monkeypatch):
    """Training with the W&B logger (offline) and the evaluation CLI with wandb.enabled: the offline run folders
    hold the eval table (a wandb.Table JSON) and the JPEG grids with their captions."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    try:
        train(compose([*FAST, "trainer.max_epochs=1", "logger=wandb", "logger.wandb.offline=true"], tmp_path,
                      cache_dir))
    finally:
        wandb.finish()
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    media = run / "files" / "media"
    (table,) = (media / "table" / "eval").glob("table_*.table.json")
    content = json.loads(table.read_text())
    assert content["columns"][:3] == ["epoch", "reward", "steps"]
    assert {row[1] for row in content["data"]} == {"brightness", "colorfulness"}
    assert list((media / "images" / "eval").glob("grid_*.jpg"))
    assert list((media / "images").glob("samples_*.jpg"))
    (history,) = run.glob("run-*.wandb")  # captions travel in the run's record log, which wandb's service
    captions = (b"held-out prompts x step counts", b"epoch 0 | ", b"1-step")  # may flush after finish() returns
    deadline = time.monotonic() + 60
    while not all(c in history.read_bytes() for c in captions) and time.monotonic() < deadline:
        time.sleep(0.5)
    records = history.read_bytes()
    assert all(c in records for c in captions), (len(records), [c in records for c in captions])

    evaluate(compose_eval(["prompts=[cat]", "steps=[1,2]", "images_per_prompt=1", "wandb.enabled=true"],
                          tmp_path / "evaluate", cache_dir))
    (eval_run,) = (tmp_path / "evaluate" / "wandb").glob("offline-run-*")
    assert list((eval_run / "files" / "media" / "table" / "eval").glob("table_*.table.json"))
    assert list((eval_run / "files" / "media" / "images" / "eval").glob("grid_*.png"))
    evaluate(compose_eval(["prompts=[cat]", "steps=[1,2]", "images_per_prompt=2", "wandb.enabled=true",
                          "baseline=true", f"checkpoint={tmp_path / 'checkpoints' / 'last.ckpt'}"],
                          tmp_path / "compare", cache_dir))
    (compare_run,) = (tmp_path / "compare" / "wandb").glob("offline-run-*")
    (table,) = (compare_run / "files" / "media" / "table" / "compare").glob("table_*.table.json")
    content = json.loads(table.read_text())
    assert content["columns"][:5] == ["reward", "steps", "base", "policy", "delta"] and len(content["data"]) == 2
    assert list((compare_run / "files" / "media" / "images" / "compare").glob("grid_*.png"))


class StepRecordingWandbLogger(WandbLogger):
    """Lightning's W&B logger, offline, that also records which keys were logged at which step."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.steps: dict[str, list[int]] = {}

    def log_metrics(self, metrics, step=None) -> None:
        for key in metrics:
            self.steps.setdefault(key, []).append(step)
        super().log_metrics(metrics, step)


def test_wandb_images_and_tables_share_the_scalars_step(tmp_path, cache_dir, monkeypatch):
    """Each iteration's sample grid and eval table are logged at the step of that iteration's scalars, so W&B
    draws them on one x axis (they were logged at the optimizer-step count: 4 per iteration here)."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    try:
        trainer = train(compose([*FAST, "trainer.max_epochs=3", "logger=wandb", "logger.wandb.offline=true",
                                 f"logger.wandb._target_={__name__}.StepRecordingWandbLogger",
                                 "callbacks.sample_grid.every_n_epochs=1", "callbacks.eval.every_n_epochs=1"],
                                tmp_path, cache_dir))
    finally:
        wandb.finish()
    (recorder,) = [lg for lg in trainer.loggers if isinstance(lg, StepRecordingWandbLogger)]
    scalars = recorder.steps["train/reward_1step"]
    assert scalars == [0, 1, 2] and trainer.global_step == 12  # 4 optimizer steps per iteration
    assert recorder.steps["samples"] == scalars and recorder.steps["eval/table"] == scalars


def test_without_rewards_a_trained_policy_is_measured_on_its_own_reward(tmp_path, cache_dir):
    """rewards=null (the default): the training reward with its settings, from a checkpoint or an exported LoRA (an
    older export without sdpo_training.json: by its model card's name), and brightness for the base model; never
    a reward the policy was not trained on, silently."""
    run = tmp_path / "run"
    train(compose([*FAST, "model.lora.enabled=true", "trainer.max_epochs=1", "callbacks.eval=null",
                   "reward=jpeg_compressibility", "reward.quality=80"], run, cache_dir))
    args = ["prompts=[cat]", "steps=[1]", "images_per_prompt=1"]
    ckpt = run / "checkpoints" / "last.ckpt"
    _, _, specs = validate_eval_config(compose_eval([*args, f"checkpoint={ckpt}"], tmp_path / "a", cache_dir))
    assert specs == [("jpeg_compressibility", "jpeg_compressibility", {"quality": 80})]
    _, _, specs = validate_eval_config(compose_eval([*args, f"lora={run / 'trained'}"], tmp_path / "a", cache_dir))
    assert specs == [("jpeg_compressibility", "jpeg_compressibility", {"quality": 80})]
    older = tmp_path / "older"
    shutil.copytree(run / "trained", older)
    (older / "sdpo_training.json").unlink()
    _, _, specs = validate_eval_config(compose_eval([*args, f"lora={older}"], tmp_path / "a", cache_dir))
    assert specs == [("jpeg_compressibility", "jpeg_compressibility", {})]  # the card names it, settings default
    from_ckpt = evaluate(compose_eval([*args, f"checkpoint={ckpt}"], tmp_path / "ckpt", cache_dir))
    from_lora = evaluate(compose_eval([*args, f"lora={run / 'trained'}"], tmp_path / "lora", cache_dir))
    base = evaluate(compose_eval(args, tmp_path / "base", cache_dir))
    assert from_ckpt.reward_names == from_lora.reward_names == ["jpeg_compressibility"]
    assert base.reward_names == ["brightness"]
    chosen = evaluate(compose_eval([*args, f"checkpoint={ckpt}", "rewards=[colorfulness]"], tmp_path / "c", cache_dir))
    assert chosen.reward_names == ["colorfulness"]  # a list given is what is measured
