"""Progress in a log file (SLURM jobs, CI, `make run > log`): whole time-stamped lines at most every 30 s and where
the bar ended, never tqdm's carriage-return redraws, its 0% line or its clearing of a finished bar."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

import pytest
import tqdm.std

from bench.device import LOG_EVERY_S, LogBar, progress_bar

LINE = re.compile(r"\d\d:\d\d:\d\d pretrain digits: +\d+%\|.*\| (\d+)/100 ")


@pytest.fixture
def clock(monkeypatch):
    """tqdm's clock (each bar reads it through `_time`), moved by hand."""
    now = SimpleNamespace(t=1000.0)
    monkeypatch.setattr(tqdm.std, "time", lambda: now.t)
    return now


def steps_shown(text: str) -> list[int]:
    assert "\r" not in text and text.endswith("\n"), repr(text)
    lines = text.splitlines()
    assert all(LINE.match(line) for line in lines), lines
    return [int(LINE.match(line).group(1)) for line in lines]


def test_a_bar_in_a_log_writes_a_line_every_interval_and_where_it_ended(clock):
    out = io.StringIO()
    bar = LogBar(total=100, desc="pretrain digits", file=out, mininterval=LOG_EVERY_S)
    for _ in range(100):
        clock.t += 1.0
        bar.update(1)
        bar.set_postfix(loss="5.47")  # a forced redraw, as the training loop's: still one line per interval
    bar.close()
    assert steps_shown(out.getvalue()) == [30, 60, 90, 100]
    assert "loss=5.47" in out.getvalue().splitlines()[-1]


def test_a_bar_shorter_than_the_interval_writes_nothing_and_a_finished_one_is_not_repeated(clock):
    short = io.StringIO()
    with LogBar(total=100, desc="pretrain digits", file=short, mininterval=LOG_EVERY_S, leave=False) as bar:
        for _ in range(100):
            clock.t += 0.1
            bar.update(1)
    assert short.getvalue() == ""  # was the 0% line alone, then a carriage return

    done = io.StringIO()
    bar = LogBar(total=100, desc="pretrain digits", file=done, mininterval=LOG_EVERY_S)
    clock.t += 40.0
    bar.update(100)
    bar.refresh()  # the sweep's bar refreshes itself before it closes: was its last line twice
    bar.close()
    bar.close()
    assert steps_shown(done.getvalue()) == [100]


def test_a_terminal_gets_tqdms_live_bar_and_a_log_gets_log_lines(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    live = progress_bar(total=3, file=io.StringIO())
    assert not isinstance(live, LogBar) and live.mininterval == 0.1
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    monkeypatch.setenv("TQDM_MININTERVAL", "5")
    logged = progress_bar(total=3, file=io.StringIO())
    assert isinstance(logged, LogBar) and logged.mininterval == 5.0
    live.close()
    logged.close()


def test_a_notebook_keeps_tqdm_autos_widget(monkeypatch):
    # tqdm.auto picks tqdm.notebook's class inside a Jupyter kernel (none here: its class stands in for that choice);
    # a notebook's output is no terminal either, and a widget beats log lines there
    import tqdm.notebook

    from bench import device

    class Widget(tqdm.notebook.tqdm):
        pass

    monkeypatch.setattr(device, "tqdm", Widget)
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    bar = progress_bar(total=3, disable=True)  # disabled: drawing a widget needs ipywidgets and a kernel
    assert isinstance(bar, Widget) and not isinstance(bar, LogBar)
