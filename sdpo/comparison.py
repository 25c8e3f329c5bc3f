"""A policy against its base model, image by image: what SDPO changed at each sampling step count.

``python -m sdpo.evaluate checkpoint=... baseline=true`` evaluates both with the same prompts, seed and noise:
every (prompt, image) starts from the same initial noise in both (``sdpo.evaluation.item_seed``), so the two
scores of an image form a pair. A paired difference cancels what the prompt and the noise contribute, and its
confidence interval is far tighter than one read off two separate tables. Reported per (reward, step count): both
means, the mean difference with its 95% CI (over the prompts' mean differences, like ``sdpo.statistics``), and the
share of images the policy scores higher (ties count half);
per prompt, the change of its mean, so that prompts the policy got worse on do not hide behind the average.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sdpo.eval_results import EvalResult, cells_legend, json_rows, shorten, write_csv
from sdpo.grids import fit_to_grid, image_grid, score_captions
from sdpo.statistics import prompt_mean_ci


@dataclass
class Comparison:
    """``policy`` and ``base`` evaluated on the same prompts, step counts, seed and images per prompt."""

    base: EvalResult
    policy: EvalResult

    def __post_init__(self) -> None:
        b, p = self.base, self.policy
        same = (b.prompts == p.prompts and b.step_counts == p.step_counts and b.meta.get("seed") == p.meta.get("seed")
                and b.reward_names == p.reward_names and b.images_per_prompt == p.images_per_prompt)
        if not same:
            raise ValueError("a paired comparison needs both evaluations on the same prompts, step counts, seed, "
                             "rewards and images per prompt")

    def differences(self, reward: str, steps: int) -> torch.Tensor:
        """Policy minus base score of every (prompt, image) at ``steps``: [P, n]."""
        return self.policy.scores_for(reward, steps) - self.base.scores_for(reward, steps)

    def table(self) -> list[dict[str, Any]]:
        """One row per (reward, step count): base and policy means, the paired difference's mean, std and 95% CI,
        the share of images the policy scores higher, n images and the number of prompts."""
        rows = []
        for reward in self.policy.reward_names:
            for k in self.policy.step_counts:
                diff = self.differences(reward, k)
                stats = prompt_mean_ci(diff)
                win = float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())
                rows.append({
                    "reward": reward, "steps": k,
                    "base": float(self.base.scores_for(reward, k).double().mean()),
                    "policy": float(self.policy.scores_for(reward, k).double().mean()),
                    "delta": stats["mean"], "delta_std": stats["std"],
                    "delta_ci95_low": stats["ci95_low"], "delta_ci95_high": stats["ci95_high"],
                    "policy_better": win, "n": stats["n"], "prompts": stats["prompts"],
                })
        return rows

    def by_prompt(self, reward: str | None = None) -> list[dict[str, Any]]:
        """One row per (reward, step count, prompt) (of ``reward`` alone if given): base and policy means over the
        prompt's images and their change. A change that is positive on average can still be negative for some
        prompts; these rows show which."""
        rows = []
        for name in [reward] if reward else self.policy.reward_names:
            for k in self.policy.step_counts:
                base, policy = self.base.scores_for(name, k).double(), self.policy.scores_for(name, k).double()
                for p, prompt in enumerate(self.policy.prompts):
                    b, q = float(base[p].mean()), float(policy[p].mean())
                    rows.append({"reward": name, "steps": k, "prompt": prompt, "base": b, "policy": q,
                                 "delta": q - b})
        return rows

    def prompt_markdown(self, reward: str | None = None, limit: int = 10) -> str:
        """The ``limit`` prompts whose mean change over the step counts is lowest for ``reward`` (default: the
        first), with their change at each step count: where the policy got worse, if anywhere."""
        reward = reward or self.policy.reward_names[0]
        steps = self.policy.step_counts
        changes: dict[str, dict[int, float]] = {}
        for row in self.by_prompt(reward):
            changes.setdefault(row["prompt"], {})[row["steps"]] = row["delta"]
        ranked = sorted(changes.items(), key=lambda item: sum(item[1].values()) / len(steps))[:limit]
        lines = [f"| prompt | {' | '.join(f'change at {k}' for k in steps)} |", "|---|" + "---:|" * len(steps)]
        lines += [f"| {shorten(prompt, 60)} | {' | '.join(f'{by_step[k]:+.4f}' for k in steps)} |"
                  for prompt, by_step in ranked]
        shown = "all" if len(changes) <= limit else f"the {limit} lowest of {len(changes)}"
        return f"{reward}, {shown} prompts by their mean change over step counts:\n\n" + "\n".join(lines)

    def means(self) -> dict[str, float]:
        """``compare/<reward>/<k>step_delta`` -> mean paired difference (W&B scalars)."""
        return {f"compare/{r['reward']}/{r['steps']}step_delta": r["delta"] for r in self.table()}

    def to_markdown(self) -> str:
        lines = ["| reward | steps | base | policy | change | 95% CI of the change | policy better | images "
                 "| prompts |", "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
        for r in self.table():
            lines.append(f"| {r['reward']} | {r['steps']} | {r['base']:.4f} | {r['policy']:.4f} | "
                         f"{r['delta']:+.4f} | [{r['delta_ci95_low']:+.4f}, {r['delta_ci95_high']:+.4f}] | "
                         f"{r['policy_better']:.0%} | {r['n']} | {r['prompts']} |")
        lines += ["", f"change: policy minus base on the same prompt and initial noise, image by image "
                      f"({len(self.policy.prompts)} prompts x {self.policy.images_per_prompt} images, seed "
                      f"{self.policy.meta.get('seed')}); CI: {self.policy.ci_method}."]
        return "\n".join(lines)

    def grid(self, max_prompts: int = 16) -> Image.Image:
        """Prompts (rows) x step counts, base and policy side by side from the same noise (each prompt's first
        image), every image captioned with each reward's score."""
        if min(self.policy.images.shape[1:3].numel(), self.base.images.shape[1:3].numel()) == 0:
            raise ValueError("no images were kept: nothing to draw")
        n_rows = min(max_prompts, self.policy.images.shape[1], self.base.images.shape[1])
        both = torch.stack([self.base.images[:, :n_rows, 0], self.policy.images[:, :n_rows, 0]], dim=1)
        images, scale = fit_to_grid(both.float() / 255)  # [S, 2, R, 3, H, W]
        results = (self.base, self.policy)
        columns = [(s, which) for s in range(len(self.policy.step_counts)) for which in (0, 1)]
        rows = [[images[s, which, p] for s, which in columns] for p in range(n_rows)]
        cells = [[score_captions(results[which].scores, (s, p, 0)) for s, which in columns] for p in range(n_rows)]
        header = [f"{self.policy.step_counts[s]}-step {'policy' if which else 'base'}" for s, which in columns]
        captions = self.policy.prompts[:n_rows]  # wrapped to fit by image_grid
        return image_grid(rows, captions, header, scale=scale, cell_captions=cells,
                          corner=cells_legend(self.policy.reward_names))

    def save(self, out_dir: str | Path, grid_prompts: int = 16) -> dict[str, Path]:
        """Write comparison.csv, comparison.json, comparison.md and grid_compare.png into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        names = ("comparison.csv", "comparison_by_prompt.csv", "comparison.json", "comparison.md",
                 "grid_compare.png")
        paths = {name: out / name for name in names}
        rows = self.table()
        write_csv(paths["comparison.csv"], rows)
        write_csv(paths["comparison_by_prompt.csv"], self.by_prompt())
        origin = {"base": self.base.meta.get("policy"), "policy": self.policy.meta.get("policy")}
        paths["comparison.json"].write_text(json.dumps({**origin, "table": json_rows(rows)}, indent=1))
        by_prompt = "\n\n".join(self.prompt_markdown(reward) for reward in self.policy.reward_names)
        paths["comparison.md"].write_text(f"# {origin['policy']} against {origin['base']}\n\n{self.to_markdown()}\n\n"
                                          f"## By prompt\n\n{by_prompt}\n")
        if self.policy.images.shape[2] and self.base.images.shape[2]:
            self.grid(max_prompts=grid_prompts).save(paths["grid_compare.png"])
        else:
            del paths["grid_compare.png"]
        return paths
