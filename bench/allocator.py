"""The malloc bench's processes run with: tcmalloc where it is installed, the C library's otherwise.

PyTorch on the CPU allocates and frees a tensor for nearly every operation, and on the digits preset's small shapes
the C library's malloc is a visible part of each step. tcmalloc (gperftools; Debian's libtcmalloc-minimal4, which
`make run` installs) takes ~0.86x the time per digits training step and ~0.84x per evaluation, with every number
bit for bit the same (docs/benchmarks, "The allocator"). A malloc is chosen when a process starts (LD_PRELOAD), so:

- the `bench` console script restarts itself once with it preloaded (`start_preloaded`), before importing anything
  heavy, and then takes LD_PRELOAD out of its environment again, so that other programs it starts are left alone;
- the processes bench starts for runs (the workers' fork server, `--cluster local` jobs) get it with `preloading`.

BENCH_ALLOCATOR=system keeps the C library's malloc everywhere, and an LD_PRELOAD of the user's own is left as it is.
This module imports nothing heavy: the console script calls it before torch is imported.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import functools
import os
import sys
import typing
from pathlib import Path

# Library names ctypes.util.find_library looks up, in order: gperftools' minimal build (no heap profiler), then the full.
ALLOCATORS = ("tcmalloc_minimal", "tcmalloc")
# Set in the environment of the restarted console script only, and removed from it as soon as it starts.
RESTARTED = "BENCH_ALLOCATOR_RESTARTED"


def allocator_library(env: typing.Mapping[str, str] | None = None) -> str | None:
    """The tcmalloc library to preload in a process with environment `env` (this one's by default), or None:
    BENCH_ALLOCATOR=system, an LD_PRELOAD of the user's own (kept as it is), not Linux, or none installed.
    ValueError for a BENCH_ALLOCATOR other than tcmalloc or system."""
    env = os.environ if env is None else env
    choice = env.get("BENCH_ALLOCATOR", "tcmalloc")
    if choice not in ("tcmalloc", "system"):
        raise ValueError(f"BENCH_ALLOCATOR={choice!r}: choose tcmalloc (the default) or system")
    if choice == "system" or env.get("LD_PRELOAD") or not sys.platform.startswith("linux"):
        return None
    return _installed()


@functools.cache
def _installed() -> str | None:
    """The first of ALLOCATORS installed here (looked up once per process: each pool or local job asks)."""
    return next(filter(None, map(ctypes.util.find_library, ALLOCATORS)), None)


@contextlib.contextmanager
def preloading(library: str | None):
    """LD_PRELOAD=`library` for the processes started inside, not after (None: nothing changes)."""
    if library is None:
        yield
        return
    os.environ["LD_PRELOAD"] = library
    try:
        yield
    finally:
        del os.environ["LD_PRELOAD"]


def malloc_of(pid: int | str) -> str:
    """Which malloc process `pid` ("self": this one) runs with, from the libraries it has mapped: "tcmalloc",
    "system", or "unknown" where its memory map cannot be read (no /proc)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return "unknown"
    return "tcmalloc" if "libtcmalloc" in maps else "system"


def describe(pid: int | str) -> str:
    """malloc_of(pid) for the log, with what would make it faster where it is the C library's and not by choice."""
    malloc = malloc_of(pid)
    if malloc != "system" or os.environ.get("BENCH_ALLOCATOR") == "system":
        return malloc
    return f"{malloc} (the C library's; libtcmalloc-minimal4 makes digits steps ~14% faster, docs/benchmarks)"


def start_preloaded() -> None:
    """Restart this process (the same pid, interpreter options and arguments) with the allocator preloaded, where
    allocator_library() names one and the process was started as a script (the `bench` console script); in the
    restarted process, take LD_PRELOAD back out of the environment. Exits with the reason for a bad BENCH_ALLOCATOR."""
    if os.environ.pop(RESTARTED, None) is not None:
        os.environ.pop("LD_PRELOAD", None)  # mapped already; what this process starts chooses for itself
        return
    try:
        library = allocator_library()
    except ValueError as exc:
        raise SystemExit(f"bench: {exc}") from None
    if library is None or not Path(sys.argv[0]).is_file():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
                  {**os.environ, "LD_PRELOAD": library, RESTARTED: library})
    except OSError:
        return  # the interpreter cannot be started again (removed since?): go on with the C library's malloc
