"""Records -> the paper's tables: Table 1 (H, UA per forget class), Table 2 (FID or FD, RTE, memory with mean and
standard deviation rows), preparation time, differences to a reference method paired by class and seed (SAFEMax
when it has records, or the one asked for), and for CIFAR-10 the paper's numbers beside this run's.

The tables show the methods and forget classes that have records, unless the report asks for others.

One table per (preset, protocol). A per-class cell is the mean over seeds with its sd and bootstrap 95% CI
(`reports.stats`); Table 2's μ row is over classes. Tables hold `Cell`s so that one structure renders as Markdown,
CSV, LaTeX (booktabs) and HTML. A (method, class) without a record is a missing cell that carries the `bench run`
command that fills it.
"""

from __future__ import annotations

import logging
import math
import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bench.cache import default_cache_dir
from bench.config import get_preset
from reports import stats
from reports.frame import DIRECTIONS, fid_label, runs_frame
from reports.render import Cell, Table, add_stats_note, mark_best, stat_cell

log = logging.getLogger(__name__)

# The methods the paper compares (its CIFAR-10 table); other tables show the methods that have records.
PAPER_METHODS = ("sa", "salun", "safemax")
METHOD_ORDER = ("original", "retrain", "sa", "salun", "erasediff", "sfron", "ga", "neggrad_plus", "safemax")
REFERENCE = "safemax"  # the method paired comparisons subtract when it has records and none is asked for
# References, not unlearning methods: shown, never ranked (never bold).
REFERENCE_METHODS = {"original", "retrain"}

# Reference data, not results: the published CIFAR-10 numbers of Spartalis et al., "Unleashing Uncertainty:
# Efficient Machine Unlearning for Generative AI" (SAFEMax), Table 1 (H, UA %) and Table 2 (FID, RTE minutes,
# GPU GB), classes 0-9 in order, and the mu / sigma rows as printed (arXiv, Spartalis et al. 2025).
# The printed SAFEMax FID sigma (0.32) does not follow from its per-class FIDs (sample std 1.48); kept as printed.
PAPER_CIFAR10 = {
    "sa": {"entropy": [1.062, 0.987, 0.948, 1.006, 0.926, 0.908, 0.993, 1.007, 0.900, 0.998],
           "ua": [98.60, 99.60, 1.80, 100.00, 100.00, 100.00, 100.00, 100.00, 100.00, 100.00],
           "fid": [14.29, 18.72, 18.55, 17.66, 17.67, 17.31, 17.71, 18.37, 18.56, 18.28],
           "rte_min": [174.32, 174.37, 174.38, 174.76, 174.87, 174.62, 173.75, 173.76, 174.26, 174.65],
           "memory_gib": [17.29] * 10,
           "mu": {"fid": 17.71, "rte_min": 174.37, "memory_gib": 17.29},
           "sigma": {"fid": 1.29, "rte_min": 0.38, "memory_gib": 0.00},
           "prepare_min": 1226.98},  # priors + FIM, reported apart from RTE in the text
    "salun": {"entropy": [0.051, 0.032, 0.084, 0.068, 0.085, 0.040, 0.045, 0.027, 0.045, 0.057],
              "ua": [99.00, 100.00, 98.80, 99.60, 99.60, 99.60, 100.00, 100.00, 99.20, 99.20],
              "fid": [14.11, 16.85, 18.24, 16.84, 16.64, 16.95, 16.78, 16.93, 18.72, 15.55],
              "rte_min": [11.56, 11.96, 11.97, 12.03, 12.03, 11.29, 12.00, 12.00, 11.99, 11.98],
              "memory_gib": [23.22, 23.23, 23.24, 23.23, 23.24, 23.23, 23.23, 23.23, 23.24, 23.24],
              "mu": {"fid": 16.76, "rte_min": 11.81, "memory_gib": 23.23},
              "sigma": {"fid": 1.27, "rte_min": 0.25, "memory_gib": 0.01}},
    "safemax": {"entropy": [1.132, 1.156, 1.156, 1.122, 1.128, 1.118, 1.144, 1.136, 1.152, 1.124],
                "ua": [100.00, 100.00, 0.00, 100.00, 100.00, 100.00, 100.00, 100.00, 100.00, 100.00],
                "fid": [13.11, 18.01, 17.07, 15.64, 16.89, 17.07, 16.80, 17.93, 18.20, 16.66],
                "rte_min": [5.82, 5.79, 5.80, 5.89, 5.80, 5.79, 5.79, 5.90, 5.80, 5.85],
                "memory_gib": [9.50] * 10,
                "mu": {"fid": 16.74, "rte_min": 5.83, "memory_gib": 9.50},
                "sigma": {"fid": 0.32, "rte_min": 0.04, "memory_gib": 0.00}},
}

