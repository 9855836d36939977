"""Two results folders -> metric deltas B - A (`bench compare A B`): before/after a code change, CPU vs GPU.

Runs are matched on preset, protocol, method, variant and forget class, and on seed where both folders have it;
a (method, variant, class) whose seeds do not overlap is compared by its means over seeds (seed "mean"). With
`by` (variant, protocol or preset), runs are paired across that key instead, on the other keys: A's runs of one
variant against B's of another (A and B may be one folder), and the pairs are named "A's → B's". The summary
gives, per method and variant, the mean delta over classes with its 95% bootstrap CI over classes
(`reports.stats`) and the ratio of mean RTEs B / A.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench.records import read_all
from reports import stats
from reports.frame import fid_label, runs_frame
from reports.mixing import compare_check
from reports.render import Cell, Table, add_stats_note, to_markdown
from reports.tables import fmt, method_label, order_methods, summary_cell

METRICS = ["ua", "entropy", "fid", "retain_accuracy", "rte_s"]
KEYS = ["preset", "protocol", "method", "variant", "class"]
BY = ("variant", "protocol", "preset")  # the keys `bench compare --by` pairs across


def _matched(a: pd.DataFrame, b: pd.DataFrame, by: str | None = None) -> pd.DataFrame:
    """One row per matched run (or pair of seed means): A's value, B's value and B - A of every metric. With `by`,
    rows pair different values of that key (kept as <by>_a and <by>_b; <by> reads "A's → B's")."""
    keys = [k for k in KEYS if k != by]
    if by:
        a, b = a.rename(columns={by: f"{by}_a"}), b.rename(columns={by: f"{by}_b"})
    sides = [keys + ([f"{by}_a"] if by else []), keys + ([f"{by}_b"] if by else [])]  # a run's group on each side
    group = list(dict.fromkeys(sides[0] + sides[1]))
    columns = ["seed", "fid_features", *METRICS]
    paired = _across(a[sides[0] + columns].merge(b[sides[1] + columns], on=[*keys, "seed"], suffixes=("_a", "_b")), by)
    both = _across(a[sides[0]].drop_duplicates().merge(b[sides[1]].drop_duplicates(), on=keys), by)
    unpaired = both.merge(paired[group].drop_duplicates(), on=group, how="left", indicator=True)
    unpaired = unpaired[unpaired["_merge"] == "left_only"].drop(columns="_merge")
    if len(unpaired):
        agg = {**{m: (m, "mean") for m in METRICS}, "fid_features": ("fid_features", "first")}
        means = [frame.merge(unpaired[side].drop_duplicates(), on=side).groupby(side, as_index=False).agg(**agg)
                 for frame, side in zip((a, b), sides)]
        pooled = unpaired.merge(means[0], on=sides[0]).merge(means[1], on=sides[1], suffixes=("_a", "_b"))
        paired = pd.concat([paired.assign(seed=paired["seed"].astype(object)), pooled.assign(seed="mean")],
                           ignore_index=True)
    for metric in METRICS:
        paired[f"{metric}_delta"] = paired[f"{metric}_b"] - paired[f"{metric}_a"]
    if by:
        paired[by] = paired[f"{by}_a"].astype(str) + " → " + paired[f"{by}_b"].astype(str)
    return paired.sort_values([*KEYS, "seed"], key=lambda c: c.astype(str)).reset_index(drop=True)


def _across(frame: pd.DataFrame, by: str | None) -> pd.DataFrame:
    """Pairs across `by` only: a run is never paired with one of its own variant, protocol or preset."""
    return frame[frame[f"{by}_a"] != frame[f"{by}_b"]] if by else frame


def compare_frames(a: pd.DataFrame, b: pd.DataFrame, by: str | None = None) -> pd.DataFrame:
    """Deltas B - A of UA, H, FID/FD, retained accuracy and RTE (seconds) per matched run; empty if none match.
    `by`: pair runs across variants, protocols or presets (see `_matched`)."""
    if by is not None and by not in BY:
        raise ValueError(f"--by {by!r}: choose from {', '.join(BY)}")
    if a.empty or b.empty:
        return pd.DataFrame()
    return _matched(a, b, by)


def one_direction(deltas: pd.DataFrame, by: str) -> pd.DataFrame:
    """Within one folder, each pair of values once: `default` (or the paper's protocol) as A, else the smaller value,
    instead of A -> B and B -> A both."""
    first = {"variant": "default", "protocol": "paper"}.get(by)

    def order(value) -> tuple:
        return (value != first, str(value))

    keep = [order(left) < order(right) for left, right in zip(deltas[f"{by}_a"], deltas[f"{by}_b"])]
    return deltas[keep]


def pairing_lines(deltas: pd.DataFrame, by: str) -> list[str]:
    """What `by` paired: one line per (A's value, B's value) with its count of rows."""
    counts = deltas.groupby([f"{by}_a", f"{by}_b"], sort=True).size()
    return [f"- paired by {by} (matching {', '.join(k for k in KEYS if k != by)}, seed): A's {left!r} with B's "
            f"{right!r}: {count} row(s)" for (left, right), count in counts.items()]


def _summary_table(deltas: pd.DataFrame, label: str) -> Table:
    names = {"ua": "Δ UA (%)", "entropy": "Δ H", "fid": f"Δ {label}", "retain_accuracy": "Δ retained acc. (%)",
             "rte_s": "Δ RTE (s)"}
    table = Table("compare_summary", "Summary per method (B - A)",
                  "Mean over forget classes of the per-class mean delta, CI by bootstrap over classes (one class: "
                  "over its seeds); RTE B/A: ratio of the mean RTEs.", "Method (variant)",
                  [("", [(names[m], m) for m in METRICS] + [("RTE B/A", "ratio"), ("runs", "n")])])
    keys = ("preset", "protocol", "method", "variant")
    found = stats.by_key(stats.over_classes(deltas, [f"{m}_delta" for m in METRICS], keys), keys)
    groups = deltas.groupby(list(keys), sort=False)
    order = {m: i for i, m in enumerate(order_methods(set(deltas["method"])))}
    several = deltas[["preset", "protocol"]].drop_duplicates().shape[0] > 1
    for key in sorted(groups.groups, key=lambda k: (k[0], k[1], order[k[2]], k[3])):
        group = groups.get_group(key)
        cells = [summary_cell(m, found.get((*key, f"{m}_delta")), sign=True) for m in METRICS]
        before, after = group["rte_s_a"].mean(), group["rte_s_b"].mean()
        ratio = after / before if before > 0 else float("nan")
        cells += [Cell(ratio, f"{ratio:.2f}×" if ratio == ratio else "–"), Cell(float(len(group)), str(len(group)))]
        where = f"{key[0]}/{key[1]} " if several else ""
        table.rows.append((f"{where}{method_label(key[2])} ({key[3]})", cells))
    add_stats_note(table, "classes")
    return table


def _detail_table(deltas: pd.DataFrame, label: str) -> Table:
    names = {"ua": "UA", "entropy": "H", "fid": label, "retain_accuracy": "retained acc.", "rte_s": "RTE (s)"}
    table = Table("compare_runs", "Per run (B - A)", "A → B and the delta; seed 'mean': the two folders share no "
                  "seed for this class, so their means over seeds are compared.", "Method / variant / class / seed",
                  [(names[m], [("A", m), ("B", m), ("Δ", m)]) for m in METRICS])
    for row in deltas.to_dict("records"):
        cells = []
        for metric in METRICS:
            cells += [Cell(row[f"{metric}_a"], fmt(metric, row[f"{metric}_a"])),
                      Cell(row[f"{metric}_b"], fmt(metric, row[f"{metric}_b"])),
                      Cell(row[f"{metric}_delta"], fmt(metric, row[f"{metric}_delta"], sign=True))]
        table.rows.append((f"{method_label(row['method'])} / {row['variant']} / {row['class']} / {row['seed']}", cells))
    return table


def compare_results(results_a: str | Path, results_b: str | Path, by: str | None = None,
                    allow_mixed: bool = False) -> tuple[str, pd.DataFrame]:
    """Markdown (summary per method, then every matched run) and the deltas as a DataFrame; `by` pairs runs across
    variants, protocols or presets (see `_matched`)."""
    frames, lines, kept = [], [], []
    for name, folder in (("A", results_a), ("B", results_b)):
        records, corrupt = read_all(folder)
        kept.append(records)
        frames.append(runs_frame(records) if records else pd.DataFrame(columns=[*KEYS, "seed"]))
        lines.append(f"- {name} = {folder}: {len(records)} record(s)"
                     + (f" ({len(corrupt)} skipped, corrupt or copies: {', '.join(str(p) for p, _ in corrupt)})"
                        if corrupt else ""))
    lines += compare_check(*kept, results_a, results_b, allow_mixed)
    a, b = frames
    deltas = compare_frames(a, b, by)
    if by and Path(results_a).resolve() == Path(results_b).resolve():
        deltas = one_direction(deltas, by)
    keyed = [set(map(tuple, frame[[k for k in KEYS if k != by] + ["seed"]].astype(str).values)) for frame in frames]
    lines.append(f"- matched: {len(deltas)} row(s); only in A: {len(keyed[0] - keyed[1])} run(s), only in B: "
                 f"{len(keyed[1] - keyed[0])} run(s) (a class whose seeds differ is compared by its seed means)")
    if deltas.empty:
        return "\n".join(["# bench compare: B - A", "", *lines, "", "No run in common."]) + "\n", deltas
    if by:
        lines += pairing_lines(deltas, by)
    features = set(deltas["fid_features_a"].dropna()) | set(deltas["fid_features_b"].dropna())
    label = fid_label(features)
    differ = deltas[deltas["fid_features_a"] != deltas["fid_features_b"]]
    if len(differ):
        lines.append(f"- WARNING: {len(differ)} row(s) compare Fréchet distances of different features "
                     f"({label}): those deltas mean nothing")
    text = ["# bench compare: B - A", "", *lines, "", to_markdown(_summary_table(deltas, label)),
            to_markdown(_detail_table(deltas, label))]
    return "\n".join(text), deltas
