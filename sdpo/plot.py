"""Reward curves of SDPO runs, laid out like the paper: one panel per sampling step count.

``python -m sdpo.plot <run dirs or parent dirs...> [--out PNG] [--x samples|reward_queries|both]
[--metric auto|train|eval|change] [--reward NAME]``

A run folder is any folder holding ``csv/metrics.csv``; a parent folder (``outputs/``, a multirun folder) is
searched recursively. Runs whose configs are equal once the seed, paths and logging settings are removed form one
group: one line per group, the mean over its seeds with a ±1 std band. Groups are labelled by the config keys that
differ between them (``algo.num_steps=8, algo.dense.anchor=uniform``); when nothing differs, a lone run by its
folder name and seeds by what they trained (``brightness, T=4``).

Panels: one per step count ``k`` of the eval metrics ``eval/<reward>/<k>step`` when the runs log them, otherwise
the training rewards: the 1-step image (``train/reward_1step``) and the T-step image (``train/reward_last``).
The x axis is the cumulative number of generated samples (``train/samples``) and/or of reward-model queries
(``train/reward_queries``) — SDPO's claim is a higher reward at equal queries, at every step count.

A run resumed with ``ckpt_path=`` (a new folder that logs only its own iterations) is drawn with the iterations of
the run it resumed, which is then not drawn separately. A relative ``ckpt_path`` is read from the folder the run was
launched from (``hydra.runtime.cwd`` in its ``.hydra/hydra.yaml``), so this works from any folder.

The figure goes into the first folder given, as ``reward_curves.png`` (``reward_curves[_<metric>][_<reward>].png``
for another ``--metric`` or a ``--reward``, so that one plot does not overwrite another; ``--out`` chooses). Next to
it goes ``phase_times.png``: each group's median seconds per iteration by phase (``sdpo.phase_times``), to compare
what speed settings buy. Group labels shorten long values (``data.source=[cow,goat,lion,+5]``).

Only the Agg canvas is used (no pyplot), so importing this module never changes a notebook's backend.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from sdpo.commands import program_name
from sdpo.phase_times import phase_table, plot_phase_times, timing_noise_notes

METRICS_FILE = Path("csv") / "metrics.csv"
CONFIG_FILES = (Path(".hydra") / "config.yaml", Path("csv") / "hparams.yaml")  # Hydra's, else the CSV logger's
HYDRA_FILE = Path(".hydra") / "hydra.yaml"  # Hydra's own settings for the run, with the folder it was launched from
X_AXES = {
    "samples": ("train/samples", "samples (images generated)"),
    "reward_queries": ("train/reward_queries", "reward queries"),
}
EVAL_COLUMN = re.compile(r"^eval/(?P<reward>.+)/(?P<steps>\d+)step$")
TRAIN_STEP_COLUMN = re.compile(r"^train/reward_(?P<steps>\d+)step$")
METRICS = ("auto", "train", "eval", "change")
# Group labels list config values: a list shows its first items, a text its first characters (lists' items fewer).
LABEL_LIST_ITEMS, LABEL_TEXT_WIDTH, LABEL_ITEM_WIDTH = 3, 40, 16
# Table columns that count things: printed as integers when every value is whole.
COUNT_COLUMNS = ("seeds", "epoch", "samples", "reward_queries", "iterations")

# Config keys that do not change what a run learns: the seed (and the data seed derived from it), where things are
# written, and how progress is logged. Runs equal up to these keys are seeds of one configuration.
IGNORED_KEYS = (
    "seed", "data.seed", "ckpt_path", "task_name", "output_dir", "cache_dir", "paths", "hydra", "logger",
    "callbacks", "model.cache_dir", "trainer.default_root_dir", "trainer.enable_progress_bar",
    "trainer.enable_model_summary", "algo.compile_cache_dir", "resume_check",
)


# ------------------------------------------------------------------------------------------------ loading
@dataclass
class Run:
    """One run folder: its metrics (one row per epoch), its composed config (resolved) and a label."""

    path: Path
    metrics: pd.DataFrame
    config: DictConfig
    label: str
    derived: frozenset[str] = frozenset()  # keys that were interpolations of other keys (e.g. sample_batch_size)
    start: dict[str, float] = field(default_factory=dict)  # eval/<reward>/<k>step before the first update

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    @property
    def reward(self) -> str | None:
        name = OmegaConf.select(self.config, "reward.name", default=None)
        return None if name is None else str(name)

    @property
    def num_steps(self) -> int | None:
        """T, the sampling steps the run trained with (config, else the ``train/reward_<T>step`` column)."""
        steps = OmegaConf.select(self.config, "algo.num_steps", default=None)
        if steps is not None:
            return int(steps)
        found = [int(m["steps"]) for c in self.metrics.columns if (m := TRAIN_STEP_COLUMN.match(c))]
        return max(found) if found else None


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders (holding ``csv/metrics.csv``) at or below each path, sorted, without duplicates."""
    found: dict[Path, None] = {}
    for raw in paths:
        path = Path(raw).expanduser()
        if (path / METRICS_FILE).is_file():
            found[path.resolve()] = None
        elif path.is_dir():
            for metrics in sorted(path.rglob("metrics.csv")):
                if metrics.parent.name == METRICS_FILE.parent.name:
                    found[metrics.parent.parent.resolve()] = None
        elif path.is_file():  # a shell glob (outputs/train/*) also matches the figures an earlier plot wrote there
            print(f"sdpo.plot: skipping {path}: a file, not a run folder", file=sys.stderr)
        else:
            raise FileNotFoundError(f"{path}: no such run folder (expected {path / METRICS_FILE} or a parent folder)")
    return sorted(found)


