"""`bench`: the command line. Each command parses, delegates, and reports where its outputs are.

This module holds the group and the commands that make things (ls, pretrain, classifier, run, prepare, perf);
bench/cli_attack.py the attacks, bench/cli_results.py the commands on records and the cache, and
bench/cli_common.py what they share.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from bench import interrupts, quick_exit
from bench.cache import Cache, CheckpointError
from bench.cli_attack import attack_group
from bench.cli_common import (
    cache_option,
    cluster_settings,
    data_root_option,
    device_option,
    download_if_asked,
    download_option,
    exit_code,
    fail,
    grid_options,
    grid_specs,
    outcomes_code,
    preset_named,
    preset_option,
    report_attacks,
)
from bench.cli_results import clean_cmd, compare_cmd, export_cmd, import_checkpoint_cmd, report_cmd, status_cmd
from bench.config import PRESETS, get_preset
from bench.device import pick_device
from methods import METHODS, load_plugins

log = logging.getLogger("bench")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")


# Options of `bench` itself that may also follow the subcommand: `bench run --method-module m:C` is
# `bench --method-module m:C run` (flags, then options that take a value).
GLOBAL_FLAGS = ("-v", "--verbose")
GLOBAL_VALUES = ("--preset-file", "--method-module")


def hoist_global_options(args: list[str], commands) -> list[str]:
    """`args` with the global options found after the subcommand's name moved before it (up to a `--`)."""
    position = next((i for i, arg in enumerate(args) if arg in commands
                     and (i == 0 or args[i - 1] not in GLOBAL_VALUES)), None)
    if position is None:
        return args
    moved, rest, index = [], [], position + 1
    while index < len(args):
        arg = args[index]
        if arg == "--":
            rest += args[index:]
            break
        if arg in GLOBAL_FLAGS or ("=" in arg and arg.split("=", 1)[0] in GLOBAL_VALUES):
            moved.append(arg)
        elif arg in GLOBAL_VALUES:
            moved += args[index:index + 2]
            index += 1
        else:
            rest.append(arg)
        index += 1
    return [*args[:position], *moved, args[position], *rest]


class BenchGroup(click.Group):
    """The `bench` group: global options are accepted before or after the subcommand."""

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, hoist_global_options(list(args), self.commands))

    def invoke(self, ctx):
        """SIGTERM is Ctrl-C; either one, where no sweep reported what finished, ends the command with 130 and a
        line saying so (not click's "Aborted!" and 1): one rule for every command (`exit_code`)."""
        previous = interrupts.install()
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("interrupted: what finished is kept; run the command again to resume the rest", err=True)
            ctx.exit(130)
        finally:
            interrupts.restore(previous)


@click.group(cls=BenchGroup)
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
@click.option("--preset-file", "preset_files", multiple=True, type=click.Path(dir_okay=False),
              help="register a preset from a YAML file (see bench/extensions.py); repeatable")
@click.option("--method-module", "method_modules", multiple=True, metavar="PKG.MODULE:CLASS",
              help="register a method class from an importable module; repeatable")
@click.version_option(package_name="unlearning-bench", prog_name="bench")
@click.pass_context
def main(ctx, verbose: bool, preset_files, method_modules) -> None:
    """Benchmark machine unlearning methods on class-conditional diffusion models.

    -v, --preset-file and --method-module may also follow the subcommand."""
    from bench.extensions import load_extensions

    quick_exit.register()
    _setup_logging(verbose)
    load_plugins()  # methods that installed packages declare under the entry-point group
    extensions = tuple(f"preset-file:{Path(p).resolve()}" for p in preset_files)
    extensions += tuple(f"method-module:{m}" for m in method_modules)
    try:
        load_extensions(extensions)
    except (ValueError, ImportError) as exc:
        fail(str(exc))
    ctx.obj = {"extensions": extensions}
    _take_threads()


def _take_threads() -> None:
    """As many torch CPU threads as the machine can give now (bench.device.choose_threads), said when fewer."""
    import torch

    from bench.device import choose_threads

    threads, why = choose_threads()
    torch.set_num_threads(threads)
    (log.info if "busy" in why else log.debug)("using %d CPU thread(s) (%s)", threads, why)


