"""Results plotting on tiny real runs: ``python -m sdpo.plot``, the figure and table it builds, the notebook."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from sdpo import plot
from sdpo.evaluate_run import evaluate
from sdpo.phase_times import PHASES, phase_table, plot_phase_times
from sdpo.train_run import train
from tests.conftest import FAST, REPO, compose, compose_eval, console_script

NOTEBOOK = REPO / "notebooks" / "analysis.ipynb"
# Two seeds of one config and one run with another T: two groups, one of them with a seed band.
RUNS = {"seed0": ["algo.num_steps=4", "seed=0"], "seed1": ["algo.num_steps=4", "seed=1"],
        "steps2": ["algo.num_steps=2", "seed=0"]}
SEEDS, OTHER = "algo.num_steps=4", "algo.num_steps=2"  # the group labels: the one key that differs
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """Three 3-epoch runs, without the eval callback (a later test writes synthetic eval columns). seed0 and steps2
    get ``.hydra/config.yaml`` as the Hydra entry point writes it; seed1 keeps only the CSV logger's
    ``hparams.yaml`` (what a run started from Python has), and must still group."""
    root = tmp_path_factory.mktemp("plot-runs")
    with one_thread():
        for name, extra in RUNS.items():
            cfg = compose([*FAST, "trainer.max_epochs=3", "callbacks.eval=null", *extra], root / name, cache_dir)
            train(cfg)
            if name != "seed1":
                (root / name / ".hydra").mkdir()
                OmegaConf.save(cfg, root / name / ".hydra" / "config.yaml")
    return root


@contextmanager
def one_thread() -> Iterator[None]:
    """Train with one thread, then restore the test session's count: a 0.8 M-parameter UNet is fastest on one,
    even on a busy machine (on two busy cores, two threads wait on each other)."""
    threads = torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SDPO_NUM_THREADS", "1")
            yield
    finally:
        torch.set_num_threads(threads)


def last_row(run_dir: Path) -> pd.Series:
    return pd.read_csv(run_dir / "csv" / "metrics.csv").iloc[-1]


def test_cli_writes_the_png_into_the_folder_it_searched(runs_root, capsys):
    # the console script: the same command as `python -m sdpo.plot`, exiting 0 although main() returns the path
    result = subprocess.run([console_script("sdpo-plot"), str(runs_root)], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = Path(result.stdout.strip().splitlines()[-1])
    assert out.resolve() == (runs_root / "reward_curves.png").resolve()  # a multirun's figures go in its folder
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert "3 run(s) in 2 group(s)" in result.stdout and SEEDS in result.stdout
    assert (runs_root / "phase_times.png").read_bytes()[:8] == PNG_MAGIC
    assert "seconds per iteration by phase: the median over each run's iterations" in result.stdout
    last = last_row(runs_root / "seed0")
    row = next(line.split() for line in result.stdout.splitlines() if line.startswith(SEEDS))
    whole = [f"{last[c]:.0f}" for c in ("epoch", "train/samples", "train/reward_queries")]
    assert row[-3:] == whole, row  # counts print as integers, not 2.0000
    assert plot.main([str(runs_root / "steps2"), str(runs_root / "seed1")]) == runs_root / "steps2" / \
        "reward_curves.png"  # several folders: into the first one given, not the first in sorted order
    curves = (runs_root / "reward_curves.png").read_bytes()
    train_png = plot.main([str(runs_root), "--metric", "train"])
    assert train_png == runs_root / "reward_curves_train.png"  # another metric: a file of its own
    assert train_png.read_bytes()[:8] == PNG_MAGIC and (runs_root / "reward_curves.png").read_bytes() == curves
    assert str(train_png) == capsys.readouterr().out.strip().splitlines()[-1]  # the last line: the path written

    explicit = runs_root / "figs" / "curves.png"
    assert plot.main([str(runs_root / "seed0"), str(runs_root / "seed1"), "--out", str(explicit), "--x",
                      "samples"]) == explicit
    assert explicit.read_bytes()[:8] == PNG_MAGIC
    bad = subprocess.run([sys.executable, "-m", "sdpo.plot", str(runs_root), "--metric", "eval"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no eval/<reward>/<k>step metrics" in bad.stderr
    with pytest.raises(SystemExit) as stop:
        plot.main([str(runs_root / "seed0"), "--smooth", "0"])
    assert stop.value.code == 2


def test_runs_group_by_config_without_seed(runs_root):
    runs = plot.load_runs([runs_root])
    assert [r.label for r in runs] == ["seed0", "seed1", "steps2"]
    assert runs[1].config.algo.num_steps == 4 and runs[1].seed == 1  # from hparams.yaml
    groups = plot.group_runs(runs)
    assert [(g.label, g.seeds) for g in groups] == [(SEEDS, [0, 1]), (OTHER, [0])]
    assert "seed" not in groups[0].config and "paths.output_dir" not in groups[0].config


def test_figure_has_one_panel_per_step_count_and_a_seed_band(runs_root):
    runs = plot.load_runs([runs_root])
    fig = plot.plot_runs(runs, x="both")
    axes = fig.get_axes()
    assert len(axes) == 2 * 2  # (1 step, T steps) x (samples, reward queries)
    assert [ax.get_title() for ax in axes] == ["1 step", "T steps (T = 2, 4)"] * 2
    assert [ax.get_xlabel() for ax in axes] == ["samples (images generated)"] * 2 + ["reward queries"] * 2
    assert axes[0].get_ylabel() == "training reward (brightness)"
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == [f"{SEEDS} (n=2 seeds)", OTHER]

    seeds = [pd.read_csv(runs_root / name / "csv" / "metrics.csv") for name in ("seed0", "seed1")]
    for ax, (x, column) in zip(axes, [("train/samples", "train/reward_1step"), ("train/samples", "train/reward_last"),
                                      ("train/reward_queries", "train/reward_1step"),
                                      ("train/reward_queries", "train/reward_last")], strict=True):
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == legend  # one line per group, seeds averaged into one
        assert len(ax.collections) == 1  # the band, only for the group with two seeds
        values = np.stack([df[column].to_numpy() for df in seeds])
        np.testing.assert_allclose(lines[0].get_xdata(), seeds[0][x].to_numpy())
        np.testing.assert_allclose(lines[0].get_ydata(), values.mean(0), rtol=1e-12)
        band = ax.collections[0].get_paths()[0].vertices[:, 1]
        std = values.std(0, ddof=1)
        assert band.max() == pytest.approx((values.mean(0) + std).max())
        assert band.min() == pytest.approx((values.mean(0) - std).min())

    assert len(plot.plot_runs(runs, x="samples").get_axes()) == 2


def test_step_table_is_the_mean_of_the_last_rows(runs_root):
    table = plot.step_table(plot.load_runs([runs_root]))
    assert list(table.index) == [(SEEDS, 1), (SEEDS, 4), (OTHER, 1), (OTHER, 2)]
    a, b, c = (last_row(runs_root / name) for name in ("seed0", "seed1", "steps2"))
    for steps, column in ((1, "train/reward_1step"), (4, "train/reward_last")):
        row = table.loc[(SEEDS, steps)]
        assert row["mean"] == pytest.approx((a[column] + b[column]) / 2, rel=1e-12)
        assert row["std"] == pytest.approx(np.std([a[column], b[column]], ddof=1), rel=1e-9)
        assert row["seeds"] == 2 and row["samples"] == a["train/samples"] and row["metric"] == column
    assert table.loc[(OTHER, 2), "mean"] == pytest.approx(c["train/reward_2step"], rel=1e-12)
    assert table.loc[(OTHER, 2), "reward_queries"] == c["train/reward_queries"]
    assert np.isnan(table.loc[(OTHER, 1), "std"])


@pytest.fixture(scope="module")
def resumed_run(runs_root: Path, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """seed0 resumed with ``ckpt_path=`` for two more epochs: a new folder that logs only iterations 3 and 4."""
    folder = tmp_path_factory.mktemp("resumed") / "more"
    ckpt = runs_root / "seed0" / "checkpoints" / "last.ckpt"
    with one_thread():
        train(compose([*FAST, "trainer.max_epochs=5", "callbacks.eval=null", *RUNS["seed0"], f"ckpt_path={ckpt}"],
                      folder, cache_dir))
    return folder


def test_a_resumed_run_is_drawn_with_the_iterations_it_resumed(runs_root, resumed_run):
    """The resumed run's curve starts at iteration 0."""
    parent, own = (plot.read_metrics(folder / "csv" / "metrics.csv") for folder in (runs_root / "seed0",
                                                                                    resumed_run))
    assert list(own["epoch"]) == [3, 4]
    (run,) = plot.load_runs([resumed_run])  # the parent is read from disk
    assert list(run.metrics["epoch"]) == [0, 1, 2, 3, 4]
    expected = pd.concat([parent, own], ignore_index=True)["train/reward_1step"]
    pd.testing.assert_series_equal(run.metrics["train/reward_1step"], expected)
    both = plot.load_runs([runs_root / "seed0", resumed_run])  # the parent is drawn as part of it, not alone
    assert [r.path.name for r in both] == ["more"] and len(both[0].metrics) == 5


