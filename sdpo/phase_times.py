"""Where an iteration's time goes, per group of runs: the logged phase times as a table and a stacked-bar figure.

The method fixes an iteration's work; what a setting changes (micro-batch, ``algo.compile``,
``algo.overlap_scoring``, the GPU) is how long each phase takes. Every run logs its wall-clock phases as
``time/<phase>`` once per iteration, so comparing settings needs no benchmark run: ``python -m sdpo.plot`` writes
``phase_times.png`` next to the reward curves. The first iteration is left out when there are more (it pays for
torch.compile and cuDNN autotuning); the logging and checkpoint time between iterations is not a logged phase.

A phase's time is the median over a run's iterations, not the mean: a few iterations slowed by another process on
the machine would otherwise set it (a run whose iterations typically take 0.6 s averaged 5.5 s).
``timing_noise_notes`` names the groups whose slow iterations were far off that median, so the reader knows.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from sdpo.plot import Group, Run

# an iteration's wall-clock phases, in the order they run (sdpo.module.SDPOModule.training_step)
PHASES = ("sampling", "rewards", "advantages", "training")
LABEL_WIDTH = 48  # characters per line of a group's label


def has_phase_times(run: Run) -> bool:
    return all(f"time/{phase}" in run.metrics.columns for phase in PHASES)


NOISY_QUANTILE = 0.9  # an iteration's time at this quantile ...
NOISY_RATIO = 2.0  # ... more than this many times the median: the run's timing was noisy


def timed_iterations(run: Run, skip: int = 1) -> pd.DataFrame:
    """The run's rows that logged phase times, after the first ``skip`` (all of them if that leaves none): the
    first iteration pays for compilation and autotuning, so it would skew every statistic."""
    rows = run.metrics[run.metrics[f"time/{PHASES[0]}"].notna()]
    return rows.iloc[skip:] if len(rows) > skip else rows


def run_phase_medians(run: Run, skip: int = 1) -> pd.Series:
    """Median seconds of each phase over the run's iterations after the first ``skip``, with the samples generated
    per iteration and the number of iterations the medians are over."""
    rows = run.metrics[run.metrics[f"time/{PHASES[0]}"].notna()]
    kept = timed_iterations(run, skip)
    medians = {phase: float(kept[f"time/{phase}"].median()) for phase in PHASES}
    samples = rows["train/samples"].to_numpy(dtype=float) if "train/samples" in rows else np.array([])
    per_iteration = np.diff(samples, prepend=0.0)  # train/samples is cumulative
    medians["samples"] = float(np.median(per_iteration[-len(kept):])) if len(samples) else np.nan
    medians["iterations"] = len(kept)
    return pd.Series(medians)


def slow_iteration_ratio(run: Run, skip: int = 1, quantile: float = NOISY_QUANTILE) -> float:
    """How far the run's slow iterations are from its typical one: the ``quantile`` of the iterations' summed
    phase times over their median (1 for a steady run; NaN without phase times)."""
    if not has_phase_times(run):
        return np.nan
    totals = timed_iterations(run, skip)[[f"time/{phase}" for phase in PHASES]].sum(axis=1, min_count=1).dropna()
    median = float(totals.median()) if len(totals) else np.nan
    return float(totals.quantile(quantile)) / median if median > 0 else np.nan


def timing_noise_notes(groups: Sequence[Group], skip: int = 1, ratio: float = NOISY_RATIO) -> list[str]:
    """One line per group with a run whose slow iterations took more than ``ratio`` times its median iteration:
    its medians are still typical, but the machine was busy (or the run slowed down), so compare with care."""
    notes = []
    for group in groups:
        worst = max((r for run in group.runs if np.isfinite(r := slow_iteration_ratio(run, skip))), default=np.nan)
        if worst > ratio:
            notes.append(f"note: {group.label}: noisy timing, its slowest iterations ({NOISY_QUANTILE:.0%} quantile) "
                         f"took {worst:.1f}x the median iteration")
    return notes


def phase_table(groups: Sequence[Group], skip: int = 1) -> pd.DataFrame:
    """Seconds per iteration of each phase (median over iterations, mean over seeds), their sum and samples/s: one
    row per group. Groups whose runs did not log phase times are left out.
    """
    rows = []
    for group in groups:
        per_run = [run_phase_medians(run, skip) for run in group.runs if has_phase_times(run)]
        if not per_run:
            continue
        mean = pd.concat(per_run, axis=1).mean(axis=1)
        total = float(sum(mean[phase] for phase in PHASES))
        rows.append({"group": group.label, **{phase: mean[phase] for phase in PHASES}, "sum of phases": total,
                     "samples/s": mean["samples"] / total, "seeds": len(per_run),
                     "iterations": int(mean["iterations"])})
    columns = ["group", *PHASES, "sum of phases", "samples/s", "seeds", "iterations"]
    return pd.DataFrame(rows, columns=columns).set_index("group")


def plot_phase_times(table: pd.DataFrame) -> Figure:
    """One horizontal bar per group, split into the phases, labelled with the sum and samples/s."""
    if table.empty:
        raise ValueError("no run logged phase times (time/sampling, time/rewards, ...)")
    labels = [textwrap.fill(str(label), LABEL_WIDTH) for label in table.index]  # group labels list config keys
    lines = sum(label.count("\n") + 1 for label in labels)
    fig = Figure(figsize=(11.0, 1.6 + 0.3 * len(labels) + 0.17 * lines), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    y = np.arange(len(labels))
    left = np.zeros(len(labels))
    for i, phase in enumerate(PHASES):
        widths = table[phase].to_numpy(dtype=float)
        ax.barh(y, widths, left=left, color=f"C{i}", label=phase)
        left += widths
    for row, (total, rate) in enumerate(zip(table["sum of phases"], table["samples/s"], strict=True)):
        ax.annotate(f" {total:.3g} s, {rate:.3g} samples/s", (total, row), va="center", fontsize="small")
    ax.set_yticks(y, labels, fontsize="small")
    ax.invert_yaxis()  # first group on top
    ax.set_xlim(0, float(left.max()) * 1.35)
    ax.set_xlabel("seconds per iteration (median over iterations after the first, mean over seeds)")
    fig.legend(loc="outside lower center", ncols=len(PHASES), frameon=False, fontsize="small")
    ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle("Where an SDPO iteration's time goes")
    return fig
