"""Pretraining time with the CPU to itself and beside busy single-threaded programs, for two commits (issue 27 item 3).

    python scripts/contention.py --before cd6e87b~1 --after HEAD --iterations 300

Each commit is checked out into a temporary git worktree and its `bench pretrain --preset digits` runs from there
(PYTHONPATH puts the worktree's packages first; the dependencies come from this virtual environment), into an empty
cache, once alone and once beside `--busy` processes that spin on one core each. Arms are interleaved (before, after,
before, after, ...) so that a drift of the machine's speed hits both commits alike. Prints one table of wall times.
OMP_NUM_THREADS is removed from the environment: the point is what each commit chooses by itself. Both arms run
`python -c "from bench.cli import main"`, so both use the C library's malloc, where the `bench` command of a commit
with `bench/launch.py` restarts itself with tcmalloc: the table compares thread choices, not allocators.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPIN = "while True: pass"


def worktree(commit: str, parent: Path) -> Path:
    path = parent / commit.replace("~", "_").replace("/", "_")
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), commit], check=True,
                   capture_output=True)
    return path


def pretrain_seconds(tree: Path, iterations: int, cache: Path) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(tree)
    command = [sys.executable, "-c", "from bench.cli import main; main()", "pretrain", "--preset", "digits",
               "--device", "cpu", "--cache", str(cache), "--iterations", str(iterations), "--force"]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{tree.name}: bench pretrain failed\n{done.stdout}\n{done.stderr}")
    threads = next((line.split("using", 1)[1].strip() for line in (done.stdout + done.stderr).splitlines()
                    if "CPU thread" in line), "no thread line: torch's default, or a free machine")
    return seconds, threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", default="HEAD")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--busy", type=int, default=3, help="single-threaded busy programs beside the loaded arm")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="contention-") as scratch:
        scratch = Path(scratch)
        trees = {name: worktree(commit, scratch) for name, commit in (("before", args.before), ("after", args.after))}
        times: dict[tuple[str, str], list[float]] = {}
        said: dict[tuple[str, str], str] = {}
        try:
            for load in ("alone", f"{args.busy} busy"):
                spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(args.busy if load != "alone"
                                                                                          else 0)]
                time.sleep(60 if spinners else 0)  # the 1-minute load average sees them, as on a machine busy for a while
                try:
                    for repeat in range(args.repeats):
                        for name, tree in trees.items():
                            seconds, threads = pretrain_seconds(tree, args.iterations, scratch / f"cache-{name}")
                            times.setdefault((name, load), []).append(seconds)
                            said[(name, load)] = threads
                            print(f"{name:6s} {load:7s} repeat {repeat}: {seconds:6.1f} s ({threads})", flush=True)
                finally:
                    for spinner in spinners:
                        spinner.kill()
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    print(f"\nbench pretrain --preset digits --iterations {args.iterations}: median wall s over {args.repeats} "
          f"(before = {args.before}, after = {args.after})\n")
    print("| commit | alone s | beside busy s | slowdown | threads beside busy |")
    print("|---|---:|---:|---:|---|")
    for name in trees:
        alone = statistics.median(times[(name, "alone")])
        busy = statistics.median(times[(name, f"{args.busy} busy")])
        print(f"| {name} | {alone:.1f} | {busy:.1f} | {busy / alone:.1f}x | {said[(name, f'{args.busy} busy')]} |")


if __name__ == "__main__":
    main()
