"""A resume that changes what the checkpoint's state depends on is refused before any model loads."""

from __future__ import annotations

import logging

import pytest

from sdpo.resume import NothingToResume, ResumeMismatch, resume_differences, resume_settings
from sdpo.train_run import train
from tests.conftest import FAST, compose, read_metrics
from tests.integration.test_train import run_probed

BASE = [*FAST, "model.lora.enabled=true", "trainer.max_epochs=1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, cache_dir):
    """A real 1-epoch LoRA run's last.ckpt (T = 4, brightness)."""
    out = tmp_path_factory.mktemp("first")
    train(compose(BASE, out, cache_dir))
    return out / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("change,listed", [
    (["algo.num_steps=3"], ["algo.num_steps: 4 in the checkpoint, 3 here"]),
    (["reward=colorfulness"], ["reward: 'brightness' in the checkpoint, 'colorfulness' here"]),
    (["model.lora.alpha=16"], ["model.lora.alpha: 8 in the checkpoint, 16 here"]),
    (["model.lora.enabled=false"], ["model.lora.enabled: True in the checkpoint, False here",
                                    "model.lora.rank: 8 in the checkpoint, None here"]),
    (["model.spacing=leading", "model.steps_offset=1"], ["model.spacing: 'trailing' in the checkpoint",
                                                         "model.steps_offset: None in the checkpoint, 1 here"]),
    (["model.tiny.seed=1"], ["model.tiny: "]),
])
def test_a_changed_setting_is_refused_before_loading(change, listed, checkpoint, tmp_path, cache_dir, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the models were loaded before the resume was checked")

    monkeypatch.setattr("sdpo.module.SDPOModule.__init__", no_loading)
    with pytest.raises(ResumeMismatch) as error:
        train(compose([*BASE, *change, f"ckpt_path={checkpoint}", "trainer.max_epochs=2"], tmp_path, cache_dir))
    message = str(error.value)
    assert all(line in message for line in listed), message
    assert "resume_check=false" in message and not (tmp_path / "checkpoints").exists()


def test_settings_the_state_does_not_depend_on_may_change(checkpoint, tmp_path, cache_dir, capsys):
    """Learning rate, seed, frozen dtype, prompts: a resumed run may change them; it trains a second epoch, as its
    header says."""
    trainer = train(compose([*BASE, f"ckpt_path={checkpoint}", "trainer.max_epochs=2", "optim.lr=1e-3", "seed=3",
                             "model.weight_dtype=bf16", "data.source=simple_animals"], tmp_path, cache_dir))
    assert trainer.current_epoch == 2 and [r["epoch"] for r in read_metrics(tmp_path)] == [1]
    assert "2 iterations (trainer.max_epochs) = 16 trajectories, 8 optimizer steps; resumed after 1: 1 to go" \
        in capsys.readouterr().out


@pytest.mark.parametrize("limits,named", [
    (["trainer.max_epochs=1"], "meets trainer.max_epochs=1 (raise it, e.g. trainer.max_epochs=2"),
    (["trainer.max_epochs=5", "trainer.max_steps=3"], "meets trainer.max_steps=3 (raise it past 4"),
])
def test_a_checkpoint_that_reached_the_limit_is_refused_before_loading(limits, named, checkpoint, tmp_path,
                                                                       cache_dir, monkeypatch):
    """Lightning would load every model, restore, print that the limit is reached and write nothing: say what to
    raise instead (the usual mistake when continuing a run), and how to get the weights without training."""
    def no_loading(*args, **kwargs):
        raise AssertionError("the models were loaded before the limits were checked")

    monkeypatch.setattr("sdpo.module.SDPOModule.__init__", no_loading)
    with pytest.raises(NothingToResume) as error:
        train(compose([*BASE, f"ckpt_path={checkpoint}", *limits], tmp_path, cache_dir))
    message = str(error.value)
    assert message.startswith(f"ckpt_path={checkpoint} has done 1 iteration (4 optimizer steps)"), message
    assert named in message and f"python -m sdpo.export {checkpoint} <folder>" in message


def test_resume_check_false_resumes_and_says_what_changed(checkpoint, tmp_path, cache_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="sdpo.train"):
        trainer = train(compose([*BASE, f"ckpt_path={checkpoint}", "trainer.max_epochs=2", "algo.num_steps=3",
                                 "resume_check=false"], tmp_path, cache_dir))
    assert trainer.current_epoch == 2
    assert "changed setting (resume_check=false): algo.num_steps: 4 in the checkpoint, 3 here" in caplog.text


def test_a_resume_with_another_global_batch_is_told_so(checkpoint, tmp_path, cache_dir, caplog, capsys):
    """Allowed (the README's exact resume needs the same global batch, but a smaller GPU count is a fair reason),
    and said once, with the two counts; the header's length counts the checkpoint's own trajectories and steps."""
    with caplog.at_level(logging.WARNING, logger="sdpo.module"):
        trainer = train(compose([*BASE, f"ckpt_path={checkpoint}", "trainer.max_epochs=3", "data.prompts_per_batch=2",
                                 "algo.micro_batch_pairs=2"], tmp_path / "smaller", cache_dir))
    assert "trained on 4 prompt pairs per iteration over all processes, this run draws 2" in caplog.text
    last = read_metrics(tmp_path / "smaller")[-1]
    said = (f"3 iterations (trainer.max_epochs) = {int(last['train/samples'])} trajectories, "
            f"{trainer.global_step} optimizer steps; resumed after 1: 2 to go")
    assert said in capsys.readouterr().out and last["train/samples"] == 8 + 2 * 4  # 4 pairs, then 2 pairs twice
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdpo.module"):
        train(compose([*BASE, f"ckpt_path={checkpoint}", "trainer.max_epochs=2"], tmp_path / "same", cache_dir))
    assert "prompt pairs per iteration" not in caplog.text


def test_reward_identity_ignores_where_weights_live_but_not_weights(tmp_path, cache_dir):
    cfg = compose(["reward=multi"], tmp_path, cache_dir)
    saved = {"model": cfg.model, "algo": cfg.algo, "reward": cfg.reward}
    moved = compose(["reward=multi", "+reward.components.aesthetic.clip_model=/models/clip",
                     "reward.components.aesthetic.dtype=bf16"], tmp_path, cache_dir)
    assert resume_differences(saved, moved) == []
    reweighted = compose(["reward=multi", "reward.components.aesthetic.weight=2.0"], tmp_path, cache_dir)
    assert resume_differences(saved, reweighted) == [
        "reward: {'aesthetic': ['aesthetic', 0.5], 'pickscore': ['pickscore', 1.0]} in the checkpoint, "
        "{'aesthetic': ['aesthetic', 2.0], 'pickscore': ['pickscore', 1.0]} here"]
    assert resume_settings(cfg.model, cfg.algo, {"name": "aesthetic", "clip_model": "/a"})["reward"] == "aesthetic"
    lora = compose(["reward=multi", "model.lora.enabled=true", "model.lora.rank=8", "model.lora.alpha=8"], tmp_path,
                   cache_dir)
    same_scale = compose(["reward=multi", "model.lora.enabled=true", "model.lora.rank=8", "model.lora.alpha=null"],
                         tmp_path, cache_dir)
    assert resume_differences({"model": lora.model, "algo": lora.algo, "reward": lora.reward}, same_scale) == []


@pytest.mark.parametrize("change,says", [
    (["trainer.max_epochs=1"], "has done 1 iteration (4 optimizer steps), which already meets trainer.max_epochs=1"),
    (["algo.num_steps=3", "trainer.max_epochs=2"], "algo.num_steps: 4 in the checkpoint, 3 here"),
])
def test_the_command_line_refuses_a_resume_before_lightning_loads(change, says, checkpoint, tmp_path, cache_dir):
    """``python -m sdpo.train`` runs both checks with torch alone loaded (~5 s to the refusal on 2 cores, not ~12)."""
    result, imported = run_probed("sdpo.train", [*BASE, *change, f"ckpt_path={checkpoint}"], cache_dir, tmp_path)
    assert result.returncode == 1 and says in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "lightning" not in imported and "diffusers" not in imported, imported


def test_the_command_line_refuses_to_start_afresh_over_another_runs_metrics(checkpoint, tmp_path, cache_dir):
    """A run folder that holds another run's metrics.csv, given without a checkpoint of its own: the CSV logger
    would delete the file. Refused before Lightning loads, the file untouched."""
    import shutil

    folder = tmp_path / "earlier"
    (folder / "csv").mkdir(parents=True)
    metrics = shutil.copy(checkpoint.parent.parent / "csv" / "metrics.csv", folder / "csv" / "metrics.csv")
    before = metrics.read_bytes()
    result, imported = run_probed("sdpo.train", [*BASE, f"hydra.run.dir={folder}"], cache_dir, tmp_path)
    assert result.returncode == 1 and "already holds a run's metrics" in result.stderr, result.stderr[-2000:]
    assert f"ckpt_path={folder.resolve() / 'checkpoints' / 'last.ckpt'}" in result.stderr
    assert "lightning" not in imported and "diffusers" not in imported, imported
    assert metrics.read_bytes() == before


def damaged_copies(checkpoint, folder):
    """Beside a good copy of ``checkpoint``: the same file cut short (a copy that did not finish), a torch file of
    another kind, and a JSON file."""
    import shutil

    import torch

    folder.mkdir()
    good = shutil.copy(checkpoint, folder / "epoch=0-step=4.ckpt")
    cut = folder / "last.ckpt"
    cut.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    torch.save({"w": torch.zeros(2)}, folder / "weights.ckpt")
    (folder / "summary.json").write_text("{}")
    return good, cut


def test_a_damaged_or_foreign_checkpoint_is_refused_with_the_good_ones_beside_it(checkpoint, tmp_path, cache_dir,
                                                                               monkeypatch):
    """Lightning would fail on these after loading every model, with torch's own error (``OSError: [Errno 22]``,
    ``KeyError: 'pytorch-lightning_version'``); the refusal says what the file is and which checkpoints in its
    folder can be read (not the damaged one)."""
    from sdpo.config_checks import ConfigError

    def no_loading(*args, **kwargs):
        raise AssertionError("the models were loaded before the checkpoint was read")

    monkeypatch.setattr("sdpo.module.SDPOModule.__init__", no_loading)
    good, cut = damaged_copies(checkpoint, tmp_path / "checkpoints")
    cases = {cut: f"a torch archive of {cut.stat().st_size:,} bytes that cannot be read",
             tmp_path / "checkpoints" / "weights.ckpt": "not a checkpoint written by sdpo.train",
             tmp_path / "checkpoints" / "summary.json": "not a checkpoint torch can load safely"}
    for path, says in cases.items():
        with pytest.raises(ConfigError) as error:
            train(compose([*BASE, f"ckpt_path={path}", "trainer.max_epochs=2"], tmp_path / "run", cache_dir))
        message = str(error.value)
        assert message.startswith(f"ckpt_path={path}: {says}"), message
        assert f"\"ckpt_path='{good}'\"" in message and f"={cut}" not in message.removeprefix(f"ckpt_path={path}")
    assert not (tmp_path / "run").exists()


def test_the_command_line_refuses_a_damaged_checkpoint_before_lightning_loads(checkpoint, tmp_path, cache_dir):
    _, cut = damaged_copies(checkpoint, tmp_path / "checkpoints")
    result, imported = run_probed("sdpo.train", [*BASE, f"ckpt_path={cut}", "trainer.max_epochs=2"], cache_dir,
                                  tmp_path)
    assert result.returncode == 1 and "cut short or damaged" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "lightning" not in imported, imported
