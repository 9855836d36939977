"""Records -> one pandas DataFrame, one row per run: the one reader every table, figure and summary uses.

Records are schema-checked when read (`bench.records.read_record`), so required fields are indexed directly;
only fields a record may lack (older schemas, CPU runs without GPU memory) have defaults here.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from bench.metrics import HIGHER_IS_BETTER

# Directions of the derived columns, beside the metrics' own.
DIRECTIONS = {**HIGHER_IS_BETTER, "rte_min": False, "memory_gib": False, "prepare_min": False, "std": False}


def _prepare_stages(timings: dict) -> dict[str, float]:
    stages = timings.get("prepare_s")
    if isinstance(stages, dict):
        return {str(k): float(v) for k, v in stages.items() if v is not None}
    return {"prepare": float(stages)} if stages else {}


def _row(record: dict) -> dict:
    metrics, timings, memory = record["metrics"], record["timings"], record["memory"]
    gpu = memory.get("peak_gpu_allocated_gib")
    stages = _prepare_stages(timings)
    return {
        "preset": record["preset"], "protocol": record["protocol"].get("name"), "method": record["method"],
        "variant": record["variant"], "class": record["forget_class"], "seed": record["seed"],
        "ua": metrics["ua"], "entropy": metrics["entropy"], "forget_prob": metrics.get("forget_prob"),
        "fid": metrics["fid"], "retain_accuracy": metrics.get("retain_accuracy"),
        "noise_top_class": (metrics.get("noise_prediction") or {}).get("top_class"),
        "rte_s": timings.get("rte_s"), "prepare_total_s": timings.get("prepare_total_s"),
        "peak_mem": f"{gpu:.2f} GiB" if gpu is not None else f"{memory.get('peak_process_mib', 0):.0f} MiB RSS",
        "peak_gpu_gib": gpu, "peak_rss_mib": memory.get("peak_process_mib"),
        "class_name": str(record.get("forget_class_name", record["forget_class"])),
        "num_classes": len(metrics.get("forget_histogram") or []) or None,
        "prepare_stages": stages, "prepare_min": sum(stages.values()) / 60,
        "rte_min": (timings.get("rte_s") or 0.0) / 60,
        "memory_gib": gpu if gpu is not None else memory.get("peak_process_mib", math.nan) / 1024,
        "memory_kind": "GPU" if gpu is not None else "RSS",
        "noise_histogram": (metrics.get("noise_prediction") or {}).get("histogram"),
        "hyperparameters": record["hyperparameters"],
        "protocol_overrides": record["overrides"].get("protocol", {}),
        "samples": str(Path(record.get("path", ".")).parent / record.get("artifacts", {}).get("samples", "samples.png")),
        "device": record["provenance"].get("device"),
        "fid_features": record["protocol"].get("fid_features"),
        "base_model_path": record["base_model"].get("path"), "base_model_id": record["base_model"].get("id"),
        "classifier_id": record["classifier"].get("id"),
    }


def runs_frame(records: list[dict]) -> pd.DataFrame:
    """One row per record: identity, headline metrics, timings, memory, and what tables and figures need."""
    return pd.DataFrame([_row(record) for record in records])
