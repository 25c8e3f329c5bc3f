"""End to end through the real Hydra entry point and Lightning Trainer, on the embedded tiny default."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from sdpo.config_checks import ConfigError, validate_config
from sdpo.eval_config import validate_eval_config
from sdpo.train_run import train
from tests.conftest import (
    CONFIG_DIR,
    FAST,
    REPO,
    assert_weights_match,
    compose,
    compose_eval,
    read_metrics,
    trainable_state,
)

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))



def cli_env(cache_dir: Path) -> dict[str, str]:
    return {**os.environ, "SDPO_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
            "PYTHONPATH": str(REPO)}


def run_cli(args: list[str], cache_dir: Path, timeout: int = 1500, cwd: Path = REPO,
            module: str = "sdpo.train") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=cli_env(cache_dir),
                          capture_output=True, text=True, timeout=timeout)



@pytest.mark.slow
def test_default_entry_point_raises_the_reward(tmp_path, cache_dir):
    """`python -m sdpo.train`, the README's main command, learns: the 1-step and T-step brightness rise by more
    than 3 standard deviations of one epoch's rewards. The whole default (100 iterations, about a minute): the rise
    varies a lot with the seed (1-step +0.023 to +0.082 over seeds 0-13), and over 40 iterations the low end of
    that range is about the threshold."""
    run_dir = tmp_path / "run"
    result = run_cli([f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1-step" in result.stdout and "4-step" in result.stdout  # the closing table
    rows = read_metrics(run_dir)
    first, last = rows[:5], rows[-5:]
    for key in ("train/reward_1step", "train/reward_last"):
        before = sum(r[key] for r in first) / 5
        after = sum(r[key] for r in last) / 5
        spread = rows[0][key + "_std"] if key + "_std" in rows[0] else rows[0]["train/reward_1step_std"]
        assert after - before > max(0.01, 3 * spread), (key, before, after, spread)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["last"]["epoch"] == 99
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png"))[0] == "epoch_0000.png"
    assert rows[-1]["train/reward_queries"] == 100 * 16 * 5  # 16 pairs x (3 + 3 - 1 shared) queries per epoch


def tiny_stand_ins(name: str, assets: dict[str, Path]) -> list[str]:
    """Experiments on real models run here on tiny random stand-ins of the same architecture and reward.

    The experiment's own algorithm settings stay, except T (50 steps is minutes on CPU) and the GPU trainer.
    HPS v2 and ImageReward need optional packages that CI does not install: those two runs swap the reward for
    a model-free one (their loading is tested in tests/unit/test_model_rewards.py). The held-out evaluation runs
    (after the only epoch) with a tiny CLIP as its clip_score, at the experiment's 1/2/4/8 native steps.
    """
    if name.startswith("tiny_"):
        return []
    family = "tiny_sdxl" if name.startswith("sdxl") else "tiny_lcm" if name.startswith("lcm") else "tiny"
    overrides = [f"model={family}", "trainer=default", "algo.num_steps=3", "data=tiny",
                 f"callbacks.eval.rewards=[{{clip_score:{{model:'{assets['clip']}'}}}}]"]  # held out, tiny CLIP
    if name.endswith("aesthetic"):
        overrides += [f"reward.clip_model={assets['clip']}", f"reward.head_source={assets['head']}"]
    elif name.endswith("pickscore"):
        overrides += [f"reward.model={assets['clip']}", f"reward.processor={assets['clip']}"]
    else:
        overrides += ["reward=brightness"]
    return overrides


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_runs_one_iteration(name, tmp_path, cache_dir, tiny_reward_assets):
    cfg = compose([f"+experiment={name}", "trainer.max_epochs=1", *FAST, *tiny_stand_ins(name, tiny_reward_assets)],
                  tmp_path, cache_dir)
    trainer = train(cfg)
    assert trainer.current_epoch == 1
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["train/loss"])))
    if not name.startswith("tiny_"):  # held-out prompts and rewards, next to the training reward
        assert cfg.callbacks.eval.prompts == "unseen_examples"
        logged = {k for k in trainer.callback_metrics if k.startswith("eval/")}
        assert {f"eval/clip_score/{k}step" for k in (1, 2, 4, 8)} <= logged, logged
        assert f"eval/{cfg.reward.name}/8step" in logged
    assert trainer.lightning_module.algo_cfg["micro_batch_pairs"] == cfg.algo.micro_batch_pairs


class CrashAtEpoch(Callback):
    """Stands in for a killed job: raises as epoch ``epoch`` starts, after the earlier epochs completed."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"simulated crash at epoch {self.epoch}")


