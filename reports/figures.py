"""Records (and, for Figure 1, the preset's training images) -> the paper's figures, as PNG and PDF.

Every builder returns a `Figure` (matplotlib figure + caption); `save` writes it. Sample grids are composed
from the runs' own samples.png files; nothing here samples a model or recomputes a record's metric. Error bars
are 95% bootstrap CIs (`reports.stats`); a value from a single run has none, and the caption says so.
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

from reports import stats  # noqa: E402
from reports.frame import fid_label  # noqa: E402
from reports.tables import REFERENCE, REFERENCE_METHODS, Grid, default_runs, method_label  # noqa: E402

log = logging.getLogger(__name__)
sns.set_theme(style="whitegrid", context="paper")
HIGHLIGHT = "#d62728"


@dataclass
class Figure:
    name: str  # file stem
    title: str
    caption: str
    figure: matplotlib.figure.Figure


def discard(fig: Figure) -> None:
    """Close a figure unsaved (the budget curves under `bench report --no-figures`, which say whether a sweep is
    there)."""
    plt.close(fig.figure)


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
    return (f"UA {runs['ua'].mean():.1f}  H {runs['entropy'].mean():.2f}\n"
            f"{fid_label(runs['fid_features'])} {runs['fid'].mean():.2f}")


def yerr(summaries: list) -> np.ndarray:
    """(2, k) distances from each mean to its CI bounds for `errorbar`; 0 where there is no interval (n = 1)."""
    below = [s.mean - s.low if s is not None and s.has_interval else 0.0 for s in summaries]
    above = [s.high - s.mean if s is not None and s.has_interval else 0.0 for s in summaries]
    return np.array([below, above])


def limits(lows, highs, bounds: tuple[float, float] = (-math.inf, math.inf), min_span: float = 1.0):
    """Axis limits around [min(lows), max(highs)] with 10% padding (at least `min_span` wide), inside `bounds`."""
    low, high = np.nanmin(lows), np.nanmax(highs)
    pad = max((high - low) * 0.1, (min_span - (high - low)) / 2, 0.0)
    return max(bounds[0], low - pad), min(bounds[1], high + pad)


def _single_note(summaries: list) -> str:
    single = sum(1 for s in summaries if s is not None and s.n == 1)
    return f" {single} value(s) come from a single run (n=1): no error bar." if single else ""


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
               f"Titles: UA %, entropy H and {fid_label(df['fid_features'])} on retained classes, mean over seeds.")
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
            keyed = keyed[values.notna()]  # a run without the parameter is not on its axis
            best = None
            for _, group in keyed.groupby("_key"):
                if group["_value"].nunique() >= 2 and (best is None or group["_value"].nunique() > best["_value"].nunique()):
                    best = group
            if best is not None:
                found.append((method, int(forget_class), param, best))
    return found


def _xscale(ax, values) -> None:
    """Logarithmic when the swept values span decades: log where all are positive (budgets in FLOPs), symlog where
    zero is among them (lambda 0, 1, 50, 100), which then starts at zero (no empty negative half)."""
    positive = [v for v in values if isinstance(v, (int, float)) and v > 0]
    if positive and all(isinstance(v, (int, float)) and v >= 0 for v in values) and max(positive) > 10 * min(positive):
        if len(positive) == len(values):
            ax.set_xscale("log")
        else:
            ax.set_xscale("symlog", linthresh=min(positive))
            ax.set_xlim(left=0)


def sweep_figure(method: str, forget_class: int, param: str, runs: pd.DataFrame, grid: Grid) -> Figure:
    """Figure 3: UA and FID (FD) against one hyperparameter (SAFEMax's lambda in the paper), with the grids."""
    values = sorted(runs["_value"].unique(), key=lambda v: (isinstance(v, str), v))
    summaries = {m: [stats.summarize(runs.loc[runs["_value"] == v, m]) for v in values] for m in ("ua", "fid")}
    fig = plt.figure(layout="constrained", figsize=(max(6.0, 1.9 * len(values)), 6.4))
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.0, 1.5])
    label = "λ in ψ(t) = exp(-λ t / T)" if (method, param) == ("safemax", "lam") else param
    fid_name = fid_label(runs["fid_features"])
    numeric = all(isinstance(v, (int, float)) for v in values)
    positions = values if numeric else list(range(len(values)))
    for ax, metric, name in zip(top.subplots(1, 2), ("ua", "fid"), ("UA (%) ↑", f"{fid_name}, retained ↓")):
        found = summaries[metric]
        means = [s.mean for s in found]
        ax.errorbar(positions, means, yerr=yerr(found), marker="o", capsize=3, color=sns.color_palette()[0])
        ax.set_xlabel(label)
        ax.set_ylabel(name, fontsize=8)
        if numeric:
            _xscale(ax, values)
        ax.set_xticks(positions, [f"{v:g}" if numeric else str(v) for v in values])
        lows = [s.low if s.has_interval else s.mean for s in found]
        highs = [s.high if s.has_interval else s.mean for s in found]
        # UA lives in [0, 100]; a FID/FD is >= 0. The axis spans the data (with its CIs), not the metric's range.
        ax.set_ylim(*limits(lows, highs, (0.0, 100.0) if metric == "ua" else (0.0, math.inf),
                            min_span=5.0 if metric == "ua" else 0.1 * max(np.nanmax(highs), 1e-9)))
    panels = bottom.subplots(1, len(values), squeeze=False)[0]
    for ax, value, ua, fid in zip(panels, values, summaries["ua"], summaries["fid"]):
        _show_samples(ax, _first_run(runs[runs["_value"] == value]), forget_class, len(grid.classes), "")
        ax.set_title(f"{param} = {value}\nUA {ua.mean:.1f}\n{fid_name} {fid.mean:.2f}", fontsize=7)
    paper = (method, param) == ("safemax", "lam")
    title = f"{'Figure 3. Ablation' if paper else 'Sweep'}: {method_label(method)} {param}, forget class {forget_class}"
    fig.suptitle(f"{title} — {grid.preset}/{grid.protocol}", fontsize=9)
    caption = (f"Runs whose hyperparameters and protocol differ only in {param}: mean and 95% bootstrap CI over seeds "
               f"and repeats ({len(runs)} runs; n per value: {', '.join(str(s.n) for s in summaries['ua'])}), with "
               "the samples of each value (first seed; forget class framed in red). The y-axes span the data, not "
               f"the metrics' full range.{_single_note(summaries['ua'])}")
    return Figure(f"sweep_{method}_{param}_class{forget_class}", title, caption, fig)


