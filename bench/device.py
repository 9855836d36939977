"""Everything about the device: which one, the speed switches, autocast, synchronisation, memory and progress bars.

Training (`bench.runner`) and sampling (`bench.diffusion`) both take a `Speed`, so one switch applies to every
method and to evaluation alike. Nothing here knows about models or methods.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import os
import platform
import resource
import subprocess
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

LOG_EVERY_S = 30.0  # a bar's lines in a log file; TQDM_MININTERVAL sets another interval


def progress_bar(**kwargs) -> tqdm:
    """A tqdm bar that redraws live on a terminal, and in a log file (SLURM, CI, `make run > log`) writes a line
    every 30 s (`LogBar`). A Jupyter notebook, which is no terminal either, keeps tqdm.auto's widget."""
    notebook = sys.modules.get("tqdm.notebook")  # imported by tqdm.auto only inside a notebook
    if sys.stderr.isatty() or (notebook is not None and issubclass(tqdm, notebook.tqdm)):
        return tqdm(mininterval=0.1, **kwargs)
    return LogBar(mininterval=float(os.environ.get("TQDM_MININTERVAL", LOG_EVERY_S)), **kwargs)


class LogBar(tqdm):
    """tqdm for a log file: a time-stamped line at most every `mininterval` seconds, and the last state when it
    closes after showing one. tqdm's own redraws begin with a carriage return, so a log kept every redraw of a
    run on one ever-growing line, glued the next log line to it, and showed a short bar as its 0% line alone."""

    def __init__(self, *args, **kwargs):
        self._shown_at, self._shown_n, self._closing = None, None, False  # tqdm's __init__ calls display()
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None) -> bool:
        if msg is not None or self.n == self.initial or self.n == self._shown_n:
            return False  # tqdm clearing its line (nothing to clear in a log), nothing done yet, nothing new
        since = self._time() - (self.start_t if self._shown_at is None else self._shown_at)
        if not self._closing and since < self.mininterval:
            return False  # a forced redraw (set_postfix, tqdm's monitor thread) within the interval
        self.fp.write(f"{time.strftime('%H:%M:%S')} {self}\n")
        self.fp.flush()
        self._shown_at, self._shown_n = self._time(), self.n
        return True

    def close(self) -> None:
        if not self.disable and self._shown_n is not None:
            self._closing = True
            self.display()  # where it ended, after the lines before
        self.leave = False  # a log line is never cleared or ended by tqdm
        super().close()


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, as SLURM and taskset set it), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def runnable_now(samples: int = 5, interval_s: float = 0.05) -> float | None:
    """How many other threads want a CPU at this moment: the median over `samples` readings of the runnable count
    in /proc/loadavg, less this process's own; None where there is no /proc (macOS, Windows)."""
    readings = []
    for index in range(samples):
        try:
            with open("/proc/loadavg") as handle:
                readings.append(int(handle.read().split()[3].split("/")[0]) - 1)  # "R/T": R counts the reader
        except (OSError, IndexError, ValueError):
            return None
        if index + 1 < samples:
            time.sleep(interval_s)
    return float(sorted(readings)[len(readings) // 2])


def choose_threads(processes: int = 1) -> tuple[int, str]:
    """CPU threads for each of `processes` processes about to start here, and why.

    $OMP_NUM_THREADS, where set, wins. Otherwise the usable cores are split between the processes, less the cores
    other programs keep busy: OpenMP threads that outnumber the free cores spin against each other, which made
    pretraining 8x slower beside three busy processes. Busy is the smaller of the 1-minute load average and the
    threads runnable right now: the average alone still counts, for a minute, work that has just ended (the
    install before `make run`, the previous sweep), and gave a quiet machine's pretraining one thread.
    """
    cores = usable_cores()
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    share = max(1, cores // processes)

    def threads(busy: float) -> int:
        free = max(1, int(cores - busy + 0.5))
        return share if free >= cores or free // processes >= share else max(1, free // processes)

    try:
        average = os.getloadavg()[0]
    except (AttributeError, OSError):
        return share, f"{cores} cores / {processes} process(es)"
    busy, load = average, f"load {average:.1f}"
    if threads(average) < share:  # the average says busy: ask whether that work is still running (0.2 s)
        now = runnable_now()
        if now is not None:
            busy, load = min(average, now), f"{load}, {now:.0f} runnable now"
    chosen = threads(busy)
    note = ": other programs are busy" if chosen < share else ""
    return chosen, f"{cores} cores / {processes} process(es), {load}{note}"


def visible_gpus() -> list[str]:
    """The GPUs this process sees, as CUDA_VISIBLE_DEVICES names them (indices, or UUIDs and MIG instances), else
    0..n-1 by torch's count."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [str(index) for index in range(torch.cuda.device_count())]
    return [name.strip() for name in visible.split(",") if name.strip()]


def names_its_gpu(device: str | None) -> bool:
    """Whether a run's --device picks one GPU by number (cuda:1), which must mean the same GPU in every process."""
    return device not in (None, "cpu", "cuda")


def gpus_to_share(devices: typing.Iterable[str | None]) -> list[str]:
    """The GPUs that processes started for runs on `devices` take one each (`least_busy`): `visible_gpus()`; none
    where every run is on the CPU or a run names its GPU (cuda:N). Processes that all saw every GPU all ran on the
    first."""
    devices = set(devices)
    return [] if devices <= {"cpu"} or any(map(names_its_gpu, devices)) else visible_gpus()


def least_busy(gpus: typing.Sequence, held: typing.Iterable, count: int = 1) -> tuple:
    """The `count` GPUs of `gpus` that the fewest of `held` (the GPUs of the processes still running) are; the
    first of equals."""
    busy = collections.Counter(held)
    return tuple(sorted(gpus, key=lambda gpu: busy[gpu])[:count])  # sorted is stable: the first of equals first


def pick_device(name: str | None = None) -> torch.device:
    """`name` if given (checked: an unknown name or CUDA without a GPU is a ValueError), else CUDA when available,
    else the CPU."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    return device


@functools.cache
def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name ('AMD EPYC 9654 96-Core Processor'): /proc/cpuinfo's, else what the system tool says
    (`_system_cpu_names`), else the architecture ('aarch64'). Several models (big and little cores) are joined.
    Read once per process and file."""
    try:
        names = [line.split(":", 1)[1].strip() for line in Path(cpuinfo).read_text().splitlines()
                 if line.split(":", 1)[0].strip() in ("model name", "cpu model")]
    except OSError:
        names = []
    names = [name for name in dict.fromkeys(names or _system_cpu_names()) if name]
    return " + ".join(names) or platform.processor() or platform.machine()


def _system_cpu_names() -> list[str]:
    """lscpu's model names (Linux on ARM names its cores there, not in /proc/cpuinfo), sysctl's (macOS), or none."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        if sys.platform == "darwin":
            command = ["sysctl", "-n", "machdep.cpu.brand_string"]
            return [subprocess.run(command, capture_output=True, text=True, timeout=5).stdout.strip()]
        if sys.platform.startswith("linux"):
            shown = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
            return [line.split(":", 1)[1].strip() for line in shown.splitlines() if line.startswith("Model name:")]
    return []


def device_name(device: torch.device) -> str:
    """What ran it, as records and `bench perf` name it: the GPU's name, or the CPU's model and the torch threads
    ('cpu (AMD EPYC 9654 96-Core Processor, 1 thread)'). Seconds compare only between runs of one name, so reports
    flag tables that mix names (reports/mixing.py)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    model = cpu_model()
    return f"cpu ({model + ', ' if model else ''}{threads} thread{'' if threads == 1 else 's'})"


@dataclass(frozen=True)
class Speed:
    """Switches that make a step faster without changing what it computes beyond bf16 rounding.

    A switch that does not apply to the device is dropped there (`for_device`).
    """

    # bf16 autocast with fp32 master weights and optimizer state: True on any device (the CPU too), False nowhere
    # (the published fp32 computation), None (the default) on CUDA for what docs/bf16.md measured to move no mean
    # metric beyond the seed spread (`for_device(..., bf16_measured)`: a method's `bf16_measured`), else fp32.
    amp: bool | None = None
    # NHWC weights and activations for the convolutions. Off until a GPU table shows it pays: the H200 anchor
    # (bf16 + channels_last + fused Adam, eager) was slower than plain fp32 for this UNet.
    channels_last: bool = False
    fused_adam: bool = True  # one fused Adam kernel (CUDA and CPU: 3x foreach's speed there); else foreach
    compile: bool = False  # torch.compile the model; its compile time lands in the first step, reported apart
    cuda_graphs: bool = True  # the sampler's guided forward captured once and replayed (CUDA only)

    def for_device(self, device: torch.device, bf16_measured: bool = True) -> Speed:
        """The switches that apply on `device`: CUDA graphs need CUDA; autocast too unless asked for by True, and
        by default (None) only where `bf16_measured`. Resolving a resolved Speed changes nothing."""
        cuda = device.type == "cuda"
        return dataclasses.replace(self, amp=self.amp is True or (self.amp is None and cuda and bf16_measured),
                                   cuda_graphs=self.cuda_graphs and cuda)

    def describe(self) -> str:
        on = [f.name for f in dataclasses.fields(self) if getattr(self, f.name)]
        return ", ".join(on) or "none (plain fp32 eager)"


# The plain fp32 eager path, the reference the switches are checked against.
PLAIN = Speed(amp=False, channels_last=False, fused_adam=False, compile=False, cuda_graphs=False)


def autocast(device: torch.device, enabled: bool, cache: bool = True):
    """bf16 autocast on `device` when `enabled` (callers decide where it applies: `Speed.for_device`).

    `cache=False` for CUDA-graph capture, whose replays must not read casts cached outside the graph.
    """
    if enabled:
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def prepare_model(model: nn.Module, speed: Speed) -> None:
    """Apply the model-level switches in place: channels_last weights, then torch.compile of its forward.

    `nn.Module.compile` keeps the module (and its parameter names): methods call the same object they hold.
    """
    if speed.channels_last:
        model.to(memory_format=torch.channels_last)
    if speed.compile:
        model.compile()


def same_layout(tensor: Tensor, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """`tensor` on `like`'s device with `like`'s strides (channels_last or not), copied only when they differ.

    foreach kernels take their fast path (one launch for all tensors) only over tensors of equal strides.
    """
    dtype = dtype or tensor.dtype
    if tensor.device == like.device and tensor.dtype == dtype and tensor.stride() == like.stride():
        return tensor
    return torch.empty_like(like, dtype=dtype).copy_(tensor)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_snapshot(device: torch.device) -> dict[str, float]:
    """Peak GPU memory (GiB) and the process's peak resident memory (MiB) since `reset_peak_memory`."""
    stats = {"peak_process_mib": _peak_rss_mib()}
    if device.type == "cuda":
        stats["peak_gpu_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        stats["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return stats


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: the GPU allocator's and, on Linux, the process's resident high-water mark.

    Without the second, a worker that ran SA first would report SA's peak for every later run it does.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass  # elsewhere the peak counts from the process's start (ru_maxrss)


def _peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
