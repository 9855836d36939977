"""A bench process's exit without the interpreter's final walks over every object torch created.

While a Python process ends, after the atexit handlers, the interpreter collects garbage as it tears its modules
down, and every collection walks every object that is still alive: with torch and torch._dynamo imported
that is over 300,000 objects, and the exit took ~1.1 CPU-s of a 3.8 CPU-s `python -c "import torch._dynamo"`
(docs/benchmarks).
`register()` adds an atexit handler that collects once, so that garbage is finalized as before, and then freezes
what is left (`gc.freeze`: the collector skips those objects from then on). Everything else of the exit is as it
was: atexit handlers, flushed and closed files, objects freed when their last reference goes.
"""

from __future__ import annotations

import atexit
import gc

_registered = False


def register() -> None:
    """Once per process; the handler runs after those registered later (LIFO), so theirs still see a live collector."""
    global _registered
    if not _registered:
        atexit.register(_collect_then_freeze)
        _registered = True


def _collect_then_freeze() -> None:
    gc.collect()
    gc.freeze()
