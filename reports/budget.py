"""Budget curves (issue 25 item 4): where the records hold a sweep of one numeric hyperparameter of a method
(`--set METHOD.iterations=a,b,c`, or any other numeric field), UA, H, FD and retained accuracy against it, and a
"matched compute" table: each method at the budget whose unlearning FLOPs are closest to SAFEMax's default run's.

A sweep is found from the records alone (their resolved `hyperparameters`): per method, the numeric fields that take
several values. The axis is `iterations` when it varies, else the one varying numeric field. Fields that follow the
axis (one value per axis value: EraseDiff's `outer_steps` and the EMA decay that the preset's scaling derives from
the iterations, `scripts/budget_study.py`) are part of the point; any other varying field (GA's `alpha` swept at
every budget) splits the runs into one curve per value. Runs with other protocol overrides are left out.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from reports import stats
from reports.figures import Figure, _xscale, yerr
from reports.frame import fid_label
from reports.render import Cell, Table, add_stats_note
from reports.tables import REFERENCE, Grid, default_runs, method_label, order_methods, summary_cell

METRICS = [("ua", "UA (%) ↑"), ("entropy", "H ↑"), ("fid", "{fid} on retained classes ↓"),
           ("retain_accuracy", "retained accuracy (%) ↑")]


@dataclass
class Curve:
    """One method's runs along one swept field: `runs` has `_x` (the field's value) and one row per run."""

    method: str
    axis: str
    label: str  # the method, plus the fixed value of any other swept field ("GA (alpha=0.1)")
    runs: pd.DataFrame


def _numeric(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


def _key(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _follows(runs: pd.DataFrame, field: str, axis: str) -> bool:
    """True when `field` takes one value per value of `axis` (it is derived from it)."""
    pairs = {(_key(hp.get(axis)), _key(hp.get(field))) for hp in runs["hyperparameters"]}
    return len(pairs) == len({axis_value for axis_value, _ in pairs})


def _varying(runs: pd.DataFrame) -> list[str]:
    keys = sorted({k for hp in runs["hyperparameters"] for k in hp})
    return [k for k in keys if len({_key(hp.get(k)) for hp in runs["hyperparameters"]}) > 1]


def find_curves(df: pd.DataFrame) -> list[Curve]:
    """Every (method, other swept values) curve with at least two values of a numeric swept field."""
    curves = []
    for method in order_methods(set(df["method"])):
        runs = df[df["method"] == method]
        plain = runs["protocol_overrides"].map(lambda found: not found)
        runs = runs[plain] if plain.any() else runs[runs["protocol_overrides"].map(_key) ==
                                                    runs["protocol_overrides"].map(_key).mode().iloc[0]]
        varying = _varying(runs)
        numeric = [k for k in varying if all(_numeric(hp.get(k)) for hp in runs["hyperparameters"])]
        if not numeric:
            continue
        axis = "iterations" if "iterations" in numeric else min(
            numeric, key=lambda k: (sum(not _follows(runs, f, k) for f in varying if f != k), k))
        others = [f for f in varying if f != axis and not _follows(runs, f, axis)]
        series = runs["hyperparameters"].map(lambda hp, others=others: tuple((f, hp.get(f)) for f in others))
        for values, group in runs.groupby(series, sort=True):
            x = group["hyperparameters"].map(lambda hp, axis=axis: hp.get(axis))
            if x.nunique() < 2:
                continue
            label = method_label(method) + (f" ({', '.join(f'{f}={v}' for f, v in values)})" if values else "")
            curves.append(Curve(method, axis, label, group.assign(_x=x)))
    return curves


def _points(curve: Curve) -> pd.DataFrame:
    """Per axis value: its mean train TFLOPs, the runs' n and a Summary (over runs: classes x seeds) per metric."""
    rows = []
    for x, group in curve.runs.groupby("_x", sort=True):
        row = {"x": x, "tflops": group["train_tflops"].mean(), "n": len(group)}
        row.update({metric: stats.summarize(group[metric]) for metric, _ in METRICS})
        rows.append(row)
    return pd.DataFrame(rows)


