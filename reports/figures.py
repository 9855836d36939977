"""Records (and, for Figure 1, the preset's training images) -> the paper's figures, as PNG and PDF.

Every builder returns a `Figure` (matplotlib figure + caption); `save` writes it. Sample grids are composed
from the runs' own samples.png files; nothing here samples a model or recomputes a record's metric.
"""

from __future__ import annotations

import json
import logging
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from reports.tables import Grid, method_label  # noqa: E402

log = logging.getLogger(__name__)
sns.set_theme(style="whitegrid", context="paper")
HIGHLIGHT = "#d62728"


@dataclass
class Figure:
    name: str  # file stem
    title: str
    caption: str
    figure: matplotlib.figure.Figure


def save(fig: Figure, folder: Path) -> dict[str, Path]:
    """Write `<name>.png` (150 dpi) and `<name>.pdf`; closes the figure."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for suffix in ("png", "pdf"):
        path = folder / f"{fig.name}.{suffix}"
        fig.figure.savefig(path, dpi=150, bbox_inches="tight")
        written[f"{fig.name}.{suffix}"] = path
    plt.close(fig.figure)
    return written


def _first_run(runs: pd.DataFrame) -> pd.Series | None:
    runs = runs.sort_values("seed")
    return None if runs.empty else runs.iloc[0]


def _show_samples(ax, run: pd.Series | None, forget_class: int, num_rows: int, missing: str) -> None:
    """One samples.png (one row per class) with the forget-class row framed in red, or what is missing."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    path = Path(run["samples"]) if run is not None else None
    if path is None or not path.exists():
        text = missing if run is None else f"no samples.png at\n{path}"
        ax.text(0.5, 0.5, "\n".join(textwrap.wrap(text, 28)), ha="center", va="center", fontsize=5,
                family="monospace", transform=ax.transAxes, color="0.3")
        ax.set_facecolor("0.95")
        return
    image = mpimg.imread(path)
    ax.imshow(image, cmap="gray", interpolation="nearest")
    row_height = (image.shape[0] - 1) / num_rows  # save_image pads 1 pixel around every tile
    ax.add_patch(Rectangle((-0.5, forget_class * row_height - 0.5), image.shape[1], row_height + 1, fill=False,
                           edgecolor=HIGHLIGHT, linewidth=1.5))


def _metrics_line(runs: pd.DataFrame) -> str:
    if runs.empty:
        return "missing"
    return f"UA {runs['ua'].mean():.1f}  H {runs['entropy'].mean():.2f}\nFID {runs['fid'].mean():.2f}"


def sample_grid(df: pd.DataFrame, grid: Grid, forget_class: int) -> Figure:
    """The paper's Figures 2 and 4-13: one panel per method, each a row of samples per class."""
    default = df[df["variant"] == "default"]
    fig, axes = plt.subplots(1, len(grid.methods), layout="constrained", figsize=(1.9 * len(grid.methods), 2.9),
                             squeeze=False)
    for ax, method in zip(axes[0], grid.methods):
        runs = default[(default["method"] == method) & (default["class"] == forget_class)]
        command = grid.commands.get((method, forget_class), "")
        _show_samples(ax, _first_run(runs), forget_class, len(grid.classes), f"missing: {command}")
        ax.set_title(f"{method_label(method)}\n{_metrics_line(runs)}", fontsize=7)
    first = axes[0][0]
    if first.images:
        height = first.images[0].get_array().shape[0]
        first.set_yticks([(c + 0.5) * (height - 1) / len(grid.classes) for c in grid.classes])
        first.set_yticklabels([grid.class_names[c] for c in grid.classes], fontsize=6)
    name = grid.class_names[forget_class]
    title = f"Unlearning class {forget_class}" + (f" ({name})" if name != str(forget_class) else "")
    fig.suptitle(f"{title} — {grid.preset}/{grid.protocol}", fontsize=9)
    caption = ("Samples of the first seed, one row per class (8 per row), the forget class framed in red. "
               "Titles: UA %, entropy H and FID on retained classes, mean over seeds.")
    return Figure(f"samples_class{forget_class}", title, caption, fig)


def _sweep_key(row: pd.Series, param: str) -> str:
    others = {k: v for k, v in row["hyperparameters"].items() if k != param}
    return json.dumps([others, row["protocol_overrides"]], sort_keys=True, default=str)


