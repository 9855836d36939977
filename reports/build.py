"""`build_report`: every record under a results folder -> tables, figures and report.html under an output folder.

Layout of the output:
  <out>/report.html                                  the page (self-contained)
  <out>/runs.csv, <out>/runs.jsonl                   one row per run: every metric, hp.<name>, timings, memory, ids
  <out>/<preset>/figure1_latents.{png,pdf,csv,json}  Figure 1 from the preset's training images (csv + key: cache)
  <out>/<preset>/<protocol>/tables/<table>.{md,csv,tex}
  <out>/<preset>/<protocol>/figures/<figure>.{png,pdf}
  <out>/<preset>/<protocol>/missing_runs.sh          the `bench run` commands that fill the missing cells
Tables: table1, table2, prepare, paired (differences to SAFEMax), paper (cifar10), robustness_relearn and
robustness_embedding (when attack files exist), matched_compute (when a sweep exists). Figures: samples_class<k>,
sweep_*, cost, tradeoff, per_class, noise_prediction, relearn_curves and attack_success (when attack files exist),
budget_curves (when the records hold a sweep of a numeric hyperparameter: `reports.budget`).
"""

from __future__ import annotations

import html
import logging
import time
from pathlib import Path

import pandas as pd

from bench.config import get_preset
from bench.records import read_all
from reports import figures as figs
from reports import robustness
from reports.budget import budget_outputs
from reports.frame import write_tidy
from reports.html import FigureEntry, Section, Subsection, page
from reports.mixing import (
    MixedModels,
    counted,
    describe,
    made_by_other_code,
    mixed_devices,
    mixed_models,
    refusal,
    rerun_commands,
    unchecked_code,
)
from reports.render import Table, write_table
from reports.tables import Grid, build_tables, load_recorded_methods, make_grid, method_label, records_frame

log = logging.getLogger(__name__)


def _add(written: dict[str, Path], paths: dict[str, Path]) -> None:
    for path in paths.values():
        written[str(path)] = path


def _facts(runs: pd.DataFrame, records: list[dict]) -> list[str]:
    commits = sorted({str((r.get("provenance") or {}).get("git_commit") or "unknown")[:10] for r in records})
    devices = sorted({str(d) for d in runs["device"].dropna()})
    return [f"{len(runs)} record(s); variants: {', '.join(sorted(set(runs['variant'])))}; seeds: "
            f"{', '.join(map(str, sorted(set(runs['seed']))))}; devices: {', '.join(devices) or 'unknown'}; "
            f"git commits: {', '.join(commits)}."]


def _section_figures(runs: pd.DataFrame, grid: Grid) -> list[figs.Figure]:
    built = [figs.sample_grid(runs, grid, c) for c in grid.classes if c in set(runs["class"])]
    built += [figs.sweep_figure(m, c, p, group, grid) for m, c, p, group in figs.find_sweeps(runs)]
    built += [figs.cost_figure(runs, grid), figs.tradeoff_figure(runs, grid), figs.per_class_figure(runs, grid)]
    if runs["noise_histogram"].notna().any():
        built.append(figs.noise_figure(runs, grid))
    return built


def _write(tables: list[Table], figures: list[figs.Figure], folder: Path, label: str,
           written: dict[str, Path]) -> list[FigureEntry]:
    """Tables under folder/tables, figures under folder/figures; returns the page's figure entries."""
    for table in tables:
        _add(written, write_table(table, folder / "tables", f"{label}-{table.name}"))
    entries = []
    for figure in figures:
        entries.append(FigureEntry(figure.title, figure.caption, folder / "figures" / f"{figure.name}.png"))
        _add(written, figs.save(figure, folder / "figures"))
    return entries