def _hbars(ax, summaries: list, colors, labels: list[str]) -> None:
    """Horizontal bars of means with CI error bars, first method on top, on a linear axis from 0."""
    means = [s.mean if s is not None else 0.0 for s in summaries]
    ax.barh(range(len(means)), means, color=colors, xerr=yerr(summaries), capsize=2, error_kw={"linewidth": 0.8})
    ax.set_xlim(left=0)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()


def cost_figure(df: pd.DataFrame, grid: Grid) -> Figure:
    """Per method: RTE with its ratio to SAFEMax's, the preparation stages, and peak memory (linear axes from 0)."""
    default = default_runs(df)
    methods = [m for m in grid.methods if m in set(default["method"])]
    runs = {m: default[default["method"] == m] for m in methods}
    stages = sorted({s for found in default["prepare_stages"] for s in found})
    fig, (ax_time, ax_flops, ax_prep, ax_mem) = plt.subplots(1, 4, layout="constrained", sharey=True,
                                                             figsize=(13.0, 0.32 * len(methods) + 1.3))
    palette = sns.color_palette("deep", len(stages) + 2)
    labels = [method_label(m) for m in methods]
    rte = [stats.summarize(runs[m]["rte_min"]) for m in methods]
    _hbars(ax_time, rte, palette[0], labels)
    reference = rte[methods.index(REFERENCE)].mean if REFERENCE in methods else math.nan
    for position, found in enumerate(rte):
        if found.mean == 0:
            text = "no training"
        elif reference > 0:
            text = f"{found.mean / reference:.2g}×"
        else:
            text = f"{found.mean:.2g} min"
        end = found.high if found.has_interval else found.mean
        ax_time.annotate(text, (end, position), xytext=(3, 0), textcoords="offset points", ha="left", va="center",
                         fontsize=6)
    ax_time.margins(x=0.18)
    ax_time.set_xlabel("RTE, minutes")
    ratio = f"; × = RTE / {method_label(REFERENCE)}'s" if reference > 0 else ""
    ax_time.set_title(f"(a) unlearning run{ratio}", fontsize=8)
    counted = _flops_panel(ax_flops, [stats.summarize(runs[m]["train_tflops"]) for m in methods], methods, palette[0],
                           labels)
    lefts = np.zeros(len(methods))
    for index, stage in enumerate(stages):
        widths = np.array([runs[m]["prepare_stages"].map(lambda found, s=stage: found.get(s, 0.0)).mean() / 60
                           for m in methods])
        ax_prep.barh(range(len(methods)), widths, left=lefts, color=palette[index + 1], label=stage)
        lefts += widths
    ax_prep.set_xlim(left=0)
    if stages:
        ax_prep.legend(fontsize=6, title="stage", title_fontsize=6, loc="lower right")
    else:
        ax_prep.text(0.5, 0.5, "no preparation stages", transform=ax_prep.transAxes, ha="center", fontsize=7)
    ax_prep.set_xlabel("preparation, minutes")
    ax_prep.set_title("(c) preparation (once per base model)", fontsize=8)
    memory = [stats.summarize(runs[m]["memory_gib"]) for m in methods]
    kinds = ["/".join(sorted(set(runs[m]["memory_kind"]))) for m in methods]
    colors = [palette[-1] if kind == "GPU" else "0.6" for kind in kinds]
    ax_mem.barh(range(len(methods)), [s.mean for s in memory], color=colors, xerr=yerr(memory), capsize=2,
                error_kw={"linewidth": 0.8})
    ax_mem.set_xlim(left=0)
    for position, (found, kind) in enumerate(zip(memory, kinds)):
        ax_mem.annotate(kind, (found.mean, position), xytext=(3, 0), textcoords="offset points", va="center", fontsize=6)
    ax_mem.margins(x=0.15)
    ax_mem.set_xlabel("peak memory, GiB")
    ax_mem.set_title("(d) GPU: CUDA allocated; RSS: process", fontsize=8)
    title = "Runtime and memory"
    fig.suptitle(f"{title} — {grid.preset}/{grid.protocol}", fontsize=9)
    runs_n = sorted({s.n for s in rte})
    caption = ("(a) Unlearning runtime (RTE, preparation excluded): mean over forget classes and seeds with its 95% "
               f"bootstrap CI over runs (n = {', '.join(map(str, runs_n))} runs per method), annotated with its ratio "
               f"to {method_label(REFERENCE)}'s mean RTE. (b) FLOPs of the unlearning loop (torch's FlopCounterMode: "
               "matrix products, convolutions, attention), with their ratio to "
               f"{method_label(REFERENCE)}'s: the machine- and load-independent cost"
               f"{'' if counted else ' (none of these records counted FLOPs: made before they were counted)'}; "
               "preparation not counted. (c) Preparation stages (priors, Fisher information, saliency "
               "masks), stacked: computed once per base model and reused by every run. (d) Peak memory: GPU = peak "
               "allocated CUDA memory, RSS = peak resident memory of the whole process (CPU runs). Linear axes from "
               "0." + _single_note(rte))
    return Figure("cost", title, caption, fig)