def latest_runs(root: str | Path = "outputs", n: int = 1) -> list[Path]:
    """The ``n`` run folders under ``root`` whose metrics were written last (runs with at least one row). The default
    searches every task's folder (``outputs/train``, ``outputs/tiny_lora``, multiruns): evaluation folders hold no
    ``csv/metrics.csv``, so they are never picked."""
    runs = [r for r in find_run_dirs([root]) if _has_rows(r / METRICS_FILE)]
    return sorted(runs, key=lambda r: (r / METRICS_FILE).stat().st_mtime)[-n:]


def _has_rows(path: Path) -> bool:
    with open(path) as f:
        f.readline()  # the header
        return bool(f.readline().strip())


def read_metrics(path: Path) -> pd.DataFrame:
    """``metrics.csv`` with one row per epoch: rows logged separately in the same epoch (e.g. eval) are merged."""
    df = pd.read_csv(path)
    key = "epoch" if "epoch" in df.columns else "step" if "step" in df.columns else None
    if key is not None and df[key].duplicated().any():
        df = df.groupby(key, as_index=False, sort=True).first()  # first non-missing value of each column
    return df.reset_index(drop=True)


def load_config(run_dir: Path) -> tuple[DictConfig, frozenset[str]]:
    """The run's composed config, resolved, and the keys that were interpolations. Empty when none is saved."""
    for rel in CONFIG_FILES:
        if (run_dir / rel).is_file():
            raw = OmegaConf.load(run_dir / rel)
            break
    else:
        return OmegaConf.create({}), frozenset()
    container = OmegaConf.to_container(raw, resolve=False)
    if not isinstance(container, dict):
        return OmegaConf.create({}), frozenset()
    derived = frozenset(k for k, v in _flatten(container).items() if isinstance(v, str) and "${" in v)
    # ${hydra:runtime.output_dir} only resolves inside Hydra: the run folder is what it resolved to.
    if "output_dir" in container:
        container["output_dir"] = str(run_dir)
    if isinstance(container.get("paths"), dict) and "output_dir" in container["paths"]:
        container["paths"]["output_dir"] = str(run_dir)
    return _resolve(OmegaConf.create(container)), derived