@pytest.mark.parametrize("how", ["ckpt_path", "same_folder", "requeued"])
def test_resume_after_a_crash_equals_uninterrupted(how, tmp_path, cache_dir, monkeypatch):
    """A 4-epoch run killed as epoch 2 starts, resumed from its last.ckpt, == 4 epochs straight: LoRA weights,
    optimizer, tracker, counters, RNG. Also proves last.ckpt is written during the run, not only at its end.
    ``ckpt_path``: resumed into a new folder. ``same_folder``: ``ckpt_path=`` with the same run folder (what the
    stop report's "the same command" means with ``hydra.run.dir=``): it continues the folder's metrics.csv, without
    a row the checkpoint does not cover. ``requeued``: the same command run again in the same folder as a requeued
    SLURM job (``SLURM_RESTART_COUNT``): it finds last.ckpt itself and continues the folder's metrics.csv."""
    base = [*FAST, "model.lora.enabled=true", "optim.lr=1e-2", "algo.tracker.min_count=2", "algo.tracker.buffer_size=4",
            "trainer.max_epochs=4"]
    full = train(compose(base, tmp_path / "full", cache_dir))
    crash = [f"+callbacks.crash._target_={__name__}.CrashAtEpoch", "+callbacks.crash.epoch=2"]
    with pytest.raises(RuntimeError, match="simulated crash at epoch 2"):
        train(compose([*base, *crash], tmp_path / "part", cache_dir))
    ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["epoch"] == 1  # the last completed epoch
    if how == "ckpt_path":
        resumed = train(compose([*base, f"ckpt_path={ckpt}"], tmp_path / "resumed", cache_dir))
        run_dir, epochs = tmp_path / "resumed", [2, 3]  # past epochs were not re-sampled
    elif how == "same_folder":
        metrics = tmp_path / "part" / "csv" / "metrics.csv"
        header = metrics.read_text().splitlines()[0].split(",")  # a row of epoch 2 logged before the kill
        stale = {"epoch": "2", "step": "2", "train/reward_1step": "-1.0"}
        with open(metrics, "a") as f:
            f.write(",".join(stale.get(column, "") for column in header) + "\n")
        with pytest.raises(ConfigError, match="already holds a run's metrics"):  # a fresh start would delete them
            train(compose(base, tmp_path / "part", cache_dir))
        resumed = train(compose([*base, f"ckpt_path={ckpt}"], tmp_path / "part", cache_dir))
        run_dir, epochs = tmp_path / "part", [0, 1, 2, 3]  # the first rows kept, the stale one replaced
    else:
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        resumed = train(compose(base, tmp_path / "part", cache_dir))
        run_dir, epochs = tmp_path / "part", [0, 1, 2, 3]  # the killed job's rows kept, none repeated
    a, b = trainable_state(full.lightning_module), trainable_state(resumed.lightning_module)
    assert a.keys() == b.keys() and any("lora" in k for k in a)
    assert_weights_match(a, b, atol=1e-6)
    name = list(a)[-1]
    assert not torch.equal(a[name], saved["state_dict"][name])  # it did train further
    assert full.lightning_module.tracker.state_dict() == resumed.lightning_module.tracker.state_dict()
    assert full.lightning_module.total_queries == resumed.lightning_module.total_queries
    rows_full, rows_resumed = read_metrics(tmp_path / "full"), read_metrics(run_dir)
    assert [r["epoch"] for r in rows_resumed] == epochs
    for row in rows_resumed:
        expected = rows_full[int(row["epoch"])]["train/reward_1step"]
        assert row["train/reward_1step"] == pytest.approx(expected, abs=1e-6)


