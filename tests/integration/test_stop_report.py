"""A run that stops early (Ctrl-C, an error) reports its complete iterations and how to continue or export them."""

from __future__ import annotations

import json
import os
import re
import signal

import pytest
import torch
from lightning.pytorch import Callback

from sdpo.callbacks import RunCheckpoint
from sdpo.export import main as export_main
from sdpo.train_run import train
from tests.conftest import FAST, compose, read_metrics
from tests.integration.test_train import run_cli


class StopAtEpoch(Callback):
    """As epoch ``epoch`` starts: Ctrl-C (a real SIGINT to this process) or a RuntimeError. ``ctrl-c-at-end``: the
    Ctrl-C comes as the epoch ends, after its rewards are recorded and before its checkpoint is written (Lightning
    runs checkpoint callbacks last)."""

    def __init__(self, epoch: int, how: str) -> None:
        self.epoch, self.how = epoch, how

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch and self.how == "ctrl-c-at-end":
            os.kill(os.getpid(), signal.SIGINT)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch and self.how != "ctrl-c-at-end":
            if self.how == "ctrl-c":
                os.kill(os.getpid(), signal.SIGINT)
            if self.how == "sigterm":  # Lightning's handler stops the run at the next batch
                os.kill(os.getpid(), signal.SIGTERM)
                return
            if self.how == "diverge":  # the policy diverges: its next sampling meets non-finite values
                with torch.no_grad():
                    next(pl_module.unet.parameters()).fill_(float("nan"))
                return
            raise RuntimeError("stopped by the test")


class SaysWhenTornDown(Callback):
    """Prints where Lightning's progress bar draws itself one last time: as fitting tears down, or in its
    exception hook (after the run's own callbacks)."""

    def teardown(self, trainer, pl_module, stage) -> None:
        print("torn down")

    def on_exception(self, trainer, pl_module, exception) -> None:
        print("torn down")


def test_the_end_of_run_report_comes_after_the_progress_bar_stops(tmp_path, cache_dir, capsys, restore_sigint):
    said = [f"+callbacks.said._target_={__name__}.SaysWhenTornDown", "callbacks.eval=null"]
    train(compose([*FAST, "trainer.max_epochs=1", *said], tmp_path / "done", cache_dir))
    out = capsys.readouterr().out
    assert out.index("torn down") < out.index("SDPO reward (") < out.index("trained weights for diffusers:")
    with pytest.raises(SystemExit):  # and a run stopped by Ctrl-C: its table and notice
        train(compose([*FAST, "trainer.max_epochs=3", *said, *stop_at(1, "ctrl-c")], tmp_path / "stopped", cache_dir))
    out = capsys.readouterr().out
    assert out.index("torn down") < out.index("SDPO reward (") < out.index("run stopped (Ctrl-C during epoch 1)")


def stop_at(epoch: int, how: str) -> list[str]:
    return [f"+callbacks.stop._target_={__name__}.StopAtEpoch", f"+callbacks.stop.epoch={epoch}",
            f"+callbacks.stop.how={how}"]