def _resolve(cfg: DictConfig) -> DictConfig:
    try:
        return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    except Exception:  # an interpolation that only resolves elsewhere: keep that leaf as written
        resolved: dict[str, Any] = {}
        for key, raw in _flatten(OmegaConf.to_container(cfg, resolve=False)).items():
            try:
                value = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
                value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            except Exception:  # kept as text: escaped, so the returned config resolves everywhere
                value = raw.replace("${", "\\${") if isinstance(raw, str) else raw
            _assign(resolved, key.split("."), value)
        return OmegaConf.create(resolved)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaves; lists and empty dicts are leaves."""
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def _assign(tree: dict, parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        tree = tree.setdefault(part, {})
    tree[parts[-1]] = value


def read_start(run_dir: Path) -> dict[str, float]:
    """The held-out evaluation before the first update (``eval/start/results.csv``, the base model), by the
    metric name it would have had: the eval curves start there, at 0 samples."""
    path = run_dir / "eval" / "start" / "results.csv"
    if not path.is_file():
        return {}
    table = pd.read_csv(path)
    return {f"eval/{row.reward}/{int(row.steps)}step": float(row.mean) for row in table.itertuples()}


def load_run(path: str | Path) -> Run:
    path = Path(path)
    config, derived = load_config(path)
    return Run(path=path, metrics=read_metrics(path / METRICS_FILE), config=config, label=path.name,
               derived=derived, start=read_start(path))


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every run at or below ``paths`` that has logged at least one iteration, sorted by folder; a resumed run
    carries the iterations of the run it resumed (``stitch_resumed``)."""
    runs = []
    for run_dir in find_run_dirs(paths):
        run = load_run(run_dir)
        if run.metrics.empty:
            print(f"sdpo.plot: skipping {run_dir} (no iteration logged yet)", file=sys.stderr)
            continue
        runs.append(run)
    return stitch_resumed(runs)


def launch_dir(run_dir: Path) -> Path | None:
    """The folder the run was launched from (Hydra's ``hydra.runtime.cwd`` in ``.hydra/hydra.yaml``): what its
    relative paths, such as ``ckpt_path=outputs/...``, meant. None when the run did not record it."""
    path = run_dir / HYDRA_FILE
    if not path.is_file():
        return None
    try:
        cwd = OmegaConf.select(OmegaConf.load(path), "hydra.runtime.cwd", default=None)
    except Exception:  # an unreadable record: the caller falls back to the current folder
        return None
    return Path(cwd) if isinstance(cwd, str) and cwd else None


def resumed_from(run: Run) -> Path | None:
    """The run folder of the checkpoint ``run`` resumed from (``<run>/checkpoints/<file>.ckpt``), when it is still
    there with its metrics. A relative ``ckpt_path`` is read from the folder the run was launched from, so the
    plot finds the parent wherever it is drawn from; the current folder when the run did not record that."""
    ckpt = run.config.get("ckpt_path")
    if not ckpt or not isinstance(ckpt, str):
        return None
    path = Path(ckpt).expanduser()
    if not path.is_absolute():
        path = (launch_dir(run.path) or Path.cwd()) / path
    folder = path.absolute().parent.parent
    return folder if (folder / METRICS_FILE).is_file() and folder.resolve() != run.path.resolve() else None


