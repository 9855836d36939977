"""The `bench` console script: the command line (bench.cli) in a process that runs with tcmalloc (bench.allocator)."""

from __future__ import annotations

from bench.allocator import start_preloaded


def main() -> None:
    start_preloaded()  # before bench.cli imports torch: the restart costs one bare interpreter start
    from bench.cli import main as command_line

    command_line()
