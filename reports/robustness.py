"""Attack files -> the robustness section: relearning curves, attack success, and their tables.

An attack leaves `<run folder>/attacks/<attack>/<variant>/attack.json` beside the run's record (written by the
attack code, which this module does not import: it reads the files alone). Two attacks are known:
- relearn: fine-tune the unlearned model on forget-class data; `curve` holds the forget-class accuracy (%, and UA,
  H) per fine-tuning step, `auc` its area divided by the step span (the mean forget-class accuracy, %),
  `steps_to_relearn` the first step it came back (null: not within the schedule);
- embedding: search a conditioning embedding that brings the forget class back; `success_rate` is the forget-class
  accuracy (%) with the embedding found, `success_rate_before` that with the class's own embedding, `budget` the
  search's budget ({samples_total, ...}).
Forget-class accuracy is the run tables' word: the % of samples the classifier labels as the forget class, 100 - UA.
A file whose numbers are NaN or infinite is listed as unreadable, as `bench attack` reruns it.
Original and Retrain bound a relearning curve: what the model knew, and what a model that never saw the class
learns in the same steps. Statistics as everywhere in the report (`reports.stats`): per method over classes (each
class the mean of its seeds), 95% bootstrap CI over classes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from reports import stats
from reports.figures import Figure, plt, sns, yerr
from reports.render import Cell, Table, add_stats_note
from reports.tables import REFERENCE_METHODS, Grid, method_label, summary_cell

ATTACK_NAME = "attack.json"
ATTACKS = ("relearn", "embedding")
REQUIRED = {"schema": int, "kind": str, "attack": str, "preset": str, "method": str, "forget_class": int, "seed": int}
NUMBER = (int, float)


def problems(payload) -> list[str]:
    """What is wrong with an attack file's payload (empty when nothing is)."""
    if not isinstance(payload, dict):
        return [f"an attack file holds a JSON object, not {type(payload).__name__}"]
    found = [f"no {key!r}" if key not in payload else f"{key!r} is {type(payload[key]).__name__}, not {kind.__name__}"
             for key, kind in REQUIRED.items()
             if key not in payload or not isinstance(payload[key], kind) or isinstance(payload[key], bool)]
    if payload.get("kind", "attack") != "attack":
        found.append(f"kind is {payload['kind']!r}, not 'attack'")
    if payload.get("attack") == "relearn":
        curve = payload.get("curve")
        if not isinstance(curve, list) or not all(isinstance(p, dict) and isinstance(p.get("step"), NUMBER)
                                                  for p in curve):
            found.append("a relearn attack needs `curve`: a list of {step, forget_accuracy, ...}")
        elif not all(math.isfinite(_forget_percent(p)) for p in curve):
            found.append("a `curve` point's forget_accuracy (or UA) is missing, NaN or infinite")
    if payload.get("attack") == "embedding" and not isinstance(payload.get("success_rate"), NUMBER):
        found.append("an embedding attack needs a number `success_rate`")
    found += [f"{key!r} is {payload[key]!r}, not a finite number" for key in ("auc", "success_rate", "success_rate_before")
              if isinstance(payload.get(key), float) and not math.isfinite(payload[key])]
    return found