@main.command("ls")
@click.argument("method", required=False)
@click.option("--preset", default=None,
              help="with METHOD: the preset whose values it resolves to [default: digits]; alone: print this "
                   "preset's resolved configuration and protocols")
def list_cmd(method, preset) -> None:
    """List the registered methods and presets; with METHOD, its resolved configuration; with --preset NAME alone,
    the preset's."""
    if method:
        _describe_method(method, preset_named(preset or "digits"))
        return
    if preset:
        _describe_preset(preset_named(preset))
        return
    click.echo("methods:")
    for name, cls in METHODS.items():
        click.echo(f"  {name:14s} {cls.description}")
    click.echo("presets:")
    for name, preset_obj in PRESETS.items():
        click.echo(f"  {name:14s} {preset_obj.description}; protocols: {', '.join(preset_obj.protocols)}")


def _describe_preset(preset) -> None:
    """Every field of a preset (YAML, as a --preset-file writes it) and its protocols, the default one named."""
    import yaml

    fields = json.loads(json.dumps(preset.to_dict(), default=str))  # tuples -> lists for YAML
    protocols = fields.pop("protocols")
    click.echo(f"# preset {preset.name} (resolved); `bench --preset-file F` takes the same fields\n"
               + yaml.safe_dump(fields, sort_keys=False).rstrip())
    for name, protocol in protocols.items():
        default = " (default)" if name == preset.default_protocol else ""
        click.echo(f"\n# protocol {name}{default}\n" + yaml.safe_dump({"protocols": {name: protocol}},
                                                                      sort_keys=False).rstrip())


def _describe_method(name: str, preset) -> None:
    """Every field of METHOD's configuration: type, the paper's default, this preset's value, what --set takes."""
    import dataclasses
    import typing

    from bench.sweep import resolve_method_config

    try:
        cls, config, scaled = resolve_method_config(preset, name)
    except ValueError as exc:
        fail(str(exc))
    hints, paper = typing.get_type_hints(cls.Config), cls.Config()
    click.echo(f"{name}: {cls.description}")
    click.echo(f"preset {preset.name}; set with --set {name}.FIELD=V1,V2 (a list sweeps)\n")
    rows = [("field", "type", "paper", preset.name, "")]
    for field in dataclasses.fields(config):
        kind = getattr(hints[field.name], "__name__", str(hints[field.name]))
        rows.append((field.name, kind, repr(getattr(paper, field.name)), repr(getattr(config, field.name)),
                     "scaled" if field.name in scaled else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    click.echo(f"\n`scaled`: the {preset.name} preset replaces the paper's value (recorded in scaled_from_paper).")


@main.command("pretrain")
@preset_option
@cache_option
@data_root_option
@download_option
@device_option
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True, help="retrain even if a base model exists")
@click.option("--iterations", type=click.IntRange(min=1), default=None,
              help="replace the recipe's iterations (smoke tests; recorded in the checkpoint)")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="replace the recipe's batch size")
@click.option("--speed", "speed_items", multiple=True, metavar="SWITCH=V",
              help="speed switch (amp, channels_last, fused_adam, compile); default: plain fp32, as published")
def pretrain_cmd(preset, cache_dir, data_root, device, seed, force, iterations, batch_size, speed_items) -> None:
    """Train the base diffusion model of a preset with its recipe."""
    from bench.device import PLAIN, Speed
    from bench.prerequisites import pretrain
    from bench.sweep import parse_speed

    preset, cache = preset_named(preset), Cache(cache_dir, data_root)
    download_if_asked(preset, data_root)
    path = cache.base_path(preset)
    if path.exists() and not force:
        click.echo(f"base model already at {path} (use --force to retrain)")
        return
    try:
        switches, dev = parse_speed(speed_items), pick_device(device)
        cache.dataset(preset, "train", keep=True)  # the split, decoded: kept for the next command
    except (ValueError, OSError) as exc:
        fail(str(exc))
    speed = Speed(**dict(switches)) if switches else PLAIN
    if force:  # a new base model: its resumable checkpoint belongs to the old one
        path.with_name("base.partial.pt").unlink(missing_ok=True)
    payload = pretrain(preset, cache, dev, seed=seed, speed=speed, iterations=iterations, batch_size=batch_size)
    click.echo(f"base model: {path} ({payload['step']} steps, {payload['seconds']:.0f} s; {payload['source']})")


