"""Confidence intervals for evaluation tables: Student's t over prompt means.

The interval of a (reward, step count) mean comes from the P prompt means, not the ``P x n`` images: images of one
prompt are correlated (a prompt that scores high does so on every noise), so treating them as independent draws
makes the interval too narrow, and the question a researcher asks is whether a result holds on other prompts. With
one prompt, the interval falls back to its images (it then covers new noise only). The t quantile comes from scipy
when installed, else from a built-in quadrature that agrees with it to 1e-6.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from torch import Tensor


def _t_quantile_builtin(p: float, df: int) -> float:
    """Student-t quantile without scipy: bisection on the CDF, integrated with Simpson's rule on [0, x]."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        grid = np.linspace(0.0, x, 4001)
        pdf = np.exp(log_norm - (df + 1) / 2 * np.log1p(grid**2 / df))
        h = x / 4000
        return 0.5 + h / 3 * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum())

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


try:  # scipy is optional; the built-in quantile matches it to ~1e-6
    from scipy.stats import t as _student_t

    T_QUANTILE_SOURCE = "scipy"

    def t_quantile(p: float, df: int) -> float:
        """Quantile ``p`` of Student's t with ``df`` degrees of freedom."""
        return float(_student_t.ppf(p, df))

except ImportError:
    T_QUANTILE_SOURCE = "built-in quadrature; scipy not installed"

    @functools.lru_cache(maxsize=256)
    def t_quantile(p: float, df: int) -> float:
        """Quantile ``p`` of Student's t with ``df`` degrees of freedom."""
        return _t_quantile_builtin(p, df)


def mean_ci(values: Tensor, level: float = 0.95) -> dict[str, float]:
    """Mean, sample std (n-1) and the ``level`` confidence interval of the mean of ``values`` (any shape)."""
    x = values.double().flatten()
    n = x.numel()
    mean = float(x.mean()) if n else math.nan
    if n < 2:
        return {"mean": mean, "std": math.nan, "ci95_low": math.nan, "ci95_high": math.nan, "n": n}
    std = float(x.std(correction=1))
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci95_low": mean - half, "ci95_high": mean + half, "n": n}


def ci_method(prompts: int) -> str:
    """How ``prompt_mean_ci`` builds its interval for ``prompts`` prompts: the footer of every results table."""
    unit = ("the prompt means, prompts-1 degrees of freedom" if prompts >= 2
            else "the images of the single prompt, images-1 degrees of freedom")
    return f"Student t over {unit} ({T_QUANTILE_SOURCE})"


def prompt_mean_ci(values: Tensor, level: float = 0.95) -> dict[str, float]:
    """Mean and std over all images of ``values`` [P, n] (prompt, image), with the ``level`` confidence interval
    from the P prompt means (t with P-1 degrees of freedom): the prompt is the sampled unit, so its images do not
    count as independent evidence. One prompt: the interval of its images. Adds ``prompts`` = P."""
    if values.dim() != 2:
        raise ValueError(f"expected scores [prompts, images], got shape {tuple(values.shape)}")
    stats = mean_ci(values)
    if values.shape[0] >= 2:
        over_prompts = mean_ci(values.double().mean(dim=1), level)
        stats["ci95_low"], stats["ci95_high"] = over_prompts["ci95_low"], over_prompts["ci95_high"]
    stats["prompts"] = values.shape[0]
    return stats