def find_sweeps(df: pd.DataFrame) -> list[tuple[str, int, str, pd.DataFrame]]:
    """(method, forget class, parameter, runs) for each set of runs whose hyperparameters differ in one value only."""
    found = []
    for (method, forget_class), runs in df.groupby(["method", "class"]):
        params = sorted({k for hp in runs["hyperparameters"] for k in hp})
        for param in params:
            values = runs["hyperparameters"].map(lambda hp, p=param: hp.get(p))
            keyed = runs.assign(_value=values, _key=runs.apply(_sweep_key, axis=1, param=param))
            best = None
            for _, group in keyed.groupby("_key"):
                if group["_value"].nunique() >= 2 and (best is None or group["_value"].nunique() > best["_value"].nunique()):
                    best = group
            if best is not None:
                found.append((method, int(forget_class), param, best))
    return found


def _xscale(ax, values) -> None:
    """Symlog when the swept values span decades (lambda 0, 1, 50, 100): zero stays on the axis."""
    positive = [v for v in values if isinstance(v, (int, float)) and v > 0]
    if positive and all(isinstance(v, (int, float)) and v >= 0 for v in values) and max(positive) > 10 * min(positive):
        ax.set_xscale("symlog", linthresh=min(positive))


def sweep_figure(method: str, forget_class: int, param: str, runs: pd.DataFrame, grid: Grid) -> Figure:
    """Figure 3: UA and FID against one hyperparameter (SAFEMax's lambda in the paper), with the grids."""
    values = sorted(runs["_value"].unique(), key=lambda v: (isinstance(v, str), v))
    per_value = runs.groupby("_value")[["ua", "fid", "entropy"]].agg(["mean", "std"]).reindex(values)
    fig = plt.figure(layout="constrained", figsize=(max(6.0, 1.9 * len(values)), 6.4))
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.0, 1.5])
    label = "λ in ψ(t) = exp(-λ t / T)" if (method, param) == ("safemax", "lam") else param
    for ax, metric, name in zip(top.subplots(1, 2), ("ua", "fid"), ("UA (%) ↑", "FID (retained) ↓")):
        ax.errorbar(values, per_value[(metric, "mean")], yerr=per_value[(metric, "std")].fillna(0), marker="o",
                    capsize=3, color=sns.color_palette()[0])
        ax.set_xlabel(label)
        ax.set_ylabel(name)
        _xscale(ax, values)
        if all(isinstance(v, (int, float)) for v in values):
            ax.set_xticks(values, [f"{v:g}" for v in values])
        if metric == "ua":
            ax.set_ylim(-5, 105)
    panels = bottom.subplots(1, len(values), squeeze=False)[0]
    for ax, value in zip(panels, values):
        _show_samples(ax, _first_run(runs[runs["_value"] == value]), forget_class, len(grid.classes), "")
        ax.set_title(f"{param} = {value}\nUA {per_value.loc[value, ('ua', 'mean')]:.1f}  "
                     f"FID {per_value.loc[value, ('fid', 'mean')]:.2f}", fontsize=7)
    paper = (method, param) == ("safemax", "lam")
    title = f"{'Figure 3. Ablation' if paper else 'Sweep'}: {method_label(method)} {param}, forget class {forget_class}"
    fig.suptitle(f"{title} — {grid.preset}/{grid.protocol}", fontsize=9)
    caption = (f"Runs whose hyperparameters and protocol differ only in {param} (mean ± sd over seeds and repeats: "
               f"{len(runs)} runs), with the samples of each value (first seed; forget class framed in red).")
    return Figure(f"sweep_{method}_{param}_class{forget_class}", title, caption, fig)


