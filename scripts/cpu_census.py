"""Where a command's CPU goes, across every process on the machine (Linux): `python scripts/cpu_census.py -- make test`.

Reads each process's CPU time from /proc twice a second while the command runs, and prints the machine's busy and
idle CPU-seconds (/proc/stat) and a table of CPU-seconds per kind of process. A process that started before the
command counts only what it used during it; one that lived under half a second may be missed (its CPU is in the
busy total, not in a row). docs/benchmarks/README.md quotes its table for `make test`.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import threading
import time
from collections import Counter, defaultdict

HZ = os.sysconf("SC_CLK_TCK")
# (kind, pattern on the command line or name); the first that matches names the row
KINDS = [
    ("xdist workers (in-process tests)", r"exec\(eval\(sys\.stdin"),
    ("submitit jobs", r"submitit\.core\._submit"),
    ("fork servers and their workers", r"multiprocessing\.forkserver"),
    ("preloaded test servers and the bench commands forked from them", r"preloaded\.py"),
    ("SLURM daemons and job steps, MariaDB, munge", r"slurm(ctld|d|dbd|stepd)\b|munged|mariadbd"),
    ("Chromium", r"chrom"),
    ("other Python processes", r"python|/bench |pytest"),
]


def busy_idle() -> tuple[float, float]:
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    return sum(fields[:3] + fields[5:8]) / HZ, sum(fields[3:5]) / HZ


def snapshot() -> dict[tuple[str, str], tuple[str, float]]:
    """(pid, start time) -> (command line or name, CPU seconds so far) for every process now."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                text = stat.read()
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                command = cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        found[(pid, rest[19])] = (command or name, (int(rest[11]) + int(rest[12])) / HZ)
    return found


def kind(command: str) -> str:
    return next((label for label, pattern in KINDS if re.search(pattern, command)), "the rest (other processes)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=0, metavar="N",
                        help="also list the N processes that used the most CPU, with their command lines")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = parser.parse_args()
    command = [arg for arg in args.command if arg != "--"] or parser.error("no command given")
    before, last, stop = snapshot(), {}, threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            for key, (line, cpu) in snapshot().items():
                last[key] = (line, max(cpu, last.get(key, ("", 0.0))[1]))

    busy0, idle0 = busy_idle()
    started, sampler = time.monotonic(), threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = subprocess.call(command)
    stop.set()
    sampler.join()
    wall, (busy1, idle1) = time.monotonic() - started, busy_idle()
    cpu, count, each = defaultdict(float), Counter(), []
    for key, (line, seconds) in last.items():
        used = seconds - before.get(key, ("", 0.0))[1]
        if used > 0:
            label = kind(line)
            cpu[label] += used
            count[label] += 1
            each.append((used, label, line))
    print(f"\n{' '.join(command)}: exit {code}, {wall:.0f} s; machine busy {busy1 - busy0:.0f} CPU-s, "
          f"idle {idle1 - idle0:.0f} CPU-s on {os.cpu_count()} cores\n")
    print("| processes | count | CPU-s |\n|---|---:|---:|")
    for label, seconds in sorted(cpu.items(), key=lambda item: -item[1]):
        print(f"| {label} | {count[label]} | {seconds:.0f} |")
    if args.top:
        print(f"\nthe {args.top} processes that used the most CPU:")
        for used, label, line in sorted(each, reverse=True)[:args.top]:
            print(f"{used:7.1f} CPU-s  [{label}]  {line[:200]}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