def test_a_relative_ckpt_path_is_read_from_the_folder_training_ran_in(runs_root, resumed_run, tmp_path,
                                                                      monkeypatch):
    """``ckpt_path=outputs/seed0/...`` as typed in the launch folder: the plot finds the parent from any folder,
    through the ``hydra.runtime.cwd`` Hydra records; a run without that record reads it from the current folder."""
    launch = tmp_path / "project"
    for name, source in (("seed0", runs_root / "seed0"), ("more", resumed_run)):
        shutil.copytree(source, launch / "outputs" / name, ignore=shutil.ignore_patterns("checkpoints", "trained"))
    resumed = launch / "outputs" / "more"
    config = OmegaConf.load(resumed / "csv" / "hparams.yaml")
    config.ckpt_path = "outputs/seed0/checkpoints/last.ckpt"  # relative, as typed on the command line
    (resumed / ".hydra").mkdir()
    OmegaConf.save(config, resumed / ".hydra" / "config.yaml")
    elsewhere = tmp_path / "notebooks"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (alone,) = plot.load_runs([resumed])  # no record of the launch folder: read from here, where it is not
    assert list(alone.metrics["epoch"]) == [3, 4]

    OmegaConf.save({"hydra": {"runtime": {"cwd": str(launch)}}}, resumed / ".hydra" / "hydra.yaml")
    (run,) = plot.load_runs([resumed])
    assert list(run.metrics["epoch"]) == [0, 1, 2, 3, 4]
    assert [r.path.name for r in plot.load_runs([launch / "outputs"])] == ["more"]  # the parent drawn within it
    monkeypatch.chdir(launch)
    (resumed / ".hydra" / "hydra.yaml").unlink()
    assert list(plot.load_runs([resumed])[0].metrics["epoch"]) == [0, 1, 2, 3, 4]  # the fallback: from here