def reference_tflops(df: pd.DataFrame) -> float | None:
    """The mean train TFLOPs of SAFEMax's default runs, or None where there are none (or none counted)."""
    runs = default_runs(df)
    value = runs.loc[runs["method"] == REFERENCE, "train_tflops"].mean()
    return float(value) if _numeric(value) and value > 0 else None


def _by_flops(curves: list[Curve]) -> bool:
    """Curves of iterations whose every run counted its FLOPs are drawn against FLOPs (comparable across methods)."""
    return all(c.axis == "iterations" and c.runs["train_tflops"].gt(0).all() for c in curves)


def curve_styles(curves: list[Curve]) -> dict[str, tuple]:
    """(colour, line style, marker) per curve: one colour per method, and a method's curves at different values of
    another swept field (GA's alpha) told apart by line and marker, so no two curves look alike."""
    methods = list(dict.fromkeys(c.method for c in curves))
    colours = dict(zip(methods, sns.color_palette("tab10" if len(methods) <= 10 else "husl", len(methods))))
    lines, markers, seen, styles = ["-", "--", ":", "-."], ["o", "s", "^", "D", "v", "P"], {}, {}
    for curve in curves:
        index = seen[curve.method] = seen.get(curve.method, -1) + 1
        styles[curve.label] = (colours[curve.method], lines[index % len(lines)], markers[index % len(markers)])
    return styles


def budget_figure(df: pd.DataFrame, curves: list[Curve], grid: Grid) -> Figure:
    """UA, H, FD and retained accuracy against the budget, one line per curve, 95% bootstrap CI over runs."""
    flops = _by_flops(curves)
    target = reference_tflops(df)
    fid_name = fid_label(df["fid_features"])
    fig, axes = plt.subplots(2, 2, layout="constrained", figsize=(10.0, 6.6))
    styles = curve_styles(curves)
    every_x = []
    for ax, (metric, name) in zip(axes.flat, METRICS):
        for curve in curves:
            points = _points(curve)
            xs = list(points["tflops"] if flops else points["x"])
            every_x += xs
            found = list(points[metric])
            color, linestyle, marker = styles[curve.label]
            ax.errorbar(xs, [s.mean for s in found], yerr=yerr(found), marker=marker, capsize=2, markersize=4,
                        color=color, linestyle=linestyle, label=curve.label, linewidth=1)
            if metric == "ua" and flops:
                for x, s, iterations in zip(xs, found, points["x"]):
                    ax.annotate(f"{iterations:g}", (x, s.mean), xytext=(2, 3), textcoords="offset points", fontsize=5,
                                color=styles[curve.label][0])
        if flops and target:
            ax.axvline(target, color="0.3", linestyle=":", linewidth=1)
        ax.set_ylabel(name.format(fid=fid_name), fontsize=8)
        ax.set_xlabel("unlearning TFLOPs" if flops else _axis_name(curves))
    for ax in axes.flat:  # symlog where the values span decades (zero stays on the axis)
        _xscale(ax, [float(x) for x in every_x if _numeric(x)])
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=7, frameon=False)
    title = "Budget curves" if _axis_name(curves) == "iterations" else f"Curves against {_axis_name(curves)}"
    fig.suptitle(f"{title} — {grid.preset}/{grid.protocol}", fontsize=9)
    runs_n = sorted({int(n) for c in curves for n in _points(c)["n"]})
    axis_text = ("unlearning FLOPs (torch's FlopCounterMode; each point's iterations written beside it on the UA "
                 f"panel){'; dotted line: ' + method_label(REFERENCE) + chr(39) + 's default run' if target else ''}"
                 if flops else f"the swept field ({_axis_name(curves)})")
    caption = (f"Each method's metrics against {axis_text}, from the records of a `--set METHOD.FIELD=a,b,c` sweep "
               "(fields the preset derives from the iterations, like EraseDiff's outer steps and the EMA decay, move "
               "with them; another swept field gives one line per value). Mean over the runs at each value (forget "
               f"classes x seeds, n = {', '.join(map(str, runs_n))}) with its 95% bootstrap CI over runs.")
    axis = _axis_name(curves)
    return Figure("budget_curves" if axis == "iterations" else f"budget_curves_{axis}", title, caption, fig)