@main.command("classifier")
@preset_option
@cache_option
@data_root_option
@download_option
@device_option
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True, help="retrain even if a classifier exists")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="train this many steps instead of the preset's epochs (smoke tests; recorded)")
@click.option("--test-images", type=click.IntRange(min=1), default=None,
              help="measure test accuracy on this many test images instead of all (recorded)")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="replace the preset's batch size")
def classifier_cmd(preset, cache_dir, data_root, device, seed, force, steps, test_images, batch_size) -> None:
    """Train the evaluation classifier of a preset and store its test accuracy."""
    from bench.prerequisites import train_classifier

    preset, cache = preset_named(preset), Cache(cache_dir, data_root)
    download_if_asked(preset, data_root)
    path = cache.classifier_path(preset)
    if path.exists() and not force:
        click.echo(f"classifier already at {path} (use --force to retrain)")
        return
    try:
        dev = pick_device(device)
        cache.dataset(preset, "train", keep=True)  # the split, decoded: kept for the next command
    except (ValueError, OSError) as exc:
        fail(str(exc))
    payload = train_classifier(preset, cache, dev, seed=seed, steps=steps, test_images=test_images,
                               batch_size=batch_size)
    click.echo(f"classifier: {path} ({payload['source']}; test accuracy {100 * payload['test_accuracy']:.2f}% on "
               f"{payload['test_images']} images, {payload['seconds']:.0f} s)")


@main.command("run")
@grid_options
@click.option("--force", is_flag=True, help="redo runs that already have a record")
@click.option("--no-progress", is_flag=True, help="no progress bars")
@click.option("--cluster", type=click.Choice(["local", "slurm", "debug"]), default=None,
              help="run each (method, class, seed) as a submitit job: processes on this machine, all started at "
                   "once with the CPU threads split between them (local; for fewer at once, --workers without "
                   "--cluster), a SLURM job array (slurm), or in this process through the job path (debug) "
                   "[default: in this process]")
@click.option("--cluster-config", default=None, metavar="NAME|PATH",
              help="cluster parameters: slurm/clusters/NAME.yaml or a YAML path (needed with --cluster slurm)")
@click.option("--jobs-folder", default=None, help="submitit pickles and job logs, on storage the jobs can see "
                                                   "[default: RESULTS/.submitit]")
@click.option("--no-wait", is_flag=True, help="submit and exit; see `bench status --results RESULTS` for progress")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="without --cluster: runs at once in worker processes on this machine, CPU threads split between them")
@click.option("--save-model", is_flag=True,
              help="keep each run's unlearned weights as model.safetensors beside its record (path and hash recorded)")
@click.option("--attacks", "attack_names", default="", metavar="relearn,embedding",
              help="after each run, in its job, attack its saved model (implies --save-model) with `bench attack`'s "
                   "default settings")
@click.option("--json", "as_json", is_flag=True, help="print the outcome of every run as JSON instead of tables")
@click.option("--dry-run", is_flag=True,
              help="print every run that would go out (method, class, seed, folder; with --cluster its resources) "
                   "and a total, skipping finished runs as a real run would; run, build and write nothing")