def test_phase_times_are_the_logged_medians_after_the_first_iteration(runs_root):
    groups = plot.group_runs(plot.load_runs([runs_root]))
    table = phase_table(groups)
    assert list(table.index) == [SEEDS, OTHER]
    for group, names in ((SEEDS, ("seed0", "seed1")), (OTHER, ("steps2",))):
        logs = [pd.read_csv(runs_root / name / "csv" / "metrics.csv") for name in names]
        logs = [log[log["time/sampling"].notna()] for log in logs]
        assert all(len(log) == 3 for log in logs)  # 3 iterations, the first left out
        row = table.loc[group]
        for phase in PHASES:
            expected = np.mean([log[f"time/{phase}"].iloc[1:].median() for log in logs])  # mean over seeds
            assert row[phase] == pytest.approx(expected, rel=1e-12), phase
        assert row["sum of phases"] == pytest.approx(sum(row[p] for p in PHASES), rel=1e-12)
        assert row["samples/s"] == pytest.approx(2 * 4 / row["sum of phases"], rel=1e-12)  # 4 pairs per iteration
        assert (row["seeds"], row["iterations"]) == (len(names), 2)
    bars = plot_phase_times(table).axes[0].patches
    assert len(bars) == len(PHASES) * 2
    assert bars[-1].get_x() + bars[-1].get_width() == pytest.approx(table.loc[OTHER, "sum of phases"])
    with pytest.raises(ValueError, match="no run logged phase times"):
        plot_phase_times(table.iloc[:0])


