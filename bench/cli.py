"""`bench`: the command line. Each command parses, delegates, and reports where its outputs are."""

from __future__ import annotations

import logging
import sys

import click

from bench.artifacts import Cache, CheckpointError, default_cache_dir, pretrain, train_classifier
from bench.config import PRESETS, get_preset
from bench.runner import pick_device
from methods import METHODS

log = logging.getLogger("bench")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")


def _fail(message: str) -> None:
    raise click.ClickException(message)


preset_option = click.option("--preset", default="digits", show_default=True,
                             help=f"one of: {', '.join(PRESETS)}")
cache_option = click.option("--cache", "cache_dir", default=None,
                            help=f"cache folder for base models and classifiers [default: $BENCH_CACHE or {default_cache_dir()}]")
data_root_option = click.option("--data-root", default=None, help="data set root (CIFAR-10: torchvision root or ImageFolder tree)")
device_option = click.option("--device", default=None, help="torch device [default: cuda if available, else cpu]")


def _preset(name: str):
    try:
        return get_preset(name)
    except ValueError as exc:
        _fail(str(exc))


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def main(verbose: bool) -> None:
    """Benchmark machine unlearning methods on class-conditional diffusion models."""
    _setup_logging(verbose)


@main.command("ls")
def list_cmd() -> None:
    """List the registered methods and presets."""
    click.echo("methods:")
    for name, cls in METHODS.items():
        click.echo(f"  {name:14s} {cls.description}")
    click.echo("presets:")
    for name, preset in PRESETS.items():
        click.echo(f"  {name:14s} {preset.description}; protocols: {', '.join(preset.protocols)}")


@main.command("pretrain")
@preset_option
@cache_option
@data_root_option
@device_option
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True, help="retrain even if a base model exists")
def pretrain_cmd(preset, cache_dir, data_root, device, seed, force) -> None:
    """Train the base diffusion model of a preset with its recipe."""
    preset, cache = _preset(preset), Cache(cache_dir, data_root)
    path = cache.base_path(preset)
    if path.exists() and not force:
        click.echo(f"base model already at {path} (use --force to retrain)")
        return
    payload = pretrain(preset, cache, pick_device(device), seed=seed)
    click.echo(f"base model: {path} ({payload['step']} steps, {payload['seconds']:.0f} s)")


@main.command("classifier")
@preset_option
@cache_option
@data_root_option
@device_option
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True, help="retrain even if a classifier exists")
def classifier_cmd(preset, cache_dir, data_root, device, seed, force) -> None:
    """Train the evaluation classifier of a preset and store its test accuracy."""
    preset, cache = _preset(preset), Cache(cache_dir, data_root)
    path = cache.classifier_path(preset)
    if path.exists() and not force:
        click.echo(f"classifier already at {path} (use --force to retrain)")
        return
    payload = train_classifier(preset, cache, pick_device(device), seed=seed)
    click.echo(f"classifier: {path} (test accuracy {100 * payload['test_accuracy']:.2f}%, {payload['seconds']:.0f} s)")


@main.command("run")
@click.option("--methods", "methods_spec", default="all", show_default=True,
              help=f"'all' or a comma-separated list of: {', '.join(METHODS)}")
@click.option("--classes", "classes_spec", default="0-9", show_default=True, help="forget classes: 0-9 or 0,3,7")
@preset_option
@click.option("--seeds", default="0", show_default=True, help="comma-separated seeds")
@click.option("--protocol", default=None, help="evaluation protocol of the preset [default: the preset's]")
@click.option("--set", "sets", multiple=True, metavar="METHOD.FIELD=V1,V2",
              help="override (and sweep) a hyperparameter, or protocol.FIELD=V; repeatable")
@click.option("--out", default="results", show_default=True, help="results folder")
@cache_option
@data_root_option
@device_option
@click.option("--force", is_flag=True, help="redo runs that already have a record")
@click.option("--no-progress", is_flag=True, help="no progress bars")
def run_cmd(methods_spec, classes_spec, preset, seeds, protocol, sets, out, cache_dir, data_root, device, force,
            no_progress) -> None:
    """Unlearn each forget class with each method, evaluate, and write one record per run."""
    from bench.orchestrate import build_specs, check_writable, parse_classes, parse_seeds, parse_sets, run_sequential
    from methods import parse_methods
    from reports.summary import summary_text

    preset_obj = _preset(preset)
    try:
        methods = parse_methods(methods_spec)
        classes = parse_classes(classes_spec, preset_obj.num_classes)
        seed_list = parse_seeds(seeds)
        preset_obj.protocol(protocol)
        sweep = parse_sets(sets, methods)
        check_writable(out)
    except (ValueError, PermissionError) as exc:
        _fail(str(exc))
    specs = build_specs(preset_obj, methods, classes, seed_list, sweep, out=out, cache=cache_dir, protocol=protocol,
                        data_root=data_root, device=device, progress=not no_progress)
    click.echo(f"{len(specs)} run(s): methods {', '.join(methods)} x classes {classes_spec} x seeds {seeds}; "
               f"records under {out}/{preset_obj.name}/")
    try:
        outcomes = run_sequential(specs, force=force)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    finished = [o.record for o in outcomes if o.record is not None]
    click.echo("\n" + summary_text(finished))
    failed = [o for o in outcomes if o.status == "failed"]
    done = sum(o.status == "done" for o in outcomes)
    skipped = sum(o.status == "skipped" for o in outcomes)
    click.echo(f"\n{done} run(s) done, {skipped} skipped (already finished), {len(failed)} failed; records in {out}/")
    if failed:
        for outcome in failed:
            click.echo(f"FAILED {outcome.spec.describe()}: {outcome.error}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
