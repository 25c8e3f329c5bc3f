"""What an evaluation produced (scores of every reward, step count, prompt and image, and the images a grid draws)
and the files a researcher reads: a table with CIs (Markdown, CSV, JSON) and a labelled image grid."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor

from sdpo.grids import fit_to_grid, image_grid, score_captions
from sdpo.statistics import ci_method, prompt_mean_ci


@dataclass
class EvalResult:
    """Scores of every (reward, step count, prompt, image) and the images a grid draws (the first of the first
    prompts)."""

    prompts: list[str]
    step_counts: tuple[int, ...]
    scores: dict[str, Tensor]  # reward -> [S, P, n] float32
    images: Tensor  # uint8 [S, K, m, 3, H, W]: the first m images of the first K prompts at each step count
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ci_method(self) -> str:
        return ci_method(len(self.prompts))

    @property
    def reward_names(self) -> list[str]:
        return list(self.scores)

    def scores_for(self, reward: str, steps: int) -> Tensor:
        """Scores [P, n] of ``reward`` at ``steps`` sampling steps."""
        return self.scores[reward][self.step_counts.index(steps)]

    def image(self, steps: int, prompt_index: int, image_index: int = 0) -> Tensor:
        """One kept image [3, H, W] in [0, 1]."""
        return self.images[self.step_counts.index(steps), prompt_index, image_index].float() / 255

    def table(self) -> list[dict[str, Any]]:
        """One row per (reward, step count): mean and std over images, 95% CI of the mean over prompts, n images,
        the number of prompts."""
        return [
            {"reward": name, "steps": k, **prompt_mean_ci(values[s])}
            for name, values in self.scores.items()
            for s, k in enumerate(self.step_counts)
        ]

    def means(self) -> dict[str, float]:
        """``eval/<reward>/<k>step`` -> mean: the scalar names logged during training."""
        return {f"eval/{r['reward']}/{r['steps']}step": r["mean"] for r in self.table()}

    def to_markdown(self) -> str:
        lines = ["| reward | steps | mean | std | 95% CI of the mean | images | prompts |",
                 "|---|---:|---:|---:|---|---:|---:|"]
        for r in self.table():
            lines.append(f"| {r['reward']} | {r['steps']} | {r['mean']:.4f} | {r['std']:.4f} | "
                         f"[{r['ci95_low']:.4f}, {r['ci95_high']:.4f}] | {r['n']} | {r['prompts']} |")
        n = self.images_per_prompt
        lines.append("")
        lines.append(f"{len(self.prompts)} prompts x {n} images per step count, seed {self.meta.get('seed')}, "
                     f"sampler {self.meta.get('scheduler')}; CI: {self.ci_method}.")
        return "\n".join(lines)

    @property
    def images_per_prompt(self) -> int:
        return next(iter(self.scores.values())).shape[-1] if self.scores else 0

    def grid(self, max_prompts: int = 16, max_images: int | None = None) -> Image.Image:
        """Prompts (rows) x step counts x each prompt's kept images (up to ``max_images``, default all), every
        image captioned with each reward's score."""
        if self.images.shape[2] == 0 or self.images.shape[1] == 0:
            raise ValueError("no images were kept (keep_images=0 or keep_prompts=0): nothing to draw")
        n_rows = min(max_prompts, self.images.shape[1])
        n_images = min(max_images or self.images.shape[2], self.images.shape[2])
        images, scale = fit_to_grid(self.images[:, :n_rows, :n_images].float() / 255)  # [S, R, m, 3, H, W]
        columns = [(s, i) for s in range(len(self.step_counts)) for i in range(n_images)]
        rows = [[images[s, p, i] for s, i in columns] for p in range(n_rows)]
        cells = [[score_captions(self.scores, (s, p, i)) for s, i in columns] for p in range(n_rows)]
        captions = self.prompts[:n_rows]  # wrapped to fit by image_grid
        header = [f"{self.step_counts[s]} step{'s' if self.step_counts[s] > 1 else ''}"
                  + (f" #{i + 1}" if n_images > 1 else "") for s, i in columns]
        return image_grid(rows, captions, header, scale=scale, cell_captions=cells,
                          corner=cells_legend(self.reward_names))

    def to_json(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "ci_method": self.ci_method,
            "prompts": self.prompts,
            "step_counts": list(self.step_counts),
            "table": json_rows(self.table()),
            "scores": {name: {str(k): values[s].tolist() for s, k in enumerate(self.step_counts)}
                       for name, values in self.scores.items()},  # [P][n] per step count
        }

    def save(self, out_dir: str | Path, grid_prompts: int = 16) -> dict[str, Path]:
        """Write results.csv, results.json, results.md and grid.png (the first ``grid_prompts`` prompts) into
        ``out_dir``; returns their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {name: out / name for name in ("results.csv", "results.json", "results.md", "grid.png")}
        write_csv(paths["results.csv"], self.table())
        paths["results.json"].write_text(json.dumps(self.to_json(), indent=1))
        meta = "\n".join(f"- {k}: {v}" for k, v in self.meta.items())
        paths["results.md"].write_text(f"# Evaluation\n\n{meta}\n\n{self.to_markdown()}\n")
        if self.images.shape[2]:
            self.grid(max_prompts=grid_prompts).save(paths["grid.png"])
        else:
            del paths["grid.png"]
        return paths


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``rows`` (dicts with the same keys) as a CSV file with a header."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def cells_legend(rewards: Sequence[str]) -> str:
    """What a grid's cell captions are: the reward, or the rewards in the order of their lines."""
    return f"cells: {rewards[0]}" if len(rewards) == 1 else f"cells, line by line: {', '.join(rewards)}"


def json_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with NaN and inf as null: JSON has neither (a std of one image is NaN)."""
    return [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()} for row in rows]


def shorten(text: str, n: int) -> str:
    """``text`` cut to ``n`` characters with an ellipsis: a grid's row caption."""
    return text if len(text) <= n else text[: n - 1] + "…"