def run_cmd(methods_spec, classes_spec, preset, seeds, protocol, sets, results, cache_dir, data_root, device,
            speed_items, force, no_progress, cluster, cluster_config, jobs_folder, no_wait, workers, save_model,
            attack_names, as_json, dry_run) -> None:
    """Unlearn each forget class with each method, evaluate, and write one record per run."""
    import dataclasses

    from submitit.core.utils import FailedSubmissionError

    from bench.attacks import attack_specs, parse_attacks, scaling_note
    from bench.orchestrate import PrerequisitesFailed, check_writable, run_local

    try:
        attack_names = parse_attacks(attack_names) if attack_names.strip() else ()
    except ValueError as exc:
        fail(f"--attacks: {exc}")
    if dry_run and click.get_current_context().meta.get("download"):
        fail("--dry-run downloads nothing: drop --download (or run without --dry-run)")
    preset_obj, methods, specs = grid_specs(methods_spec, classes_spec, preset, seeds, protocol, sets, results,
                                        cache_dir, data_root, device, speed_items, absolute=cluster is not None,
                                        progress=not no_progress and cluster is None and workers == 1 and not as_json,
                                        save_model=save_model or bool(attack_names))
    specs = [dataclasses.replace(spec, attacks=attack_names) for spec in specs]
    try:
        config = cluster_settings(cluster, cluster_config, no_wait)
        if dry_run:
            _dry_run(specs, cluster, config, force, workers, as_json)
            return
        check_writable(results)
    except (ValueError, PermissionError, FileNotFoundError, CheckpointError) as exc:
        fail(str(exc))
    if cluster is not None:
        results = str(Path(results).resolve())
    click.echo(f"{len(specs)} run(s): methods {', '.join(methods)} x classes {classes_spec} x seeds {seeds}; "
               f"records under {results}/{preset_obj.name}/", err=as_json)  # --json: stdout holds the JSON only
    for note in filter(None, (scaling_note(attack_specs(specs[0], name)) for name in attack_names)):
        click.echo(note, err=as_json)
    try:
        if cluster is None:
            outcomes = run_local(specs, force=force, workers=workers, show_progress=not no_progress and not as_json)
        else:
            outcomes = _run_on_cluster(specs, cluster, config, jobs_folder or str(Path(results) / ".submitit"), force,
                                       no_wait, not no_progress, results, as_json)
    except (CheckpointError, FileNotFoundError, ValueError, PrerequisitesFailed, FailedSubmissionError) as exc:
        fail(str(exc))
    if outcomes is not None:
        try:
            code = _report(outcomes, results, as_json)
        finally:  # the attacks' lines follow the runs' table, also when a run failed
            code = exit_code([code, report_attacks([a for o in outcomes for a in o.attacks], err=as_json)])
        _unread_cache_note(cache_dir)
        if code:
            sys.exit(code)


def _unread_cache_note(cache_dir: str | None) -> None:
    """One line when the cache holds derived files this code no longer reads (a code edit, a base model trained
    again leaves them): `bench clean` lists and removes them."""
    from bench import clean
    from bench.cache import Cache

    root = Cache(cache_dir).root
    try:
        removals, _ = clean.find(root)
    except OSError as exc:  # a note is not worth failing a finished sweep for
        log.debug("cache %s not checked for unread files: %s", root, exc)
        return
    if removals:
        click.echo(f"note: the cache holds {clean.total(removals)}, that this code no longer reads (made by other "
                   f"code, models or data): `bench clean --cache {root} --dry-run` lists them", err=True)


@main.command("prepare")
@grid_options
@click.option("--no-progress", is_flag=True, help="no progress bars")
def prepare_cmd(methods_spec, classes_spec, preset, seeds, protocol, sets, results, cache_dir, data_root, device,
                speed_items, no_progress) -> None:
    """Build what the runs of a grid share (base model, classifier, preparations, FID statistics), nothing else."""
    from bench.prerequisites import build, prerequisites_for

    _, _, specs = grid_specs(methods_spec, classes_spec, preset, seeds, protocol, sets, results, cache_dir, data_root,
                         device, speed_items, absolute=False, progress=not no_progress)
    try:
        for task in prerequisites_for(specs):
            built = build(task)
            what = ", ".join(built["built"]) or "nothing: all cached"
            click.echo(f"{task.preset}: built {what}; base model {built['base']} ({built['base_id']}), classifier "
                       f"{built['classifier']} (test accuracy {100 * built['classifier_accuracy']:.2f}%)")
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))


