"""The plain-text summary table printed at the end of `bench run`, and the DataFrame behind it."""

from __future__ import annotations

import pandas as pd

from reports.frame import fid_label, runs_frame

COLUMNS = {
    "ua": "UA %", "entropy": "H", "fid": "FID", "retain_accuracy": "RA %", "rte_s": "RTE s",
    "prepare_total_s": "prep s", "peak_mem": "peak mem",
}


def summary_text(records: list[dict]) -> str:
    """Per-run rows, then the mean of each (method, variant) over classes and seeds."""
    if not records:
        return "(no records)"
    df = runs_frame(records).sort_values(["preset", "protocol", "method", "variant", "class", "seed"])
    # The small presets' Fréchet distance uses classifier features: never shown as a bare "FID".
    columns = {**COLUMNS, "fid": fid_label(df["fid_features"])}
    runs = df[["method", "variant", "class", "seed", *columns]].rename(columns=columns)
    numeric = ["ua", "entropy", "fid", "retain_accuracy", "rte_s", "prepare_total_s"]
    means = df.groupby(["method", "variant"], sort=False)[numeric].mean().reset_index().rename(columns=columns)
    with pd.option_context("display.width", 200, "display.max_rows", 500, "display.float_format", "{:.3f}".format):
        return (f"{runs.to_string(index=False)}\n\nMean over classes and seeds:\n"
                f"{means.to_string(index=False)}\n\n{efficiency_text(df)}")


def efficiency(df: pd.DataFrame, reference: str = "safemax") -> pd.DataFrame:
    """Per (method, variant): mean RTE and unlearning TFLOPs, the loop's GFLOP/s, their ratios to the reference
    method's, preparation time, peak memory. A ratio in FLOPs holds on any machine; one in seconds only under the same
    load."""
    grouped = df.groupby(["method", "variant"], sort=False)
    table = grouped.agg(rte_s=("rte_s", "mean"), train_tflops=("train_tflops", "mean"),
                        prepare_s=("prepare_total_s", "mean"), peak_gpu_gib=("peak_gpu_gib", "max"),
                        peak_rss_mib=("peak_rss_mib", "max")).reset_index()
    # The loop's achieved rate on the machine that ran it (`bench perf` prints that machine's single-core peak beside);
    # none for a method without a loop.
    table["train_gflop_s"] = (table["train_tflops"] * 1e3 / table["rte_s"]).where(table["rte_s"] > 0)
    base = table[(table.method == reference) & (table.variant == "default")]
    for column, name in (("rte_s", "rte_vs_"), ("train_tflops", "tflops_vs_")):
        value = float(base[column].iloc[0]) if len(base) else float("nan")
        table[name + reference] = table[column] / value if value > 0 else None
    return table


def efficiency_text(df: pd.DataFrame) -> str:
    table = efficiency(df).dropna(axis=1, how="all")
    note = ("RTE: wall time of the unlearning loop; train_tflops: the FLOPs it executed (ratios in FLOPs hold on any "
            "machine); train_gflop_s: their rate on this machine (`bench perf` measures its peak); prep: priors, Fisher, "
            "masks (computed once, reused by later runs); peak RSS is the whole worker process.")
    return f"Efficiency (mean over runs):\n{table.to_string(index=False)}\n{note}"