def _axis_name(curves: list[Curve]) -> str:
    return ", ".join(sorted({c.axis for c in curves}))


def matched_table(df: pd.DataFrame, curves: list[Curve], grid: Grid) -> Table | None:
    """Per curve (and per method with default runs only): the point whose train FLOPs are nearest SAFEMax's default
    run's (in ratio), with its metrics; None without SAFEMax default runs or FLOPs."""
    target = reference_tflops(df)
    if target is None:
        return None
    label = fid_label(df["fid_features"])
    columns = [("iterations", "iterations"), ("train TFLOPs", "train_tflops"), (f"× {method_label(REFERENCE)}", "x"),
               ("UA (%) ↑", "ua"), ("H ↑", "entropy"), (f"{label} ↓", "fid"), ("retained acc. (%) ↑", "retain_accuracy")]
    table = Table("matched_compute", "Matched compute",
                  f"Each method at the budget on its curve whose unlearning FLOPs are nearest (in ratio) to "
                  f"{method_label(REFERENCE)}'s default run ({target:.3g} TFLOPs); a method without a curve at its "
                  f"default budget. Preset {grid.preset}, protocol {grid.protocol}. Metrics over the runs at that "
                  "budget (forget classes x seeds). FLOPs: the unlearning loop only (preparation not counted).",
                  "Method", [("", columns)])
    swept = {c.method for c in curves}
    rows = [(c.label, c.runs) for c in curves]
    default = default_runs(df[df["class"].isin(grid.classes)])
    rows += [(method_label(m), default[default["method"] == m].assign(
        _x=default.loc[default["method"] == m, "hyperparameters"].map(lambda hp: hp.get("iterations"))))
        for m in grid.methods if m not in swept and m in set(default["method"])]
    for row_label, runs in rows:
        table.rows.append((row_label, _matched_cells(runs, target)))
    add_stats_note(table, "runs (classes × seeds)")
    return table


def _matched_cells(runs: pd.DataFrame, target: float) -> list[Cell]:
    means = runs.groupby("_x")["train_tflops"].mean()
    counted = means[means > 0]
    if counted.empty:  # no training (original) or FLOPs not counted
        chosen = means.index[0]
        flops = float(means.iloc[0])
    else:
        chosen = min(counted.index, key=lambda x: abs(math.log(counted[x] / target)))
        flops = float(counted[chosen])
    at = runs[runs["_x"] == chosen]
    iterations = at["hyperparameters"].map(lambda hp: hp.get("iterations")).iloc[0]
    cells = [Cell(float(iterations), f"{iterations:g}") if _numeric(iterations) else Cell(None, "–"),
             Cell(flops, f"{flops:.3g}") if _numeric(flops) else Cell(None, "n/a"),
             Cell(flops / target, f"{flops / target:.2g}×") if _numeric(flops) and flops > 0
             else Cell(None, "no training" if flops == 0 else "n/a")]
    return cells + [summary_cell(metric, stats.summarize(at[metric])) for metric, _ in METRICS]


def budget_outputs(df: pd.DataFrame, grid: Grid) -> tuple[list[Table], list[Figure]]:
    """The budget figure and matched-compute table of one (preset, protocol), or nothing where no record holds a
    sweep of a numeric field."""
    runs = df[df["class"].isin(grid.classes) & df["method"].isin(grid.methods)]
    curves = find_curves(runs) if len(runs) else []
    if not curves:
        return [], []
    budgets = [c for c in curves if c.axis == "iterations"]  # matched compute compares budgets, not other fields
    table = matched_table(runs, budgets, grid) if budgets else None
    axes = sorted({c.axis for c in curves}, key=lambda axis: (axis != "iterations", axis))
    return ([table] if table is not None else []), [budget_figure(runs, [c for c in curves if c.axis == axis], grid)
                                                    for axis in axes]

