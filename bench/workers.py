"""`bench run --workers N`: runs in worker processes on this machine, each fed one run at a time by the
orchestrator (`bench.orchestrate.run_local`), forked from a fork server that imported bench and torch once."""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import select
import signal
import threading
import time

import torch
from tqdm import tqdm

from bench.allocator import allocator_library, describe, preloading
from bench.device import choose_threads, gpus_to_share, least_busy, progress_bar
from bench.eta import BAR_FORMAT, SweepEta
from bench.orchestrate import Job, Outcome, ended, log_ended, run_guarded, stopped
from bench.sweep import RunSpec

log = logging.getLogger(__name__)


def _worker_main(conn, threads: int, force: bool, orchestrator: int, gpu: str | None = None) -> None:
    """A worker process: receive (index, spec) on its own pipe until None, send back each run's Outcome. `gpu`:
    the one GPU it sees (set before anything here asks CUDA; the fork server never does)."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    _die_with_orchestrator(orchestrator)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the orchestrator's to handle
    torch.set_num_threads(threads)
    # tqdm's default lock is a multiprocessing semaphore, which a worker process registers with the resource
    # tracker (a "leaked semaphore" warning when it is terminated); a worker draws no bars: a thread lock does
    tqdm.set_lock(threading.RLock())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if gpu is not None:
        log.info("worker %d: GPU %s (CUDA_VISIBLE_DEVICES)", os.getpid(), gpu)
    job = Job(force)
    while (task := conn.recv()) is not None:
        index, spec = task
        conn.send(run_guarded(job, spec))


def _die_with_orchestrator(orchestrator: int) -> None:
    """SIGTERM to this worker when the orchestrator dies, however it dies (a kill, a lost session): a worker left
    behind would go on taking CPU and writing records for a sweep nobody waits for.

    The worker's parent is the fork server (`worker_context`), which outlives a killed orchestrator for as long as
    a worker holds its liveness pipe, so the parent-death signal cannot tell: a thread waits on the orchestrator
    itself (a pidfd on Linux, else a poll every second)."""
    try:
        handle = os.pidfd_open(orchestrator)
    except ProcessLookupError:  # it died before this worker started
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd here (not Linux 5.3+)
        handle = None

    def watch() -> None:
        if handle is not None:
            select.select([handle], [], [])
        else:
            while _alive(orchestrator):
                time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="orchestrator-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or its number taken by someone else's process
        return False
    return True


# What a worker imports before its first run, imported once per sweep by the fork server the workers come from
# instead of once per worker (~3 CPU-s each): bench, torch, and torch._dynamo, which torch.optim imports on the
# first step (~1 CPU-s).
WORKER_PRELOAD = ["bench.workers", "torch._dynamo"]


def worker_context():
    """Workers forked from multiprocessing's fork server: a fresh interpreter that only imported WORKER_PRELOAD
    and so never ran an OpenMP thread (the orchestrator may have, and is never forked). Fresh interpreters for
    each worker (spawn) where the platform has no fork server."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)
    return context