def test_a_resumed_run_logs_into_the_w_and_b_run_of_its_checkpoint(tmp_path, cache_dir, monkeypatch):
    """Real wandb, offline: a requeued job and a ``ckpt_path`` resume continue the W&B run the checkpoint was
    written under (one id, a folder per process start, as wandb writes a resumed run); ``logger.wandb.id`` chooses
    another."""
    import wandb

    from sdpo.loggers import recorded_wandb_run
    from sdpo.resume import read_resume_state

    monkeypatch.setenv("WANDB_MODE", "offline")
    base = [*FAST, "trainer.max_epochs=2", "callbacks.eval=null", "callbacks.sample_grid=null", "logger=wandb",
            "logger.wandb.offline=true"]
    crash = [f"+callbacks.crash._target_={__name__}.CrashAtEpoch", "+callbacks.crash.epoch=1"]

    def run_ids(folder: Path) -> list[str]:  # one offline-run-<time>-<id>[-n] folder per start, holding run-<id>.wandb
        records = (folder / "wandb").glob("offline-run-*/run-*.wandb")
        return sorted(record.name.removeprefix("run-").removesuffix(".wandb") for record in records)

    def fit(overrides: list[str], folder: Path) -> None:
        try:
            train(compose(overrides, folder, cache_dir))
        finally:
            wandb.finish()

    with pytest.raises(RuntimeError, match="simulated crash at epoch 1"):
        fit([*base, *crash], tmp_path / "part")
    ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    (first,) = run_ids(tmp_path / "part")
    assert recorded_wandb_run(read_resume_state(ckpt)) == first

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    fit(base, tmp_path / "part")
    assert run_ids(tmp_path / "part") == [first, first]
    monkeypatch.delenv("SLURM_RESTART_COUNT")

    more = [*base, f"ckpt_path={ckpt}", "trainer.max_epochs=3"]  # the requeued job finished the run's 2 iterations
    fit(more, tmp_path / "branch")
    assert run_ids(tmp_path / "branch") == [first]
    fit([*more, "logger.wandb.id=fresh01"], tmp_path / "fresh")
    assert run_ids(tmp_path / "fresh") == ["fresh01"]
    fit(base, tmp_path / "new")  # no checkpoint: a run of its own
    (other,) = run_ids(tmp_path / "new")
    assert other != first


