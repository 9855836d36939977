"""`bench attack relearn` and `bench attack embedding`: is a class really gone from a run's saved model?"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from bench.cache import CheckpointError
from bench.cli_common import cluster_settings, fail, grid_options, grid_specs, report_attacks


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
        fail(f"{name} {text!r}: give integers separated by commas, such as 5,30")


@click.group("attack")
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
    _, _, runs = grid_specs(methods_spec, classes_spec, preset, seeds, protocol, sets, results, cache_dir, data_root,
                        device, speed_items, absolute=cluster is not None,
                        progress=not no_progress and cluster is None and workers == 1 and not as_json)
    try:
        check_options(name, options)
        specs = [spec for run in runs for spec in attack_specs(run, name, options)]
        check_held_out(specs)
        check_attacked(specs)
        config = cluster_settings(cluster, cluster_config, False)
        check_writable(results)
    except (ValueError, PermissionError, FileNotFoundError, CheckpointError) as exc:
        fail(str(exc))
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
        fail(str(exc))
    if code := report_attacks(outcomes, as_json):
        sys.exit(code)

