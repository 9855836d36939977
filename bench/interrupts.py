"""Ctrl-C and SIGTERM that cannot be lost.

Python raises KeyboardInterrupt from a signal handler inside whatever code runs at that moment. When that is a weakref
callback or a finalizer (garbage collection, often during an import), the exception is printed as "Exception
ignored in: ..." and dropped, and the command runs on as if nothing had been pressed. The handler here also records
the signal, and the training loop calls `check()` at every step, which raises it again there.
"""

from __future__ import annotations

import signal
import threading

_received: int | None = None  # the signal this command was stopped by, until it ends


def _stop(signum, frame) -> None:
    global _received
    _received = signum
    raise KeyboardInterrupt(f"signal {signum}")


def check() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C or SIGTERM came while this command runs (its first one may have been
    dropped where Python could not raise it)."""
    if _received is not None:
        raise KeyboardInterrupt(f"signal {_received}")


def install() -> dict:
    """Stop on SIGTERM as on Ctrl-C, and record either; the handlers they replace (for `restore`). SIGINT is left
    alone where it is ignored (a worker, whose orchestrator handles Ctrl-C). Main thread only, where Python allows it."""
    global _received
    _received = None
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _stop)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _stop)
    return previous


def restore(previous: dict) -> None:
    global _received
    _received = None
    for signum, handler in previous.items():
        signal.signal(signum, handler)