def test_wandb_without_a_login_says_how_to_log_in_or_go_offline(tmp_path, cache_dir, monkeypatch):
    """Real wandb, online mode, on a machine with no W&B credentials: the run stops before its first iteration."""
    import wandb

    for name in ("WANDB_API_KEY", "WANDB_MODE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no wandb settings
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    wandb.teardown()  # wandb keeps the settings of this process's earlier (offline) runs: read them again
    try:
        with pytest.raises(ConfigError, match=r"logger=wandb found no W&B login on this machine .* "
                                              r"logger.wandb.offline=true"):
            train(compose([*FAST, "trainer.max_epochs=1", "logger=wandb"], tmp_path / "run", cache_dir))
    finally:
        wandb.finish()
        wandb.teardown()  # nor leave this test's settings to later ones
    assert not (tmp_path / "run" / "csv" / "metrics.csv").exists()


class SignalAtEpoch(Callback):
    """Sends ``SIGUSR1`` to this process as epoch ``epoch`` starts, as sbatch --signal does before a time limit."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_the_requeue_signal_requeues_a_slurm_job(tmp_path, cache_dir, monkeypatch):
    """In a SLURM job, SIGUSR1 makes rank 0 run ``scontrol requeue <job id>`` (a stand-in on PATH records it; a
    real one would end the job here) and the run goes on; after fit the previous handler is back."""
    from tests.unit.test_cluster import fake_scontrol

    calls = fake_scontrol(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    unhandled: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: unhandled.append(signum))
    try:
        train(compose([*FAST, "trainer.max_epochs=2", "callbacks.eval=null",
                       f"+callbacks.signal._target_={__name__}.SignalAtEpoch", "+callbacks.signal.epoch=1"],
                      tmp_path / "run", cache_dir))
        assert calls.read_text().splitlines() == ["requeue 4242"] and unhandled == []
        os.kill(os.getpid(), signal.SIGUSR1)  # after fit: the handler that was there before
        assert unhandled == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.parametrize(("grid", "kept"), [(["callbacks.sample_grid.max_prompts=3"], 3),
                                            (["callbacks.sample_grid=null"], 0)])
def test_the_module_copies_off_the_device_only_the_images_a_grid_shows(grid, kept, tmp_path, cache_dir):
    trainer = train(compose([*FAST, "trainer.max_epochs=1", "callbacks.eval=null", *grid], tmp_path, cache_dir))
    latest = trainer.lightning_module.latest
    assert len(latest["prompts"]) == 4 and latest["last_rewards"].shape == (4, 2)
    assert latest["first_images"].shape[0] == latest["last_images"].shape[0] == kept
    assert len(list((tmp_path / "samples").glob("*.png"))) == (1 if kept else 0)


def test_checkpoint_holds_only_trainable_weights_and_tracker(tmp_path, cache_dir):
    train(compose([*FAST, "model.lora.enabled=true", "trainer.max_epochs=1"], tmp_path, cache_dir))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["state_dict"] and all("lora" in k for k in ckpt["state_dict"])
    assert ckpt["sdpo"]["tracker"]["buffers"] and ckpt["sdpo"]["total_queries"] > 0
    assert ckpt["optimizer_states"]


def test_first_update_is_on_policy(tmp_path, cache_dir):
    """Before any optimizer step, every recorded transition's importance ratio is 1 (fp32)."""
    from sdpo.module import SDPOModule

    cfg = compose([*FAST, "model.lora.enabled=true"], tmp_path, cache_dir)
    module = SDPOModule(cfg.model, cfg.algo, cfg.reward, cfg.optim, seed=0)
    traj = module.sample(["cat", "dog", "zebra"])
    worst = 0.0
    with torch.no_grad():
        for step in range(traj.num_steps):  # the training path, at a different batch composition
            for pair in range(traj.num_pairs):
                idx, steps = torch.tensor([pair]), torch.tensor([step])
                log_prob = module._micro_batch_log_probs(traj, idx, steps)  # [1, 2]
                worst = max(worst, float((log_prob - traj.log_probs[idx, :, steps]).abs().max()))
    assert worst < 1e-5


def test_multirun_sweeps_steps_and_anchors(tmp_path, cache_dir):
    result = run_cli(["-m", "algo.num_steps=3,4", "algo.dense.anchor=argmin,uniform", "trainer.max_epochs=1",
                      *FAST, f"hydra.sweep.dir={tmp_path}"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and (p / "csv" / "metrics.csv").exists())
    assert len(runs) == 4
    assert {read_metrics(r)[0]["train/queries_per_trajectory"] for r in runs} == {2.5}


# runs an entry point as ``python -m`` would, then names the heavy packages it had imported, and exits as it did
ENTRY_PROBE = """
import runpy, sys
module = sys.argv.pop(1)
code = 0
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit as stop:
    code = stop.code
print("imported:", sorted(m for m in ("torch", "lightning", "diffusers", "transformers") if m in sys.modules))
sys.exit(code)
"""


def run_probed(module: str, args: list[str], cache_dir: Path, cwd: Path) -> tuple[subprocess.CompletedProcess, str]:
    """``python -m <module> <args>`` through ENTRY_PROBE: the result, and the heavy packages it had imported. An
    empty Hugging Face cache: a machine that has downloaded the real models still finds none of them."""
    env = {**cli_env(cache_dir), "HF_HUB_CACHE": str(cwd / "empty-hf-cache")}
    result = subprocess.run([sys.executable, "-c", ENTRY_PROBE, module, *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    imported = result.stdout.rstrip().rpartition("\n")[2]
    assert imported.startswith("imported: "), result.stdout[-300:] + result.stderr[-3000:]
    return result, imported


def test_each_entry_point_helps_with_its_own_options_before_importing_torch(tmp_path, cache_dir):
    """``--help`` of train lists its config groups; evaluate's lists its own file's options, not training's groups.
    Neither imports torch, Lightning or diffusers: Hydra answers help and shell completion (a process per TAB) at
    once."""
    def probe(module: str) -> str:
        result, imported = run_probed(module, ["--help"], cache_dir, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert imported == "imported: []", imported
        return result.stdout

    train_help = probe("sdpo.train")
    assert "experiment: " in train_help and "conf/<group>/<option>.yaml" in train_help
    evaluate_help = probe("sdpo.evaluate")
    assert "conf/evaluate.yaml" in evaluate_help and "grid_images: 2" in evaluate_help
    assert "experiment: " not in evaluate_help and "== Configuration groups ==" not in evaluate_help


def test_bad_config_fails_before_loading(tmp_path, cache_dir):
    cfg = compose(["algo.dense.anchor=middle", "algo.eta=0", "model.spacing=odd", "algo.compile=fast"], tmp_path,
                  cache_dir)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    message = str(err.value)
    assert "algo.dense.anchor='middle'" in message and "algo.eta=0" in message and "model.spacing" in message
    assert "algo.compile='fast'" in message
    result = run_cli(["algo.num_steps=0", f"hydra.run.dir={tmp_path / 'x'}"], cache_dir, timeout=120)
    assert result.returncode != 0 and "algo.num_steps=0" in result.stderr
    assert "Traceback" not in result.stderr  # the message alone
    assert (tmp_path / "x" / "train.log").exists()  # a folder the user named is never removed


# one case per stage a refusal comes from (each a subprocess: ~5 s to refuse from the config alone, ~12 s once the
# training stack is imported); the config check's own messages are tested in-process (tests/unit/test_config_checks.py,
# tests/integration/test_evaluate.py). ``first``: refused before Lightning and diffusers load
@pytest.mark.parametrize("module,bad,says,first", [
    ("sdpo.train", "+algo.num_stepz=3", "did you mean algo.num_steps?", True),
    ("sdpo.train", "+trainer.devicez=2", "did you mean trainer.devices?", True),  # Trainer's arguments, unimported
    ("sdpo.evaluate", "checkpoint=/no/such.ckpt", "checkpoint=/no/such.ckpt: no such file", True),
    ("sdpo.evaluate", "rewards=[color_match]", "set prompts to prompts that each name one of", True),  # cannot score
    # one refusal for the training prompts and the held-out ones
    ("sdpo.train", "reward=color_match", ("set callbacks.eval.prompts to prompts that each name one of",
                                          "set data.source to prompts that each name one of"), True),
    # what only the loaded model shows, found as fitting starts (after the CSV logger wrote its copy of the config:
    # still nothing ran)
    ("sdpo.train", "model=tiny_lcm callbacks.eval.steps=[1,60]", "this model's LCMScheduler samples at most 50 steps",
     False),
    # a callback's own argument check, run on its config node
    ("sdpo.train", "callbacks.eval.steps=[0,1]", "callbacks.eval.steps=[0, 1]: need distinct step counts >= 1", True),
    # weights that are not here: the message says how to provide them (the cases: tests/unit/test_model_sources.py,
    # tests/unit/test_reward_weights.py)
    ("sdpo.train", "model.source=/no/such/model", "Point `model.source` at a diffusers-layout folder", True),
    ("sdpo.evaluate", "model.source=/no/such/model", "Point `model.source` at a diffusers-layout folder", True),
    ("sdpo.train", "reward=aesthetic", "`hf download openai/clip-vit-large-patch14`", True),  # HF_HUB_OFFLINE=1
])
def test_refused_run_leaves_no_empty_folder(tmp_path, cache_dir, module, bad, says, first):
    """A run refused by its config check did nothing: the folder Hydra named and made for it is removed, the
    folders of earlier runs next to it are not. A value the config alone shows to be wrong is refused before
    Lightning and diffusers load (their imports take about 8 s on a 2-core machine)."""
    task = module.split(".")[1]
    earlier = tmp_path / "outputs" / task / "earlier-run"
    earlier.mkdir(parents=True)
    (earlier / f"{task}.log").write_text("an earlier run\n")
    result, imported = run_probed(module, bad.split(), cache_dir, tmp_path)
    assert result.returncode == 1
    for said in (says,) if isinstance(says, str) else says:
        assert said in result.stderr, said
    assert "empty run folder" in result.stderr and "Traceback" not in result.stderr
    assert [p.name for p in (tmp_path / "outputs" / task).iterdir()] == ["earlier-run"]
    if first:
        assert "lightning" not in imported and "diffusers" not in imported, imported


def test_bf16_autocast_run_keeps_log_probs_fp32(tmp_path, cache_dir):
    """Mixed precision: the UNet under bf16 autocast, frozen parts in bf16, the loss still finite."""
    trainer = train(compose([*FAST, "trainer.precision=bf16-mixed", "model.weight_dtype=bf16", "trainer.max_epochs=1"],
                            tmp_path, cache_dir))
    module = trainer.lightning_module
    assert next(module.vae.parameters()).dtype == torch.bfloat16
    assert next(module.text_encoder.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in module.unet.parameters() if p.requires_grad)
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["train/loss"])))


class ProcessorsSeen(Callback):
    """Records which attention processor the UNet's first attention layer ran, in training and in evaluation."""

    def __init__(self) -> None:
        self.seen: list[str] = []  # processor class names, one per run of a new kind

    def on_fit_start(self, trainer, pl_module) -> None:
        from diffusers.models.attention_processor import Attention

        def note(module, args) -> None:
            name = type(module.processor).__name__
            if not self.seen or self.seen[-1] != name:
                self.seen.append(name)

        next(m for m in pl_module.unet.modules() if isinstance(m, Attention)).register_forward_pre_hook(note)


def test_a_pinned_attention_kernel_trains_and_one_the_device_lacks_stops_at_fit_start(tmp_path, cache_dir):
    """Training runs the pinned kernel, the held-out evaluation torch's choice (it runs outside training's autocast,
    where a kernel pinned for it may not run), and the pin is back for the next iteration."""
    from torch.nn.attention import SDPBackend

    from sdpo.policy.attention import pinned_backend

    # bf16-mixed: the fit-start probe runs under the precision plugin's autocast, a context made afresh per use
    trainer = train(compose([*FAST, "trainer.max_epochs=2", "algo.attention_backend=math",
                             "trainer.precision=bf16-mixed", "callbacks.eval.every_n_epochs=1",
                             f"+callbacks.seen._target_={__name__}.ProcessorsSeen"], tmp_path / "math", cache_dir))
    assert pinned_backend(trainer.lightning_module.unet) == SDPBackend.MATH
    (probe,) = [c for c in trainer.callbacks if isinstance(c, ProcessorsSeen)]
    pinned, torchs = "PinnedAttnProcessor", "AttnProcessor2_0"
    # the evaluation before the first update, epoch 0, its evaluation, epoch 1, the final evaluation
    assert probe.seen == [torchs, pinned, torchs, pinned, torchs]
    assert "eval/brightness/1step" in read_metrics(tmp_path / "math")[0]
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["train/loss"])))
    if torch.cuda.is_available():
        return  # cuDNN attention may well run here
    # trainer.accelerator=auto passes the config check (it could mean a GPU); the kernel probe at fit start does not,
    # and says so as a refusal (ConfigError: the message, no traceback, as the refusal test shows at that stage)
    with pytest.raises(ConfigError, match=r"algo.attention_backend=cudnn cannot run this UNet's attention .* on cpu"):
        train(compose([*FAST, "algo.attention_backend=cudnn"], tmp_path / "cudnn", cache_dir))
    assert not list((tmp_path / "cudnn").rglob("*.ckpt")) and not list((tmp_path / "cudnn").rglob("metrics.csv"))


