"""One command line, one set of habits (issue 26 item 4): `--json` prints JSON only on stdout, `bench report` reads
--results and writes --report-dir (old --out still works, and says so) and fails on a folder without records, the
global options work after the subcommand too, every sweep logs an ETA, and `bench ls --preset` shows a preset.

Real commands in subprocesses on the tiny preset.
"""

from __future__ import annotations

import json

import pytest

from bench.cli import hoist_global_options

PRESET = "name: tiny-cli\nbase: tiny\ndescription: the tiny preset, from a file\niteration_scale: 0.5\n"


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_cache, bench_cli):
    """Two runs of `original` made by `bench run --json` (single worker, no progress bars); the process's output."""
    root = tmp_path_factory.mktemp("cli")
    run = bench_cli("run", "--preset", "tiny", "--methods", "original", "--classes", "0,1", "--cache", tiny_cache,
                    "--results", str(root / "results"), "--device", "cpu", "--no-progress", "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    return {"root": root, "results": root / "results", "run": run, "cache": tiny_cache}


def test_run_json_prints_pure_json_on_stdout(results):
    run = results["run"]
    payload = json.loads(run.stdout)  # nothing else on stdout: no header line, no log
    assert payload["counts"]["done"] == 2 and [r["status"] for r in payload["runs"]] == ["done", "done"]
    assert "2 run(s): methods original" in run.stderr  # the header went to stderr


def test_a_single_worker_sweep_logs_an_eta(results):
    # `--no-progress`, one worker: the log line of the second run says how long the rest will take
    assert "[2/2] original class 1 seed 0 (elapsed " in results["run"].stderr and ", ETA " in results["run"].stderr


@pytest.mark.slow
def test_report_reads_results_and_writes_report_dir(results, bench_cli):
    out = results["root"] / "pages"
    made = bench_cli("report", "--results", str(results["results"]), "--report-dir", str(out), "--no-figure1")
    assert made.returncode == 0, made.stderr
    assert (out / "report.html").is_file() and "deprecated" not in made.stderr
    old = bench_cli("report", "--results", str(results["results"]), "--out", str(results["root"] / "old"),
                    "--no-figures")  # the old name of --report-dir: where the page goes, figures or not
    assert old.returncode == 0, old.stderr
    assert "--out is deprecated here" in old.stderr and "use --report-dir" in old.stderr
    assert (results["root"] / "old" / "report.html").is_file()


def test_report_without_records_fails_and_writes_nothing(tmp_path, bench_cli):
    (tmp_path / "empty").mkdir()
    empty = bench_cli("report", "--results", str(tmp_path / "empty"), "--report-dir", str(tmp_path / "out"))
    assert empty.returncode != 0 and f"no record under {tmp_path / 'empty'}" in empty.stderr
    assert "Traceback" not in empty.stderr and not (tmp_path / "out").exists()
    missing = bench_cli("report", "--results", str(tmp_path / "nowhere"), "--report-dir", str(tmp_path / "out"))
    assert missing.returncode != 0 and f"--results {tmp_path / 'nowhere'}: no such folder" in missing.stderr


def test_global_options_work_after_the_subcommand(results, tmp_path, bench_cli):
    (tmp_path / "p.yaml").write_text(PRESET)
    listed = bench_cli("ls", "--preset-file", str(tmp_path / "p.yaml"), "-v")
    assert listed.returncode == 0, listed.stderr
    assert "tiny-cli" in listed.stdout
    shown = bench_cli("ls", "safemax", "--preset", "tiny-cli", f"--preset-file={tmp_path / 'p.yaml'}")
    assert shown.returncode == 0 and "preset tiny-cli" in shown.stdout, shown.stderr
    # a value that looks like a command name stays where it is
    assert hoist_global_options(["--method-module", "run", "ls", "-v", "--", "-v"], {"run", "ls"}) == [
        "--method-module", "run", "-v", "ls", "--", "-v"]


def test_ls_preset_prints_the_resolved_preset_and_protocols(bench_cli):
    shown = bench_cli("ls", "--preset", "tiny")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("# preset tiny (resolved)")
    assert "\nunet:\n" in shown.stdout and "iteration_scale:" in shown.stdout
    assert "# protocol paper (default)" in shown.stdout and "sampler_steps: 2" in shown.stdout
    unknown = bench_cli("ls", "--preset", "nope")
    assert unknown.returncode != 0 and "nope" in unknown.stderr and "Traceback" not in unknown.stderr