def _flops_panel(ax, flops: list, methods: list[str], color, labels: list[str]) -> bool:
    """Train TFLOPs per method with the ratio to the reference's; False where no record counted them."""
    if all(s.n == 0 for s in flops):
        ax.text(0.5, 0.5, "FLOPs not recorded", transform=ax.transAxes, ha="center", fontsize=7)
        ax.set_xlabel("unlearning TFLOPs")
        return False
    _hbars(ax, flops, color, labels)
    reference = flops[methods.index(REFERENCE)].mean if REFERENCE in methods else math.nan
    for position, found in enumerate(flops):
        if found.n == 0:
            text = "n/a"
        elif found.mean == 0:
            text = "no training"
        else:
            text = f"{found.mean / reference:.2g}×" if reference > 0 else f"{found.mean:.3g}"
        ax.annotate(text, (found.mean if found.n else 0.0, position), xytext=(3, 0), textcoords="offset points",
                    ha="left", va="center", fontsize=6)
    ax.margins(x=0.18)
    ax.set_xlabel("unlearning TFLOPs")
    ratio = f"; × = FLOPs / {method_label(REFERENCE)}'s" if reference > 0 else ""
    ax.set_title(f"(b) unlearning FLOPs{ratio}", fontsize=8)
    return True


def _original_line(ax, found: dict, methods: list[str], fid_name: str) -> str:
    """Original (no unlearning) as a vertical line at its FID/FD: the retention it starts from."""
    if "original" not in methods:
        return ""
    level = found[("original", "fid")].mean
    ax.axvline(level, color="0.3", linestyle=":", linewidth=1)
    ax.annotate("Original", (level, 1), xycoords=("data", "axes fraction"), xytext=(2, -8),
                textcoords="offset points", fontsize=6, color="0.3")
    return f" Dotted line: Original's {fid_name} (it forgets nothing, so it is drawn as a line, not a point)."