class WorkerPool:
    """Worker processes, each fed one run at a time over its own pipe; a dead worker is replaced and only the run
    it held fails.

    The orchestrator hands out the runs, so it knows which run every worker holds without the worker saying so,
    and no lock is shared between workers: a worker killed at any instant (even in the middle of a message) costs
    its own run and nothing else.
    """

    def __init__(self, workers: int, force: bool, show_progress: bool = True):
        self.workers, self.force, self.show_progress = workers, force, show_progress
        self.context = worker_context()
        self.threads, self.why_threads = choose_threads(workers)  # fewer where other programs keep cores busy

    def _spawn(self, gpu: str | None) -> tuple:
        ours, theirs = self.context.Pipe()
        process = self.context.Process(target=_worker_main, daemon=True,
                                       args=(theirs, self.threads, self.force, os.getpid(), gpu))
        with preloading(allocator_library()):  # the first start starts the fork server, which the workers inherit
            process.start()
        theirs.close()  # the worker's end lives in the worker: its death is an end of file here
        return ours, process

    def run(self, todo: list[RunSpec], progress=None) -> list[Outcome]:
        # each worker sees one GPU (an attack's device is its run's); gpu_of: worker process -> its GPU
        gpus, gpu_of = gpus_to_share(getattr(spec, "run", spec).device for spec in todo), {}
        shared = f"; GPUs {', '.join(gpus)}, one per worker" if gpus else ""
        log.info("running %d run(s) in %d worker processes, %d thread(s) each (%s)%s", len(todo), self.workers,
                 self.threads, self.why_threads, shared)
        waiting = list(enumerate(todo))[::-1]  # popped from the end: spec order
        outcomes: dict[int, Outcome] = {}
        held: dict = {}  # pipe -> (process, index of the run it holds)
        bar = progress_bar(total=len(todo), desc="sweep", unit="run", disable=not self.show_progress,
                           bar_format=BAR_FORMAT)
        clock = SweepEta(todo, self.workers)

        def hand_out(conn, process) -> None:
            """Give this worker the next run, or let it finish; one found dead fails that run and is replaced."""
            while waiting:
                index, spec = waiting.pop()
                try:
                    conn.send((index, spec))
                except OSError:  # it died before its run (BrokenPipeError)
                    conn.close()
                    finish(index, self._died(spec, process))
                    conn, process = start()
                    continue
                held[conn] = (process, index)
                clock.begun(index)
                return
            try:
                conn.send(None)
            except OSError:
                pass  # it is gone already, with nothing to do
            conn.close()

        def start() -> tuple:
            """A new worker, on the GPU the fewest live workers hold (a replaced worker's, when one died)."""
            gpu = least_busy(gpus, (gpu for process, gpu in gpu_of.items() if process.is_alive()))[0] if gpus else None
            conn, process = self._spawn(gpu)
            processes.append(process)
            gpu_of[process] = gpu
            return conn, process

        left = ""  # the ETA of the last finished run's log line, for the bar

        def finish(index: int, outcome: Outcome) -> None:
            nonlocal left
            outcomes[index] = outcome
            left = log_ended(clock, index, outcome, len(outcomes), len(todo))
            if progress:
                progress(outcome)

        def show() -> None:
            """The bar, once the freed worker holds its next run (so `running` counts it)."""
            failed = sum(o.status == "failed" for o in outcomes.values())
            bar.set_postfix_str(f"failed={failed}, running={len(held)}" + (f", ETA {left}" if left else ""),
                                refresh=False)
            bar.n = len(outcomes)
            bar.refresh()

        processes = []
        try:
            for _ in range(min(self.workers, len(todo))):
                hand_out(*start())
            if processes:
                log.info("worker malloc: %s", describe(processes[0].pid))
            while held:
                for conn in multiprocessing.connection.wait(list(held), timeout=1.0):
                    process, index = held.pop(conn)
                    try:
                        outcome = conn.recv()
                    except (EOFError, OSError, pickle.UnpicklingError):  # the worker died, maybe mid-message
                        conn.close()
                        finish(index, self._died(todo[index], process))
                        if waiting:
                            hand_out(*start())
                        show()
                        continue
                    finish(index, outcome)
                    hand_out(conn, process)
                    show()
        except KeyboardInterrupt:
            log.warning("interrupted: stopping %d worker(s)", len(held))
        finally:
            bar.close()
            self._stop(processes, busy={process for process, _ in held.values()})
            for conn in held:
                conn.close()
        finished = list(outcomes.values())
        return finished + (stopped(todo, finished) if len(finished) < len(todo) else [])  # stopped: interrupted

    @staticmethod
    def _stop(processes: list, busy: set) -> None:
        """End the workers still holding a run (interrupted); let the others, told to finish, exit on their own,
        which releases what they opened."""
        for process in busy:
            process.terminate()
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)

    @staticmethod
    def _died(spec: RunSpec, process) -> Outcome:
        """The outcome of the run a dead worker held: failed, with `failure.json` saying so, unless the worker died
        after writing its record (then done)."""
        process.join(timeout=10)  # for its exit code
        outcome = ended(spec, "failed", f"worker process {process.pid} died (exit code {process.exitcode})",
                        mark=True)
        log.log(logging.ERROR if outcome.status == "failed" else logging.WARNING, "%s: worker process %s died; %s",
                spec.describe(), process.pid, outcome.error or "its record was written")
        return outcome