def copy_with_eval_rows(source: Path, run: Path, offset: float) -> None:
    """A copy of a run that logged eval rewards every 2 epochs, in rows of their own (as ``callbacks.eval`` does):
    ``eval/brightness/<k>step`` = 0.1 k + epoch + ``offset``, its change 0.01 k epoch, colorfulness 5 at 1 step."""
    shutil.copytree(source, run, ignore=shutil.ignore_patterns("checkpoints", "trained", "*.png"))
    df = pd.read_csv(run / "csv" / "metrics.csv")
    evals = df.loc[df["epoch"] % 2 == 0, ["epoch", "step"]].copy()
    for k in (1, 2, 4):
        evals[f"eval/brightness/{k}step"] = 0.1 * k + evals["epoch"] + offset
        evals[f"eval/brightness/{k}step_change"] = 0.01 * k * evals["epoch"]
    evals["eval/colorfulness/1step"] = 5.0
    pd.concat([df, evals]).sort_values("epoch", kind="stable").to_csv(run / "csv" / "metrics.csv", index=False)


def test_eval_metrics_give_one_panel_per_evaluated_step_count(runs_root, tmp_path):
    """Eval rewards logged every 2 epochs, in rows of their own: one panel per k, values from the eval rows."""
    for offset, name in enumerate(("seed0", "seed1")):
        copy_with_eval_rows(runs_root / name, tmp_path / name, offset)

    runs = plot.load_runs([tmp_path])
    assert len(runs[0].metrics) == 3  # the eval rows merged into their epoch's row
    fig = plot.plot_runs(runs, x="samples")
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["1 step", "2 steps", "4 steps"]
    assert axes[0].get_ylabel() == "eval reward (brightness)"
    for k, ax in zip((1, 2, 4), axes, strict=True):
        (line,) = ax.get_lines()  # one group: the configs agree once seeds and paths are left out
        assert line.get_label() == "brightness, T=4 (n=2 seeds)"  # nothing differs: what the seeds trained
        np.testing.assert_allclose(line.get_xdata(), runs[0].metrics["train/samples"].to_numpy()[[0, 2]])
        np.testing.assert_allclose(line.get_ydata(), [0.1 * k + 0.5, 0.1 * k + 2.5])
    change = plot.plot_runs(runs, x="samples", metric="change").get_axes()  # the _change columns are not step counts
    assert [ax.get_title() for ax in change] == ["1 step", "2 steps", "4 steps"]
    assert change[0].get_ylabel() == "eval change since the first update (brightness)"
    np.testing.assert_allclose(change[2].get_lines()[0].get_ydata(), [0.0, 0.04 * 2])
    with pytest.raises(ValueError, match="no eval/colorfulness/<k>step_change"):
        plot.plot_runs(runs, metric="change", reward="colorfulness")
    table = plot.step_table(runs)
    assert table.loc[("brightness, T=4", 4), "mean"] == pytest.approx(0.4 + 2.5)
    assert table.loc[("brightness, T=4", 4), "epoch"] == 2
    assert [ax.get_title() for ax in plot.plot_runs(runs, reward="colorfulness").get_axes()] == ["1 step"] * 2
    assert [ax.get_title() for ax in plot.plot_runs(runs, metric="train", x="samples").get_axes()] == [
        "1 step", "4 steps"]


