"""Where an iteration's time goes, per group of runs: the logged phase times as a table and a stacked-bar figure.

The method fixes an iteration's work; what a setting changes (micro-batch, ``algo.compile``,
``algo.overlap_scoring``, the GPU) is how long each phase takes. Every run logs its wall-clock phases as
``time/<phase>`` once per iteration, so comparing settings needs no benchmark run: ``python -m sdpo.plot`` writes
``phase_times.png`` next to the reward curves. The first iteration is left out when there are more (it pays for
torch.compile and cuDNN autotuning); the logging and checkpoint time between iterations is not a logged phase.
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


def run_phase_means(run: Run, skip: int = 1) -> pd.Series:
    """Mean seconds of each phase over the run's iterations after the first ``skip`` (all of them if that leaves
    none), with the samples generated per iteration."""
    rows = run.metrics[run.metrics[f"time/{PHASES[0]}"].notna()]
    kept = rows.iloc[skip:] if len(rows) > skip else rows
    means = {phase: float(kept[f"time/{phase}"].mean()) for phase in PHASES}
    samples = rows["train/samples"].to_numpy(dtype=float) if "train/samples" in rows else np.array([])
    per_iteration = np.diff(samples, prepend=0.0)  # train/samples is cumulative
    means["samples"] = float(per_iteration[-len(kept):].mean()) if len(samples) else np.nan
    means["iterations"] = len(kept)
    return pd.Series(means)


def phase_table(groups: Sequence[Group], skip: int = 1) -> pd.DataFrame:
    """Seconds per iteration of each phase, their sum and samples/s: one row per group (mean over its seeds).

    Groups whose runs did not log phase times are left out.
    """
    rows = []
    for group in groups:
        per_run = [run_phase_means(run, skip) for run in group.runs if has_phase_times(run)]
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
    ax.set_xlabel("seconds per iteration (mean over iterations after the first, and over seeds)")
    fig.legend(loc="outside lower center", ncols=len(PHASES), frameon=False, fontsize="small")
    ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle("Where an SDPO iteration's time goes")
    return fig
