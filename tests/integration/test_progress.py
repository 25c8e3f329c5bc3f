"""The bars inside an iteration count the work that really runs, and leave Lightning's bar as they found it."""

from __future__ import annotations

import logging
import math
import re

import lightning as L

from sdpo.progress import RunPaceBar, _RunColumn
from sdpo.train_run import train
from tests.conftest import compose, read_metrics

RUN = ["trainer.enable_progress_bar=true", "trainer.max_epochs=2", "data.prompts_per_batch=6",
       "algo.sample_batch_size=4", "algo.micro_batch_pairs=2", "algo.gradient_accumulation_steps=2", "algo.num_steps=3"]


class WatchTheBars(L.Callback):
    """At every optimizer step, the Rich bar's tasks: (description, total, completed) of each."""

    def __init__(self) -> None:
        self.seen: list[list[tuple[str, float, float]]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        tasks = trainer.progress_bar_callback.progress.tasks
        self.seen.append([(t.description.strip(), t.total, t.completed) for t in tasks])


def test_the_training_bar_ticks_once_per_optimizer_step_and_goes(tmp_path, cache_dir):
    cfg = compose([*RUN, "+callbacks.bar._target_=lightning.pytorch.callbacks.RichProgressBar",
                   f"+callbacks.watch._target_={__name__}.WatchTheBars"], tmp_path, cache_dir)
    trainer = train(cfg)
    watch = next(c for c in trainer.callbacks if isinstance(c, WatchTheBars))
    steps = int(read_metrics(tmp_path)[0]["train/optimizer_steps"])
    assert steps == 3 * math.ceil(6 / (2 * 2))  # T columns x ceil(pairs / (micro x accumulation))
    assert len(watch.seen) == 2 * steps
    for epoch in range(2):
        views = watch.seen[epoch * steps:(epoch + 1) * steps]
        training = [next(task for task in view if task[0] == "training") for view in views]
        assert training == [("training", steps, k) for k in range(steps)]  # ticks after each step
        assert all("sampling" not in [task[0] for task in view] for view in views)  # removed when it ended
    left = [t.description for t in trainer.progress_bar_callback.progress.tasks]
    assert not any("training" in d or "sampling" in d for d in left)


def test_tqdm_bars_show_the_phases(tmp_path, cache_dir, capsys):
    cfg = compose([*RUN, "+callbacks.bar._target_=lightning.pytorch.callbacks.TQDMProgressBar"], tmp_path, cache_dir)
    train(cfg)
    shown = capsys.readouterr()
    assert "sampling" in shown.out + shown.err and "training" in shown.out + shown.err


class WatchThePace(L.Callback):
    """As each iteration's batch starts (the bar has made its line): the line's time and speed texts, and the
    pace's arithmetic."""

    def __init__(self) -> None:
        self.texts: list[list[str]] = []
        self.paces: list[tuple] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        bar = trainer.progress_bar_callback
        task = bar.progress.tasks[bar.train_progress_bar_id]
        self.texts.append([str(c.render(task)) for c in bar.progress.columns if isinstance(c, _RunColumn)])
        ended = bar.pace.ended
        if ended:  # at the moment the last iteration ended: seconds left = pace x iterations to go
            self.paces.append((bar.run_pace(now=ended[-1]), (ended[-1] - bar.pace.started) / len(ended)))


def test_the_iteration_line_shows_the_runs_time_and_pace(tmp_path, cache_dir):
    """One batch per epoch made Lightning's columns read "0:00:01 • 0:00:00 0.00it/s" on every iteration."""
    cfg = compose([*RUN, f"+callbacks.watch._target_={__name__}.WatchThePace"], tmp_path, cache_dir)
    trainer = train(cfg)
    assert isinstance(trainer.progress_bar_callback, RunPaceBar)  # what a run gets when its config names no bar
    watch = next(c for c in trainer.callbacks if isinstance(c, WatchThePace))
    assert watch.texts[0][1] == "-- s/it" and watch.texts[0][0].endswith(" • -:--:--")  # no pace before one ends
    assert re.fullmatch(r"0:00:\d\d • 0:00:\d\d", watch.texts[1][0]) and re.fullmatch(r"\d+\.\d s/it",
                                                                                      watch.texts[1][1])
    ((elapsed, per_iteration, left), mean), = watch.paces  # 2 iterations: paced once, with 1 to go
    assert per_iteration == mean and left == per_iteration * 1 and elapsed == mean
    sampling = [c for c in trainer.progress_bar_callback.progress.columns if isinstance(c, _RunColumn)]
    assert [type(c.lightnings).__name__ for c in sampling] == ["CustomTimeColumn", "ProcessingSpeedColumn"]


def test_the_pace_log_says_each_minute_and_at_the_end_what_the_bar_shows_on_a_terminal(tmp_path, cache_dir, caplog):
    """Where stdout is no terminal (a cluster job's output file, pytest here) Rich draws no bar: the pace line is
    logged instead, at most every ``every_seconds`` and after the last iteration."""
    def logged(every_seconds: float, folder: str) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sdpo.progress"):
            train(compose([*RUN, "trainer.enable_progress_bar=false", f"callbacks.pace.every_seconds={every_seconds}"],
                          tmp_path / folder, cache_dir))
        return [r.getMessage() for r in caplog.records if r.name == "sdpo.progress"]

    each = logged(0, "each")
    assert [line.split(":")[0] for line in each] == ["iteration 1/2", "iteration 2/2"]
    pattern = r"iteration 2/2: 0:00:\d\d spent, 0:00:00 left, \d+\.\d s/it, reward 1-step 0\.\d{4}, 3-step 0\.\d{4}"
    assert re.fullmatch(pattern, each[1]), each[1]
    rows = read_metrics(tmp_path / "each")
    assert f"1-step {rows[-1]['train/reward_1step']:.4f}, 3-step {rows[-1]['train/reward_last']:.4f}" in each[1]
    assert [line.split(":")[0] for line in logged(3600, "hourly")] == ["iteration 2/2"]  # the last one always