def _robustness(attacks: pd.DataFrame, runs: pd.DataFrame, grid: Grid, folder: Path, label: str,
                written: dict[str, Path], draw: bool = True) -> Subsection:
    tables = robustness.robustness_tables(attacks, grid)
    figures = robustness.robustness_figures(attacks, grid, runs) if draw else []
    entries = _write(tables, figures, folder, label, written)
    counts = attacks.groupby("attack")["method"].agg(lambda m: ", ".join(method_label(x) for x in sorted(set(m))))
    lines = [f"{len(attacks)} attack file(s) (<run folder>/attacks/<attack>/<variant>/attack.json): "
             + "; ".join(f"{attack} on {methods}" for attack, methods in counts.items()) + "."]
    return Subsection("robustness", "Robustness", lines, tables, entries)


def _budget(runs: pd.DataFrame, grid: Grid, folder: Path, label: str, written: dict[str, Path],
            draw: bool = True) -> Subsection | None:
    """Budget curves and the matched-compute table, where the records hold a sweep of a numeric field (issue 25)."""
    tables, figures = budget_outputs(runs, grid)
    if not figures:  # no sweep in the records
        return None
    if not draw:
        for figure in figures:
            figs.discard(figure)
    entries = _write(tables, figures if draw else [], folder, label, written)
    lines = ["Runs that differ in one numeric hyperparameter (a `--set METHOD.FIELD=a,b,c` sweep, such as "
             "scripts/budget_study.py's budgets): their metrics against the swept value or the FLOPs it cost."]
    return Subsection("budget", "Budget curves", lines, tables, entries)


def _section(runs: pd.DataFrame, records: list[dict], attacks: pd.DataFrame, preset: str, protocol: str,
             results_dir: str, data_root: str | None, out: Path, written: dict[str, Path],
             methods: list[str] | None, classes: list[int] | None, reference: str | None = None,
             extensions: tuple[str, ...] = (), draw: bool = True) -> Section:
    folder = out / preset / protocol
    made_with = [item for r in records for item in (r.get("provenance") or {}).get("extensions") or ()]
    grid = make_grid(runs, preset, protocol, results_dir, data_root, methods, classes, (*made_with, *extensions))
    tables = build_tables(runs, grid, reference)
    entries = _write(tables, _section_figures(runs, grid) if draw else [], folder, f"{preset}-{protocol}", written)
    commands = list(dict.fromkeys(c for table in tables for c in table.commands))
    if commands:
        script = folder / "missing_runs.sh"
        script.write_text("#!/bin/sh\n# Runs that the tables of this preset/protocol still miss.\n"
                          + "\n".join(commands) + "\n")
        _add(written, {"script": script})
    section = Section(preset, protocol, tables, entries, runs, commands, _facts(runs, records))
    budget = _budget(runs, grid, folder, f"{preset}-{protocol}", written, draw)
    if budget is not None:
        section.subsections.append(budget)
    if len(attacks):
        section.subsections.append(_robustness(attacks, runs, grid, folder, f"{preset}-{protocol}", written, draw))
    return section


def _figure1(preset: str, out: Path, data_root: str | None, written: dict[str, Path], notes: list[str],
             points: int) -> list[FigureEntry]:
    from reports.latents import KEY_NAME, STATS_NAME, cached_figure1

    folder = out / preset
    try:
        figure, _, _ = cached_figure1(get_preset(preset), data_root, folder, points=points)
    except (ValueError, OSError) as exc:  # an unknown preset, or CIFAR-10 without --data-root
        notes.append(f"Figure 1 for preset {html.escape(preset)} skipped: {html.escape(str(exc))}")
        log.warning("Figure 1 for %s skipped: %s", preset, exc)
        return []
    _add(written, figs.save(figure, folder))
    _add(written, {"csv": folder / STATS_NAME, "key": folder / KEY_NAME})
    return [FigureEntry(figure.title, figure.caption, folder / "figure1_latents.png")]


def _keep(frame: pd.DataFrame, methods: list[str] | None, classes: list[int] | None) -> pd.DataFrame:
    if len(frame) and methods:
        frame = frame[frame["method"].isin(methods)]
    if len(frame) and classes is not None:
        frame = frame[frame["class"].isin(classes)]
    return frame.reset_index(drop=True)


