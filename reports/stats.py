"""Statistics over seeds and classes: mean, standard deviation and a bootstrap 95% confidence interval.

Pure functions of DataFrames (`reports.frame.runs_frame` rows). The units a statistic resamples are stated with it:
- per (method, class) cell: the runs' seeds;
- over classes (Table 2's μ rows, per-method summaries): each class's mean over its seeds is one unit, and the
  bootstrap resamples classes (with a single class, its seeds). n says how many classes and runs went in;
- paired with a reference method (the report's `--reference`, SAFEMax by default): a pair shares class and seed;
  the difference method - reference is resampled over seeds per class, over classes (of per-class mean
  differences) per method.
The interval is the percentile bootstrap (scipy.stats.bootstrap, 9,999 resamples, seeded): with n values it never
leaves their range, so with 2-3 seeds it is narrow and should be read as such. With n = 1 there is no interval and
no standard deviation (NaN); tables show "n=1" instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import bootstrap

CONFIDENCE = 0.95
RESAMPLES = 9999
SEED = 0
STAT_COLUMNS = ["n", "mean", "std", "low", "high"]


@dataclass(frozen=True)
class Summary:
    """n values: their mean, sample standard deviation (ddof 1) and bootstrap CI of the mean (NaN when n < 2)."""

    n: int
    mean: float
    std: float
    low: float
    high: float

    @property
    def has_interval(self) -> bool:
        return self.n >= 2 and not math.isnan(self.low)


def bootstrap_ci(values, *, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                 seed: int = SEED) -> tuple[float, float]:
    """Percentile-bootstrap CI of the mean of `values` (NaNs dropped); (nan, nan) with fewer than 2 values."""
    array = np.asarray(values, dtype=float)
    array = array[~np.isnan(array)]
    if len(array) < 2:
        return math.nan, math.nan
    if np.ptp(array) == 0:  # every resample has the same mean
        return float(array[0]), float(array[0])
    options = {"confidence_level": confidence, "n_resamples": resamples, "method": "percentile", "vectorized": True}
    try:
        result = bootstrap((array,), np.mean, rng=np.random.default_rng(seed), **options)
    except TypeError:  # SciPy before 1.15 names the generator random_state
        result = bootstrap((array,), np.mean, random_state=np.random.default_rng(seed), **options)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def summarize(values, *, seed: int = SEED) -> Summary:
    """Mean, standard deviation and bootstrap CI of `values` (NaNs dropped)."""
    array = np.asarray(values, dtype=float)
    array = array[~np.isnan(array)]
    if len(array) == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean, (low, high) = float(array.mean()), bootstrap_ci(array, seed=seed)
    if not math.isnan(low):  # the interval holds the mean: nine equal values sum to a mean one rounding above them
        low, high = min(low, mean), max(high, mean)
    std = float(np.std(array, ddof=1)) if len(array) > 1 else math.nan
    return Summary(len(array), mean, std, low, high)


def _rows(groups, metrics: list[str]) -> list[dict]:
    rows = []
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        for metric in metrics:
            rows.append({"_key": key, "metric": metric, **vars(summarize(group[metric]))})
    return rows


def _frame(rows: list[dict], keys: list[str], extra: list[str] = ()) -> pd.DataFrame:
    if not rows:
        return pd.DataFrame(columns=[*keys, "metric", *STAT_COLUMNS, *extra])
    frame = pd.DataFrame(rows)
    frame[keys] = pd.DataFrame(frame.pop("_key").tolist(), index=frame.index)
    return frame[[*keys, "metric", *STAT_COLUMNS, *extra]]


def over_seeds(df: pd.DataFrame, metrics: list[str], keys: tuple[str, ...] = ("method", "class")) -> pd.DataFrame:
    """One row per (keys..., metric): n, mean, std, low, high over the rows (seeds) of each group."""
    keys = list(keys)
    return _frame(_rows(df.groupby(keys, sort=False), metrics), keys)


def over_classes(df: pd.DataFrame, metrics: list[str], keys: tuple[str, ...] = ("method",)) -> pd.DataFrame:
    """One row per (keys..., metric) over classes: each class's seed mean is one value; with one class, its seeds.

    Extra columns: `classes` (how many) and `runs` (rows that went in).
    """
    keys, rows = list(keys), []
    for key, group in df.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        per_class = group.groupby("class")[metrics].mean()
        for metric in metrics:
            units = per_class[metric] if len(per_class) > 1 else group[metric]
            rows.append({"_key": key, "metric": metric, **vars(summarize(units)),
                         "classes": int(per_class[metric].notna().sum()), "runs": int(group[metric].notna().sum())})
    return _frame(rows, keys, ["classes", "runs"])


def by_key(stats: pd.DataFrame, keys: tuple[str, ...]) -> dict[tuple, Summary]:
    """An `over_*` frame as {(key values..., metric): Summary} for cell-by-cell lookups."""
    found = {}
    for values in stats.to_dict("records"):
        if values["n"]:
            found[(*(values[k] for k in keys), values["metric"])] = Summary(
                int(values["n"]), *(float(values[c]) for c in ("mean", "std", "low", "high")))
    return found


def pairs(df: pd.DataFrame, metrics: list[str], reference: str = "safemax") -> pd.DataFrame:
    """Each run of another method beside the reference's run of the same class and seed: method - reference.

    One row per pair: method, class, seed and, per metric, the difference.
    """
    ref = df[df["method"] == reference][["class", "seed", *metrics]]
    others = df[df["method"] != reference][["method", "class", "seed", *metrics]]
    merged = others.merge(ref, on=["class", "seed"], suffixes=("", "_ref"))
    diffs = merged[["method", "class", "seed"]].copy()
    for metric in metrics:
        diffs[metric] = merged[metric] - merged[f"{metric}_ref"]
    return diffs


def paired_differences(df: pd.DataFrame, metrics: list[str], reference: str = "safemax") -> pd.DataFrame:
    """Per (method, class) the difference method - reference over paired seeds, and per method (class "all")
    over classes of the per-class mean differences (with one class: over its seeds)."""
    diffs = pairs(df, metrics, reference)
    if diffs.empty:
        return _frame([], ["method", "class"], ["classes", "runs"])
    per_class = over_seeds(diffs, metrics).assign(classes=1)
    per_class["runs"] = per_class["n"]
    overall = over_classes(diffs, metrics).assign(**{"class": "all"})
    return pd.concat([overall, per_class], ignore_index=True)[["method", "class", "metric", *STAT_COLUMNS,
                                                               "classes", "runs"]]


def curve_band(curves: pd.DataFrame, value: str, keys: tuple[str, ...] = ("method",)) -> pd.DataFrame:
    """Per (keys..., step): mean and CI over classes (of seed means) of `value`; `curves` has a `step` column."""
    stats = over_classes(curves.rename(columns={value: "_value"}), ["_value"], (*keys, "step"))
    return stats.drop(columns="metric").sort_values([*keys, "step"]).reset_index(drop=True)
