"""Records -> one pandas DataFrame, one row per run: the one reader every table, figure and summary uses; and
the tidy form of the same runs (`tidy_frame`: scalars only, one column per metric and hyperparameter) that
`bench report` writes as runs.csv and runs.jsonl.

Records are schema-checked when read (`bench.records.read_record`), so required fields are indexed directly;
only fields a record may lack (older schemas, CPU runs without GPU memory) have defaults here.
"""

from __future__ import annotations

import json
import math
import re
from numbers import Number
from pathlib import Path

import pandas as pd

from bench.metrics import HIGHER_IS_BETTER

# Directions of the derived columns, beside the metrics' own.
DIRECTIONS = {**HIGHER_IS_BETTER, "rte_min": False, "memory_gib": False, "prepare_min": False, "std": False,
              "train_tflops": False, "eval_tflops": False,
              "prepare_tflops": False}
# The Fréchet distance of the small presets uses the evaluation classifier's features: not an FID, never called one.
FID_LABELS = {"classifier": "FD (classifier features)", "inception": "FID"}


def fid_label(features) -> str:
    """The name of the records' `fid` metric for a set of `protocol.fid_features` values: 'FID' for Inception
    features only, 'FD (classifier features)' for the evaluation classifier's."""
    found = {str(f) for f in features if isinstance(f, str)}
    if len(found) == 1:
        return FID_LABELS.get(found.pop(), "FD (unknown features)")
    return " / ".join(FID_LABELS.get(f, f) for f in sorted(found)) if found else "FD (unknown features)"


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
        "fid_features": record["protocol"].get("fid_features", record["classifier"].get("fid_features")),
        "base_model_path": record["base_model"].get("path"), "base_model_id": record["base_model"].get("id"),
        "classifier_id": record["classifier"].get("id"),
        **_cost(timings),
        "cores": record["provenance"].get("cores") or math.nan,  # usable cores where the run ran (newer records)
        "cpu_share": cpu_share(timings, record["provenance"].get("device")),
    }


# `bench.device.device_name` on a CPU: 'cpu (AMD EPYC 9654 96-Core Processor, 1 thread)'
CPU_THREADS = re.compile(r"^cpu \((?:.*, )?(\d+) threads?\)$")


def cpu_share(timings: dict, device) -> float:
    """The share of its threads' time the unlearning loop got on the CPU: its process's CPU seconds over the loop
    / (wall seconds x torch threads). Near 1 when the run had its cores; well under 1 when other work took them.
    NaN on a GPU (the GPU does the work), without a loop, for a resumed loop (its CPU seconds cover the last
    attempt only) and for records made before CPU seconds were recorded."""
    found = CPU_THREADS.match(device) if isinstance(device, str) else None
    rte, cpu = timings.get("rte_s"), timings.get("train_cpu_s")
    if not found or not isinstance(rte, Number) or rte <= 0 or not isinstance(cpu, Number) \
            or timings.get("resumed_from_step"):
        return math.nan
    return float(cpu) / (float(rte) * int(found.group(1)))


def _tera(value) -> float:
    return value / 1e12 if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _cost(timings: dict) -> dict:
    """FLOPs of the unlearning loop and of the evaluation (TFLOPs) and the 1-minute load average at the run's
    start (`bench.flops`); NaN where a record predates them or its FLOPs were not counted (torch.compile)."""
    flops = timings.get("flops") if isinstance(timings.get("flops"), dict) else {}
    load = (timings.get("load_average") or {}).get("start") if isinstance(timings.get("load_average"), dict) else None
    return {"train_tflops": _tera(flops.get("train")), "eval_tflops": _tera(flops.get("evaluate")),
            "prepare_tflops": _tera(flops.get("prepare")),
            "load_1m": float(load[0]) if load else math.nan}


def runs_frame(records: list[dict]) -> pd.DataFrame:
    """One row per record: identity, headline metrics, timings, memory, and what tables and figures need."""
    return pd.DataFrame([_row(record) for record in records])


def _round(value):
    """Six significant digits for floats; other scalars as they are."""
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    return value


def _scalars(prefix: str, values: dict) -> dict:
    return {f"{prefix}{key}": _round(value) for key, value in values.items()
            if value is None or isinstance(value, (Number, str))}


def tidy_row(record: dict) -> dict:
    """One record as flat scalars: identity, every scalar metric, timings (prepare.<stage>_s), memory, every
    hyperparameter as hp.<name>, every protocol setting as protocol.<name>, ids and provenance."""
    metrics, timings, noise = record["metrics"], record["timings"], record["metrics"].get("noise_prediction") or {}
    protocol = record["protocol"]
    features = protocol.get("fid_features", record["classifier"].get("fid_features"))
    stages = timings.get("prepare_s") if isinstance(timings.get("prepare_s"), dict) else {}
    provenance = record["provenance"]
    return {
        "preset": record["preset"], "protocol": protocol.get("name"), "method": record["method"],
        "variant": record["variant"], "forget_class": record["forget_class"],
        "forget_class_name": record.get("forget_class_name"), "seed": record["seed"],
        **_scalars("", metrics), "fid_features": features, "fid_label": fid_label([features]),
        "noise_top_class": noise.get("top_class"), "noise_top_fraction": _round(noise.get("top_fraction")),
        **_scalars("", {k: v for k, v in timings.items() if k != "prepare_s"}),
        **_scalars("prepare.", {f"{stage}_s": seconds for stage, seconds in stages.items()}),
        **_scalars("flops.", {k: v for k, v in (timings.get("flops") or {}).items()
                                if k in ("train", "evaluate", "prepare", "total")}),
        **_scalars("", record["memory"]),
        **_scalars("budget.", {k: v for k, v in (record.get("budget") or {}).items() if k in ("chosen_by", "how")}),
        **_scalars("hp.", record["hyperparameters"]),
        **_scalars("protocol.", {k: v for k, v in protocol.items() if k != "name"}),
        "base_model_id": record["base_model"].get("id"), "base_model_step": record["base_model"].get("step"),
        "classifier_id": record["classifier"].get("id"),
        "classifier_test_accuracy": _round(record["classifier"].get("test_accuracy")),
        "speed": (record.get("speed") or {}).get("describe"), "device": provenance.get("device"),
        "git_commit": provenance.get("git_commit"), "hostname": provenance.get("hostname"),
        "finished": provenance.get("finished"), "schema": record["schema"], "record": record.get("path"),
    }


def tidy_rows(records: list[dict]) -> list[dict]:
    """`tidy_row` of each record, sorted by preset, protocol, method, variant, forget class and seed."""
    order = ("preset", "protocol", "method", "variant", "forget_class", "seed")
    return sorted((tidy_row(record) for record in records), key=lambda row: tuple(str(row[k]) if k not in (
        "forget_class", "seed") else row[k] for k in order))


def tidy_frame(records: list[dict]) -> pd.DataFrame:
    """One row per record, scalar columns only, floats rounded to 6 significant digits (runs.csv)."""
    return pd.DataFrame(tidy_rows(records))


def write_tidy(records: list[dict], folder: Path) -> dict[str, Path]:
    """runs.csv and runs.jsonl (one JSON object per run, its own types kept; absent fields left out) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = tidy_rows(records)
    csv_path, jsonl_path = folder / "runs.csv", folder / "runs.jsonl"
    pd.DataFrame(rows).to_csv(csv_path, index=False)
    jsonl_path.write_text("".join(json.dumps(row, default=str) + "\n" for row in rows))
    return {"runs.csv": csv_path, "runs.jsonl": jsonl_path}