def test_the_table_names_the_groups_without_the_metric_it_shows(runs_root, tmp_path, capsys):
    """Evaluated seeds next to a run trained without evaluation: its group has no eval row, and the printed table
    says so rather than dropping it silently."""
    for offset, name in enumerate(("seed0", "seed1")):
        copy_with_eval_rows(runs_root / name, tmp_path / name, offset)
    shutil.copytree(runs_root / "steps2", tmp_path / "steps2", ignore=shutil.ignore_patterns("checkpoints", "*.png"))
    runs = plot.load_runs([tmp_path])
    groups = plot.group_runs(runs)
    table = plot.step_table(runs, groups=groups)
    assert plot.groups_left_out(table, groups) == [OTHER]
    assert plot.left_out_note(runs, plot.step_table(runs, "train", groups=groups), groups, "train") is None

    plot.main([str(tmp_path), "--x", "samples"])
    printed = capsys.readouterr().out
    assert "3 run(s) in 2 group(s)" in printed
    (note,) = [line for line in printed.splitlines() if line.startswith("note: left out")]
    assert note == f"note: left out, no eval reward (brightness) logged: {OTHER} (--metric train compares every run)"
    plot.main([str(tmp_path), "--x", "samples", "--metric", "train"])
    assert "note: left out" not in capsys.readouterr().out  # every run logs its training reward


def python_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernel name that runs this interpreter: the installed ``python3`` spec when it does (a bare ``python``
    is replaced by ``sys.executable`` at launch), else a throwaway spec found through ``JUPYTER_PATH``."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        command = KernelSpecManager().get_kernel_spec("python3").argv[0]
        bare = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}
        if command in bare or Path(command).resolve() == Path(sys.executable).resolve():
            return "python3"
    except NoSuchKernel:
        pass
    spec = tmp_path / "jupyter" / "kernels" / "sdpo-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "sdpo test", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "sdpo-test"


