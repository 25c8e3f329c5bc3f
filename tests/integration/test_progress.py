"""The bars inside an iteration count the work that really runs, and leave Lightning's bar as they found it."""

from __future__ import annotations

import math

import lightning as L

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