def _read_attacks(results_dir: str | Path, notes: list[str], methods, classes) -> pd.DataFrame:
    attacks, unreadable = robustness.read_attacks(results_dir) if Path(results_dir).is_dir() else ([], [])
    notes += [f"Attack file skipped: <code>{html.escape(str(path))}</code>: {html.escape(problem)}"
              for path, problem in unreadable]
    for path, problem in unreadable:
        log.warning("attack file skipped: %s: %s", path, problem)
    return _keep(robustness.attacks_frame(attacks), methods, classes)


def _code_notes(records: list[dict], results: str) -> list[str]:
    """Notes (also logged) on the records whose method or bench code has changed since they were made: they stand in
    the tables, where `bench run` would redo them; the commands that do. And on those whose code could not be
    checked (a plug-in not importable here)."""
    notes = []
    if unchecked := unchecked_code(records):
        methods = ", ".join(f"{method}: {count}" for method, count in sorted(unchecked.items()))
        log.warning("the code of %d record(s) was not checked: their method cannot be imported here (%s)",
                    sum(unchecked.values()), methods)
        notes.append(f"The code of {sum(unchecked.values())} record(s) was not checked against the code now: their "
                     f"method cannot be imported here ({html.escape(methods)}); name it with "
                     "<code>--method-module</code> or install its package.")
    stale = made_by_other_code(records)
    if not stale:
        return notes
    count = sum(map(len, stale.values()))
    why = counted(stale)
    commands = rerun_commands([r for found in stale.values() for r in found], results)
    log.warning("%d of %d record(s) were made by code that has changed since (%s); they are in the tables as they "
                "are: `bench run` redoes them, for example %s", count, len(records), why, commands[0])
    return notes + [f"{count} of {len(records)} record(s) were made by code that has changed since "
                    f"({html.escape(why)}). They are shown as they are; <code>bench status</code> marks them stale "
                    "and these commands redo them: "
                    + "".join(f"<br><code>{html.escape(command)}</code>" for command in commands)]


def _mixed_devices(records: list[dict]) -> list[str]:
    """Notes (also logged) on the tables whose records ran on different devices: RTE and memory do not compare."""
    notes = []
    for (preset, protocol), counts in mixed_devices(records).items():
        where = ", ".join(f"{device}: {count}" for device, count in counts.most_common())
        log.warning("the records of %s/%s ran on %d devices (%s): their RTE and peak memory compare only between "
                    "runs on one device", preset, protocol, len(counts), where)
        notes.append(f"The records of {html.escape(preset)}/{html.escape(protocol)} ran on {len(counts)} devices "
                     f"({html.escape(where)}). Their RTE and peak memory compare only between runs on one device (the "
                     "device column of runs.csv says which); UA, H, FID and the FLOP columns compare across them.")
    return notes