def stitch_resumed(runs: Sequence[Run]) -> list[Run]:
    """A run resumed with ``ckpt_path=`` writes a new folder that logs only its own iterations: give it the earlier
    iterations of the run it resumed (and of that run's own parent), so its curves start at iteration 0, and drop
    that parent from the list when it was loaded too (it is now part of the resumed run's curve)."""
    by_path = {run.path.resolve(): run for run in runs}
    absorbed: set[Path] = set()
    done: dict[Path, pd.DataFrame] = {}

    def full_metrics(run: Run, seen: frozenset[Path]) -> pd.DataFrame:
        key = run.path.resolve()
        if key in done:
            return done[key]
        parent_dir = resumed_from(run)
        metrics = run.metrics
        if parent_dir is not None and parent_dir.resolve() not in seen and "epoch" in metrics.columns:
            parent = by_path.get(parent_dir.resolve()) or load_run(parent_dir)
            earlier = full_metrics(parent, seen | {key})
            earlier = earlier[earlier["epoch"] < metrics["epoch"].min()]
            metrics = pd.concat([earlier, metrics], ignore_index=True)
            absorbed.add(parent_dir.resolve())
            run.start = run.start or parent.start  # the evaluation before the first update is the first run's
        done[key] = metrics
        return metrics

    for run in runs:
        run.metrics = full_metrics(run, frozenset())
    return [run for run in runs if run.path.resolve() not in absorbed]


# ------------------------------------------------------------------------------------------------ grouping
@dataclass
class Group:
    """Runs of one configuration (seeds). ``config`` is the flat config they share, ignored keys removed."""

    label: str
    runs: list[Run]
    config: dict[str, Any]

    @property
    def seeds(self) -> list[Any]:
        return [run.seed for run in self.runs]