def read_attacks(results: str | Path) -> tuple[list[dict], list[tuple[Path, str]]]:
    """Every readable attack.json under `results` (each with its `path`), and (path, problem) for the others."""
    attacks, unreadable = [], []
    for path in sorted(Path(results).glob(f"**/attacks/*/*/{ATTACK_NAME}")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            unreadable.append((path, f"unreadable ({exc})"))
            continue
        wrong = problems(payload)
        if wrong:
            unreadable.append((path, "; ".join(wrong)))
            continue
        attacks.append({**payload, "path": str(path)})
    return attacks, unreadable


def _forget_percent(point: dict) -> float:
    """Forget-class accuracy of a curve point in %: as recorded, or 100 - UA; a fraction (0-1) that matches
    100 - UA only when scaled is scaled."""
    accuracy, ua = point.get("forget_accuracy"), point.get("ua")
    if not isinstance(accuracy, NUMBER):
        return 100.0 - ua if isinstance(ua, NUMBER) else math.nan
    if isinstance(ua, NUMBER) and accuracy <= 1 and abs(100 * accuracy - (100 - ua)) < abs(accuracy - (100 - ua)):
        return 100.0 * accuracy
    return float(accuracy)


def _number(value) -> float:
    return float(value) if isinstance(value, NUMBER) and not isinstance(value, bool) else math.nan


def _budget(value) -> float:
    """The search budget in samples: `budget.samples_total` (or a bare number)."""
    return _number(value.get("samples_total") if isinstance(value, dict) else value)


def attacks_frame(attacks: list[dict]) -> pd.DataFrame:
    """One row per attack file: identity (of the attack and its run), the attack's numbers, and its curve."""
    rows = []
    for payload in attacks:
        protocol = payload.get("protocol")
        curve = sorted(payload.get("curve") or [], key=lambda p: p["step"])
        forget = [_forget_percent(p) for p in curve]
        rows.append({
            "preset": payload["preset"], "protocol": protocol.get("name") if isinstance(protocol, dict) else protocol,
            "method": payload["method"], "run_variant": payload.get("run_variant", "default"),
            "attack": payload["attack"], "variant": payload.get("variant", "default"),
            "class": payload["forget_class"], "seed": payload["seed"],
            "auc": _number(payload.get("auc")), "steps_to_relearn": _number(payload.get("steps_to_relearn")),
            "relearned": payload.get("steps_to_relearn") is not None if payload["attack"] == "relearn" else None,
            "success_rate": _number(payload.get("success_rate")),
            "success_rate_before": _number(payload.get("success_rate_before")),
            "budget": _budget(payload.get("budget")),
            "attack_min": _number((payload.get("timings") or {}).get("attack_s")) / 60,
            "forget_before": forget[0] if forget else math.nan, "forget_after": forget[-1] if forget else math.nan,
            "curve": [{"step": p["step"], "forget_accuracy": f, "ua": _number(p.get("ua")),
                       "entropy": _number(p.get("entropy"))} for p, f in zip(curve, forget)],
            "path": payload.get("path"),
        })
    return pd.DataFrame(rows)


def curves_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The relearn curves as long rows: method, class, seed, step, forget_accuracy (%), ua, entropy."""
    keys = ["method", "run_variant", "variant", "class", "seed"]
    rows = [{**dict(zip(keys, key)), **point} for *key, curve in frame[[*keys, "curve"]].itertuples(index=False)
            for point in curve]
    return pd.DataFrame(rows, columns=[*keys, "step", "forget_accuracy", "ua", "entropy"])


def _row_label(method: str, run_variant: str, variant: str, variants: set) -> str:
    label = method_label(method) + ("" if run_variant == "default" else f" [{run_variant}]")
    return label + (f" (attack {variant})" if len(variants) > 1 else "")


def _attack_table(frame: pd.DataFrame, grid: Grid, attack: str, columns: list[tuple[str, str]],
                  extra=None) -> Table:
    """Per (method, run variant, attack variant): each column's mean ± sd [CI] over classes, and n."""
    runs = frame[frame["attack"] == attack]
    keys = ("method", "run_variant", "variant")
    found = stats.by_key(stats.over_classes(runs, [m for _, m in columns], keys), keys)
    counts = runs.groupby(list(keys)).agg(classes=("class", "nunique"), n=("seed", "size"))
    variants = set(runs["variant"])
    titles = {"relearn": "Relearning attack", "embedding": "Embedding attack"}
    table = Table(f"robustness_{attack}", titles[attack], "", "Method",
                  [("", [(label, metric) for label, metric in columns] + [("n (classes × seeds)", "n")]
                    + ([(extra[0], "extra")] if extra else []))])
    order = {m: i for i, m in enumerate(grid.methods)}
    for key in sorted(counts.index, key=lambda k: (order.get(k[0], len(order)), k[1], k[2])):
        cells = [summary_cell(metric, found.get((*key, metric))) for _, metric in columns]
        classes, n = counts.loc[key]
        cells.append(Cell(float(n), f"{classes} × {n / classes:g}" if n % classes == 0 else f"{classes} / {n}"))
        if extra:
            cells.append(extra[1](runs[(runs[list(keys)] == list(key)).all(axis=1)]))
        table.rows.append((_row_label(*key, variants), cells))
    add_stats_note(table, "classes")
    return table


def relearn_table(frame: pd.DataFrame, grid: Grid) -> Table:
    def relearned(runs: pd.DataFrame) -> Cell:
        done = int(runs["relearned"].sum())
        return Cell(float(done), f"{done}/{len(runs)}")

    table = _attack_table(frame, grid, "relearn", [
        ("forget-class acc. before (%)", "forget_before"), ("forget-class acc. after (%)", "forget_after"),
        ("AUC (mean forget-class acc., %)", "auc"), ("steps to relearn", "steps_to_relearn")], ("relearned", relearned))
    table.caption = (f"Fine-tuning each unlearned model on forget-class data (preset {grid.preset}, protocol "
                     f"{grid.protocol}): the forget-class accuracy (% of its samples classified as the forget class, "
                     "100 - UA) before and after the last step, the area under that curve over the step span (its "
                     "mean, %) and the steps until the class came back (over the runs where it did: 'relearned' counts "
                     "them). Lower is more robust; Original and Retrain are the ceiling and the floor.")
    return table


def embedding_table(frame: pd.DataFrame, grid: Grid) -> Table:
    runs = frame.assign(success_gain=frame["success_rate"] - frame["success_rate_before"])
    table = _attack_table(runs, grid, "embedding", [
        ("forget-class acc., own embedding (%)", "success_rate_before"),
        ("forget-class acc., found embedding (%)", "success_rate"), ("gain (pts)", "success_gain"),
        ("budget (samples)", "budget")])
    table.caption = (f"Searching a conditioning embedding that makes each unlearned model generate the forget class "
                     f"again (preset {grid.preset}, protocol {grid.protocol}): the forget-class accuracy (% of samples "
                     "classified as the forget class, 100 - UA) with the class's own embedding and with the one found, "
                     "and the search budget (samples drawn in all). Lower is more robust.")
    return table


def _reference_lines(ax, runs: pd.DataFrame | None, bands: pd.DataFrame, grid: Grid) -> list[str]:
    """Original (ceiling) and Retrain (floor): their own attack curves when attacked, else their records' level."""
    said = []
    for method, style, color in (("original", "--", "0.15"), ("retrain", ":", "0.45")):
        role = "ceiling" if method == "original" else "floor"
        curve = bands[bands["method"] == method]
        if len(curve):
            ax.plot(curve["step"], curve["mean"], linestyle=style, color=color,
                    label=f"{method_label(method)} ({role}, attacked)")
            said.append(f"{method_label(method)}: its own attack curve")
        elif runs is not None and (runs["method"] == method).any():
            level = float((100 - runs.loc[runs["method"] == method, "ua"]).mean())
            ax.axhline(level, linestyle=style, color=color, linewidth=1,
                       label=f"{method_label(method)} ({role}, no attack): {level:.1f}%")
            said.append(f"{method_label(method)}: 100 - UA of its records, not attacked")
    return said


def relearn_figure(frame: pd.DataFrame, grid: Grid, runs: pd.DataFrame | None = None) -> Figure:
    """Forget-class accuracy against fine-tuning steps per method: mean over classes and seeds with a CI band."""
    curves = curves_frame(frame[(frame["attack"] == "relearn") & (frame["run_variant"] == "default")])
    bands = stats.curve_band(curves, "forget_accuracy", ("method",))
    methods = [m for m in grid.methods if m in set(bands["method"]) and m not in REFERENCE_METHODS]
    fig, ax = plt.subplots(layout="constrained", figsize=(6.4, 3.8))
    palette = sns.color_palette("tab10", max(len(methods), 1))
    for color, method in zip(palette, methods):
        band = bands[bands["method"] == method]
        ax.plot(band["step"], band["mean"], color=color, marker="o", markersize=2.5, label=method_label(method))
        ax.fill_between(band["step"], band["low"].fillna(band["mean"]), band["high"].fillna(band["mean"]),
                        color=color, alpha=0.18, linewidth=0)
    default_runs = runs[runs["variant"] == "default"] if runs is not None else None
    said = _reference_lines(ax, default_runs, bands, grid)
    ax.set_xlabel("fine-tuning steps on the forget class")
    ax.set_ylabel("forget-class accuracy (%)")
    tops = [np.nanmax(np.asarray(line.get_ydata(), dtype=float)) for line in ax.get_lines()]
    ax.set_ylim(0, min(105.0, np.nanmax(tops + [bands["high"].max(), 10.0]) * 1.06))  # % lives in [0, 100]
    ax.set_xlim(left=0)
    ax.legend(fontsize=6, loc="best")
    title = "Relearning attack"
    fig.suptitle(f"{title} — {grid.preset}/{grid.protocol}", fontsize=9)
    counts = curves.groupby("method").agg(classes=("class", "nunique"), runs=("seed", "size"))
    n_text = "; ".join(f"{method_label(m)} {int(c.classes)} classes" for m, c in counts.iterrows())
    caption = ("Forget-class accuracy (% of forget-class samples the classifier recognises, 100 - UA) while the "
               "unlearned model is fine-tuned on that class: mean over forget classes (each the mean of its "
               f"seeds), band = 95% bootstrap CI over classes (no band where a step has one value). n: {n_text}. "
               f"{'; '.join(said) + '.' if said else 'Original and Retrain: no records or attacks to draw.'}")
    return Figure("relearn_curves", title, caption, fig)


def success_figure(frame: pd.DataFrame, grid: Grid) -> Figure:
    """Attack success per method with CI bars: relearn (forget-class accuracy after the last step) and embedding
    (success rate, the rate before as a tick)."""
    frame = frame[frame["run_variant"] == "default"]
    kinds = [a for a in ATTACKS if (frame["attack"] == a).any()]
    fig, axes = plt.subplots(1, len(kinds), layout="constrained", figsize=(4.2 * len(kinds) + 0.5, 3.4), squeeze=False)
    single = 0
    for ax, attack in zip(axes[0], kinds):
        runs = frame[frame["attack"] == attack]
        metric = "forget_after" if attack == "relearn" else "success_rate"
        metrics = [metric] + (["success_rate_before"] if attack == "embedding" else [])
        found = stats.by_key(stats.over_classes(runs, metrics), ("method",))
        methods = [m for m in grid.methods if (m, metric) in found]
        summaries = [found[(m, metric)] for m in methods]
        single += sum(s.n == 1 for s in summaries)
        colors = ["0.6" if m in REFERENCE_METHODS else sns.color_palette()[0] for m in methods]
        ax.bar(range(len(methods)), [s.mean for s in summaries], color=colors, yerr=yerr(summaries), capsize=3)
        if attack == "embedding":
            before = [found.get((m, "success_rate_before")) for m in methods]
            ax.scatter(range(len(methods)), [s.mean if s else np.nan for s in before], marker="_", s=300,
                       color="black", zorder=3, label="own embedding")
            ax.legend(fontsize=6)
        ax.set_xticks(range(len(methods)), [method_label(m) for m in methods], rotation=30, ha="right", fontsize=7)
        ax.set_ylim(0, 105)
        ax.set_ylabel("forget-class accuracy after relearning (%)" if attack == "relearn"
                      else "forget-class accuracy, found embedding (%)", fontsize=8)
        ax.set_title(f"{attack} attack", fontsize=8)
    title = "Attack success"
    fig.suptitle(f"{title} — {grid.preset}/{grid.protocol}", fontsize=9)
    caption = ("Per method, mean over forget classes (each the mean of its seeds) with its 95% bootstrap CI over "
               "classes: the forget-class accuracy (100 - UA) after the relearning attack's last step, and with the "
               "embedding attack's found embedding (black tick: with the class's own embedding). Lower is more "
               "robust; grey bars: "
               "Original and Retrain." + (f" {single} bar(s) rest on one class and seed (n=1): no CI." if single else ""))
    return Figure("attack_success", title, caption, fig)


def robustness_tables(frame: pd.DataFrame, grid: Grid) -> list[Table]:
    builders = {"relearn": relearn_table, "embedding": embedding_table}
    return [builders[a](frame, grid) for a in ATTACKS if (frame["attack"] == a).any()]


def robustness_figures(frame: pd.DataFrame, grid: Grid, runs: pd.DataFrame | None = None) -> list[Figure]:
    figures = []
    if ((frame["attack"] == "relearn") & (frame["run_variant"] == "default")).any():
        figures.append(relearn_figure(frame, grid, runs))
    if (frame["run_variant"] == "default").any():
        figures.append(success_figure(frame, grid))
    return figures
