"""`build_report`: every record under a results folder -> tables, figures and report.html under an output folder.

Layout of the output:
  <out>/report.html                                  the page (self-contained)
  <out>/<preset>/figure1_latents.{png,pdf,csv}       Figure 1 from the preset's training images
  <out>/<preset>/<protocol>/tables/<table>.{md,csv,tex}
  <out>/<preset>/<protocol>/figures/<figure>.{png,pdf}
  <out>/<preset>/<protocol>/missing_runs.sh          the `bench run` commands that fill the missing cells
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
from reports.html import FigureEntry, Section, page
from reports.render import write_table
from reports.tables import Grid, build_tables, make_grid, records_frame

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
    built.append(figs.cost_figure(runs, grid))
    if runs["noise_histogram"].notna().any():
        built.append(figs.noise_figure(runs, grid))
    return built


def _section(runs: pd.DataFrame, records: list[dict], preset: str, protocol: str, results_dir: str,
             data_root: str | None, out: Path, written: dict[str, Path]) -> Section:
    folder = out / preset / protocol
    grid = make_grid(runs, preset, protocol, results_dir, data_root)
    tables = build_tables(runs, grid)
    for table in tables:
        _add(written, write_table(table, folder / "tables"))
    entries = []
    for figure in _section_figures(runs, grid):
        entry = FigureEntry(figure.title, figure.caption, folder / "figures" / f"{figure.name}.png")
        _add(written, figs.save(figure, folder / "figures"))
        entries.append(entry)
    commands = list(dict.fromkeys(c for table in tables for c in table.commands))
    if commands:
        script = folder / "missing_runs.sh"
        script.write_text("#!/bin/sh\n# Runs that the tables of this preset/protocol still miss.\n"
                          + "\n".join(commands) + "\n")
        _add(written, {"script": script})
    return Section(preset, protocol, tables, entries, runs, commands, _facts(runs, records))


def _figure1(preset: str, out: Path, data_root: str | None, written: dict[str, Path], notes: list[str],
             points: int) -> list[FigureEntry]:
    from reports.latents import build_figure1

    try:
        figure, stats = build_figure1(get_preset(preset), data_root, points=points)
    except (ValueError, OSError) as exc:  # an unknown preset, or CIFAR-10 without --data-root
        notes.append(f"Figure 1 for preset {html.escape(preset)} skipped: {html.escape(str(exc))}")
        log.warning("Figure 1 for %s skipped: %s", preset, exc)
        return []
    folder = out / preset
    _add(written, figs.save(figure, folder))
    stats.to_csv(folder / "figure1_latents.csv", index=False)
    _add(written, {"csv": folder / "figure1_latents.csv"})
    return [FigureEntry(figure.title, figure.caption, folder / "figure1_latents.png")]


def build_report(results_dir: str | Path, out_dir: str | Path, *, data_root: str | Path | None = None,
                 figure1: bool = True, figure1_points: int = 40) -> dict[str, Path]:
    """Read every record under `results_dir`; write tables, figures and report.html under `out_dir`.

    Returns {path relative to out_dir: absolute path} of everything written; `report.html` is the page.
    `data_root` is the CIFAR-10 root that Figure 1 (and the fill-in commands) need for preset cifar10.
    Missing runs, corrupt records and an empty folder are reported on the page, never raised.
    """
    started = time.perf_counter()
    out, results = Path(out_dir), str(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_root = str(data_root) if data_root is not None else None
    records, corrupt = read_all(results_dir) if Path(results_dir).is_dir() else ([], [])
    written: dict[str, Path] = {}
    notes = [f"Corrupt record skipped: <code>{html.escape(str(path))}</code>: {html.escape(problem)}"
             for path, problem in corrupt]
    if not records:
        notes.append(f"No records under <code>{html.escape(results)}</code>; run for example "
                     f"<code>bench run --preset digits --methods all --classes 0-9 --results {html.escape(results)}</code>.")
    df = records_frame(records)
    sections, preset_figures = [], {}
    for (preset, protocol), runs in (df.groupby(["preset", "protocol"], sort=True) if len(df) else []):
        chosen = [r for r in records if r["preset"] == preset and (r.get("protocol") or {}).get("name") == protocol]
        sections.append(_section(runs.reset_index(drop=True), chosen, preset, protocol, results, data_root, out,
                                 written))
        if figure1 and preset not in preset_figures:
            preset_figures[preset] = _figure1(preset, out, data_root, written, notes, figure1_points)
    intro = [f"Built {time.strftime('%Y-%m-%d %H:%M')} from {len(records)} record(s) under {results}. Tables and "
             "figures read the records only; tables average over seeds. Files: tables (Markdown, CSV, LaTeX) and "
             "figures (PNG, PDF) sit beside this page, one folder per preset and protocol."]
    report = out / "report.html"
    report.write_text(page("Machine unlearning benchmark report", intro, preset_figures, sections, notes))
    _add(written, {"report": report})
    written = {str(path.relative_to(out)): path.resolve() for path in written.values()}
    log.info("report: %s (%d files under %s, %.0f s)", report, len(written), out, time.perf_counter() - started)
    return written
