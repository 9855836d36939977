"""What the `bench` commands share: option definitions, the grid's parsing, the cluster settings, exit codes and
the attacks' summary. Errors a user can cause end as `fail(message)`: click prints "Error: message" and exits with 1."""

from __future__ import annotations

import json
from pathlib import Path

import click

from bench.cache import default_cache_dir
from bench.config import PRESETS, get_preset
from bench.device import pick_device
from methods import METHODS


def fail(message: str) -> None:
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


def download_if_asked(preset, data_root: str | None) -> None:
    """With --download, fetch the preset's data set into `data_root` before any work (CIFAR-10 only)."""
    if not click.get_current_context().meta.get("download"):
        return
    if preset.dataset != "cifar10" or not data_root:
        fail("--download fetches CIFAR-10 into --data-root: use it with --preset cifar10 --data-root PATH")
    from bench.data import load_cifar10

    try:
        for split in ("train", "test"):
            load_cifar10(split, data_root, download=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        fail(f"cannot download CIFAR-10 into {data_root} ({exc}); copy a CIFAR-10 root or ImageFolder tree there")


def preset_named(name: str):
    """The preset called `name`; an unknown name fails, naming the presets."""
    try:
        return get_preset(name)
    except ValueError as exc:
        fail(str(exc))


def grid_options(command):
    """The options that say which runs: shared by `bench run`, `bench prepare` and `bench attack`."""
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


def grid_specs(methods_spec, classes_spec, preset, seeds, protocol, sets, results, cache_dir, data_root, device,
           speed_items, absolute: bool, progress: bool, save_model: bool = False):
    """Parse and check every grid option before any work; the RunSpecs they ask for."""
    from bench.sweep import build_specs, parse_classes, parse_seeds, parse_sets, parse_speed, resolve_protocol
    from methods import parse_methods

    preset_obj = preset_named(preset)
    download_if_asked(preset_obj, data_root)
    try:
        methods = parse_methods(methods_spec)
        classes = parse_classes(classes_spec, preset_obj.num_classes)
        seed_list = parse_seeds(seeds)
        preset_obj.protocol(protocol)
        sweep = parse_sets(sets, methods)
        speed = parse_speed(speed_items)
        pick_device(device)
    except ValueError as exc:
        fail(str(exc))
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
        fail(str(exc))
    return preset_obj, methods, specs


def cluster_settings(cluster: str | None, name_or_path: str | None, no_wait: bool) -> dict:
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


def exit_code(codes) -> int:
    """One rule for every command: 130 if anything was interrupted (Ctrl-C, SIGTERM), else 1 if anything failed."""
    return 130 if 130 in codes else max(codes, default=0)


def outcomes_code(count: dict) -> int:
    return exit_code([130 if count.get("interrupted") else 0, 1 if count.get("failed") else 0])


def report_attacks(outcomes, as_json: bool = False, err: bool = False) -> int:
    """One line per attack (or JSON), failures with their log; returns the exit code (`exit_code`). `err` writes
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
    return outcomes_code(counts)