def build_report(results_dir: str | Path, out_dir: str | Path, *, data_root: str | Path | None = None,
                 figure1: bool = True, figure1_points: int = 40, methods: list[str] | None = None,
                 classes: list[int] | None = None, reference: str | None = None,
                 extensions: tuple[str, ...] = (), allow_mixed: bool = False, figures: bool = True) -> dict[str, Path]:
    """Read every record (and attack file) under `results_dir`; write tables, figures, runs.csv/.jsonl and
    report.html under `out_dir`.

    Returns {path relative to out_dir: absolute path} of everything written; `report.html` is the page.
    `data_root` is the CIFAR-10 root that Figure 1 (and the fill-in commands) need for preset cifar10. `figures`:
    False draws none (Figure 1 neither): the tables and the page in a fraction of the time.
    `methods` and `classes` keep only those runs and show those columns and rows (default: those with records).
    `reference`: the method paired differences subtract (default: SAFEMax where it has records, else the first
    method). `extensions` (`bench.extensions` items) join those the records were made with in the fill-in commands.
    Missing runs, corrupt records, copies and an empty folder are reported on the page, never raised. Records of
    one preset made from different base models or classifiers raise MixedModels unless `allow_mixed`.
    """
    started = time.perf_counter()
    out, results = Path(out_dir), str(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_root = str(data_root) if data_root is not None else None
    records, corrupt = read_all(results_dir) if Path(results_dir).is_dir() else ([], [])
    records = [r for r in records if (not methods or r["method"] in methods)
               and (classes is None or r["forget_class"] in classes)]
    if reference and records and reference not in {r["method"] for r in records}:
        raise ValueError(f"--reference {reference}: no record of that method under {results}; choose from "
                         f"{', '.join(sorted({r['method'] for r in records}))}")
    load_recorded_methods(records)  # plug-ins: named by their class
    written: dict[str, Path] = {}
    mixed = mixed_models(records)
    if mixed and not allow_mixed:
        raise MixedModels(refusal(records, results))
    notes = [f"Record skipped: <code>{html.escape(str(path))}</code>: {html.escape(problem)}"
             for path, problem in corrupt]  # corrupt ones, and copies (`bench.records.read_all`)
    notes += _code_notes(records, results) + _mixed_devices(records)
    attacks = _read_attacks(results_dir, notes, methods, classes)
    if not records:
        notes.append(f"No records under <code>{html.escape(results)}</code>"
                     f"{' for the methods and classes asked for' if methods or classes is not None else ''}; run "
                     f"for example <code>bench run --preset digits --methods all --classes 0-9 --results "
                     f"{html.escape(results)}</code>.")
    df = records_frame(records)
    _add(written, write_tidy(records, out))
    sections, preset_figures = [], {}
    for (preset, protocol), runs in (df.groupby(["preset", "protocol"], sort=True) if len(df) else []):
        chosen = [r for r in records if r["preset"] == preset and (r.get("protocol") or {}).get("name") == protocol]
        attacked = attacks[(attacks["preset"] == preset) & (attacks["protocol"] == protocol)] if len(attacks) else attacks
        sections.append(_section(runs.reset_index(drop=True), chosen, attacked, preset, protocol, results, data_root,
                                 out, written, methods, classes, reference, extensions, figures))
        if figure1 and figures and preset not in preset_figures:
            preset_figures[preset] = _figure1(preset, out, data_root, written, notes, figure1_points)
    shown = {(s.preset, s.protocol) for s in sections}
    orphans = {key for key in zip(attacks.get("preset", []), attacks.get("protocol", [])) if key not in shown}
    notes += [f"Attack files of {html.escape(p)}/{html.escape(str(q))} have no records beside them: not shown."
              for p, q in sorted(orphans)]
    intro = [f"Built {time.strftime('%Y-%m-%d %H:%M')} from {len(records)} record(s) and {len(attacks)} attack file(s) "
             f"under {results}. Tables and figures read the records only. A per-class cell is the mean over seeds "
             "± sd with a 95% bootstrap CI (n stated; n=1: none); aggregates over classes resample classes. Files: "
             "runs.csv and runs.jsonl (one row per run), tables (Markdown, CSV, LaTeX) and figures (PNG, PDF) sit "
             "beside this page, one folder per preset and protocol."]
    intro += [f"Preset {html.escape(preset)} mixes base models or classifiers, shown together as asked "
              f"(--allow-mixed): {html.escape(describe(counts))}." for preset, counts in mixed.items()]
    if not figures:
        intro.append("Figures not drawn (--no-figures): the tables only.")
    if methods or classes is not None:
        intro.append(f"Filtered: methods {', '.join(methods) if methods else 'all'}; classes "
                     f"{', '.join(map(str, classes)) if classes is not None else 'all'}.")
    report = out / "report.html"
    report.write_text(page("Machine unlearning benchmark report", intro, preset_figures, sections, notes))
    _add(written, {"report": report})
    written = {str(path.relative_to(out)): path.resolve() for path in written.values()}
    log.info("report: %s (%d files under %s, %.0f s)", report, len(written), out, time.perf_counter() - started)
    return written
