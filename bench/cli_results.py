"""The `bench` commands on what runs leave behind: records (status, report, compare, export) and the cache (clean,
import-checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from bench.cache import Cache, CheckpointError
from bench.cli_common import cache_option, data_root_option, fail, preset_named, preset_option


@click.command("status")
@click.option("--results", "--out", "out", default="results", show_default=True, help="results folder (the records)")
@click.option("--jobs-folder", default=None,
              help="the submitit folder given to `bench run` [default: RESULTS/.submitit]")
@click.option("--json", "as_json", is_flag=True, help="print the rows as JSON")
@cache_option
def status_cmd(out, jobs_folder, as_json, cache_dir) -> None:
    """Show done / stale / running / failed / missing for every (method, class, seed) submitted or recorded; stale:
    `bench run` with this --cache (without one: the cache each record's base model is in) would run it again (the
    reason is shown)."""
    import dataclasses

    from bench.status import STATES, status

    if not Path(out).is_dir():
        fail(f"results folder {out} does not exist")
    rows = status(out, jobs_folder or Path(out) / ".submitit", cache_dir)
    if as_json:
        counts = {state: sum(r.state == state for r in rows) for state in STATES}
        click.echo(json.dumps({"results": out, "counts": counts, "runs": [dataclasses.asdict(r) for r in rows]},
                              indent=2))
        return
    if not rows:
        click.echo(f"nothing submitted or recorded under {out}")
        return
    width = max(len(r.method) for r in rows), max(len(r.variant) for r in rows), max(len(r.attack) for r in rows)
    width += (max(8, *(len(r.state) for r in rows)),)
    attack = f"{'attack':{width[2]}}  " if width[2] else ""
    click.echo(f"{'method':{width[0]}}  {'variant':{width[1]}}  {attack}class  seed  {'state':{width[3]}} detail")
    for r in rows:
        attack = f"{r.attack:{width[2]}}  " if width[2] else ""
        click.echo(f"{r.method:{width[0]}}  {r.variant:{width[1]}}  {attack}{r.forget_class:5d}  {r.seed:4d}  "
                   f"{r.state:{width[3]}} {r.detail}")
    runs, attacks = [r for r in rows if not r.attack], [r for r in rows if r.attack]
    click.echo(", ".join(f"{sum(r.state == s for r in runs)} {s}" for s in STATES))
    if attacks:
        click.echo("attacks: " + ", ".join(f"{sum(r.state == s for r in attacks)} {s}" for s in STATES))


@click.command("clean")
@cache_option
@click.option("--dry-run", is_flag=True, help="list what would be removed; remove nothing")
def clean_cmd(cache_dir, dry_run) -> None:
    """Remove the cached files this code no longer reads: preparations, samples and FID statistics made by other
    code or for a base model or classifier since trained again, decoded data sets no run reads again (another
    scikit-learn version's, an image folder gone or changed since), and unfinished writes (bench/clean.py). Base
    models, classifiers and the data sets a run may read stay; whatever is removed is rebuilt when a run needs it.
    Run it when no sweep runs; a checkout of other code sharing the cache would compute its files again."""
    from bench import clean
    from bench.cache import Cache

    root = Cache(cache_dir).root
    if not root.is_dir():
        fail(f"cache folder {root} does not exist")
    removals, kept = clean.find(root)
    verb = "would remove" if dry_run else "removed"
    for removal in removals:
        try:
            if not dry_run:
                clean.remove(removal)
        except OSError as exc:
            fail(f"cannot remove {exc.filename or removal.path} ({exc.strerror or exc}); the rest was left")
        click.echo(f"{verb} {clean.readable(removal.size):>10}  {removal.path}  ({removal.why})")
    for note in kept:
        click.echo(f"kept: {note}")
    click.echo(f"{verb} {clean.total(removals)}, from {root}" if removals else
               f"nothing to remove in {root}" + ("" if kept else ": every derived file is of the current code and models"))


@click.command("report")
@click.option("--results", default="results", show_default=True, help="results folder holding the records (read)")
@click.option("--report-dir", "out", default=None, help="where the report goes (written) [default: RESULTS/report]")
@click.option("--out", "old_out", default=None, hidden=True,
              help="deprecated name of --report-dir (in `bench run`, --out is the results folder)")
@data_root_option
@click.option("--no-figure1", is_flag=True, help="skip Figure 1 (latent entropy against t), which reads the data set")
@click.option("--no-figures", is_flag=True,
              help="draw no figure (Figure 1 neither): the tables, runs.csv and the page, in a fraction of the time")
@click.option("--methods", "methods_spec", default=None,
              help="comma-separated methods to show, in the tables' order (e.g. sa,salun,safemax), with a missing-run "
                   "command for those without records [default: the methods that have records]")
@click.option("--classes", "classes_spec", default=None,
              help="forget classes to show, e.g. 0-9 or 0,3,7 [default: the classes that have records]")
@click.option("--reference", default=None, metavar="METHOD",
              help="the method the paired differences subtract [default: safemax if it has records, else the first "
                   "method]")
@click.option("--allow-mixed", is_flag=True,
              help="report records of one preset made from different base models or classifiers together (the page "
                   "says so) instead of refusing")
def report_cmd(results, out, old_out, data_root, no_figure1, no_figures, methods_spec, classes_spec, reference,
               allow_mixed) -> None:
    """Tables (Markdown, CSV, LaTeX), figures, runs.csv/runs.jsonl and one self-contained report.html from the
    records (and attack files) under --results, written to --report-dir; --methods/--classes choose the tables'
    columns and rows (e.g. the paper's grid, with commands for the runs it lacks)."""
    from bench.sweep import parse_classes
    from reports.build import build_report

    if old_out:
        click.echo("bench report: --out is deprecated here (it means the results folder in `bench run`); use "
                   "--report-dir", err=True)
        if out and Path(out) != Path(old_out):
            fail(f"--out {old_out} and --report-dir {out} disagree: give --report-dir only")
        out = out or old_out
    out = out or str(Path(results) / "report")
    methods = [m.strip() for m in methods_spec.split(",") if m.strip()] if methods_spec else None
    try:
        classes = parse_classes(classes_spec, 10**6) if classes_spec else None
    except ValueError as exc:
        fail(f"--classes: {exc}")
    _check_records(results, methods, classes, reference)
    extensions = (click.get_current_context().obj or {}).get("extensions", ())
    try:
        written = build_report(results, out, data_root=data_root, figure1=not no_figure1, methods=methods,
                               classes=classes, reference=reference, extensions=extensions, allow_mixed=allow_mixed,
                               figures=not no_figures)
    except ValueError as exc:  # reports.mixing.MixedModels: the message lists the models and the fix
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write the report to {out}: {exc.strerror or exc}")
    click.echo(f"report: {Path(out) / 'report.html'} ({len(written)} files under {out}/; runs: "
               f"{Path(out) / 'runs.csv'}, {Path(out) / 'runs.jsonl'})")


def _check_records(results: str, methods, classes, reference: str | None) -> None:
    """Before any report is written: `results` holds records (of `methods` and `classes`, when given) and one of
    `reference`; read from the records' paths (<preset>/<protocol>/<method>/<variant>/class<k>/seed<s>)."""
    from bench.records import RECORD_NAME, parse_run_dir

    if not Path(results).is_dir():
        fail(f"--results {results}: no such folder; give the folder `bench run --results` wrote the records to")
    found = []
    for path in Path(results).rglob(RECORD_NAME):
        try:
            found.append(parse_run_dir(path.parent))
        except ValueError:  # a stray record.json outside the layout: the reader reports it
            continue
    kept = [run for run in found if (not methods or run["method"] in methods)
            and (classes is None or run["forget_class"] in classes)]
    if not kept:
        asked = " of the methods and classes asked for" if found else ""
        fail(f"no record{asked} under {results}: nothing to report (run `bench run --results {results}` first, "
              "or give --results the folder that holds the records)")
    if reference and reference not in {run["method"] for run in kept}:
        fail(f"--reference {reference}: no record of that method under {results}; choose from "
              f"{', '.join(sorted({run['method'] for run in kept}))}")


@click.command("compare")
@click.argument("results_a", type=click.Path(exists=True, file_okay=False))
@click.argument("results_b", type=click.Path(exists=True, file_okay=False))
@click.option("--csv", "csv_path", default=None, type=click.Path(dir_okay=False),
              help="also save every matched run (A, B and B - A per metric) as CSV")
@click.option("--by", type=click.Choice(["variant", "protocol", "preset"]), default=None,
              help="pair runs that differ in this (a --set variant, a protocol, a preset) and match on the other keys; "
                   "A and B may be one folder [default: match on all keys]")
@click.option("--allow-mixed", is_flag=True,
              help="compare A and B although they were made from different base models or classifiers (the output "
                   "says so); a folder that mixes them itself is refused all the same")
def compare_cmd(results_a, results_b, csv_path, by, allow_mixed) -> None:
    """Metric deltas B - A between two results folders (UA, H, FID/FD, retained accuracy, RTE), per method,
    variant, class and shared seed, with a summary per method: Markdown on stdout. With --by, runs of different
    variants, protocols or presets are paired (e.g. `bench compare R R --by variant`)."""
    from reports.compare import KEYS, compare_results

    try:
        text, deltas = compare_results(results_a, results_b, by=by, allow_mixed=allow_mixed)
    except ValueError as exc:  # reports.mixing.MixedModels: the message lists the models and the fix
        fail(str(exc))
    click.echo(text)
    if deltas.empty:
        keys = ", ".join(k for k in KEYS if k != by)
        fail(f"no run of {results_b} matches one of {results_a} ({keys}, seed or seed means)"
              + ("" if by else "; to pair runs across variants, protocols or presets, add --by variant|protocol|preset"))
    if csv_path:
        try:
            Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
            deltas.to_csv(csv_path, index=False)
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(csv_path) else ""
            fail(f"cannot write --csv {csv_path}: {exc.strerror or exc}{where}; choose a file in a folder you can write")
        click.echo(f"deltas: {csv_path}")


@click.command("import-checkpoint")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@preset_option
@cache_option
@click.option("--force", is_flag=True, help="replace an existing base model")
def import_checkpoint_cmd(checkpoint, preset, cache_dir, force) -> None:
    """Import a checkpoint written by the published SA/SalUn code (ckpt.pth) as the preset's base model."""
    from bench.checkpoints import import_published_checkpoint

    try:
        path = import_published_checkpoint(Path(checkpoint), preset_named(preset), Cache(cache_dir), force=force)
    except (CheckpointError, ValueError, FileExistsError) as exc:
        fail(str(exc))
    click.echo(f"base model: {path}")


@click.command("export")
@click.argument("run", type=click.Path(exists=True))
@click.option("--format", "fmt", type=click.Choice(["published", "safetensors"]), default="published",
              show_default=True, help="published: the SA/SalUn code's ckpt.pth; safetensors: the weights file "
                                      "(both carry the UNet configuration; see docs/export.md)")
@click.option("--to", "dst", required=True, type=click.Path(dir_okay=False),
              help="the file to write, outside every run folder")
@click.option("--force", is_flag=True, help="replace an existing file at --to")
def export_cmd(run, fmt, dst, force) -> None:
    """Write a run's unlearned weights (saved by `bench run --save-model`) as a published ckpt.pth or safetensors.

    RUN is the run's folder or its record.json.
    """
    from bench.checkpoints import export_run

    try:
        path = export_run(Path(run), fmt, Path(dst), force=force)
    except (CheckpointError, ValueError, FileExistsError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write --to {dst}: {exc.strerror or exc}")
    click.echo(f"{fmt} checkpoint: {path}")

