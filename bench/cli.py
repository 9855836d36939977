"""`bench`: the command line. Each command parses, delegates, and reports where its outputs are."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from bench import interrupts
from bench.cache import Cache, CheckpointError, default_cache_dir
from bench.config import PRESETS, get_preset
from bench.device import pick_device
from methods import METHODS, load_plugins

log = logging.getLogger("bench")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")


def _fail(message: str) -> None:
    raise click.ClickException(message)


preset_option = click.option("--preset", default="digits", show_default=True,
                             help=f"one of: {', '.join(PRESETS)}")
cache_option = click.option(
    "--cache", "cache_dir", default=None,
    help=f"cache folder for base models and classifiers [default: $BENCH_CACHE or {default_cache_dir()}]")
data_root_option = click.option(
    "--data-root", default=None, help="data set root (CIFAR-10: torchvision root or ImageFolder tree)")
device_option = click.option("--device", default=None, help="torch device [default: cuda if available, else cpu]")
download_option = click.option(
    "--download", is_flag=True, expose_value=False, callback=lambda ctx, _, value: ctx.meta.update(download=value),
    help="download CIFAR-10 into --data-root first (torchvision; needs network access)")


def _download(preset, data_root: str | None) -> None:
    """With --download, fetch the preset's data set into `data_root` before any work (CIFAR-10 only)."""
    if not click.get_current_context().meta.get("download"):
        return
    if preset.dataset != "cifar10" or not data_root:
        _fail("--download fetches CIFAR-10 into --data-root: use it with --preset cifar10 --data-root PATH")
    from bench.data import load_cifar10

    try:
        for split in ("train", "test"):
            load_cifar10(split, data_root, download=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        _fail(f"cannot download CIFAR-10 into {data_root} ({exc}); copy a CIFAR-10 root or ImageFolder tree there")


def _preset(name: str):
    try:
        return get_preset(name)
    except ValueError as exc:
        _fail(str(exc))


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
        line saying so (not click's "Aborted!" and 1): one rule for every command (`_exit_code`)."""
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

    _setup_logging(verbose)
    load_plugins()  # methods that installed packages declare under the entry-point group
    extensions = tuple(f"preset-file:{Path(p).resolve()}" for p in preset_files)
    extensions += tuple(f"method-module:{m}" for m in method_modules)
    try:
        load_extensions(extensions)
    except (ValueError, ImportError) as exc:
        _fail(str(exc))
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
        _describe_method(method, _preset(preset or "digits"))
        return
    if preset:
        _describe_preset(_preset(preset))
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
        _fail(str(exc))
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

    preset, cache = _preset(preset), Cache(cache_dir, data_root)
    _download(preset, data_root)
    path = cache.base_path(preset)
    if path.exists() and not force:
        click.echo(f"base model already at {path} (use --force to retrain)")
        return
    try:
        switches, dev = parse_speed(speed_items), pick_device(device)
        cache.dataset(preset, "train")
    except (ValueError, OSError) as exc:
        _fail(str(exc))
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

    preset, cache = _preset(preset), Cache(cache_dir, data_root)
    _download(preset, data_root)
    path = cache.classifier_path(preset)
    if path.exists() and not force:
        click.echo(f"classifier already at {path} (use --force to retrain)")
        return
    try:
        dev = pick_device(device)
        cache.dataset(preset, "train")
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    payload = train_classifier(preset, cache, dev, seed=seed, steps=steps, test_images=test_images,
                               batch_size=batch_size)
    click.echo(f"classifier: {path} ({payload['source']}; test accuracy {100 * payload['test_accuracy']:.2f}% on "
               f"{payload['test_images']} images, {payload['seconds']:.0f} s)")


def grid_options(command):
    """The options that say which runs: shared by `bench run` and `bench prepare`."""
    for option in reversed([
        click.option("--methods", "methods_spec", default="all", show_default=True,
                     help=f"'all' or a comma-separated list of: {', '.join(METHODS)}"),
        click.option("--classes", "classes_spec", default="0-9", show_default=True,
                     help="forget classes: 0-9 or 0,3,7"),
        preset_option,
        click.option("--seeds", default="0", show_default=True, help="seeds: 0, 0,1,2 or 0-2"),
        click.option("--protocol", default=None, help="evaluation protocol of the preset [default: the preset's]"),
        click.option("--set", "sets", multiple=True, metavar="METHOD.FIELD=V1,V2",
                     help="override (and sweep) a hyperparameter, or protocol.FIELD=V; repeatable"),
        click.option("--results", "--out", "results", default="results", show_default=True,
                     help="results folder (the records)"),
        cache_option, data_root_option, download_option, device_option,
        click.option("--speed", "speed_items", multiple=True, metavar="SWITCH=V",
                     help="speed switch for training and sampling (amp, channels_last, fused_adam, compile, "
                          "cuda_graphs); repeatable; recorded, and a record made with others is run again"),
    ]):
        command = option(command)
    return command


def _specs(methods_spec, classes_spec, preset, seeds, protocol, sets, results, cache_dir, data_root, device,
           speed_items, absolute: bool, progress: bool, save_model: bool = False):
    """Parse and check every grid option before any work; the RunSpecs they ask for."""
    from bench.sweep import build_specs, parse_classes, parse_seeds, parse_sets, parse_speed, resolve_protocol
    from methods import parse_methods

    preset_obj = _preset(preset)
    _download(preset_obj, data_root)
    try:
        methods = parse_methods(methods_spec)
        classes = parse_classes(classes_spec, preset_obj.num_classes)
        seed_list = parse_seeds(seeds)
        preset_obj.protocol(protocol)
        sweep = parse_sets(sets, methods)
        speed = parse_speed(speed_items)
        pick_device(device)
    except ValueError as exc:
        _fail(str(exc))
    if absolute:  # jobs may start elsewhere: give them absolute paths, and the default cache explicitly
        results, cache_dir = str(Path(results).resolve()), str(Path(cache_dir or default_cache_dir()).resolve())
        data_root = str(Path(data_root).resolve()) if data_root else None
    extensions = (click.get_current_context().obj or {}).get("extensions", ())
    specs = build_specs(preset_obj, methods, classes, seed_list, sweep, results=results, cache=cache_dir,
                        protocol=protocol, data_root=data_root, device=device, speed=speed, progress=progress,
                        save_model=save_model, extensions=extensions)
    try:
        for spec in {s.protocol_overrides: s for s in specs}.values():
            resolve_protocol(preset_obj, spec)
    except ValueError as exc:
        _fail(str(exc))
    return preset_obj, methods, specs


@main.command("run")
@grid_options
@click.option("--force", is_flag=True, help="redo runs that already have a record")
@click.option("--no-progress", is_flag=True, help="no progress bars")
@click.option("--cluster", type=click.Choice(["local", "slurm", "debug"]), default=None,
              help="run each (method, class, seed) as a submitit job: processes on this machine (local), a SLURM "
                   "job array (slurm), or in this process through the job path (debug) [default: in this process]")
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
        _fail(f"--attacks: {exc}")
    if dry_run and click.get_current_context().meta.get("download"):
        _fail("--dry-run downloads nothing: drop --download (or run without --dry-run)")
    preset_obj, methods, specs = _specs(methods_spec, classes_spec, preset, seeds, protocol, sets, results,
                                        cache_dir, data_root, device, speed_items, absolute=cluster is not None,
                                        progress=not no_progress and cluster is None and workers == 1 and not as_json,
                                        save_model=save_model or bool(attack_names))
    specs = [dataclasses.replace(spec, attacks=attack_names) for spec in specs]
    try:
        config = _cluster_config(cluster, cluster_config, no_wait)
        if dry_run:
            _dry_run(specs, cluster, config, force, workers, as_json)
            return
        check_writable(results)
    except (ValueError, PermissionError, FileNotFoundError, CheckpointError) as exc:
        _fail(str(exc))
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
        _fail(str(exc))
    if outcomes is not None:
        try:
            code = _report(outcomes, results, as_json)
        finally:  # the attacks' lines follow the runs' table, also when a run failed
            code = _exit_code([code, _report_attacks([a for o in outcomes for a in o.attacks], err=as_json)])
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
                   f"code or models): `bench clean --cache {root} --dry-run` lists them", err=True)


@main.command("prepare")
@grid_options
@click.option("--no-progress", is_flag=True, help="no progress bars")
def prepare_cmd(methods_spec, classes_spec, preset, seeds, protocol, sets, results, cache_dir, data_root, device,
                speed_items, no_progress) -> None:
    """Build what the runs of a grid share (base model, classifier, preparations, FID statistics), nothing else."""
    from bench.prerequisites import build, prerequisites_for

    _, _, specs = _specs(methods_spec, classes_spec, preset, seeds, protocol, sets, results, cache_dir, data_root,
                         device, speed_items, absolute=False, progress=not no_progress)
    try:
        for task in prerequisites_for(specs):
            built = build(task)
            what = ", ".join(built["built"]) or "nothing: all cached"
            click.echo(f"{task.preset}: built {what}; base model {built['base']} ({built['base_id']}), classifier "
                       f"{built['classifier']} (test accuracy {100 * built['classifier_accuracy']:.2f}%)")
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


def _cluster_config(cluster: str | None, name_or_path: str | None, no_wait: bool) -> dict:
    from bench.cluster import load_cluster_config

    if cluster is None:
        if name_or_path or no_wait:
            raise ValueError("--cluster-config and --no-wait need --cluster local, slurm or debug")
        return {}
    if no_wait and cluster == "debug":
        raise ValueError("--no-wait needs --cluster local or slurm: debug jobs run in this process")
    if name_or_path is None:
        if cluster == "slurm":
            raise ValueError("--cluster slurm needs --cluster-config NAME|PATH (slurm/clusters/NAME.yaml; "
                             "copy example.yaml)")
        return {"timeout_min": 7 * 24 * 60}  # local processes: no time limit to speak of
    return load_cluster_config(name_or_path)


def _dry_run(specs, cluster: str | None, config: dict, force: bool, workers: int, as_json: bool) -> None:
    """One line per run a real `bench run` would start (finished and claimed runs left out, as it leaves them), with
    the resources its job would get, and a total. Reads records, claims and the cache; writes nothing."""
    from bench.cluster import describe_resources, resources
    from bench.orchestrate import split_finished
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
        ids = [job.job_id for job in submission.jobs]
        if cluster == "slurm":  # one array per distinct method resources (`bench.cluster.submit_grouped`)
            arrays = [job_id.split("_")[0] for job_id in ids]
            shown = ", ".join(f"array {array} ({arrays.count(array)} tasks)" for array in dict.fromkeys(arrays))
        else:
            shown = ", ".join(ids)
        click.echo(f"submitted {len(ids)} run(s) to {cluster}: job {shown}; logs in {jobs_folder}", err=err)
    if no_wait:
        if submission.prerequisites_jobs:
            click.echo(f"the runs wait for job {', '.join(submission.prerequisites_jobs)} (base model, classifier)",
                       err=err)
        status_folder = "" if Path(jobs_folder) == Path(out) / ".submitit" else f" --jobs-folder {jobs_folder}"
        click.echo(f"check progress with: bench status --results {out}{status_folder}", err=err)
        return None
    return wait_runs(submission, progress=progress)


def _exit_code(codes) -> int:
    """One rule for every command: 130 if anything was interrupted (Ctrl-C, SIGTERM), else 1 if anything failed."""
    return 130 if 130 in codes else max(codes, default=0)


def _outcomes_code(count: dict) -> int:
    return _exit_code([130 if count.get("interrupted") else 0, 1 if count.get("failed") else 0])


def _report(outcomes, out: str, as_json: bool = False) -> int:
    """The summary table over every record of the sweep, then each failure with its log; returns the exit code
    (`_exit_code`). With `as_json`, one JSON object instead: every run's identity, status, record path, error and
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
        return _outcomes_code(count)
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
    return _outcomes_code(count)


def _report_attacks(outcomes, as_json: bool = False, err: bool = False) -> int:
    """One line per attack (or JSON), failures with their log; returns the exit code (`_exit_code`). `err` writes
    to stderr."""
    from bench.attacks import summary

    if not outcomes:
        return 0
    if as_json:
        keys = ("auc", "steps_to_relearn", "curve", "success_rate", "success_rate_before", "budget")
        rows = [{"attack": o.spec.attack, "variant": o.spec.variant, "method": o.spec.run.method,
                 "run_variant": o.spec.run.variant, "forget_class": o.spec.run.forget_class, "seed": o.spec.run.seed,
                 "status": o.status, "directory": str(o.spec.directory), "error": o.error, "log": o.log_path,
                 "result": {k: o.record[k] for k in keys if k in o.record} if o.record else None} for o in outcomes]
        click.echo(json.dumps({"attacks": rows}, indent=2, default=str), err=err)
    for outcome in outcomes if not as_json else ():
        line = summary(outcome.record) if outcome.record else f"{outcome.spec.describe()}: {outcome.error}"
        where = f" (log: {outcome.log_path})" if outcome.status == "failed" and outcome.log_path else ""
        click.echo(f"{outcome.status:8s} {line}{where}", err=err or outcome.status in ("failed", "interrupted"))
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "busy", "failed", "interrupted")}
    if not as_json:
        stopped = "; stopped: run the command again to resume" if counts["interrupted"] else ""
        click.echo(f"attacks: {', '.join(f'{n} {s}' for s, n in counts.items())}; records in <run>/attacks/"
                   f"{stopped}", err=err)
    return _outcomes_code(counts)


def attack_run_options(command):
    """Where and how attacks run: shared by `bench attack relearn` and `bench attack embedding`."""
    for option in reversed([
        click.option("--force", is_flag=True, help="redo attacks that already have a record"),
        click.option("--no-progress", is_flag=True, help="no progress bars"),
        click.option("--cluster", type=click.Choice(["local", "slurm", "debug"]), default=None,
                     help="run each attack as a submitit job, as `bench run --cluster` runs runs [default: here]"),
        click.option("--cluster-config", default=None, metavar="NAME|PATH",
                     help="cluster parameters: slurm/clusters/NAME.yaml or a YAML path (needed with --cluster slurm)"),
        click.option("--jobs-folder", default=None, help="submitit pickles and job logs [default: RESULTS/.submitit]"),
        click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
                     help="without --cluster: attacks at once in worker processes on this machine"),
        click.option("--json", "as_json", is_flag=True, help="print the outcome of every attack as JSON"),
    ]):
        command = option(command)
    return command


def _int_list(text: str | None, name: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        _fail(f"{name} {text!r}: give integers separated by commas, such as 5,30")


@main.group("attack")
def attack_group() -> None:
    """Is it really forgotten? Attack the saved models of finished runs (`bench run --save-model` or `--attacks`).

    Each attack writes <run dir>/attacks/<attack>/<variant>/attack.json; a rerun skips finished ones.
    """


@attack_group.command("relearn")
@grid_options
@click.option("--k", "k_values", default=None, metavar="K1,K2",
              help="held-out (test split) forget-class images to fine-tune on; a list sweeps [default: 5,50; "
                   "digits 5,30]")
@click.option("--schedule", default=None, metavar="S0,S1,...",
              help="fine-tuning step counts after which forget-class accuracy (100 - UA) is measured "
                   "[default: 0,10,50,100,200]")
@click.option("--samples", type=int, default=None, help="guided forget-class samples per point [default: the "
                                                          "protocol's forget_samples]")
@click.option("--lr", type=float, default=None, help="fine-tuning rate [default: the preset's pretraining rate]")
@click.option("--batch-size", type=int, default=None, help="[default: min(k, the pretraining batch)]")
@click.option("--checkpoint-every", type=int, default=None, help="resumable checkpoint every N steps [default: 50]")
@attack_run_options
def attack_relearn_cmd(k_values, schedule, samples, lr, batch_size, checkpoint_every, **grid) -> None:
    """Fine-tune each run's model on k real forget-class images (pretraining loss) and measure the forget-class
    accuracy (100 - UA), H and forget-class probability of its guided samples after each step count of a schedule."""
    schedule = _int_list(schedule, "--schedule")
    _attack("relearn", {"k": _int_list(k_values, "--k"), "schedule": tuple(schedule) if schedule else None,
                        "samples": samples, "lr": lr, "batch_size": batch_size, "checkpoint_every": checkpoint_every},
            **grid)


@attack_group.command("embedding")
@grid_options
@click.option("--targets", default=None, metavar="embedding,embedding+guidance",
              help="what the search may change: the class embedding, or it and the guidance weight; a list sweeps "
                   "[default: both]")
@click.option("--steps", type=int, default=None, help="optimisation steps [default: 100]")
@click.option("--batch-size", type=int, default=None, help="samples per optimisation step [default: 16]")
@click.option("--sampler-steps", type=int, default=None,
              help="DDIM (eta 0) steps of the differentiable sampler [default: 10]")
@click.option("--lr", type=float, default=None, help="Adam rate of the search [default: 0.05]")
@click.option("--max-guidance", type=float, default=None, help="largest guidance weight tried [default: 10]")
@click.option("--samples", type=int, default=None, help="protocol samples the forget-class accuracy is measured on "
                                                          "[default: the protocol's forget_samples]")
@click.option("--checkpoint-every", type=int, default=None, help="resumable checkpoint every N steps [default: 25]")
@attack_run_options
def attack_embedding_cmd(targets, steps, batch_size, sampler_steps, lr, max_guidance, samples, checkpoint_every,
                         **grid) -> None:
    """Freeze each run's model and search a forget-class embedding (and guidance weight) whose guided samples the
    classifier labels as the forget class; report the forget-class accuracy (100 - UA) before and after."""
    names = [name.strip() for name in targets.split(",") if name.strip()] if targets else None
    _attack("embedding", {"target": names, "steps": steps, "batch_size": batch_size, "sampler_steps": sampler_steps,
                          "lr": lr, "max_guidance": max_guidance, "samples": samples,
                          "checkpoint_every": checkpoint_every}, **grid)


def _attack(name: str, options: dict, methods_spec, classes_spec, preset, seeds, protocol, sets, results, cache_dir,
            data_root, device, speed_items, force, no_progress, cluster, cluster_config, jobs_folder, workers,
            as_json) -> None:
    """Check everything before any work, then run (or submit) the attacks and report them."""
    from submitit.core.utils import FailedSubmissionError

    from bench.attacks import attack_specs, check_attacked, check_held_out, check_options, scaling_note
    from bench.orchestrate import check_writable, run_attacks_local, submit_attacks, wait_runs

    options = {key: value for key, value in options.items() if value is not None}
    _, _, runs = _specs(methods_spec, classes_spec, preset, seeds, protocol, sets, results, cache_dir, data_root,
                        device, speed_items, absolute=cluster is not None,
                        progress=not no_progress and cluster is None and workers == 1 and not as_json)
    try:
        check_options(name, options)
        specs = [spec for run in runs for spec in attack_specs(run, name, options)]
        check_held_out(specs)
        check_attacked(specs)
        config = _cluster_config(cluster, cluster_config, False)
        check_writable(results)
    except (ValueError, PermissionError, FileNotFoundError, CheckpointError) as exc:
        _fail(str(exc))
    click.echo(f"{len(specs)} {name} attack(s) on {len(runs)} run(s); records in each run's attacks/{name}/",
               err=as_json)
    if note := scaling_note(specs):
        click.echo(note, err=as_json)
    try:
        if cluster is None:
            outcomes = run_attacks_local(specs, force=force, workers=workers)
        else:
            folder = jobs_folder or str(Path(specs[0].run.results) / ".submitit")
            outcomes = wait_runs(submit_attacks(specs, cluster, config, folder, force), progress=not no_progress)
    except (CheckpointError, FileNotFoundError, ValueError, FailedSubmissionError) as exc:
        _fail(str(exc))
    if code := _report_attacks(outcomes, as_json):
        sys.exit(code)


@main.command("status")
@click.option("--results", "--out", "out", default="results", show_default=True, help="results folder (the records)")
@click.option("--jobs-folder", default=None,
              help="the submitit folder given to `bench run` [default: RESULTS/.submitit]")
@click.option("--json", "as_json", is_flag=True, help="print the rows as JSON")
@cache_option
def status_cmd(out, jobs_folder, as_json, cache_dir) -> None:
    """Show done / stale / running / failed / missing for every (method, class, seed) submitted or recorded; stale:
    `bench run` with this --cache would run it again (the reason is shown)."""
    import dataclasses

    from bench.status import STATES, status

    if not Path(out).is_dir():
        _fail(f"results folder {out} does not exist")
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


@main.command("clean")
@cache_option
@click.option("--dry-run", is_flag=True, help="list what would be removed; remove nothing")
def clean_cmd(cache_dir, dry_run) -> None:
    """Remove the cached files this code no longer reads: preparations, samples and FID statistics made by other
    code or for a base model or classifier since trained again, and unfinished writes (bench/clean.py). Base models,
    classifiers and data sets stay; whatever is removed is rebuilt when a run needs it. Run it when no sweep runs; a
    checkout of other code sharing the cache would compute its files again."""
    from bench import clean
    from bench.cache import Cache

    root = Cache(cache_dir).root
    if not root.is_dir():
        _fail(f"cache folder {root} does not exist")
    removals, kept = clean.find(root)
    verb = "would remove" if dry_run else "removed"
    for removal in removals:
        try:
            if not dry_run:
                clean.remove(removal)
        except OSError as exc:
            _fail(f"cannot remove {exc.filename or removal.path} ({exc.strerror or exc}); the rest was left")
        click.echo(f"{verb} {clean.readable(removal.size):>10}  {removal.path}  ({removal.why})")
    for note in kept:
        click.echo(f"kept: {note}")
    click.echo(f"{verb} {clean.total(removals)}, from {root}" if removals else
               f"nothing to remove in {root}" + ("" if kept else ": every derived file is of the current code and models"))


@main.command("report")
@click.option("--results", default="results", show_default=True, help="results folder holding the records (read)")
@click.option("--report-dir", "out", default=None, help="where the report goes (written) [default: RESULTS/report]")
@click.option("--out", "old_out", default=None, hidden=True,
              help="deprecated name of --report-dir (in `bench run`, --out is the results folder)")
@data_root_option
@click.option("--no-figure1", is_flag=True, help="skip Figure 1 (latent entropy against t), which reads the data set")
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
def report_cmd(results, out, old_out, data_root, no_figure1, methods_spec, classes_spec, reference,
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
            _fail(f"--out {old_out} and --report-dir {out} disagree: give --report-dir only")
        out = out or old_out
    out = out or str(Path(results) / "report")
    methods = [m.strip() for m in methods_spec.split(",") if m.strip()] if methods_spec else None
    try:
        classes = parse_classes(classes_spec, 10**6) if classes_spec else None
    except ValueError as exc:
        _fail(f"--classes: {exc}")
    _check_records(results, methods, classes, reference)
    extensions = (click.get_current_context().obj or {}).get("extensions", ())
    try:
        written = build_report(results, out, data_root=data_root, figure1=not no_figure1, methods=methods,
                               classes=classes, reference=reference, extensions=extensions, allow_mixed=allow_mixed)
    except ValueError as exc:  # reports.mixing.MixedModels: the message lists the models and the fix
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot write the report to {out}: {exc.strerror or exc}")
    click.echo(f"report: {Path(out) / 'report.html'} ({len(written)} files under {out}/; runs: "
               f"{Path(out) / 'runs.csv'}, {Path(out) / 'runs.jsonl'})")


def _check_records(results: str, methods, classes, reference: str | None) -> None:
    """Before any report is written: `results` holds records (of `methods` and `classes`, when given) and one of
    `reference`; read from the records' paths (<preset>/<protocol>/<method>/<variant>/class<k>/seed<s>)."""
    from bench.records import RECORD_NAME, parse_run_dir

    if not Path(results).is_dir():
        _fail(f"--results {results}: no such folder; give the folder `bench run --results` wrote the records to")
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
        _fail(f"no record{asked} under {results}: nothing to report (run `bench run --results {results}` first, "
              "or give --results the folder that holds the records)")
    if reference and reference not in {run["method"] for run in kept}:
        _fail(f"--reference {reference}: no record of that method under {results}; choose from "
              f"{', '.join(sorted({run['method'] for run in kept}))}")


@main.command("compare")
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
        _fail(str(exc))
    click.echo(text)
    if deltas.empty:
        keys = ", ".join(k for k in KEYS if k != by)
        _fail(f"no run of {results_b} matches one of {results_a} ({keys}, seed or seed means)"
              + ("" if by else "; to pair runs across variants, protocols or presets, add --by variant|protocol|preset"))
    if csv_path:
        try:
            Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
            deltas.to_csv(csv_path, index=False)
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(csv_path) else ""
            _fail(f"cannot write --csv {csv_path}: {exc.strerror or exc}{where}; choose a file in a folder you can write")
        click.echo(f"deltas: {csv_path}")


@main.command("import-checkpoint")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@preset_option
@cache_option
@click.option("--force", is_flag=True, help="replace an existing base model")
def import_checkpoint_cmd(checkpoint, preset, cache_dir, force) -> None:
    """Import a checkpoint written by the published SA/SalUn code (ckpt.pth) as the preset's base model."""
    from bench.checkpoints import import_published_checkpoint

    try:
        path = import_published_checkpoint(Path(checkpoint), _preset(preset), Cache(cache_dir), force=force)
    except (CheckpointError, ValueError, FileExistsError) as exc:
        _fail(str(exc))
    click.echo(f"base model: {path}")


@main.command("export")
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
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot write --to {dst}: {exc.strerror or exc}")
    click.echo(f"{fmt} checkpoint: {path}")


@main.command("perf")
@click.option("--preset", default="digits", show_default=True,
              help=f"backbone, batch and schedule of: {', '.join(PRESETS)} (cifar10: the paper's, for a GPU)")
@click.option("--methods", "methods_spec", default="all", show_default=True,
              help="'all' (every method that trains) or a comma-separated list")
@click.option("--variants", default="default", show_default=True,
              help="comma-separated speed-switch sets for the training steps (fp32, default, channels_last, "
                   "compile, compile_channels_last)")
@click.option("--sampler-variants", default=None, help="speed-switch sets for the sampler [default: --variants]")
@click.option("--iterations", default=20, show_default=True, type=click.IntRange(20, None),
              help="timed steps per method after warm-up (the median is reported)")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(1, None))
@click.option("--sample-batch", default=None, type=click.IntRange(1, None),
              help="images per sampler call [default: 1024 at cifar10, 32 elsewhere]")
@click.option("--sample-steps", default=None, type=click.IntRange(1, None),
              help="timed sampler steps [default: 50 at cifar10, 5 elsewhere]")
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
        _fail(str(exc))
    result = run_perf(options)
    json_path, md_path = write_outputs(result, out)
    click.echo(md_path.read_text())
    click.echo(f"wrote {json_path} and {md_path}")
    if any("error" in row for row in result["rows"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