def test_multi_reward_logs_each_component(tmp_path, cache_dir):
    """A weighted sum of rewards trains on the sum and logs every part on its own."""
    components = "{brightness:{weight:1.0},colorfulness:{weight:0.5}}"
    cfg = compose([*FAST, "reward=multi", "~reward.components", f"+reward.components={components}",
                   "trainer.max_epochs=1"], tmp_path, cache_dir)
    metrics = train(cfg).callback_metrics
    total = float(metrics["train/reward_1step"])
    bright, color = float(metrics["train/reward_brightness_1step"]), float(metrics["train/reward_colorfulness_1step"])
    assert total == pytest.approx(bright + 0.5 * color, rel=1e-5)
    assert "train/reward_colorfulness_last" in metrics


def test_sweep_config_is_a_multirun_over_steps_rewards_anchors():
    """Every point of the shipped sweep composes to its reward's own experiment with the swept step count and
    anchor: a reward swept on its own would keep the first experiment's lr and batch (and held-out rewards)."""
    import itertools

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose("train", overrides=["+sweep=steps_rewards_anchors"], return_hydra_config=True)
        assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
        params = {key: str(values).split(",") for key, values in cfg.hydra.sweeper.params.items()}
        assert set(params) == {"+experiment", "algo.num_steps", "algo.dense.anchor"}
        assert len(list(itertools.product(*params.values()))) == 12
        for experiment, steps, anchor in itertools.product(*params.values()):
            point = hydra_compose("train", overrides=[f"+experiment={experiment}", f"algo.num_steps={steps}",
                                                      f"algo.dense.anchor={anchor}"])
            alone = hydra_compose("train", overrides=[f"+experiment={experiment}"])
            assert (point.algo.num_steps, point.algo.dense.anchor) == (int(steps), anchor)
            assert point.reward.name == experiment.removeprefix("sd_turbo_")
            for key in ("optim.lr", "algo.micro_batch_pairs", "algo.gradient_accumulation_steps", "callbacks.eval"):
                assert OmegaConf.select(point, key) == OmegaConf.select(alone, key), (experiment, key)
        assert "sweep" in cfg.hydra.job.config.override_dirname.exclude_keys  # folder names list the swept keys


