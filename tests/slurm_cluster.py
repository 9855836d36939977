"""A real single-node SLURM cluster (munge, MariaDB, slurmdbd, slurmctld, slurmd) under one folder, for tests.

Everything lives under `folder`: configuration, munge key and socket, MariaDB data, state, spool, logs and pid
files. Daemons talk over 127.0.0.1 on free ports, so the cluster does not collide with a system SLURM or with a
second test cluster. `stop()` kills every process it started, and any job step left behind, by pid.

    with LocalSlurmCluster(tmp_path / "slurm") as cluster:
        subprocess.run(["sbatch", "--wrap", "true"], env={**os.environ, **cluster.env})
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

DEBIAN_PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client", "slurmdbd", "mariadb-server")
NEEDED_PROGRAMS = ("munged", "mungekey", "mariadb-install-db", "mariadbd", "mariadb", "slurmdbd", "slurmctld",
                   "slurmd", "sacctmgr", "sinfo", "srun", "sbatch", "squeue", "sacct", "scancel")
MARKER = "LOCAL_SLURM_CLUSTER_ID"  # in every daemon's environment, so job steps they fork can be found


class ClusterStartError(RuntimeError):
    """The cluster did not come up; the message carries the tail of the daemon logs."""


def process_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie counts as dead (init here reaps orphans seconds late)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _wait_until(check, timeout_s: float, what: str, interval_s: float = 0.25) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, so a killed pytest leaves no daemons."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


class LocalSlurmCluster:
    """Start with `start()` or `with`; `env` holds what clients need (SLURM_CONF); `stop()` ends everything."""

    def __init__(self, folder: str | Path, cpus: int = 4, name: str = "benchtest", account: str = "bench",
                 start_timeout_s: float = 120.0) -> None:
        self.folder = Path(folder).resolve()
        self.cpus, self.name, self.account = cpus, name, account
        self.start_timeout_s = start_timeout_s
        self.hostname = socket.gethostname().split(".")[0]
        self.token = uuid.uuid4().hex
        self._procs: dict[str, subprocess.Popen] = {}
        self.pids: dict[str, int] = {}  # every daemon ever started, for checks that stop() ended them
        self.startup_s: float | None = None
        for sub in ("etc", "munge", "db", "state", "spool", "log", "run"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self.conf = self.folder / "etc" / "slurm.conf"
        self.munge_socket = self.folder / "munge" / "munge.socket.2"
        self.db_socket = self.folder / "run" / "mariadb.sock"
        self.env = {"SLURM_CONF": str(self.conf)}

    # -- lifecycle --------------------------------------------------------------------------------------------
    def __enter__(self) -> LocalSlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Write configuration, start every daemon, register accounting; raises ClusterStartError on failure."""
        missing = [p for p in NEEDED_PROGRAMS if not shutil.which(p, path=os.environ.get("PATH", "") + ":/usr/sbin")]
        if missing:
            raise ClusterStartError(f"missing programs {', '.join(missing)}; install the Debian packages "
                                    f"{' '.join(DEBIAN_PACKAGES)}")
        started = time.monotonic()
        self._kill_leftovers()
        try:
            self.db_port, self.ctld_port, self.slurmd_port, self.dbd_port = _free_ports(4)
            self._write_config()
            self._start_munge()
            self._start_mariadb()
            self._start_slurmdbd()
            self._register_accounting()
            self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-i"])
            self._spawn("slurmd", ["slurmd", "-D"])
            self._wait_for_idle_node()
        except Exception as exc:
            report = self.log_tails()
            self.stop()
            raise ClusterStartError(f"local SLURM cluster in {self.folder} did not start: {exc}\n{report}") from exc
        self.startup_s = time.monotonic() - started
        log.info("SLURM cluster %s up in %.1f s (conf %s)", self.name, self.startup_s, self.conf)

    def stop(self) -> None:
        """Cancel jobs, then end slurmd, slurmctld, slurmdbd, MariaDB and munged, then any stray job step."""
        if "slurmctld" in self._procs and process_alive(self._procs["slurmctld"].pid):
            self._cancel_all_jobs()
        for name in ("slurmd", "slurmctld", "slurmdbd", "mariadb", "munged"):
            proc = self._procs.pop(name, None)
            if proc is not None:
                self._end(proc.pid, proc)
        self._kill_leftovers()

    # -- clients ----------------------------------------------------------------------------------------------
    def run(self, *args: str, timeout_s: float = 30, check: bool = True,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        """Run a SLURM client command (sbatch, sacct, ...) against this cluster."""
        return subprocess.run(list(args), env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=timeout_s, check=check, cwd=cwd)

    def sacct_state(self, job_id: str) -> str:
        """The accounting state of a job ('' while accounting has not seen it), e.g. COMPLETED, FAILED, CANCELLED."""
        out = self.run("sacct", "-n", "-X", "-P", "-o", "State", "-j", str(job_id), check=False).stdout.split()
        return out[0] if out else ""

    def log_tails(self, lines: int = 15) -> str:
        parts = []
        for path in sorted((self.folder / "log").glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name} ---\n" + "\n".join(text))
        return "\n".join(parts)

    # -- internals --------------------------------------------------------------------------------------------
    def _write_config(self) -> None:
        f, host = self.folder, self.hostname
        mem_mib = int(int(Path("/proc/meminfo").read_text().split()[1]) / 1024 * 0.9)
        self.conf.write_text(f"""\
ClusterName={self.name}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={f}/state
SlurmdSpoolDir={f}/spool
SlurmctldPidFile={f}/run/slurmctld.pid
SlurmdPidFile={f}/run/slurmd.pid
SlurmctldLogFile={f}/log/slurmctld.log
SlurmdLogFile={f}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true
KillWait=2
InactiveLimit=0
MinJobAge=60
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={self.dbd_port}
AccountingStoragePass={self.munge_socket}
AccountingStorageEnforce=associations
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
NodeName={host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={mem_mib} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
        dbd_conf = self.conf.with_name("slurmdbd.conf")
        dbd_conf.write_text(f"""\
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
DbdHost={host}
DbdAddr=127.0.0.1
DbdPort={self.dbd_port}
SlurmUser=root
PidFile={f}/run/slurmdbd.pid
LogFile={f}/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self.db_port}
StorageUser=slurm
StoragePass={self.token}
StorageLoc=slurm_acct_db
""")
        dbd_conf.chmod(0o600)

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.folder / "log" / f"{name}.out", "ab")  # noqa: SIM115 -- handed to the child
        env = {**os.environ, **self.env, MARKER: self.token}
        self._procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             env=env, cwd=self.folder, start_new_session=True,
                                             preexec_fn=_die_with_parent)
        out.close()
        self.pids[name] = self._procs[name].pid
        (self.folder / "run" / f"{name}.started").write_text(str(self._procs[name].pid))
        time.sleep(0.2)
        if self._procs[name].poll() is not None:
            raise RuntimeError(f"{name} exited at once with code {self._procs[name].returncode}; "
                               f"see {self.folder / 'log' / (name + '.out')}")

    def _start_munge(self) -> None:
        key = self.folder / "etc" / "munge.key"
        if not key.exists():
            subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True, timeout=30)
        key.chmod(0o600)
        (self.folder / "munge").chmod(0o755)  # munged refuses a socket folder of mode 0700
        self._spawn("munged", ["munged", "-F", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                               f"--pid-file={self.folder / 'run' / 'munged.pid'}",
                               f"--log-file={self.folder / 'log' / 'munged.log'}",
                               f"--seed-file={self.folder / 'munge' / 'munged.seed'}"])
        _wait_until(self.munge_socket.exists, 20, "munged socket")

    def _start_mariadb(self) -> None:
        datadir = self.folder / "db" / "data"
        common = [f"--datadir={datadir}", "--user=root", "--innodb-buffer-pool-size=32M",
                  "--innodb-log-file-size=16M", "--innodb-lock-wait-timeout=900"]
        if not (datadir / "mysql").exists():
            subprocess.run(["mariadb-install-db", "--no-defaults", *common, "--skip-test-db", "--skip-name-resolve",
                            "--auth-root-authentication-method=socket"], check=True, capture_output=True,
                           timeout=120, cwd=self.folder)
        self._spawn("mariadb", ["mariadbd", "--no-defaults", *common, f"--socket={self.db_socket}",
                                f"--port={self.db_port}", "--bind-address=127.0.0.1", "--skip-name-resolve",
                                "--skip-log-bin", f"--pid-file={self.folder / 'run' / 'mariadb.pid'}",
                                f"--log-error={self.folder / 'log' / 'mariadb.log'}"])
        _wait_until(lambda: self._sql("SELECT 1", check=False).returncode == 0, 60, "MariaDB")
        self._sql(f"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '{self.token}'; "
                  "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;")

    def _sql(self, statement: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["mariadb", "--no-defaults", f"--socket={self.db_socket}", "-uroot", "-e", statement],
                              capture_output=True, text=True, timeout=20, check=check)

    def _start_slurmdbd(self) -> None:
        self._spawn("slurmdbd", ["slurmdbd", "-D"])
        _wait_until(lambda: self.run("sacctmgr", "-n", "list", "cluster", check=False, timeout_s=15).returncode == 0,
                    60, "slurmdbd", interval_s=0.5)

    def _register_accounting(self) -> None:
        """The cluster, an account and root's association in it (jobs are checked against associations)."""
        if self.name not in self.run("sacctmgr", "-n", "-P", "list", "cluster", "format=Cluster").stdout.split():
            self.run("sacctmgr", "-i", "add", "cluster", self.name)
        self.run("sacctmgr", "-i", "add", "account", self.account, f"Cluster={self.name}",
                 "Description=benchmark tests", "Organization=bench", check=False)
        self.run("sacctmgr", "-i", "add", "user", "root", f"Account={self.account}", f"Cluster={self.name}",
                 check=False)
        listed = self.run("sacctmgr", "-n", "-P", "list", "assoc", "format=Account,User").stdout
        if f"{self.account}|root" not in listed:
            raise RuntimeError(f"account {self.account!r} not registered; sacctmgr lists:\n{listed}")

    def _wait_for_idle_node(self) -> None:
        def idle() -> bool:
            if self._procs["slurmctld"].poll() is not None or self._procs["slurmd"].poll() is not None:
                raise RuntimeError("slurmctld or slurmd exited")
            states = self.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout_s=10).stdout.split()
            return states == ["idle"]

        _wait_until(idle, 60, "node idle in sinfo", interval_s=0.5)
        self.run("srun", "-N1", "-n1", "-t", "1", "true", timeout_s=60)

    def _cancel_all_jobs(self) -> None:
        try:
            ids = self.run("squeue", "-h", "-o", "%A", check=False, timeout_s=10).stdout.split()
            if ids:
                self.run("scancel", *ids, check=False, timeout_s=10)
                _wait_until(lambda: not self.run("squeue", "-h", "-o", "%A", check=False, timeout_s=10).stdout.split(),
                            20, "job cancellation", interval_s=0.5)
        except (subprocess.SubprocessError, TimeoutError) as exc:
            log.warning("could not cancel every job before stopping: %s", exc)

    @staticmethod
    def _end(pid: int, proc: subprocess.Popen | None = None, grace_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `grace_s`; reaps our own children."""
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if proc is not None and proc.poll() is not None:
                    return
                if proc is None and not process_alive(pid):
                    return
                time.sleep(0.1)
        if proc is not None:
            proc.poll()

    def _kill_leftovers(self) -> None:
        """Daemons from pid files of an earlier run in this folder, and job steps forked by our slurmd."""
        victims = set()
        for started in (self.folder / "run").glob("*.started"):
            try:
                pid = int(started.read_text())
                if process_alive(pid) and MARKER.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                    victims.add(pid)
            except (OSError, ValueError):
                pass
            started.unlink(missing_ok=True)
        mine = f"{MARKER}={self.token}".encode()
        job_conf = f"SLURM_CONF={self.conf}".encode()
        keep = _ancestors()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in keep:
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            is_job = job_conf in environ and any(v.startswith(b"SLURM_JOB_ID=") for v in environ)
            if mine in environ or is_job:
                victims.add(int(entry.name))
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while any(process_alive(pid) for pid in victims) and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = [pid for pid in victims if process_alive(pid)]
        if alive:
            log.warning("processes still alive after SIGKILL: %s", alive)