def _dry_run(specs, cluster: str | None, config: dict, force: bool, workers: int, as_json: bool) -> None:
    """One line per run a real `bench run` would start (finished and claimed runs left out, as it leaves them), with
    the resources its job would get, and a total. Reads records, claims and the cache; writes nothing."""
    from bench.cluster import describe_resources, resources
    from bench.orchestrate import local_gpus, local_slots, split_finished
    from bench.prerequisites import prerequisites_for

    known, todo = split_finished(specs, force)
    first = []
    for task in prerequisites_for(specs):
        preset, cache = get_preset(task.preset), task.cache_obj()
        absent = [what for what, path in (("base model", cache.base_path(preset)),
                                          ("classifier", cache.classifier_path(preset))) if not path.exists()]
        if absent:
            first.append({"preset": task.preset, "build": absent, "cache": str(cache.root),
                          "resources": resources(config, None) if cluster else None})
    jobs = [{"method": spec.method, "variant": spec.variant, "forget_class": spec.forget_class, "seed": spec.seed,
             "directory": str(spec.directory), "resources": resources(config, spec.method) if cluster else None}
            for spec in todo]
    skipped, busy = sum(o.status == "skipped" for o in known), sum(o.status == "busy" for o in known)
    where = f"--cluster {cluster}" if cluster else (f"{workers} worker processes" if workers > 1 else "this process")
    if cluster == "local" and todo:
        gpus = local_gpus(cluster, config, [spec.device for spec in todo])
        needs = {spec.method: gpus.need(resources(config, spec.method)) for spec in todo}
        slots = local_slots(cluster, config, len(todo), gpus=gpus.slots(needs.values()))
        where += f", {'up to ' if len(set(needs.values())) > 1 else ''}{slots} at a time{gpus.describe(needs)}"
    if as_json:
        click.echo(json.dumps({"dry_run": True, "where": where, "prerequisites": first, "runs": jobs,
                               "skipped": skipped, "busy": busy}, indent=2))
        return
    for item in first:
        extra = f"  [{describe_resources(item['resources'])}]" if cluster else ""
        click.echo(f"first: build the {item['preset']} {' and '.join(item['build'])} in {item['cache']}{extra}")
    width = max([len(job["method"]) for job in jobs] + [6])
    for job in jobs:
        variant = "" if job["variant"] == "default" else f" [{job['variant']}]"
        extra = f"  [{describe_resources(job['resources'])}]" if cluster else ""
        click.echo(f"{job['method']:{width}} class {job['forget_class']:<3d} seed {job['seed']:<3d} "
                   f"{job['directory']}{variant}{extra}")
    busy_text = f", {busy} left to another process running them" if busy else ""
    click.echo(f"dry run: {len(jobs)} run(s) to start ({where}), {skipped} skipped (already finished){busy_text}; "
               "nothing was run or written")


def _run_on_cluster(specs, cluster: str, config: dict, jobs_folder: str, force: bool, no_wait: bool,
                    progress: bool, out: str, err: bool = False):
    """Submit, then wait and return the outcomes; with `no_wait`, say what was submitted and return None.
    `err`: say it on stderr (`--json` keeps stdout for the JSON)."""
    from bench.orchestrate import submit_runs, wait_runs

    submission = submit_runs(specs, cluster, config, jobs_folder, force=force, wait_prerequisites=not no_wait)
    if submission.jobs:
        ids = [job.job_id for job in submission.jobs if job is not None]
        if cluster == "slurm":  # one array per distinct method resources (`bench.cluster.Submitter`)
            arrays = [job_id.split("_")[0] for job_id in ids]
            shown = ", ".join(f"array {array} ({arrays.count(array)} tasks)" for array in dict.fromkeys(arrays))
        else:
            shown = ", ".join(ids)
        held = (f" ({submission.queued} more start as these end, {submission.slots} at a time)" if submission.queued
                else "")
        click.echo(f"submitted {len(ids)} run(s) to {cluster}: job {shown}{held}; logs in {jobs_folder}", err=err)
    if no_wait:
        if submission.prerequisites_jobs:
            click.echo(f"the runs wait for job {', '.join(submission.prerequisites_jobs)} (base model, classifier)",
                       err=err)
        status_folder = "" if Path(jobs_folder) == Path(out) / ".submitit" else f" --jobs-folder {jobs_folder}"
        click.echo(f"check progress with: bench status --results {out}{status_folder}", err=err)
        return None
    return wait_runs(submission, progress=progress)