def test_notebook_executes_top_to_bottom(runs_root, tmp_path, monkeypatch, cache_dir):
    import nbformat
    from nbclient import NotebookClient

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. nbformat's MissingIDFieldWarning: every cell has an id (nbformat 4.5)
        nb = nbformat.read(NOTEBOOK, as_version=4)
        nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert "RUNS = " in code[0].source  # the runs are chosen in the first code cell
    assert all(not cell.outputs and cell.execution_count is None for cell in code)  # stored without outputs

    # steps2 as a run whose last epoch was evaluated on held-out prompts: the files EvalDuringTraining writes
    # (EvalResult.save into eval/epoch_XXXX/), here by `python -m sdpo.evaluate` on the run's checkpoint
    evaluated = tmp_path / "steps2"
    shutil.copytree(runs_root / "steps2", evaluated)
    evaluate(compose_eval([f"checkpoint={evaluated / 'checkpoints' / 'last.ckpt'}", "steps=[1,2]",
                           "images_per_prompt=1", "prompts=[cow,lion]"], evaluated / "eval" / "epoch_0002", cache_dir))
    dirs = [runs_root / "seed0", runs_root / "seed1", evaluated]
    monkeypatch.setenv("SDPO_RUNS", os.pathsep.join(str(d) for d in dirs))
    NotebookClient(nb, timeout=120, kernel_name=python_kernel(tmp_path, monkeypatch),
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    def outputs(marker: str) -> list:
        (cell,) = [c for c in code if marker in c.source]
        return cell.outputs

    curves = [o for o in outputs('plot.plot_runs(runs, x="both"') if "image/png" in o.get("data", {})]
    assert len(curves) == 1 and base64.b64decode(curves[0]["data"]["image/png"])[:8] == PNG_MAGIC
    change = "".join(o.get("text", "") for o in outputs('metric="change"'))  # these runs evaluated nothing
    assert change.startswith("no change curves: these runs log no eval/<reward>/<k>step metrics"), change
    printed = "".join(o.get("text", "") for o in outputs("plot.group_runs("))
    assert f"{SEEDS}: 2 run(s), seeds [0, 1]" in printed and f"{OTHER}: 1 run(s)" in printed
    table = outputs("plot.step_table(")[-1]["data"]["text/plain"]
    assert SEEDS in table and OTHER in table
    grids = [o for o in outputs("samples/epoch_") if "image/png" in o.get("data", {})]
    assert len(grids) == 2 * len(RUNS)  # first and latest grid of each run
    held_out = outputs('glob("eval/epoch_*")')
    printed = "".join(o.get("text", "") for o in held_out)
    assert printed.count("no held-out evaluation") == 2
    assert "steps2: epoch_0002, the latest of 1 after updates" in printed
    assert any("image/png" in o.get("data", {}) for o in held_out)
    assert any("brightness" in o.get("data", {}).get("text/plain", "") for o in held_out)  # the results table


def test_the_notebook_opens_the_newest_run_of_any_task(runs_root, tmp_path, monkeypatch):
    """Without ``SDPO_RUNS`` the first cell picks the run folder written last under ``outputs/``, whichever task wrote
    it (``+experiment=tiny_lora`` writes ``outputs/tiny_lora/``); an evaluation folder has no metrics.csv and is
    never picked, even when it is newer."""
    import nbformat

    checkout = tmp_path / "checkout"
    (checkout / "notebooks").mkdir(parents=True)
    (checkout / "sdpo").symlink_to(REPO / "sdpo")  # what the cell looks for to find the checkout
    outputs = checkout / "outputs"
    older, newer = outputs / "train" / "2025-01-01", outputs / "tiny_lora" / "2025-01-02"  # newest sorts first
    for folder, source, written in ((older, "seed0", 1e9), (newer, "seed1", 2e9)):
        shutil.copytree(runs_root / source, folder, ignore=shutil.ignore_patterns("checkpoints", "trained"))
        os.utime(folder / "csv" / "metrics.csv", (written, written))
    evaluation = outputs / "evaluate" / "2025-01-03"
    evaluation.mkdir(parents=True)
    pd.DataFrame({"reward": ["brightness"], "steps": [1], "mean": [0.5]}).to_csv(evaluation / "results.csv")

    monkeypatch.delenv("SDPO_RUNS", raising=False)
    monkeypatch.chdir(checkout / "notebooks")
    monkeypatch.setattr(sys, "path", list(sys.path))  # the cell puts the checkout first on it
    first = next(cell for cell in nbformat.read(NOTEBOOK, as_version=4).cells if cell.cell_type == "code")
    namespace: dict = {}
    exec(first.source, namespace)
    assert namespace["RUNS"] == [newer.resolve()]


def test_eval_curves_start_at_the_base_model(runs_root, tmp_path):
    """eval/start/results.csv (the evaluation before the first update) is each eval curve's point at 0 samples and
    0 reward queries; training-reward curves, which have no such point, are unchanged."""
    run = tmp_path / "seed0"
    shutil.copytree(runs_root / "seed0", run, ignore=shutil.ignore_patterns("checkpoints", "trained", "*.png"))
    df = pd.read_csv(run / "csv" / "metrics.csv")
    df["eval/brightness/1step"] = 0.6 + 0.01 * df["epoch"]
    df.to_csv(run / "csv" / "metrics.csv", index=False)
    (run / "eval" / "start").mkdir(parents=True)
    pd.DataFrame({"reward": ["brightness"], "steps": [1], "mean": [0.5]}).to_csv(run / "eval" / "start" /
                                                                                  "results.csv", index=False)
    runs = plot.load_runs([run])
    for xkey, ax in zip(("samples", "reward_queries"), plot.plot_runs(runs).get_axes(), strict=True):
        (line,) = ax.get_lines()
        assert line.get_xdata()[0] == 0 and line.get_ydata()[0] == pytest.approx(0.5), xkey
        np.testing.assert_allclose(line.get_xdata()[1:], df[f"train/{xkey}"].to_numpy())
    (train_line, *_), *_ = (ax.get_lines() for ax in plot.plot_runs(runs, metric="train").get_axes())
    assert train_line.get_xdata()[0] > 0