OUTLIER_FACTOR = 5.0  # an FD this many times the methods' median puts the forgetting-vs-retention x-axis on a log scale


def _fd_axis(ax, found: dict, methods: list[str], fid_name: str) -> str:
    """Linear from 0 when the FDs are alike; a log axis, the outliers named on it, when one method's FD is more than
    OUTLIER_FACTOR x the median (GA's 209 against 6-17), so that the other methods stay apart. Returns the caption's
    sentence about it."""
    means = {m: found[(m, "fid")].mean for m in methods}
    highs = [found[(m, "fid")].high if found[(m, "fid")].has_interval else means[m] for m in methods]
    lows = [found[(m, "fid")].low if found[(m, "fid")].has_interval else means[m] for m in methods]
    median = float(np.median(list(means.values())))
    outliers = [m for m, value in means.items() if median > 0 and value > OUTLIER_FACTOR * median]
    if not outliers or min(lows) <= 0:
        ax.set_xlim(left=0, right=max(highs) * 1.1)
        return ""
    ax.set_xscale("log")
    ax.set_xlim(min(lows) / 1.25, max(highs) * 1.25)
    for method in outliers:
        ax.annotate(f"{method_label(method)}: {means[method]:.3g}", (means[method], 0), xycoords=("data", "axes fraction"),
                    xytext=(0, 4), textcoords="offset points", ha="center", fontsize=6, color="0.3")
    named = ", ".join(f"{method_label(m)} {means[m]:.3g}" for m in outliers)
    return (f" The {fid_name} axis is logarithmic because {named} is more than {OUTLIER_FACTOR:g}x the methods' median "
            f"({median:.3g}); on a linear axis the other methods would sit on top of each other.")