def test_checkpoint_every_n_epochs_still_saves_the_final_epoch(tmp_path, cache_dir):
    """every_n_epochs=2 with 3 epochs: epoch 1 is saved on schedule, epoch 2 because it is the last."""
    trainer = train(compose([*FAST, "trainer.max_epochs=3", "callbacks.checkpoint.every_n_epochs=2",
                             "callbacks.eval=null"], tmp_path, cache_dir))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert len(names) == 2 and names[0].startswith("epoch=2-") and names[1] == "last.ckpt", names
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["epoch"] == 2 and saved["global_step"] == trainer.global_step
    final = trainable_state(trainer.lightning_module)
    for name, value in saved["state_dict"].items():
        torch.testing.assert_close(value, final[name], rtol=0, atol=0)


@pytest.mark.parametrize("limits", [
    ["trainer.max_epochs=10", "trainer.max_steps=12"],  # max_steps ends the run first
    ["trainer.max_epochs=-1", "trainer.max_steps=12"],  # no epoch limit at all
    ["trainer.max_epochs=10", f"+callbacks.stop._target_={__name__}.RequestStopAtEpoch", "+callbacks.stop.epoch=2"],
])
def test_the_final_iteration_gets_its_checkpoint_grid_and_evaluation_whatever_limit_ends_the_run(
        limits, tmp_path, cache_dir):
    """Three iterations (4 optimizer steps each), ended by max_steps or by a stop request (as max_time's Timer
    makes): the final one (epoch 2) is checkpointed, drawn and evaluated although no schedule asks for it, and
    epoch 1, which none asks for either, is not (every_n_epochs: checkpoint 4, grid 5, eval 25)."""
    train(compose([*FAST, "algo.micro_batch_pairs=1", "algo.gradient_accumulation_steps=4", *limits,
                   "callbacks.checkpoint.every_n_epochs=4", "callbacks.sample_grid.every_n_epochs=5",
                   "callbacks.eval.every_n_epochs=25", "callbacks.eval.steps=[1]"], tmp_path, cache_dir))
    assert [int(r["epoch"]) for r in read_metrics(tmp_path) if "train/reward_1step" in r] == [0, 1, 2]
    assert (tmp_path / "checkpoints" / "last.ckpt").resolve().name == "epoch=2-step=12.ckpt"
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == ["epoch_0000.png", "epoch_0002.png"]
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["epoch_0000", "epoch_0002", "start"]


