"""A Ctrl-C or SIGTERM stops a command even where Python drops the KeyboardInterrupt it raises (`bench.interrupts`)."""

from __future__ import annotations

import itertools
import os
import signal
import sys
import weakref

import pytest
import torch
from torch import nn

from bench import interrupts
from bench.config import TrainConfig
from bench.runner import train


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_python_drops_inside_a_finalizer_still_stops_the_training_loop(signum, monkeypatch):
    """Seen in `make test`: a Ctrl-C that landed in a weakref callback during an import was printed as "Exception
    ignored" and the attack ran on for its 100,000 steps."""
    model, steps, dropped = nn.Linear(2, 1), [], []
    # Ctrl-C's handler as a command started from a terminal has it: a test run started in the background (a shell
    # without job control) inherits SIGINT ignored, and `install` then rightly leaves it alone.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    monkeypatch.setattr(sys, "unraisablehook", dropped.append)  # where Python reports "Exception ignored in: ..."

    def update(step, trainer, _):
        steps.append(step)
        if step == 1:  # the signal arrives while a finalizer runs, so its KeyboardInterrupt is dropped there
            weakref.finalize(type("Doomed", (), {})(), os.kill, os.getpid(), signum)
        return trainer.update(lambda: {"loss": model(torch.ones(1, 2)).sum()})

    previous = interrupts.install()
    try:
        with pytest.raises(KeyboardInterrupt, match=f"signal {int(signum)}"):
            train(model, itertools.repeat(None), update, TrainConfig(iterations=10, batch_size=1, lr=1e-3),
                  torch.device("cpu"), progress=False)
    finally:
        interrupts.restore(previous)
        signal.signal(signal.SIGINT, previous_int)
    assert [d.exc_type for d in dropped] == [KeyboardInterrupt]  # Python did drop the first one
    assert steps == [0, 1]  # stopped before step 2
    assert signal.getsignal(signal.SIGTERM) is previous[signal.SIGTERM]
    interrupts.check()  # restored: nothing left to raise in the next command