METRIC_FORMAT = {"entropy": "{:.3f}", "ua": "{:.2f}", "fid": "{:.2f}", "memory_gib": "{:.2f}", "auc": "{:.2f}",
                 "steps_to_relearn": "{:.0f}", "budget": "{:.0f}", "train_tflops": "{:.3g}", "eval_tflops": "{:.3g}"}
PAIRED_METRICS = ["ua", "entropy", "fid", "retain_accuracy", "rte_min"]


def method_label(method: str) -> str:
    """The method class's `display_name` (plug-ins registered in this process included), else its name."""
    from methods import METHODS

    cls = METHODS.get(method)
    return getattr(cls, "display_name", "") or method


def load_recorded_methods(records: list[dict]) -> None:
    """Register the plug-in methods (`method-module:` extensions) the records were made with, so that tables name
    them by their class's `display_name`; one that cannot be imported here keeps its plain name (logged)."""
    from methods import METHODS, load_method

    for record in records:
        for item in (record.get("provenance") or {}).get("extensions") or ():
            kind, _, path = str(item).partition(":")
            if kind == "method-module" and record["method"] not in METHODS:
                try:
                    load_method(path)
                except ValueError as exc:
                    log.info("method %s keeps its plain name in the report: %s", record["method"], exc)


def fmt(metric: str, value: float | None, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if metric in ("rte_min", "prepare_min") and 0 < abs(value) < 0.1:
        return f"{value:+.2g}" if sign else f"{value:.2g}"  # tiny presets train for seconds: two significant digits
    spec = METRIC_FORMAT.get(metric, "{:.2f}")
    return (spec.replace("{:", "{:+") if sign else spec).format(value)


def spec_of(metric: str, mean: float) -> str:
    """The format of a statistic's sd and CI bounds: the mean's (two significant digits for sub-0.1 times)."""
    if metric in ("rte_min", "prepare_min") and 0 < abs(mean) < 0.1:
        return "{:.2g}"
    return METRIC_FORMAT.get(metric, "{:.2f}")


def summary_cell(metric: str, summary, sign: bool = False) -> Cell:
    """A statistic as a Cell: the mean formatted as the metric is, sd and CI alike."""
    if summary is None:
        return Cell(None, "–")
    return stat_cell(summary, lambda v: fmt(metric, v, sign), spec_of(metric, summary.mean))


# --- records -> DataFrame -------------------------------------------------------------------------------------

def records_frame(records: list[dict]) -> pd.DataFrame:
    return runs_frame(records) if records else pd.DataFrame()


def directions(df: pd.DataFrame) -> dict[str, bool]:
    return dict(DIRECTIONS)


def order_methods(methods) -> list[str]:
    known = [m for m in METHOD_ORDER if m in methods]
    return known + sorted(m for m in methods if m not in METHOD_ORDER)


# --- what should exist, and the commands that fill what does not ---------------------------------------------

def class_spec(classes: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    parts, run = [], []
    for value in sorted(classes):
        if run and value != run[-1] + 1:
            parts.append(run)
            run = []
        run.append(value)
    parts += [run] if run else []
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in parts)


def global_options(extensions) -> list[str]:
    """`bench.extensions` items -> the options that register them: --preset-file PATH, --method-module PKG.MOD:CLASS."""
    options = []
    for item in dict.fromkeys(extensions):
        kind, _, value = str(item).partition(":")
        if kind in ("preset-file", "method-module") and value:
            options.append(f"--{kind} {shlex.quote(value)}")
    return options


@dataclass
class Grid:
    """The (method, class, seed) runs one (preset, protocol) table should hold, and how to run the missing ones."""

    preset: str
    protocol: str
    methods: list[str]
    classes: list[int]
    class_names: dict[int, str]
    seeds: list[int]
    results_dir: str
    cache: str | None = None
    data_root: str | None = None
    # `bench.extensions` items the records were made with: the commands register them again
    extensions: tuple[str, ...] = ()
    commands: dict[tuple[str, int], str] = field(default_factory=dict)

    def command(self, method: str, classes: list[int], seeds: list[int]) -> str:
        parts = ["bench", *global_options(self.extensions), "run", f"--preset {self.preset}",
                 f"--protocol {self.protocol}", f"--methods {method}", f"--classes {class_spec(classes)}",
                 f"--seeds {','.join(map(str, seeds))}", f"--results {self.results_dir}"]
        if self.cache:
            parts.append(f"--cache {self.cache}")
        if self.data_root or self.preset == "cifar10":
            parts.append(f"--data-root {self.data_root or 'DATA_ROOT'}")
        return " ".join(parts)

    def fill_missing(self, present: set[tuple[str, int, int]]) -> list[str]:
        """Record, per missing (method, class), the command that runs it; returns all commands (grouped)."""
        commands = []
        for method in self.methods:
            by_seed = {s: [c for c in self.classes if (method, c, s) not in present] for s in self.seeds}
            groups: dict[tuple[int, ...], list[int]] = {}
            for seed, classes in by_seed.items():
                if classes:
                    groups.setdefault(tuple(classes), []).append(seed)
            for classes, seeds in groups.items():
                command = self.command(method, list(classes), seeds)
                commands.append(command)
                for forget_class in classes:
                    self.commands.setdefault((method, forget_class), command)
        return commands


def _cache_dir(df: pd.DataFrame, preset: str) -> str | None:
    """The --cache the records were made with (<cache>/<preset>/base.pt), unless it is the default one."""
    paths = [Path(p) for p in df["base_model_path"].dropna()]
    roots = Counter(str(p.parent.parent) for p in paths if p.parent.name == preset)
    if not roots:
        return None
    root = roots.most_common(1)[0][0]
    return None if Path(root) == default_cache_dir() else root


def make_grid(df: pd.DataFrame, preset: str, protocol: str, results_dir: str, data_root: str | None = None,
              methods: list[str] | None = None, classes: list[int] | None = None, extensions=()) -> Grid:
    """Expected methods (those with records, or `methods`), classes (those with records, or `classes`) and seeds
    (all found); `extensions` (`bench.extensions` items) go into the commands that fill missing cells."""
    try:
        num_classes = get_preset(preset).num_classes
    except ValueError:  # a preset this checkout does not know: trust the records
        num_classes = int(max(df["num_classes"].dropna().max() or 0, df["class"].max() + 1))
    names = dict(zip(df["class"], df["class_name"]))
    default = df[df["variant"] == "default"]
    seeds = sorted(set((default if len(default) else df)["seed"])) or [0]
    expected = order_methods(methods if methods else set(df["method"]))
    shown = [c for c in range(num_classes) if (c in classes if classes is not None else c in names)]
    grid = Grid(preset, protocol, expected, shown, {c: names.get(c, str(c)) for c in range(num_classes)}, seeds,
                results_dir, _cache_dir(df, preset), data_root, tuple(extensions))
    grid.fill_missing(set(zip(default["method"], default["class"], default["seed"])))
    return grid


def default_runs(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["variant"] == "default"]


def _cell(found: dict, grid: Grid, method: str, forget_class: int, metric: str, ran: set) -> Cell:
    if (method, forget_class) not in ran:
        return Cell(None, "missing", command=grid.commands.get((method, forget_class), "bench run"))
    summary = found.get((method, forget_class, metric))
    return summary_cell(metric, summary) if summary else Cell(None, "n/a")


def _class_label(grid: Grid, forget_class: int) -> str:
    name = grid.class_names.get(forget_class, str(forget_class))
    return str(forget_class) if name == str(forget_class) else f"{forget_class} {name}"


def _per_class_rows(table: Table, df: pd.DataFrame, grid: Grid, metrics: list[str]) -> None:
    """One row per forget class: each method's mean ± sd [CI] over seeds for each metric."""
    default = default_runs(df)
    found = stats.by_key(stats.over_seeds(default, metrics), ("method", "class"))
    ran = set(zip(default["method"], default["class"]))
    for forget_class in grid.classes:
        cells = [_cell(found, grid, m, forget_class, metric, ran) for m in grid.methods for metric in metrics]
        table.rows.append((_class_label(grid, forget_class), cells))


def _seeds_text(grid: Grid) -> str:
    return f"seed {grid.seeds[0]}" if len(grid.seeds) == 1 else f"seeds {class_spec(grid.seeds)}"


def table1(df: pd.DataFrame, grid: Grid) -> Table:
    table = Table(
        "table1", "Table 1. Evaluation of unlearning",
        f"H (mean entropy of the classifier on forget-class samples) and UA (100 - % classified as the forget class) "
        f"per forget class; preset {grid.preset}, protocol {grid.protocol}, over {_seeds_text(grid)}. "
        "Bold: best mean per row among unlearning methods (Original and Retrain are references).",
        "Class", [(method_label(m), [("H ↑", "entropy"), ("UA (%) ↑", "ua")]) for m in grid.methods],
        rank_groups=[m not in REFERENCE_METHODS for m in grid.methods])
    _per_class_rows(table, df, grid, ["entropy", "ua"])
    mark_best(table, directions(df))
    add_stats_note(table, "seeds")
    return table


def _memory_label(df: pd.DataFrame, method: str) -> str:
    kinds = set(df.loc[(df["method"] == method) & (df["variant"] == "default"), "memory_kind"])
    if kinds == {"RSS"}:
        return "RSS GiB ↓"
    return "GPU GiB ↓" if kinds == {"GPU"} else "GPU/RSS GiB ↓"


def fid_note(df: pd.DataFrame) -> str:
    features = set(df["fid_features"].dropna())
    if features == {"classifier"}:
        return ("FD (classifier features): the Fréchet distance between the evaluation classifier's features of "
                "generated and real retained-class images; not an FID (no Inception features), not comparable to one.")
    return "FID: Fréchet distance of Inception pool3 features." if features == {"inception"} else ""


def _class_stat_rows(table: Table, df: pd.DataFrame, grid: Grid, metrics: list[str]) -> None:
    """Table 2's μ row (over classes, CI over classes) and σ row (sd over classes of the per-class means)."""
    default = default_runs(df[df["class"].isin(grid.classes)])
    found = stats.by_key(stats.over_classes(default, metrics), ("method",))
    per_class = default.groupby(["method", "class"])[metrics].mean()
    mu, sigma, partial_any = [], [], False
    for method in grid.methods:
        classes = per_class.loc[method] if method in per_class.index.get_level_values(0) else None
        partial = classes is not None and 0 < len(classes) < len(grid.classes)
        partial_any = partial_any or partial
        for metric in metrics:
            cell = summary_cell(metric, found.get((method, metric)))
            if partial and cell.value is not None:
                cell.text += "*"
            mu.append(cell)
            value = classes[metric].std() if classes is not None else math.nan
            sigma.append(Cell(value, fmt(metric, value) + ("*" if partial else "")) if text_ok(value) else Cell(None, "–"))
    table.rules.add(len(table.rows))
    table.rows += [("μ", mu), ("σ", sigma)]
    if partial_any:
        table.notes.append("* over fewer classes than the table has (some runs missing).")
    table.notes.append("μ: mean over classes of the per-class means, its CI by bootstrap over classes (n = classes; "
                       "with one class, over its seeds). σ: sample sd over classes of the per-class means.")


def table2(df: pd.DataFrame, grid: Grid, reference: str | None = None) -> Table:
    metrics = ["fid", "rte_min", "train_tflops", "eval_tflops", "memory_gib"]
    label = fid_label(df["fid_features"])
    table = Table(
        "table2", "Table 2. Evaluation of retention and efficiency",
        f"{label} on retained-class samples, RTE (unlearning run, minutes, preparation excluded) and peak memory; "
        f"per forget class over {_seeds_text(grid)}, then μ and σ over the forget classes that have records; preset "
        f"{grid.preset}, protocol {grid.protocol}. GPU GiB: peak allocated GPU memory; RSS GiB "
        "(CPU runs, no GPU figure): peak resident memory of the whole process during the run, the Python "
        f"and torch runtime included (the original model's row shows that floor). {fid_note(df)} {FLOPS_NOTE} "
        "Bold: best mean per row among unlearning methods.",
        "Class", [(method_label(m), [(f"{label} ↓", "fid"), ("RTE (min) ↓", "rte_min"),
                                     ("train TFLOPs ↓", "train_tflops"), ("eval TFLOPs", "eval_tflops"),
                                     (_memory_label(df, m), "memory_gib")]) for m in grid.methods],
        rank_groups=[m not in REFERENCE_METHODS for m in grid.methods])
    _per_class_rows(table, df, grid, metrics)
    _class_stat_rows(table, df, grid, metrics)
    mark_best(table, directions(df))
    add_stats_note(table, "seeds")
    table.notes += [note for note in (cost_ratios(df, grid, reference), load_note(df)) if note]
    return table


FLOPS_NOTE = ("TFLOPs: floating-point operations counted by torch's FlopCounterMode (matrix products, convolutions, "
              "attention; 2 per multiply-add), of the unlearning loop (train; the preparation's are in the preparation "
              "table) and of the evaluation (sampling, classifier, FD features; sampling not counted where samples "
              "were cached: the original model's runs share their samples, so its eval count depends on which run "
              "drew them first). Unlike RTE the train counts do not depend on the machine or its load; n/a: a record "
              "made before FLOPs were counted.")


def _ratio(value: float, reference: float) -> str:
    if not (text_ok(value) and text_ok(reference)) or reference <= 0:
        return "n/a"
    return "no training" if value == 0 else f"{value / reference:.2g}×"


def cost_ratios(df: pd.DataFrame, grid: Grid, reference: str | None) -> str:
    """Each method's mean RTE and mean train FLOPs over its default runs, as ratios to the reference's."""
    default = default_runs(df[df["class"].isin(grid.classes)])
    means = default.groupby("method")[["rte_min", "train_tflops"]].mean()
    if reference not in means.index:
        return ""
    ref = means.loc[reference]
    parts = [f"{method_label(m)} {_ratio(means.loc[m, 'rte_min'], ref['rte_min'])} in time, "
             f"{_ratio(means.loc[m, 'train_tflops'], ref['train_tflops'])} in FLOPs"
             for m in grid.methods if m in means.index and m != reference]
    return (f"Cost relative to {method_label(reference)} (mean over its runs of RTE and of train FLOPs): "
            + "; ".join(parts) + ".") if parts else ""


LOAD_SPREAD = 2.0  # runs whose 1-minute load averages at start differ more than this factor (and by >= 1) were timed apart
STARVED_SHARE = 0.9  # a CPU run whose loop got less than this share of its threads' time was slowed by other work


def load_note(df: pd.DataFrame) -> str:
    """A warning when RTE mixes speed with load. Only runs with an unlearning loop count (the original model has no
    RTE to inflate). A CPU run is judged by what its loop got: under STARVED_SHARE of its threads' time
    (`cpu_share`) means other work slowed it. A machine whose cores are all in use by the sweep's own workers is
    not busy: `make run`'s two one-thread workers hold the 1-minute load of a 2-core machine at 2.0-2.2 while each
    gets 97.6-99.9% of its core (measured). Where the share is unknown (GPU runs, older records, resumed loops), the
    load average at the start stands in: runs timed under clearly different loads, or with more runnable processes
    than cores."""
    timed = df[df["rte_s"].fillna(0) > 0] if "rte_s" in df else df.iloc[:0]
    share = timed.get("cpu_share", pd.Series(math.nan, index=timed.index, dtype=float))
    starved, by_load = timed[share < STARVED_SHARE], timed[share.isna()]
    busy = (f" {len(starved)} of {len(timed)} timed runs got under {STARVED_SHARE:.0%} of their CPU threads' time "
            f"over the unlearning loop (as little as {starved['cpu_share'].min():.0%}): other work slowed them, and "
            f"their RTE is inflated." if len(starved) else "")
    loads = by_load["load_1m"].dropna() if "load_1m" in by_load else pd.Series(dtype=float)
    over = by_load[by_load["load_1m"] > by_load["cores"]] if "cores" in by_load else by_load.iloc[:0]
    busy += (f" {len(over)} of {len(loads)} runs started with more runnable processes than the machine's cores "
             f"(load above {int(over['cores'].min())}): their RTE is inflated." if len(over) else "")
    low, high = (float(loads.min()), float(loads.max())) if len(loads) else (0.0, 0.0)
    if len(loads) < 2 or high - low < 1.0 or high <= LOAD_SPREAD * max(low, 0.01):
        return ("Timed on a busy machine:" + busy + " Compare TFLOPs.") if busy else ""
    busiest = by_load.loc[by_load["load_1m"].idxmax()]
    return (f"Timed under different loads: the 1-minute load average at the runs' start ranged from {low:.2f} to "
            f"{high:.2f} (highest: {method_label(busiest['method'])}, class {busiest['class']}, seed "
            f"{busiest['seed']}).{busy} RTE comparisons between these runs mix speed with load; compare TFLOPs.")


def text_ok(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def prepare_table(df: pd.DataFrame, grid: Grid) -> Table:
    """Per method: each preparation stage, their total and the unlearning run (minutes, mean over runs)."""
    default = default_runs(df)
    stages = sorted({stage for found in default["prepare_stages"] for stage in found})
    columns = [(f"{stage} (min)", "prepare_min") for stage in stages] + [
        ("preparation (min)", "prepare_min"), ("preparation TFLOPs", "prepare_tflops"), ("RTE (min)", "rte_min"),
        ("total (min)", "rte_min"), ("runs", "n")]
    table = Table("prepare", "Preparation time", "Preparation stages (priors, Fisher information, saliency "
                  "masks...) are timed apart from the unlearning run (RTE), as the paper reports SA's FIM apart; their "
                  "TFLOPs are the sampler's forwards and the Fisher and saliency passes, one image each (n/a: "
                  "cached before preparations counted FLOPs; 0: nothing to prepare); "
                  "a stage is computed once per base model and reused, so its time repeats across runs. Mean over "
                  f"forget classes and seeds; preset {grid.preset}, protocol {grid.protocol}.",
                  "Method", [("", columns)])
    for method in grid.methods:
        runs = default[default["method"] == method]
        if runs.empty:
            command = grid.command(method, grid.classes, grid.seeds)
            table.rows.append((method_label(method), [Cell(None, "missing", command=command) for _ in columns]))
            continue
        cells = []
        for stage in stages:
            value = runs["prepare_stages"].map(lambda found, s=stage: found.get(s, math.nan)).mean() / 60
            cells.append(Cell(value, fmt("prepare_min", value)) if text_ok(value) else Cell(None, "–"))
        flops = runs["prepare_tflops"].mean()
        cells += [summary_cell("prepare_min", stats.summarize(runs["prepare_min"])),
                  Cell(flops, f"{flops:.3g}") if text_ok(flops) else Cell(None, "n/a"),
                  summary_cell("rte_min", stats.summarize(runs["rte_min"])),
                  summary_cell("rte_min", stats.summarize(runs["prepare_min"] + runs["rte_min"])),
                  Cell(float(len(runs)), str(len(runs)))]
        table.rows.append((method_label(method), cells))
    add_stats_note(table, "runs (classes × seeds)")
    return table


def pick_reference(methods, asked: str | None = None) -> str | None:
    """The method paired differences subtract: `asked`, else SAFEMax when it has records, else the first method in
    table order; None when `asked` has no records here (or there are none)."""
    found = order_methods(set(methods))
    if asked:
        return asked if asked in found else None
    return REFERENCE if REFERENCE in found else (found[0] if found else None)


def paired_table(df: pd.DataFrame, grid: Grid, reference: str = REFERENCE) -> Table | None:
    """Per method: the difference method - reference of each metric, paired by class and seed; a row over all
    classes (CI over classes of the per-class mean differences), then a row per class (CI over seeds)."""
    default = default_runs(df[df["class"].isin(grid.classes)])
    if reference not in set(default["method"]):
        return None
    diffs = stats.paired_differences(default, PAIRED_METRICS, reference)
    if diffs.empty:
        return None
    found = stats.by_key(diffs.assign(**{"class": diffs["class"].astype(str)}), ("method", "class"))
    label = fid_label(df["fid_features"])
    names = {"ua": "Δ UA (%)", "entropy": "Δ H", "fid": f"Δ {label}", "retain_accuracy": "Δ retained acc. (%)",
             "rte_min": "Δ RTE (min)"}
    ref = method_label(reference)
    table = Table("paired", f"Differences to {ref}",
                  f"Each method minus {ref} on runs that share forget class and seed (preset {grid.preset}, protocol "
                  f"{grid.protocol}). 'all classes': mean over classes of the per-class mean differences, CI by "
                  "bootstrap over classes (n = classes); per class: CI by bootstrap over the paired seeds (n = "
                  f"pairs). A CI that excludes 0 marks a difference larger than the seed-to-seed spread. {label}: "
                  "lower is better; UA, H, retained accuracy: higher is better; RTE: lower is better.",
                  "Method / class", [("", [(names[m], m) for m in PAIRED_METRICS])])
    for method in [m for m in grid.methods if m != reference and m in set(diffs["method"])]:
        table.rules.add(len(table.rows))
        keys = ["all"] + [str(c) for c in grid.classes]
        for key in keys:
            if (method, key, "ua") not in found:
                continue
            label_row = f"{method_label(method)}: all classes" if key == "all" else f"{method_label(method)}: class {key}"
            table.rows.append((label_row, [summary_cell(m, found.get((method, key, m)), sign=True)
                                           for m in PAIRED_METRICS]))
    table.rules.discard(0)
    add_stats_note(table, "pairs or classes")
    return table


def paper_table(df: pd.DataFrame, grid: Grid) -> Table:
    """The paper's CIFAR-10 numbers beside this run's, method by method (means over the classes run)."""
    metrics = ["entropy", "ua", "fid", "rte_min", "memory_gib"]
    default = default_runs(df)
    found = stats.by_key(stats.over_classes(default, metrics), ("method",))
    per_class = default.groupby(["method", "class"])[metrics].mean()
    label = fid_label(df["fid_features"])
    paper_name = "" if label == "FID" else " (paper: FID)"
    quantities = [("H (mean over classes)", "entropy"), ("UA % (mean over classes)", "ua"),
                  (f"{label} μ{paper_name}", "fid"), (f"{label} σ{paper_name}", "fid_sigma"), ("RTE min μ", "rte_min"),
                  ("peak memory GiB μ (paper: GPU GB)", "memory_gib")]
    table = Table("paper", "Paper vs this run (CIFAR-10)",
                  "Paper: Spartalis et al., Tables 1-2 (all 10 classes). This run: mean ± sd [95% CI] over the "
                  f"classes that have records (protocol {grid.protocol}), CI by bootstrap over classes; n = classes.",
                  "Quantity", [(method_label(m), [("paper", "value"), ("this run", "value")]) for m in PAPER_METHODS])
    for row_label, key in quantities:
        cells = []
        for method in PAPER_METHODS:
            paper = PAPER_CIFAR10[method]
            if key == "fid_sigma":
                published = paper["sigma"]["fid"]
            else:
                published = paper["mu"][key] if key in paper["mu"] else sum(paper[key]) / len(paper[key])
            cells.append(Cell(published, fmt(key, published)))
            if method not in per_class.index.get_level_values(0):
                cells.append(Cell(None, "missing", command=grid.command(method, sorted(grid.class_names), grid.seeds)))
            elif key == "fid_sigma":
                ours = per_class.loc[method]["fid"]
                value = ours.std()
                cells.append(Cell(value, f"{fmt('fid', value)} (n={len(ours)})") if text_ok(value) else Cell(None, "n/a"))
            else:
                cells.append(summary_cell(key, found.get((method, key))))
        table.rows.append((row_label, cells))
    add_stats_note(table, "classes")
    return table


def build_tables(df: pd.DataFrame, grid: Grid, reference: str | None = None) -> list[Table]:
    """Tables 1-2, preparation, differences to `reference` (see `pick_reference`) and, for cifar10, the paper's."""
    reference = pick_reference(set(default_runs(df)["method"]) & set(grid.methods), reference)
    tables = [table1(df, grid), table2(df, grid, reference), prepare_table(df, grid)]
    paired = paired_table(df, grid, reference) if reference else None
    if paired is not None:
        tables.append(paired)
    if grid.preset == "cifar10":
        tables.append(paper_table(df, grid))
    return tables
