"""How long a sweep has left, each run weighted by the iterations it will train.

The runs of one sweep differ tenfold in cost (the original model is only evaluated; retrain trains 1,000 steps), and
`bench run` orders them method by method, so counting runs put `make run`'s ETA at 10 minutes when 25 were left. A run
is weighed instead as a + b x its planned iterations, in seconds, both read off the records of the runs that finished:
a, the median time spent outside the unlearning loop (evaluation, loading) by the finished runs that trained, or by
those that did not for a run that trains nothing; b, the median seconds per iteration of the run's method, or of the
slowest method so far until one of its own runs has finished. The runs left are then handed out in order to the
workers as they free up, the runs in progress counting what they have left, and the ETA is when the last one ends.
Until a run that trains has finished, the runs that train have no weight yet, and the ETA is a lower bound
('ETA > 4m 10s'); with no record at all (every run failed) it counts runs. Jobs on a cluster (`wait_runs`) are begun
when they are seen running, and `workers` follows the most seen running at once.
"""

from __future__ import annotations

import heapq
import statistics
import time

from bench.config import get_preset
from bench.sweep import RunSpec, resolve_method_config

# The sweep's bar: tqdm's own remaining time counts runs, which differ tenfold in cost; the bar's postfix shows the
# weighted ETA instead.
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


def planned_iterations(spec: object) -> int | None:
    """The unlearning iterations `spec` will train; None where its method or preset cannot be resolved here, and for
    what is not a run (an attack)."""
    if not isinstance(spec, RunSpec):
        return None
    try:
        return resolve_method_config(get_preset(spec.preset), spec.method, spec.method_overrides)[1].iterations
    except Exception:  # an ETA never stops a sweep: the run itself reports what is wrong with its spec
        return None


def duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


class SweepEta:
    """The ETA of `todo` run by `workers` processes: `begun(i)` when run i starts, `ended(i, outcome)` when it ends."""

    def __init__(self, todo: list, workers: int = 1):
        self.methods = [getattr(spec, "method", None) for spec in todo]  # an attack (`AttackSpec`) has none: counted
        self.planned = [planned_iterations(spec) for spec in todo]
        self.workers, self.started = max(1, workers), time.perf_counter()
        self.left, self.running = set(range(len(todo))), {}  # running: index -> when it began
        # seconds outside the unlearning loop of the finished runs with a record, of those that trained (evaluation,
        # loading) and of those that did not (the original model, whose samples other runs of it may have cached)
        self.outside_s: dict[bool, list[float]] = {True: [], False: []}
        self.per_iteration: dict[str, list[float]] = {}  # method -> seconds per iteration of its finished runs

    def begun(self, index: int) -> None:
        self.running[index] = time.perf_counter()

    def ended(self, index: int, outcome) -> None:
        self.left.discard(index)
        self.running.pop(index, None)
        timings = (getattr(outcome, "record", None) or {}).get("timings") or {}
        total, loop = timings.get("total_s"), timings.get("rte_s")
        trained = (timings.get("iterations") or 0) - (timings.get("resumed_from_step") or 0)  # in this process
        if not (isinstance(total, (int, float)) and isinstance(loop, (int, float))):
            return  # failed, interrupted, or a record without timings: nothing to learn from
        self.outside_s[bool(timings.get("iterations"))].append(max(0.0, total - loop))
        if trained > 0:
            self.per_iteration.setdefault(self.methods[index], []).append(loop / trained)

    def text(self, left: str | None = None) -> str:
        """' (elapsed 1m 20s, ETA 4m 00s)'; '' before the first run ends. `left`: `left_text()`, where the caller
        has it already."""
        left = self.left_text() if left is None else left
        return f" (elapsed {duration(time.perf_counter() - self.started)}, ETA {left})" if left else ""

    def left_text(self) -> str:
        """'4m 00s', or '> 4m 10s' where runs that train have no weight yet; '' before the first run ends."""
        done = len(self.methods) - len(self.left)
        if done == 0:
            return ""
        now = time.perf_counter()
        finished = self.outside_s[True] + self.outside_s[False]
        if not finished:  # no record to weigh by: count runs
            return duration((now - self.started) / done * len(self.left))
        outside = {trains: statistics.median(seconds or finished) for trains, seconds in self.outside_s.items()}
        rates = {method: statistics.median(seconds) for method, seconds in self.per_iteration.items()}
        slowest = max(rates.values(), default=None)  # a method not timed yet: the slowest so far, not the cheapest
        lower_bound, waiting, busy = False, [], []  # busy: seconds each running run has left
        for index in sorted(self.left):
            iterations = self.planned[index]
            rate = rates.get(self.methods[index], slowest)
            if iterations and rate is None:
                lower_bound = True
            seconds = outside[bool(iterations)] + (iterations or 0) * (rate or 0.0)
            if index in self.running:
                busy.append(max(0.0, seconds - (now - self.running[index])))
            else:
                waiting.append(seconds)
        # hand the waiting runs out in order to whichever worker frees first, as the pool does: the last ones may run
        # alone, so the time left is when the last worker ends, not the work over the workers
        free = busy + [0.0] * max(0, self.workers - len(busy))
        heapq.heapify(free)
        for seconds in waiting:
            heapq.heappush(free, heapq.heappop(free) + seconds)
        return ("> " if lower_bound else "") + duration(max(free))