@pytest.fixture
def restore_sigint():
    """Lightning ignores SIGINT after a Ctrl-C (so a second one cannot cut its shutdown short): put it back."""
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a fresh Python's, whatever ran before on this worker
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_keeps_the_complete_iterations_and_says_how_to_go_on(tmp_path, cache_dir, capsys, restore_sigint):
    run = tmp_path / "run"
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown ends with exit status 1
        train(compose([*FAST, "trainer.max_epochs=6", *stop_at(2, "ctrl-c")], run, cache_dir))
    out = capsys.readouterr().out
    assert "epoch 0 -> epoch 1 (stopped by Ctrl-C during epoch 2)" in out  # the table over epochs 0 and 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped"] == "Ctrl-C during epoch 2" and [h["epoch"] for h in summary["history"]] == [0, 1]
    assert not (run / "trained").exists()  # the end-of-training export did not run
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert f"newest checkpoint: {checkpoint} (epoch=1-step=" in out

    export = re.search(r"export: +python -m sdpo\.export (\S+) (\S+)", out)
    assert export is not None, out
    export_main([export.group(1), export.group(2)])  # the printed command works
    assert (run / "trained" / "diffusion_pytorch_model.safetensors").is_file()  # the full UNet, as diffusers saves it

    said = re.search(r"continue: the same command with (ckpt_path=\S+)", out).group(1)
    more = tmp_path / "continued"  # a new run folder, as Hydra makes for the same command run again
    train(compose([*FAST, "trainer.max_epochs=3", said], more, cache_dir))  # ... and so does this one
    assert [int(r["epoch"]) for r in read_metrics(more) if "train/reward_1step" in r] == [2]
    summary = json.loads((more / "summary.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [0, 1, 2] and "stopped" not in summary


def test_an_epoch_that_ended_after_the_newest_checkpoint_is_named(tmp_path, cache_dir, capsys, restore_sigint):
    """Ctrl-C between an epoch's reward record and its checkpoint: the table includes that epoch, and the notice says
    the checkpoint is one epoch earlier, so continuing runs it again."""
    run = tmp_path / "run"
    with pytest.raises(SystemExit):
        train(compose([*FAST, "trainer.max_epochs=6", "callbacks.eval=null", *stop_at(2, "ctrl-c-at-end")], run,
                      cache_dir))
    out = capsys.readouterr().out
    assert "epoch 0 -> epoch 2 (stopped by Ctrl-C during epoch 2)" in out
    assert "(epoch=1-step=" in out  # the newest checkpoint holds epoch 1
    assert "the table's epoch 2 ended after that checkpoint: continuing from it runs it again" in out


class FailsBeforeLinking(RunCheckpoint):
    """Rank 0 when another rank dies while it writes epoch ``fail_epoch``'s checkpoint: the new file is written, and
    the run fails at the ranks' next meeting, before ``last.ckpt`` moves to it."""

    def __init__(self, fail_epoch: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fail_epoch = fail_epoch

    def _generate_state_key(self, **kwargs) -> str:  # RunCheckpoint's, so a RunCheckpoint resumes its state
        return f"{RunCheckpoint.__qualname__}{kwargs!r}"

    def _link_checkpoint(self, trainer, filepath: str, linkpath: str) -> None:
        if trainer.current_epoch == self.fail_epoch:
            raise RuntimeError("another rank died")
        super()._link_checkpoint(trainer, filepath, linkpath)


def test_a_failure_between_writing_a_checkpoint_and_linking_it_leaves_last_ckpt_whole(tmp_path, cache_dir, capsys,
                                                                                     recwarn):
    """Lightning deletes the previous file before it moves last.ckpt: a failure in between left last.ckpt naming a
    deleted file. Now the notice names a complete checkpoint, and continuing in the run's folder (as a restart does)
    runs the lost epoch again over its unlinked file and leaves one checkpoint, not an orphan."""
    run, limits = tmp_path / "run", [*FAST, "trainer.max_epochs=4", "callbacks.eval=null"]
    failing = [f"callbacks.checkpoint._target_={__name__}.FailsBeforeLinking", "+callbacks.checkpoint.fail_epoch=2"]
    with pytest.raises(RuntimeError, match="another rank died"):
        train(compose([*limits, *failing], run, cache_dir))
    last = run / "checkpoints" / "last.ckpt"
    assert last.resolve().is_file() and last.resolve().name.startswith("epoch=1-"), sorted(last.parent.iterdir())
    assert list(last.parent.glob("epoch=2-*.ckpt"))  # written, never linked
    out = capsys.readouterr().out
    assert f"newest checkpoint: {last} (epoch=1-step=" in out
    assert "the table's epoch 2 ended after that checkpoint: continuing from it runs it again" in out

    said = re.search(r"continue: the same command with (ckpt_path=\S+)", out).group(1)
    train(compose([*limits, said], run, cache_dir))  # in the same folder
    files = sorted(p.name for p in last.parent.iterdir())
    assert len(files) == 2 and files[0].startswith("epoch=3-") and files[1] == "last.ckpt", files
    assert last.resolve().name == files[0]
    assert not [w for w in recwarn if "is not empty" in str(w.message)]  # continuing in its folder is by design


def test_an_error_reports_what_was_done_and_that_nothing_was_saved(tmp_path, cache_dir, capsys):
    with pytest.raises(RuntimeError, match="stopped by the test"):
        train(compose([*FAST, "trainer.max_epochs=4", "callbacks.checkpoint=null", *stop_at(1, "error")], tmp_path,
                      cache_dir))
    out = capsys.readouterr().out
    assert "epoch 0 -> epoch 0 (stopped by RuntimeError during epoch 1)" in out
    assert "no checkpoint written (callbacks.checkpoint is off): nothing to continue from" in out
    assert not list(tmp_path.rglob("*.ckpt"))  # nor did Lightning's default checkpointing write one


def test_an_error_before_the_first_iteration_ends_adds_nothing(tmp_path, cache_dir, capsys):
    with pytest.raises(RuntimeError, match="stopped by the test"):
        train(compose([*FAST, "trainer.max_epochs=2", *stop_at(0, "error")], tmp_path, cache_dir))
    assert "stopped by" not in capsys.readouterr().out
    assert not (tmp_path / "summary.json").exists()


def test_sigterm_exits_non_zero_and_the_run_folder_keeps_the_record(tmp_path, cache_dir):
    """A scheduler's SIGTERM: the run stops after its complete iterations with status 143 (Lightning's own exit would
    be 0, which reads as success), and the run's train.log holds what the console showed: header, table, notice."""
    run = tmp_path / "run"
    result = run_cli([*FAST, "trainer.max_epochs=6", "callbacks.eval=null", *stop_at(2, "sigterm"),
                      f"hydra.run.dir={run}"], cache_dir, timeout=300)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    # Lightning acts on SIGTERM after the iteration it arrived in: epoch 2 completes, the stop comes as 3 starts
    assert "epoch 0 -> epoch 2 (stopped by SIGTERM during epoch 3)" in result.stdout
    log = (run / "train.log").read_text()
    for text in ("SDPO run:", "epoch 0 -> epoch 2 (stopped by SIGTERM during epoch 3)",
                 f"newest checkpoint: {run / 'checkpoints' / 'last.ckpt'}", "run stopped by SIGTERM"):
        assert text in log, text


def test_ctrl_c_in_the_first_iteration_says_nothing_was_saved(tmp_path, cache_dir, capsys, restore_sigint):
    with pytest.raises(SystemExit):
        train(compose([*FAST, "trainer.max_epochs=3", *stop_at(0, "ctrl-c")], tmp_path, cache_dir))
    out = capsys.readouterr().out
    assert "run stopped (Ctrl-C during epoch 0) with no checkpoint written (the first iteration had not ended)" in out


def test_a_diverged_policy_says_where_and_is_not_told_to_run_again_as_is(tmp_path, cache_dir, capsys):
    with pytest.raises(FloatingPointError) as error:
        train(compose([*FAST, "trainer.max_epochs=4", "callbacks.eval=null", *stop_at(2, "diverge")], tmp_path,
                      cache_dir))
    message = str(error.value)
    assert "while sampling iteration 2, with the policy after 8 optimizer steps" in message  # 4 steps per iteration
    assert "Lower optim.lr (now 0.0003)" in message
    out = capsys.readouterr().out
    assert "(stopped by non-finite values during epoch 2)" in out
    assert "the same command would diverge the same way" in out and "with a lower optim.lr (now 0.0003) and " in out
    assert "continue: the same command with ckpt_path" not in out