def cost_figure(df: pd.DataFrame, grid: Grid) -> Figure:
    """RTE with the preparation stages stacked under it, and peak memory, per method (log scales)."""
    default = df[df["variant"] == "default"]
    methods = [m for m in grid.methods if m in set(default["method"])]
    stages = sorted({s for found in default["prepare_stages"] for s in found})
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, layout="constrained", figsize=(max(6.0, 1.4 * len(methods) + 3), 3.2))
    palette = sns.color_palette("deep", len(stages) + 1)
    bottoms, smallest = np.zeros(len(methods)), math.inf
    for index, part in enumerate(stages + ["unlearning run (RTE)"]):
        heights = []
        for method in methods:
            runs = default[default["method"] == method]
            seconds = (runs["rte_s"] if part == "unlearning run (RTE)" else
                       runs["prepare_stages"].map(lambda found, s=part: found.get(s, 0.0)))
            heights.append(float(seconds.fillna(0).mean()) / 60)
        heights = np.array(heights)
        if heights.any():
            smallest = min(smallest, heights[heights > 0].min())
            ax_time.bar(range(len(methods)), heights, bottom=bottoms, color=palette[index],
                        label=part if part.startswith("unlearning") else f"preparation: {part}")
        bottoms += heights
    for position, total in enumerate(bottoms):
        if total == 0:
            ax_time.annotate("no training", (position, 0.02), xycoords=("data", "axes fraction"), ha="center",
                             va="bottom", fontsize=6)
    ax_time.set_yscale("log")
    if math.isfinite(smallest):
        ax_time.set_ylim(bottom=smallest / 3)
    ax_time.set_ylabel("minutes (log), mean over runs")
    ax_time.legend(fontsize=6)
    memory = default[default["method"].isin(methods)].groupby("method")[["memory_gib"]].mean().reindex(methods)
    kinds = default.groupby("method")["memory_kind"].agg(lambda k: "/".join(sorted(set(k)))).reindex(methods)
    colors = [palette[-1] if kind == "GPU" else "0.55" for kind in kinds]
    ax_mem.bar(range(len(methods)), memory["memory_gib"], color=colors)
    for position, (value, kind) in enumerate(zip(memory["memory_gib"], kinds)):
        ax_mem.annotate(f"{kind} {value:.2f}", (position, value), ha="center", va="bottom", fontsize=6)
    ax_mem.set_yscale("log")
    ax_mem.set_ylabel("peak memory, GiB (log)")
    ax_mem.set_title("GPU: CUDA allocated; RSS: process (CPU runs)", fontsize=7)
    ax_time.set_title("preparation stacked under the unlearning run", fontsize=7)
    for ax in (ax_time, ax_mem):
        ax.set_xticks(range(len(methods)), [method_label(m) for m in methods], rotation=30, fontsize=7)
    title = "Runtime and memory"
    fig.suptitle(f"{title} — {grid.preset}/{grid.protocol}", fontsize=9)
    caption = ("Left: unlearning runtime (RTE) with each preparation stage stacked beneath it (log scale, so the "
               "lower segments look larger than they are). Right: peak memory; GPU = peak allocated CUDA memory, "
               "RSS = peak resident memory of the process (CPU runs). Mean over forget classes and seeds.")
    return Figure("cost", title, caption, fig)


def noise_figure(df: pd.DataFrame, grid: Grid) -> Figure:
    """What the evaluation classifier predicts on pure N(0, I) noise: a class it favours can fake a low UA."""
    by_seed = df.dropna(subset=["noise_histogram"]).sort_values("seed").drop_duplicates("seed")
    counts = np.sum([np.asarray(h, dtype=float) for h in by_seed["noise_histogram"]], axis=0)
    fractions = 100 * counts / max(counts.sum(), 1)
    names = [grid.class_names.get(c, str(c)) for c in range(len(fractions))]
    top = int(np.argmax(fractions))
    fig, ax = plt.subplots(layout="constrained", figsize=(max(4.0, 0.5 * len(names) + 1), 2.8))
    colors = [HIGHLIGHT if c == top else sns.color_palette()[0] for c in range(len(fractions))]
    ax.bar(range(len(names)), fractions, color=colors)
    ax.set_xticks(range(len(names)), names)
    ax.axhline(100 / len(fractions), color="0.4", linestyle="--", linewidth=1, label="uniform")
    ax.set_ylabel("% of noise images")
    ax.set_xlabel("predicted class")
    ax.legend(fontsize=7)
    title = "Classifier on pure noise"
    fig.suptitle(f"{title} — {grid.preset}/{grid.protocol}", fontsize=9)
    caption = (f"Predictions of the evaluation classifier on {int(counts.sum())} images of pure N(0, I) noise "
               f"(records' metrics.noise_prediction, seeds {sorted(by_seed['seed'].tolist())}). It assigns "
               f"{fractions[top]:.0f}% to class {names[top]}: a method that outputs noise for forget class "
               f"{names[top]} gets a low UA although it forgot (the paper's class 2, bird).")
    return Figure("noise_prediction", title, caption, fig)
