"""Comparing training arms over seeds: mean ± std, paired differences, the label-efficiency curve.

One run is noise (a fine-tuning run moves by ~0.1 V_rand with the float reduction order alone),
so arms are compared on several seeds, and each seed of one arm against the same seed of the
other (same slices, same steps, same augmentation stream): the paired differences and whether
every one of them favours the first arm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from emfm.data.labeled import IGNORE
from emfm.errors import EmfmError
from emfm.pictures import titled

METRICS = ("iou", "dice", "vrand", "vinfo", "vi")  # VI: lower is better; the others higher


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value, which has no spread to estimate)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), (float(array.std(ddof=1)) if len(array) > 1 else 0.0)


def summarize(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = METRICS) -> dict[str, Any]:
    """``{metric: mean, ..., "std": {metric: std}, "seeds": rows}`` over the metrics every row has."""
    present = [m for m in metrics if rows and all(m in row for row in rows)]
    stats = {m: mean_std([row[m] for row in rows]) for m in present}
    return {**{m: s[0] for m, s in stats.items()}, "std": {m: s[1] for m, s in stats.items()}, "seeds": list(rows)}


def paired_differences(first: Sequence[Mapping[str, Any]], second: Sequence[Mapping[str, Any]],
                       metrics: Sequence[str] = METRICS) -> dict[str, dict[str, Any]]:
    """``first - second`` seed by seed, per metric: the values, their mean and std, and whether all are > 0.

    Rows are paired by their ``"seed"``; both arms must have run the same seeds.
    """
    a, b = ({row["seed"]: row for row in rows} for rows in (first, second))
    if sorted(a) != sorted(b):
        raise EmfmError(f"paired differences need the same seeds in both arms, got {sorted(a)} and {sorted(b)}")
    seeds = sorted(a)
    out = {}
    for metric in (m for m in metrics if all(m in a[s] and m in b[s] for s in seeds)):
        values = [float(a[s][metric] - b[s][metric]) for s in seeds]
        mean, std = mean_std(values)
        out[metric] = {"seeds": seeds, "values": values, "mean": mean, "std": std,
                       "all_positive": all(v > 0 for v in values)}
    return out


def plot_curve(path: Path, counts: Sequence[int], arms: Mapping[str, Sequence[Mapping[str, Any]]],
               metrics: Sequence[tuple[str, str]] = (("iou", "IoU"), ("vrand", "V_rand")), title: str = "") -> None:
    """The label-efficiency curve: one panel per metric, one line per arm against the number of
    labeled slices, error bars one std over seeds. ``arms[arm][i]`` is a :func:`summarize` of
    ``counts[i]`` slices; metrics no arm has are left out."""
    shown = [(key, name) for key, name in metrics if any(key in s for rows in arms.values() for s in rows)]
    fig = Figure(figsize=(4.5 * max(1, len(shown)), 3.6), layout="constrained")
    order = np.argsort(counts, kind="stable")
    for i, (key, name) in enumerate(shown):
        ax = fig.add_subplot(1, len(shown), i + 1)
        for a, (arm, rows) in enumerate(arms.items()):
            dodge = 0.04 * (a - (len(arms) - 1) / 2)  # error bars of different arms side by side
            points = [(counts[j] + dodge, rows[j][key], rows[j]["std"][key]) for j in order if key in rows[j]]
            if points:
                x, y, err = zip(*points)
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=arm)
        ax.set(xlabel="labeled slices", ylabel=name, xticks=sorted(set(counts)))
        ax.grid(alpha=0.3)
    if shown:
        fig.axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)


def side_by_side(path: Path, raw: np.ndarray, truth: np.ndarray, probs: Mapping[str, np.ndarray],
                 heading: str = "") -> None:
    """raw | truth | one probability map per arm (its first channel), one greyscale PNG under the panels'
    names; unlabeled truth pixels grey."""
    shown = np.where(truth == IGNORE, 0.5, truth > 0)
    panels = [_grey(raw, *np.percentile(raw, [1, 99])), _grey(shown.astype(float), 0, 1)]
    panels += [_grey(p[0], 0, 1) for p in probs.values()]
    width, height = panels[0].size
    sheet = Image.new("L", (width * len(panels), height))
    for i, image in enumerate(panels):
        sheet.paste(image, (i * width, 0))
    titled(sheet, ["raw", "truth", *(f"{arm} probability" for arm in probs)], heading).save(path)


def _grey(array: np.ndarray, lo: float, hi: float) -> Image.Image:
    scaled = np.clip((array - lo) / max(hi - lo, 1e-6), 0, 1)
    return Image.fromarray((255 * scaled).astype(np.uint8))
