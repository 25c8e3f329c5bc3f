"""What ``python -m sdpo.plot`` prints and where it writes, on hand-made run folders (no training needed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from sdpo import plot
from sdpo.phase_times import PHASES, phase_table, plot_phase_times, timing_noise_notes

TYPICAL = {"sampling": 0.3, "rewards": 0.1, "advantages": 0.05, "training": 0.15}  # 0.6 s per iteration
PAIRS_PER_ITERATION = 4


def write_run(folder: Path, sampling: list[float], config: dict | None = None) -> Path:
    """A run folder whose log has one row per iteration: ``time/sampling`` as given, the other phases typical, and
    the cumulative ``train/samples`` (2 images per pair). ``config``: saved as Hydra's ``.hydra/config.yaml``."""
    n = len(sampling)
    log = pd.DataFrame({"epoch": range(n), "step": range(n),
                        "train/samples": [2 * PAIRS_PER_ITERATION * (i + 1) for i in range(n)],
                        "train/reward_1step": np.linspace(0.1, 0.2, n)})
    for phase, seconds in TYPICAL.items():
        log[f"time/{phase}"] = sampling if phase == "sampling" else [seconds] * n
    (folder / "csv").mkdir(parents=True)
    log.to_csv(folder / "csv" / "metrics.csv", index=False)
    if config is not None:
        (folder / ".hydra").mkdir()
        OmegaConf.save(OmegaConf.create(config), folder / ".hydra" / "config.yaml")
    return folder


def test_phase_times_are_medians_and_a_noisy_run_is_named(tmp_path: Path, capsys: pytest.CaptureFixture):
    """A run whose typical iteration takes 0.6 s, with a compiling first iteration and two iterations slowed by
    another process: the table shows the typical time, the mean would not, and a note names the noisy group."""
    noisy = [30.0] + [0.3] * 7 + [20.0, 20.0]
    steady = [12.0] + [0.29, 0.31, 0.3, 0.32, 0.28, 0.3, 0.3, 0.31, 0.29]
    assert {*PHASES} == set(TYPICAL)  # the hand-made logs cover every phase
    write_run(tmp_path / "noisy", noisy, {"seed": 0, "algo": {"num_steps": 4}})
    write_run(tmp_path / "steady", steady, {"seed": 0, "algo": {"num_steps": 2}})
    groups = plot.group_runs(plot.load_runs([tmp_path]))
    table = phase_table(groups)

    row = table.loc["algo.num_steps=4"]
    assert row["sampling"] == pytest.approx(np.median(noisy[1:]))  # 0.3: the typical iteration
    assert np.mean(noisy[1:]) > 10 * row["sampling"]  # what the mean would have shown
    assert row["sum of phases"] == pytest.approx(sum(TYPICAL.values()))
    assert row["samples/s"] == pytest.approx(2 * PAIRS_PER_ITERATION / row["sum of phases"])
    assert row["iterations"] == len(noisy) - 1
    assert table.loc["algo.num_steps=2", "sampling"] == pytest.approx(np.median(steady[1:]))

    (note,) = timing_noise_notes(groups)  # the steady run's slowest iterations are within 2x of its median
    assert note.startswith("note: algo.num_steps=4: noisy timing")
    assert "median over iterations" in plot_phase_times(table).axes[0].get_xlabel()
    plot.main([str(tmp_path), "--x", "samples"])
    printed = capsys.readouterr().out
    assert note in printed.splitlines() and "algo.num_steps=2: noisy" not in printed


def test_long_config_values_are_shortened_in_labels(tmp_path: Path):
    animals = ["cow", "goat", "lion", "zebra", "horse", "monkey", "rabbit", "bird"]
    prompt = "a photograph of an astronaut riding a horse on the moon, highly detailed"
    configs = {"many": {"data": {"source": animals}, "note": "short"},
               "few": {"data": {"source": animals[:3]}, "note": prompt}}
    runs = [plot.load_run(write_run(tmp_path / name, [0.3, 0.3], {"seed": 0, **cfg})) for name, cfg in configs.items()]
    labels = [group.label for group in plot.group_runs(runs)]
    assert labels[0] == "data.source=[cow,goat,lion,+5], note=short"
    assert labels[1].startswith("data.source=[cow,goat,lion], note=a photograph of an astronaut")
    assert labels[1].endswith("…") and len(labels[1]) < len("data.source=[cow,goat,lion], note=") + len(prompt)


def test_counts_print_as_integers_unless_a_mean_over_seeds_is_fractional():
    table = pd.DataFrame({"mean": [0.5, 2.0], "seeds": [2, 1], "epoch": [99.0, 49.5],
                          "samples": [3200.0, 1600.0], "reward_queries": [6400.0, np.nan]})
    shown = plot.counts_as_integers(table)
    assert shown["samples"].tolist() == [3200, 1600] and shown["reward_queries"].iloc[0] == 6400
    assert pd.isna(shown["reward_queries"].iloc[1])
    assert shown["epoch"].tolist() == [99.0, 49.5]  # 49.5: seeds that stopped at different epochs
    assert shown["mean"].tolist() == [0.5, 2.0]  # a reward is not a count, even when whole
    text = shown.to_string(float_format=lambda v: f"{v:.4f}")
    assert "3200" in text and "3200.0000" not in text and "2.0000" in text


def test_latest_runs_searches_every_task(tmp_path: Path):
    older = write_run(tmp_path / "train" / "a", [0.3, 0.3])
    newer = write_run(tmp_path / "tiny_lora" / "b", [0.3, 0.3])
    os.utime(older / "csv" / "metrics.csv", (2e9, 2e9))
    os.utime(newer / "csv" / "metrics.csv", (1e9, 1e9))
    (tmp_path / "evaluate" / "c").mkdir(parents=True)  # an evaluation: no csv/metrics.csv
    assert plot.latest_runs(tmp_path) == [older.resolve()]
    os.utime(newer / "csv" / "metrics.csv", (3e9, 3e9))
    assert plot.latest_runs(tmp_path, n=2) == [older.resolve(), newer.resolve()]


def test_the_figure_is_named_by_what_it_shows(tmp_path: Path):
    assert plot.default_out([tmp_path / "b", tmp_path / "a"]) == tmp_path / "b" / "reward_curves.png"
    assert plot.default_out([tmp_path], "train") == tmp_path / "reward_curves_train.png"
    assert plot.default_out([tmp_path], "change", "clip score") == tmp_path / "reward_curves_change_clip-score.png"
    assert plot.default_out([tmp_path], reward="aesthetic") == tmp_path / "reward_curves_aesthetic.png"


def test_a_glob_that_also_matches_earlier_figures_plots_the_runs(tmp_path, capsys):
    """``python -m sdpo.plot outputs/train/*`` after ``python -m sdpo.plot outputs/train``: the glob also names
    the figures that plot wrote there, which are skipped with a word; a path that does not exist still stops."""
    run = write_run(tmp_path / "run", [0.3, 0.3, 0.3])
    figure = tmp_path / "reward_curves.png"
    figure.write_bytes(b"")
    assert plot.find_run_dirs([run, figure]) == [run.resolve()]
    assert f"skipping {figure}: a file, not a run folder" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        plot.find_run_dirs([run, tmp_path / "missing"])
