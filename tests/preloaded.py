"""`python -m bench.cli ARGS` in a new process, without paying for torch's import in each one.

A `bench` command a test runs is a process of its own, as a user's is: its own module state, environment, working
directory, PYTHONPATH, file descriptors, exit status. Starting one the plain way costs ~2 CPU-s on this machine to
import torch, and ~1 more for torch._dynamo, which torch.optim imports on the first step: that was about a third of
the suite's CPU. Here each command is instead forked from a server (one per test worker) that imported those
third-party modules once and nothing else. The server never imports the project (bench, methods, plug-ins), so each
command imports the code of its own checkout and PYTHONPATH afresh, and it exits through the interpreter's own end
(atexit, tracebacks, SystemExit). The server runs with the malloc the `bench` script restarts itself with (tcmalloc
where installed: bench.allocator), so a fork allocates as a user's `bench` does; one whose environment chooses
another (BENCH_ALLOCATOR, LD_PRELOAD) gets a fresh interpreter. What depends on how a process starts (signals, the
installed `bench` script) is tested with plain subprocesses: `conftest.start_bench`.

Run as a script, this file is the server: one JSON request per line on stdin, two replies per request on stdout
(the child's pid when it starts, its return code when it ends).
"""

from __future__ import annotations

import gc
import json
import locale
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# What every bench command imports before its own code (checked by `python -X importtime -m bench.cli ls`),
# torch._dynamo, which the first optimizer step imports, and what data loading and `bench report` import (~2 CPU-s
# more there). Never project code.
PRELOAD = ("numpy", "torch", "torch._dynamo", "torch.utils.flop_counter", "click", "tqdm", "torchvision", "pandas",
           "scipy.stats", "matplotlib", "matplotlib.pyplot", "seaborn")
# Environment variables read when the interpreter starts or those modules load (PYTHONHASHSEED, OMP_NUM_THREADS,
# TQDM_DISABLE, MPLBACKEND, LD_PRELOAD, BENCH_ALLOCATOR, ...): a command that sets one to another value than the
# server has gets a fresh interpreter. Not CUDA_*: CUDA reads them when it initializes, which the server never
# does (checked in `serve`), and torch counts GPUs afresh until then, so a fork that sets CUDA_VISIBLE_DEVICES sees
# what a fresh interpreter sees.
READ_AT_START = ("PYTHON", "OMP_", "KMP_", "MKL_", "OPENBLAS_", "TORCH", "PYTORCH_", "TQDM_", "NUMPY_", "MPL",
                 "SCIPY_", "LD_", "BENCH_ALLOCATOR")


def serve() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    if sys.modules["torch"].cuda.is_initialized():
        raise SystemExit("preloaded server: importing PRELOAD initialized CUDA, so a fork would not read CUDA_*")
    # The preloaded objects out of the collector's reach: a fork's collections, and above all the full one at its
    # interpreter's exit, would otherwise write to every one of them and so copy the server's memory page by page
    # (1.4 s of a `bench ls` that takes 1.7 s; gc.freeze's documented use before fork)
    gc.freeze()
    base_path = sys.path[1:]                 # without this file's folder, which `-m` would not have
    replies = os.fdopen(os.dup(1), "w")
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            replies.close()
            _become(request, base_path)      # ends this process through the interpreter's exit, never returns
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


def _become(request: dict, base_path: list[str]) -> None:
    """Turn this fork into `python -m bench.cli ARGS` started in `cwd` with `env` and the given output files."""
    import importlib
    import runpy

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, fd)
        os.close(out)
    extra = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [os.getcwd(), *extra, *base_path]   # what `python -m` builds
    importlib.invalidate_caches()
    sys.argv = ["-m", *request["args"]]
    runpy.run_module("bench.cli", run_name="__main__", alter_sys=True)
    raise SystemExit(0)


class Server:
    """The test side: one server process, one command at a time."""

    def __init__(self) -> None:
        from bench.allocator import allocator_library  # here, not in the server, which never imports the project

        self._env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"}
        # the malloc the `bench` script restarts itself with (bench.allocator), which the forks inherit mapped; their
        # environment, as the restarted script's, has no LD_PRELOAD
        library = allocator_library(self._env)
        self._proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      env={**self._env, **({"LD_PRELOAD": library} if library else {})},
                                      cwd=Path(__file__).parent, bufsize=0)
        self._pending = b""
        self._lock = threading.Lock()

    def run(self, args: list[str], env: dict, cwd: str | Path, timeout_s: float) -> subprocess.CompletedProcess:
        """As `subprocess.run([python, -m, bench.cli, *args], capture_output=True, text=True, ...)`."""
        argv = [sys.executable, "-m", "bench.cli", *args]
        if not self.preloadable(env):
            return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=cwd)
        with self._lock, tempfile.TemporaryDirectory(prefix="bench-cmd-") as scratch:
            out, err = Path(scratch, "stdout"), Path(scratch, "stderr")
            request = {"args": list(args), "env": env, "cwd": str(Path(cwd).resolve()), "stdout": str(out),
                       "stderr": str(err)}
            self._proc.stdin.write((json.dumps(request) + "\n").encode())
            pid = self._reply(None)["pid"]
            try:
                code = self._reply(timeout_s)["returncode"]
            except subprocess.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)
                self._reply(None)
                raise subprocess.TimeoutExpired(argv, timeout_s, _read(out), _read(err)) from None
            return subprocess.CompletedProcess(argv, code, _read(out), _read(err))

    def preloadable(self, env: dict) -> bool:
        """Whether a command with `env` starts as it would in a fresh interpreter: every variable read at start-up
        (other than PYTHONPATH, which the fork applies) as the server has it."""
        read = {k for k in {*env, *self._env} if k.startswith(READ_AT_START) and k != "PYTHONPATH"}
        return all(env.get(k) == self._env.get(k) for k in read)

    def _reply(self, timeout_s: float | None) -> dict:
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._pending:
            ready, _, _ = select.select([fd], [], [], timeout_s)
            if not ready:
                raise subprocess.TimeoutExpired("bench", timeout_s)
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the preloaded server ended (exit status {self._proc.wait()}); its stderr is "
                                   "in the test's captured output")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        self._proc.stdin.close()
        self._proc.wait(timeout=30)


def _read(path: Path) -> str:
    return path.read_text(encoding=locale.getpreferredencoding(False)) if path.exists() else ""


if __name__ == "__main__":
    serve()