class RequestStopAtEpoch(Callback):
    """Asks the trainer to stop after epoch ``epoch``'s batch, as trainer.max_time's Timer does when time is up."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


class PoisonTheLoss(Callback):
    """Makes every SDPO loss computed after the run's first ``after_steps`` optimizer steps NaN (a NaN clip range;
    the samples stay finite) and keeps the module, its initial weights and its weights at that moment (on the
    class: Hydra builds the instance inside ``train``)."""

    after_steps = 0
    seen: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        PoisonTheLoss.seen = {"module": pl_module, "initial": trainable_state(pl_module), "steps": 0}
        if PoisonTheLoss.after_steps == 0:
            self._poison(pl_module)
        trainer.optimizers[0].register_step_post_hook(lambda optimizer, args, kwargs: self._count(pl_module))

    def _count(self, pl_module) -> None:
        PoisonTheLoss.seen["steps"] += 1
        if PoisonTheLoss.seen["steps"] == PoisonTheLoss.after_steps:
            self._poison(pl_module)

    @staticmethod
    def _poison(pl_module) -> None:
        pl_module.algo_cfg["clip_range"] = float("nan")
        PoisonTheLoss.seen["weights"] = trainable_state(pl_module)


@pytest.mark.parametrize(("lora", "after_steps"), [(True, 0), (True, 3), (False, 3)])
def test_a_non_finite_loss_stops_training_before_the_weights_move(lora, after_steps, tmp_path, cache_dir):
    """A LoRA run reads each optimizer step's loss checks one step late (no host sync per step) and undoes a bad
    step; a full fine-tune reads them before the step. Either way training stops with the weights of just before
    the first step on a non-finite loss: the run's first step, or its fourth (4 prompts in micro-batches of 2: 2
    steps per step column, 8 per iteration)."""
    PoisonTheLoss.after_steps = after_steps
    poison = [f"+callbacks.poison._target_={__name__}.PoisonTheLoss", f"model.lora.enabled={str(lora).lower()}",
              "trainer.max_epochs=1", "callbacks.eval=null", "algo.gradient_accumulation_steps=1"]
    with pytest.raises(FloatingPointError, match="non-finite SDPO loss at epoch 0, steps"):
        train(compose([*FAST, *poison], tmp_path, cache_dir))
    seen = PoisonTheLoss.seen
    before, after = seen["weights"], trainable_state(seen["module"])
    assert before.keys() == after.keys() and any(("lora" in n) == lora for n in before)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert seen["steps"] == after_steps + lora  # LoRA: the bad step was taken, then undone
    moved = any(not torch.equal(before[n], seen["initial"][n]) for n in before)
    assert moved == (after_steps > 0)  # the good steps did train


def test_a_sweep_runs_each_point_in_a_folder_usable_as_a_path(tmp_path, cache_dir):
    """`-m` over two settings: one run per point, in folders named after their overrides without the ``=`` and
    ``,`` that Hydra's grammar refuses in ``checkpoint=``; each point's checkpoint evaluates as printed."""
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", "algo.num_steps=2,3", *FAST, "trainer.max_epochs=1", "callbacks.eval=null",
                      f"hydra.sweep.dir={sweep}"], cache_dir, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    points = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert [p[:2] for p in points] == ["0_", "1_"] and "_algo.num_steps-2_" in points[0], points
    assert all("=" not in p and "," not in p for p in points)
    for point, steps in zip(points, (2, 3), strict=True):
        assert [r[f"train/reward_{steps}step"] > 0 for r in read_metrics(sweep / point)] == [True]
        ckpt = sweep / point / "checkpoints" / "last.ckpt"
        validate_eval_config(compose_eval([f"checkpoint={ckpt}"], tmp_path / "eval", cache_dir))  # parses as is


def test_continuing_a_run_in_its_own_folder_keeps_its_record(tmp_path, cache_dir):
    """The README's resume in the same folder (``hydra.run.dir=`` + ``ckpt_path=``) through the CLI: a refused
    attempt (nothing left to do) leaves the run's .hydra/ record as it was; the real continuation keeps the first
    command's record in .hydra/earlier/1/ and appends to the run's metrics.csv. Lightning's messages print once."""
    import yaml

    run = tmp_path / "run"
    first = [*FAST, "callbacks.eval=null", "seed=3", f"hydra.run.dir={run}"]
    started = run_cli([*first, "trainer.max_epochs=1"], cache_dir, timeout=300)
    assert started.returncode == 0, started.stderr[-3000:]
    console = started.stdout + started.stderr
    assert console.count("GPU available") == 1, console[-3000:]  # Lightning's own lines printed once, not twice
    assert "GPU available" in (run / "train.log").read_text()  # and kept in the run's log
    original = (run / ".hydra" / "overrides.yaml").read_text()
    again = [*first, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"]
    refused = run_cli([*again, "trainer.max_epochs=1"], cache_dir, timeout=300)
    assert refused.returncode == 1 and "raise it" in refused.stderr, refused.stderr[-2000:]
    assert (run / ".hydra" / "overrides.yaml").read_text() == original and not (run / ".hydra" / "earlier").exists()
    assert "already meets trainer.max_epochs=1" in (run / "train.log").read_text()  # the refusal is on record
    continued = run_cli([*again, "trainer.max_epochs=2"], cache_dir, timeout=300)
    assert continued.returncode == 0, continued.stderr[-3000:]
    assert (run / ".hydra" / "earlier" / "1" / "overrides.yaml").read_text() == original
    assert any(o.startswith("ckpt_path=") for o in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()))
    assert [int(r["epoch"]) for r in read_metrics(run)] == [0, 1]