def comparable_config(run: Run, ignore: Sequence[str] = IGNORED_KEYS) -> dict[str, Any]:
    """The run's flat config without the keys in ``ignore`` (and their sub-keys) and without paths into the run."""
    own = str(run.path)
    out = {}
    for key, value in _flatten(OmegaConf.to_container(run.config, resolve=True)).items():
        if any(key == k or key.startswith(k + ".") for k in ignore):
            continue
        if isinstance(value, str) and own in value:
            continue
        out[key] = value
    return out


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple((k, _freeze(v)) for k, v in sorted(value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _format(value: Any, width: int = LABEL_TEXT_WIDTH) -> str:
    """A config value as a group label shows it, kept short so that printed tables stay readable: a list by its
    first items and how many more (``[cow,goat,lion,+5]``), a long text cut with an ellipsis."""
    if isinstance(value, list | tuple):
        shown = [_format(v, LABEL_ITEM_WIDTH) for v in value[:LABEL_LIST_ITEMS]]
        more = len(value) - LABEL_LIST_ITEMS
        return "[" + ",".join([*shown, f"+{more}"] if more > 0 else shown) + "]"
    text = "null" if value is None else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def same_config_label(members: Sequence[Run]) -> str:
    """The label of a group when no config key tells the groups apart. One run: its folder name. Several seeds:
    what they trained (a folder name like ``0_seed=0`` would name one seed of several)."""
    first = members[0]
    if len(members) == 1:
        return first.label
    parts = [part for part in (first.reward, None if first.num_steps is None else f"T={first.num_steps}") if part]
    return ", ".join(parts) or first.path.parent.name


def group_runs(runs: Sequence[Run], ignore: Sequence[str] = IGNORED_KEYS) -> list[Group]:
    """Group runs whose configs are equal up to ``ignore``; label each group by the keys that differ."""
    buckets: dict[Any, tuple[dict[str, Any], list[Run]]] = {}
    for run in runs:
        flat = comparable_config(run, ignore)
        key = _freeze(flat) if flat else ("<no config>", str(run.path))  # no config: cannot tell, keep apart
        buckets.setdefault(key, (flat, []))[1].append(run)
    configs = [flat for flat, _ in buckets.values()]
    order = list(dict.fromkeys(k for flat in configs for k in flat))  # the config's own order
    missing = object()
    differing = [k for k in order if len({_freeze(flat.get(k, missing)) for flat in configs}) > 1]
    derived = set().union(*(run.derived for run in runs)) if runs else set()
    shown = [k for k in differing if k not in derived] or differing
    groups = []
    for flat, members in buckets.values():
        parts = [f"{k}={_format(flat[k])}" for k in shown if k in flat]
        groups.append(Group(label=", ".join(parts) or same_config_label(members), runs=members, config=flat))
    seen: dict[str, int] = {}
    for group in groups:  # labels must tell groups apart (e.g. two runs without a config in same-named folders)
        seen[group.label] = seen.get(group.label, 0) + 1
        if seen[group.label] > 1:
            group.label = f"{group.label} #{seen[group.label]}"
    return groups


# ------------------------------------------------------------------------------------------------ panels
@dataclass(frozen=True)
class Panel:
    """One step count: which column of a run holds its reward. ``steps`` is None for a T-step panel whose T
    differs between runs (each run contributes its own T)."""

    title: str
    steps: int | None
    column_of: Callable[[Run], str | None]

    def steps_of(self, run: Run) -> int | None:
        return self.steps if self.steps is not None else run.num_steps


def steps_title(k: int) -> str:
    return f"{k} step" if k == 1 else f"{k} steps"


def eval_steps(runs: Sequence[Run]) -> dict[str, list[int]]:
    """Step counts with at least one logged value, per eval reward: ``{"brightness": [1, 2, 4]}``."""
    found: dict[str, set[int]] = {}
    for run in runs:
        for column in run.metrics.columns:
            m = EVAL_COLUMN.match(column)
            if m and run.metrics[column].notna().any():
                found.setdefault(m["reward"], set()).add(int(m["steps"]))
    return {reward: sorted(ks) for reward, ks in sorted(found.items())}


def step_panels(runs: Sequence[Run], metric: str = "auto", reward: str | None = None) -> tuple[list[Panel], str]:
    """The panels to draw and the y-axis label. ``metric``: ``auto`` (eval when logged), ``train``, ``eval`` or
    ``change`` (``eval/<reward>/<k>step_change``: the paired change since the first update)."""
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: choose {', '.join(METRICS)}")
    evals = eval_steps(runs)
    if metric in ("eval", "change") or (metric == "auto" and evals and (reward is None or reward in evals)):
        if not evals:
            raise ValueError("these runs log no eval/<reward>/<k>step metrics; use --metric train")
        if reward is None:
            trained = [r.reward for r in runs if r.reward in evals]
            reward = trained[0] if trained else next(iter(evals))
        if reward not in evals:
            raise ValueError(f"no eval metrics for reward {reward!r}; these runs log: {', '.join(evals)}")
        suffix = "_change" if metric == "change" else ""
        if suffix and not any(f"eval/{reward}/{k}step_change" in run.metrics.columns
                              for run in runs for k in evals[reward]):
            raise ValueError(f"these runs log no eval/{reward}/<k>step_change (callbacks.eval.compare_to_start); "
                             f"use --metric eval")
        panels = [Panel(steps_title(k), k, lambda run, c=f"eval/{reward}/{k}step{suffix}": c) for k in evals[reward]]
        return panels, (f"eval change since the first update ({reward})" if suffix else f"eval reward ({reward})")

    trained = sorted({r.reward for r in runs if r.reward is not None})
    first, last = "train/reward_1step", "train/reward_last"
    if reward is not None and reward not in trained:  # a part of a multi-reward: train/reward_<name>_1step
        first, last = f"train/reward_{reward}_1step", f"train/reward_{reward}_last"
        if not any(first in r.metrics.columns for r in runs):
            known = sorted(set(trained) | set(evals))
            raise ValueError(f"no training metrics for reward {reward!r}; known rewards: {', '.join(known)}")
    name = reward or (", ".join(trained) if trained else "reward")
    panels = [Panel(steps_title(1), 1, lambda run: first)]
    ts = sorted({t for r in runs if (t := r.num_steps) is not None and t != 1})
    if len(ts) == 1:
        panels.append(Panel(steps_title(ts[0]), ts[0], lambda run: last))
    elif ts:
        panels.append(Panel(f"T steps (T = {', '.join(map(str, ts))})", None, lambda run: last))
    return panels, f"training reward ({name})"


# ------------------------------------------------------------------------------------------------ curves
@dataclass
class Curve:
    x: np.ndarray
    mean: np.ndarray
    std: np.ndarray  # across seeds (ddof=1), NaN where fewer than two seeds cover x
    n: int  # runs that contributed


def _series(run: Run, column: str | None, x: str, smooth: int = 1) -> tuple[np.ndarray, np.ndarray] | None:
    df = run.metrics
    if column is None or column not in df.columns or x not in df.columns:
        return None
    d = df[[x, column]].dropna()
    if d.empty:
        return None
    if column in run.start and (d[x] > 0).all():  # the base model, at 0 samples and 0 reward queries
        d = pd.concat([pd.DataFrame({x: [0.0], column: [run.start[column]]}), d], ignore_index=True)
    d = d.groupby(x, as_index=False, sort=True).mean()
    y = d[column]
    if smooth > 1:  # trailing rolling mean over logged points: per-iteration training rewards are noisy
        y = y.rolling(smooth, min_periods=1).mean()
    return d[x].to_numpy(float), y.to_numpy(float)


def group_curve(group: Group, column_of: Callable[[Run], str | None], x: str, smooth: int = 1) -> Curve | None:
    """Mean and std over the group's seeds; seeds are interpolated onto the union of their x values, within the
    x range that all of them cover (when they share one). ``smooth`` > 1: a rolling mean over that many points
    of each seed first."""
    series = [s for run in group.runs if (s := _series(run, column_of(run), x, smooth)) is not None]
    if not series:
        return None
    if all(len(s[0]) == len(series[0][0]) and np.array_equal(s[0], series[0][0]) for s in series):
        grid, ys = series[0][0], np.stack([s[1] for s in series])
    else:
        grid = np.unique(np.concatenate([s[0] for s in series]))
        lo, hi = max(s[0][0] for s in series), min(s[0][-1] for s in series)
        if lo <= hi:
            grid = grid[(grid >= lo) & (grid <= hi)]
        ys = np.stack([np.interp(grid, sx, sy, left=np.nan, right=np.nan) for sx, sy in series])
    count = np.isfinite(ys).sum(0)
    keep = count > 0
    grid, ys, count = grid[keep], ys[:, keep], count[keep]
    mean = np.nansum(ys, 0) / count
    squares = np.nansum((ys - mean) ** 2, 0)
    std = np.where(count > 1, np.sqrt(squares / np.maximum(count - 1, 1)), np.nan)
    return Curve(grid, mean, std, len(series))


# ------------------------------------------------------------------------------------------------ figure
def _x_keys(x: str) -> list[str]:
    if x == "both":
        return list(X_AXES)
    if x not in X_AXES:
        raise ValueError(f"x={x!r}: choose samples, reward_queries or both")
    return [x]


def plot_runs(runs: Sequence[Run], x: str = "both", metric: str = "auto", reward: str | None = None,
              groups: Sequence[Group] | None = None, smooth: int = 1) -> Figure:
    """The paper's figure: one column of panels per step count, one row per x axis, one line per group.

    ``x``: ``samples``, ``reward_queries`` or ``both`` (two rows); ``metric`` and ``reward``: see
    :func:`step_panels`; ``groups``: precomputed :func:`group_runs`; ``smooth``: rolling-mean window (points).
    """
    if not runs:
        raise ValueError("no runs to plot")
    groups = list(groups) if groups is not None else group_runs(runs)
    panels, ylabel = step_panels(runs, metric, reward)
    xs = _x_keys(x)
    fig = Figure(figsize=(1.0 + 4.0 * len(panels), 0.9 + 3.2 * len(xs)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(xs), len(panels), squeeze=False)
    palette = [f"C{i}" for i in range(10)] if len(groups) <= 10 else None
    cmap = None if palette else matplotlib.colormaps["tab20"]
    handles: dict[str, Any] = {}
    for row, xkey in enumerate(xs):
        column, xlabel = X_AXES[xkey]
        for col, panel in enumerate(panels):
            ax = axes[row, col]
            for i, group in enumerate(groups):
                curve = group_curve(group, panel.column_of, column, smooth)
                if curve is None:
                    continue
                color = palette[i] if palette else cmap(i % 20)
                name = group.label if curve.n == 1 else f"{group.label} (n={curve.n} seeds)"
                (line,) = ax.plot(curve.x, curve.mean, color=color, label=name, marker="." if len(curve.x) < 30
                                  else None)
                if curve.n > 1:
                    ax.fill_between(curve.x, curve.mean - curve.std, curve.mean + curve.std, color=color, alpha=0.2,
                                    linewidth=0)
                handles.setdefault(name, line)
            ax.set_title(panel.title)
            ax.set_xlabel(xlabel)
            if col == 0:
                ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncols=min(3, len(handles)), fontsize="small", frameon=False)
    several = any(len(g.runs) > 1 for g in groups)
    notes = [note for note, on in (("mean ± std over seeds", several), (f"rolling mean of {smooth}", smooth > 1)) if on]
    fig.suptitle("SDPO reward by sampling steps" + (f" ({'; '.join(notes)})" if notes else ""))
    return fig


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (for ``IPython.display.Image``)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ table
def step_table(runs: Sequence[Run], metric: str = "auto", reward: str | None = None,
               groups: Sequence[Group] | None = None) -> pd.DataFrame:
    """Final reward per group and step count: mean and std (ddof=1) over seeds of each run's last logged value.

    Indexed by (group, steps); columns ``mean``, ``std``, ``seeds``, ``epoch``, ``samples``, ``reward_queries``
    (the last three: means over seeds at the row the value comes from) and ``metric`` (the column read).
    """
    groups = list(groups) if groups is not None else group_runs(runs)
    panels, _ = step_panels(runs, metric, reward)
    rows = []
    for group in groups:
        for panel in panels:
            by_steps: dict[int | None, list[tuple[Run, str, pd.Series]]] = {}
            for run in group.runs:
                column = panel.column_of(run)
                if column is None or column not in run.metrics.columns:
                    continue
                valid = run.metrics[run.metrics[column].notna()]
                if not valid.empty:
                    by_steps.setdefault(panel.steps_of(run), []).append((run, column, valid.iloc[-1]))
            for steps, finals in by_steps.items():
                values = np.array([last[column] for _, column, last in finals], dtype=float)
                rows.append({
                    "group": group.label,
                    "steps": steps,
                    "mean": values.mean(),
                    "std": values.std(ddof=1) if len(values) > 1 else np.nan,
                    "seeds": len(values),
                    "epoch": float(np.mean([last.get("epoch", np.nan) for _, _, last in finals])),
                    **{name: float(np.mean([last.get(col, np.nan) for _, _, last in finals]))
                       for name, (col, _) in X_AXES.items()},
                    "metric": finals[0][1],
                })
    table = pd.DataFrame(rows, columns=["group", "steps", "mean", "std", "seeds", "epoch", *X_AXES, "metric"])
    return table.set_index(["group", "steps"])


def groups_left_out(table: pd.DataFrame, groups: Sequence[Group]) -> list[str]:
    """Labels of the groups with no row in ``table``: none of their runs logged the metric it reads (e.g. runs
    trained with ``callbacks.eval=null`` among evaluated ones), so they are missing from the table and the figure."""
    present = set(table.index.get_level_values("group"))
    return [group.label for group in groups if group.label not in present]


def left_out_note(runs: Sequence[Run], table: pd.DataFrame, groups: Sequence[Group], metric: str = "auto",
                  reward: str | None = None) -> str | None:
    """A line naming the groups ``step_table(runs, metric, reward)`` had nothing for, and why; None when every group
    has a row."""
    missing = groups_left_out(table, groups)
    if not missing:
        return None
    _, ylabel = step_panels(runs, metric, reward)
    hint = "" if metric == "train" else " (--metric train compares every run)"
    return f"note: left out, no {ylabel} logged: {'; '.join(missing)}{hint}"


def counts_as_integers(table: pd.DataFrame) -> pd.DataFrame:
    """The table with its count columns (``COUNT_COLUMNS``) as integers where every value is whole, so that they
    print as ``3200`` rather than ``3200.0000``; a mean over seeds that stopped at different epochs stays a float."""
    out = table.copy()
    for column in COUNT_COLUMNS:
        if column not in out.columns or not pd.api.types.is_float_dtype(out[column]):
            continue
        values = out[column].dropna()
        if (values == values.round()).all():
            out[column] = out[column].round().astype("Int64")
    return out


# ------------------------------------------------------------------------------------------------ CLI
def default_out(paths: Sequence[str | Path], metric: str = "auto", reward: str | None = None) -> Path:
    """Where the figure goes without ``--out``: into the first folder given (the one folder searched, e.g. a
    multirun's, or the first run named), named by what it shows so that plotting another metric or reward next to
    it does not overwrite it: ``reward_curves.png``, ``reward_curves_train.png``, ``reward_curves_change_clip.png``."""
    parts = [part for part in (None if metric == "auto" else metric, reward) if part]
    name = "_".join(["reward_curves", *(re.sub(r"[^\w.-]+", "-", part) for part in parts)])
    return Path(paths[0]).expanduser() / f"{name}.png"


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog=program_name("sdpo.plot"), description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="run folders, or folders to search for runs (outputs/, a multirun)")
    parser.add_argument("--out", type=Path, default=None,
                        help="PNG to write (default: reward_curves[_<metric>][_<reward>].png in the first folder "
                             "given; phase_times.png goes next to it)")
    parser.add_argument("--x", choices=[*X_AXES, "both"], default="both", help="x axis (default: both, two rows)")
    parser.add_argument("--metric", choices=METRICS, default="auto",
                        help="eval/<reward>/<k>step panels, their change since the first update "
                             "(eval/<reward>/<k>step_change), or the training 1-step and T-step ones (default: auto, "
                             "eval when logged)")
    parser.add_argument("--reward", default=None, help="which reward's metrics (default: the training reward)")
    parser.add_argument("--smooth", type=int, default=1, help="rolling mean over this many logged points (default 1)")
    args = parser.parse_args(argv)
    if args.smooth < 1:
        parser.error(f"--smooth {args.smooth}: the rolling mean needs a window of >= 1 points (1: none)")
    try:
        runs = load_runs(args.paths)
        if not runs:
            raise ValueError(f"no run with logged metrics under {', '.join(args.paths)}")
        groups = group_runs(runs)
        fig = plot_runs(runs, x=args.x, metric=args.metric, reward=args.reward, groups=groups, smooth=args.smooth)
        table = step_table(runs, metric=args.metric, reward=args.reward, groups=groups)
        note = left_out_note(runs, table, groups, args.metric, args.reward)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"sdpo.plot: {err}\n")
    out = args.out or default_out(args.paths, args.metric, args.reward)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(f"{len(runs)} run(s) in {len(groups)} group(s); final reward per step count:")
        print(counts_as_integers(table.drop(columns="metric")).to_string(float_format=lambda v: f"{v:.4f}"))
        if note is not None:
            print(note)
        times = phase_table(groups)
        if not times.empty:
            times_png = out.with_name("phase_times.png")
            plot_phase_times(times).savefig(times_png, dpi=120)
            print("\nseconds per iteration by phase: the median over each run's iterations (the first, which "
                  "compiles, left out), the mean over seeds:")
            print(counts_as_integers(times).to_string(float_format=lambda v: f"{v:.4g}"))
            for line in timing_noise_notes(groups):
                print(line)
            print(times_png)
    print(out)
    return out


def cli() -> None:
    """The ``sdpo-plot`` console script: ``main`` returns the figure's path, which ``sys.exit`` would print as an
    error."""
    main()


if __name__ == "__main__":
    main()