def _report(outcomes, out: str, as_json: bool = False) -> int:
    """The summary table over every record of the sweep, then each failure with its log; returns the exit code
    (`exit_code`). With `as_json`, one JSON object instead: every run's identity, status, record path, error and
    metrics."""
    from bench.orchestrate import finished_record
    from reports.summary import summary_text

    states = ("done", "skipped", "busy", "failed", "interrupted")
    count = {status: sum(o.status == status for o in outcomes) for status in states}
    # runs left to another process may have finished meanwhile: show them too
    records = [o.record or (finished_record(o.spec) if o.status == "busy" else None) for o in outcomes]
    if as_json:
        runs = [{"method": o.spec.method, "variant": o.spec.variant, "forget_class": o.spec.forget_class,
                 "seed": o.spec.seed, "status": o.status, "directory": str(o.spec.directory), "error": o.error,
                 "log": o.log_path, "metrics": record["metrics"] if record else None}
                for o, record in zip(outcomes, records)]
        click.echo(json.dumps({"results": out, "counts": count, "runs": runs}, indent=2, default=str))
        return outcomes_code(count)
    click.echo("\n" + summary_text([record for record in records if record is not None]))
    busy = f", {count['busy']} left to another process running them" if count["busy"] else ""
    stopped = f", {count['interrupted']} not finished (stopped)" if count["interrupted"] else ""
    click.echo(f"\n{count['done']} run(s) done, {count['skipped']} skipped (already finished){busy}, "
               f"{count['failed']} failed{stopped}; records in {out}/")
    failed = [o for o in outcomes if o.status in ("failed", "interrupted")]
    for outcome in failed:
        spec = outcome.spec
        where = f"\n  log: {outcome.log_path}" if outcome.log_path else ""
        label = "FAILED" if outcome.status == "failed" else "NOT FINISHED"
        click.echo(f"{label} {spec.method} [{spec.variant}] class {spec.forget_class} seed {spec.seed}: "
                   f"{outcome.error}{where}", err=True)
    return outcomes_code(count)


@main.command("perf")
@click.option("--preset", default="digits", show_default=True,
              help=f"backbone, batch and schedule of: {', '.join(PRESETS)} (cifar10: the paper's, for a GPU)")
@click.option("--methods", "methods_spec", default="all", show_default=True,
              help="'all' (every method that trains) or a comma-separated list")
@click.option("--variants", default="default", show_default=True,
              help="comma-separated speed-switch sets for the training steps (fp32, default, channels_last, "
                   "compile, compile_channels_last)")
@click.option("--sampler-variants", default=None, help="speed-switch sets for the sampler [default: --variants]")
@click.option("--iterations", default=None, type=click.IntRange(1, None),
              help="timed steps per method after warm-up, the median reported [default: 20, at least 20; 5 at the "
                   "tiny preset, the smoke test]")
@click.option("--warmup", default=None, type=click.IntRange(1, None), help="[default: 3; 1 at the tiny preset]")
@click.option("--sample-batch", default=None, type=click.IntRange(1, None),
              help="images per sampler call [default: 1024 at cifar10, 32 at tiny, elsewhere the batch the "
                   "evaluation samples a retained class in (digits: 100)]")
@click.option("--sample-steps", default=None, type=click.IntRange(1, None),
              help="timed sampler steps [default: 50 at cifar10, 5 at tiny, elsewhere the evaluation's steps, up "
                   "to 2,000 image-steps (digits: 20)]")
@click.option("--out", default="results/perf", show_default=True, help="folder for <gpu>-<date>.json and .md")
@device_option
def perf_cmd(preset, methods_spec, variants, sampler_variants, iterations, warmup, sample_batch, sample_steps, out,
             device) -> None:
    """Time each method's step, the sampler, SA's Fisher and SalUn's mask; write JSON and a Markdown table."""
    from bench.perf import PerfOptions, run_perf, write_outputs

    def names(spec: str) -> tuple[str, ...]:
        return tuple(n.strip() for n in spec.split(",") if n.strip())

    trainable = tuple(name for name, cls in METHODS.items() if cls.Config().iterations > 0)
    options = PerfOptions.for_preset(
        preset, methods=trainable if methods_spec.strip() == "all" else names(methods_spec), variants=names(variants),
        sampler_variants=names(sampler_variants or variants), iterations=iterations, warmup=warmup,
        sample_batch=sample_batch, sample_steps=sample_steps, device=device)
    try:
        options.check()
    except ValueError as exc:
        fail(str(exc))
    result = run_perf(options)
    json_path, md_path = write_outputs(result, out)
    click.echo(md_path.read_text())
    click.echo(f"wrote {json_path} and {md_path}")
    if any("error" in row for row in result["rows"]):
        sys.exit(1)


for command in (attack_group, status_cmd, clean_cmd, report_cmd, compare_cmd, import_checkpoint_cmd, export_cmd):
    main.add_command(command)


if __name__ == "__main__":
    main()