def tradeoff_figure(df: pd.DataFrame, grid: Grid) -> Figure:
    """Forgetting (UA, H) against retention (FID/FD on retained classes): one point per method, CI bars both ways,
    marker area proportional to RTE."""
    default = default_runs(df[df["class"].isin(grid.classes)])
    found = stats.by_key(stats.over_classes(default, ["ua", "entropy", "fid", "rte_min"]), ("method",))
    methods = [m for m in grid.methods if all((m, k) in found for k in ("ua", "entropy", "fid", "rte_min"))]
    points = [m for m in methods if m != "original"]
    fid_name = fid_label(df["fid_features"])
    largest = max([found[(m, "rte_min")].mean for m in points] + [1e-12])
    fig, axes = plt.subplots(1, 2, layout="constrained", figsize=(9.0, 3.8))
    palette = dict(zip(methods, sns.color_palette("tab10", len(methods))))
    note = ""
    for ax, metric, name in zip(axes, ("ua", "entropy"), ("UA (%) ↑", "H (entropy) ↑")):
        for method in points:
            x, y, rte = found[(method, "fid")], found[(method, metric)], found[(method, "rte_min")]
            color = palette[method]
            ax.errorbar([x.mean], [y.mean], xerr=yerr([x]), yerr=yerr([y]), fmt="none", ecolor=color, elinewidth=0.8,
                        capsize=2)
            ax.scatter([x.mean], [y.mean], s=25 + 350 * rte.mean / largest,
                       color="none" if method in REFERENCE_METHODS else color, edgecolors=color, linewidths=1.2,
                       zorder=3, alpha=0.8, label=method_label(method))
        note = _original_line(ax, found, methods, fid_name)
        ax.set_xlabel(f"{fid_name} on retained classes ↓")
        ax.set_ylabel(name)
        axis_note = _fd_axis(ax, found, methods, fid_name)
        ax.margins(y=0.1)
    # Legend markers of one size (the axes' markers scale with RTE).
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=palette[m], markersize=6,
                          markerfacecolor="none" if m in REFERENCE_METHODS else palette[m]) for m in points]
    fig.legend(handles, [method_label(m) for m in points], loc="outside right center", fontsize=7, frameon=False)
    n_classes = sorted({found[(m, "ua")].n for m in methods})
    title = "Forgetting vs retention"
    fig.suptitle(f"{title} — {grid.preset}/{grid.protocol}", fontsize=9)
    caption = (f"One point per method: mean over forget classes (each the mean of its seeds) of UA (left) or H "
               f"(right) against {fid_name} on retained classes; bars: 95% bootstrap CI over classes (n = "
               f"{', '.join(map(str, n_classes))}). Marker area grows with the mean RTE (largest: {largest:.2g} min). "
               f"Hollow marker: Retrain, the reference to match.{note} Best is the upper left.{axis_note}")
    return Figure("tradeoff", title, caption, fig)


def per_class_figure(df: pd.DataFrame, grid: Grid) -> Figure:
    """UA and FID/FD per forget class and method: mean over seeds with 95% CI error bars."""
    default = default_runs(df[df["class"].isin(grid.classes)])
    methods = [m for m in grid.methods if m in set(default["method"])]
    classes = [c for c in grid.classes if c in set(default["class"])]
    found = stats.by_key(stats.over_seeds(default, ["ua", "fid"]), ("method", "class"))
    fid_name = fid_label(df["fid_features"])
    fig, axes = plt.subplots(2, 1, layout="constrained", sharex=True,
                             figsize=(min(12.0, 0.09 * len(classes) * len(methods) + 3), 4.6))
    width = 0.8 / max(len(methods), 1)
    palette = sns.color_palette("tab10", len(methods))
    every = []
    for ax, metric, name in zip(axes, ("ua", "fid"), ("UA (%) ↑", f"{fid_name} ↓")):
        for index, (color, method) in enumerate(zip(palette, methods)):
            summaries = [found.get((method, c, metric)) for c in classes]
            every += summaries
            positions = np.arange(len(classes)) + (index - (len(methods) - 1) / 2) * width
            ax.bar(positions, [s.mean if s else 0.0 for s in summaries], width, color=color,
                   yerr=yerr(summaries), capsize=1, error_kw={"linewidth": 0.6}, label=method_label(method))
        ax.set_ylabel(name, fontsize=8)
        ax.set_ylim(bottom=0)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(methods), 9), fontsize=7, frameon=False)
    axes[1].set_xticks(range(len(classes)), [grid.class_names.get(c, str(c)) for c in classes], fontsize=7)
    axes[1].set_xlabel("forget class")
    title = "Per forget class"
    fig.suptitle(f"{title} — {grid.preset}/{grid.protocol}", fontsize=9)
    caption = (f"UA (top) and {fid_name} on retained classes (bottom) per forget class and method: mean over seeds "
               f"with its 95% bootstrap CI.{_single_note(every)}")
    return Figure("per_class", title, caption, fig)


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
