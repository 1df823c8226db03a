"""A real Slurm cluster for tests: private daemons on this host, all state in a temp dir.

The harness installs Debian's ``slurmctld``, ``slurmd``, ``slurm-client`` and
``munge`` when they are missing (``apt-get``, so it needs root), then starts
a private ``munged`` (as the munge user, with its own key and socket), one
``slurmctld`` and one ``slurmd`` per node (as root, on free ports). Nothing
under ``/etc`` is read or changed: every Slurm command the harness runs, and
every job (sbatch passes the environment on), gets ``SLURM_CONF`` pointing at
the temp ``slurm.conf``. Starting takes about a second once installed.

Two nodes by default, both on this host (``slurmd -N sfpnodeK``, each with its
own port and spool dir), because a heterogeneous job's components are only
started by the backfill scheduler, which plans whole nodes: two components on
one node wait for each other forever. Two nodes also let multi-node scripts
run for real. Each node declares more CPUs and memory than the machine has
(``SlurmdParameters=config_overrides``) so that scripts' shapes fit on a CI
box, and one GPU whose "device" is a /dev/null look-alike in the temp dir, so
that ``--gres=gpu:1`` is accepted; jobs then run with ``--server-device cpu``.

``srun --mpi=pmi2`` starts the PyPI ``mpich`` wheel (its PMI client speaks
Slurm's PMI-2 wire protocol), so ``MpiDefault=pmi2``; MPICH's ``mpiexec``
inside an allocation works as well.

Usage::

    with SlurmCluster() as cluster:
        job_id = cluster.submit("jobs/single_node.sbatch", env={"CONFIG": ...}, cwd=tmp_path)
        (info,) = cluster.wait(job_id, timeout=300)
        assert info.state == "COMPLETED", cluster.job_output(info)

Every wait is bounded and fails with a message that says what it waited for,
with the tails of the daemons' logs.
"""

from __future__ import annotations

import os
import random
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
REQUIRED_BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "munged")
FINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "PREEMPTED", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED",
})


class SlurmHarnessError(RuntimeError):
    """The test cluster could not be installed, started, or driven."""


@dataclass
class JobInfo:
    """What ``scontrol show job`` says about a finished (or timed-out) job."""

    job_id: int
    state: str
    exit_code: str  # "rc:signal", as Slurm prints it
    fields: dict[str, str]

    @property
    def stdout_path(self) -> Path | None:
        path = self.fields.get("StdOut")
        return Path(path) if path else None


def _missing(names: Sequence[str]) -> list[str]:
    return [n for n in names if shutil.which(n) is None and not Path("/usr/sbin", n).exists()]


def _run(cmd: Sequence[str], timeout: float, what: str, env: Mapping[str, str] | None = None,
         check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        raise SlurmHarnessError(f"{what}: `{' '.join(cmd)}` did not finish in {timeout:.0f} s") from exc
    if check and proc.returncode != 0:
        raise SlurmHarnessError(f"{what}: `{' '.join(cmd)}` exited {proc.returncode}\n"
                                f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def ensure_installed(packages: Sequence[str] = APT_PACKAGES, binaries: Sequence[str] = REQUIRED_BINARIES,
                     timeout: float = 300.0) -> None:
    """apt-get install ``packages`` unless every one of ``binaries`` is already there."""
    if not _missing(binaries):
        return
    if os.geteuid() != 0:
        raise SlurmHarnessError(f"missing {', '.join(_missing(binaries))} and not root to install it: "
                                f"run `apt-get install {' '.join(packages)}` first")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    proc = _run(install, timeout, "apt-get install", env=env, check=False)
    if proc.returncode != 0:  # usually a stale or empty package index
        _run(["apt-get", "update", "-q"], timeout, "apt-get update", env=env)
        _run(install, timeout, "apt-get install", env=env)
    missing = _missing(binaries)
    if missing:
        raise SlurmHarnessError(f"after installing {' '.join(packages)} still missing: {', '.join(missing)}")


def _job_pids(job_id: int) -> list[int]:
    """Processes on this host of Slurm job ``job_id``: its step daemons (``slurmstepd: [ID.batch]``)
    and whatever runs with ``SLURM_JOB_ID=ID`` in its environment."""
    env_mark, step_mark, pids = f"SLURM_JOB_ID={job_id}".encode(), f"[{job_id}.".encode(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (step_mark in (entry / "cmdline").read_bytes()
                        or env_mark in (entry / "environ").read_bytes().split(b"\0")):
                    pids.append(int(entry.name))
            except OSError:  # gone meanwhile, or not ours to read
                pass
    return pids


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """A private munged + slurmctld + one slurmd per node on this host; see the module docstring.

    ``cpus``, ``gpus`` and ``real_memory_mb`` are what each node declares, not what it has.
    """

    def __init__(self, nodes: int = 2, cpus: int = 16, gpus: int = 1, real_memory_mb: int = 256000,
                 partition: str = "debug", start_timeout: float = 90.0) -> None:
        self.cpus, self.gpus, self.real_memory_mb = cpus, gpus, real_memory_mb
        self.partition = partition
        self.start_timeout = start_timeout
        self.hostname = socket.gethostname().split(".")[0]
        self.nodes = [f"sfpnode{i}" for i in range(1, nodes + 1)]
        self.root: Path | None = None
        self.conf: Path | None = None
        self._procs: list[tuple[str, subprocess.Popen]] = []
        self.start_seconds: float | None = None

    # -- lifecycle -----------------------------------------------------------

    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Install if needed, write the config, start the daemons, wait for an idle node."""
        t0 = time.monotonic()
        ensure_installed()
        if os.geteuid() != 0:
            raise SlurmHarnessError("the Slurm test cluster runs slurmd as root; run the tests as root")
        try:
            self.root = Path(tempfile.mkdtemp(prefix="sfp-slurm-"))
            self.root.chmod(0o755)  # munged (as munge) must reach its own subdirectory
            self._start_munge()
            self._write_config()
            self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            for node in self.nodes:
                self._spawn(f"slurmd-{node}", [_sbin("slurmd"), "-D", "-N", node, "-f", str(self.conf),
                                               "-L", str(self.root / f"slurmd-{node}.log")])
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0

    def stop(self) -> None:
        """Cancel all jobs, stop every daemon this harness started, remove its temp dir."""
        if self.conf is not None and any(p.poll() is None for n, p in self._procs if n == "slurmctld"):
            try:  # let Slurm end the jobs' processes before the daemons go
                self._client(["scancel", "--full", f"--partition={self.partition}"], timeout=15, check=False)
                self._wait_for(lambda: not self._client(["squeue", "-h"], timeout=10, check=False).stdout.strip(),
                               30, "cancelled jobs to leave the queue")
            except SlurmHarnessError:
                pass  # stopping goes on regardless; leftover steps are killed below
        for _, proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
        for name, proc in reversed(self._procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self._procs.clear()
        self._kill_leftovers()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
        self.conf = None

    def _kill_leftovers(self) -> None:
        """End what outlived the daemons: slurmstepd and job processes, found by our SLURM_CONF."""
        if self.conf is None:
            return
        marker = f"SLURM_CONF={self.conf}".encode()
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
                continue
            try:
                environ = (pid_dir / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in environ:
                try:
                    os.kill(int(pid_dir.name), signal.SIGKILL)
                except OSError:
                    pass

    def _spawn(self, name: str, cmd: list[str], user: str | None = None) -> subprocess.Popen:
        assert self.root is not None
        log = open(self.root / f"{name}.console.log", "wb")
        kwargs = {}
        if user is not None:
            pw = pwd.getpwnam(user)
            kwargs = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        env = dict(os.environ, SLURM_CONF=str(self.conf)) if self.conf else dict(os.environ)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, **kwargs)
        log.close()
        self._procs.append((name, proc))
        return proc

    def _start_munge(self) -> None:
        assert self.root is not None
        munge_dir = self.root / "munge"
        munge_dir.mkdir(mode=0o700)
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        pw = pwd.getpwnam("munge")
        for path in (munge_dir, key):
            os.chown(path, pw.pw_uid, pw.pw_gid)
        self.munge_socket = munge_dir / "munge.socket"
        self._spawn("munged", [
            _sbin("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
            f"--key-file={key}", f"--pid-file={munge_dir / 'munged.pid'}",
            f"--log-file={munge_dir / 'munged.log'}", f"--seed-file={munge_dir / 'munged.seed'}",
        ], user="munge")
        self._wait_for(lambda: self.munge_socket.exists(), 20, "munged to create its socket",
                       extra=lambda: self._tail(munge_dir / "munged.log") + self._tail(self.root / "munged.console.log"))

    def _write_config(self) -> None:
        assert self.root is not None
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        ctld_port, slurmd_port, *node_ports = _free_ports(2 + len(self.nodes))
        (self.root / "state").mkdir()
        # Every node is a slurmd on this host with its own port, spool dir and log.
        node_lines = "\n".join(
            f"NodeName={node} NodeHostname={self.hostname} NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus} "
            f"RealMemory={self.real_memory_mb}{gres} State=UNKNOWN" for node, port in zip(self.nodes, node_ports))
        self.conf = self.root / "slurm.conf"
        self.conf.write_text(f"""\
# Written by tests/slurm_cluster.py; lives and dies with {self.root}
ClusterName=sfptest
SlurmctldHost={self.hostname}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool-%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/slurmctld.log
SlurmdLogFile={self.root}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=100
MpiDefault=pmi2
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=3600
# Job ids of their own: MPICH names its shared-memory segments after the PMI job, so two test
# clusters on one host that both run a job 1 would collide in /dev/shm ("Out of memory" at MPI_Init).
FirstJobId={random.randrange(10_000, 60_000_000)}
# Slurm's default: a signalled step has 30 s before SIGKILL. The run finishes its round in progress after
# SIGTERM, and a round takes up to 9 s on a slow stretch of the 2-core VM (5 s here once cut one short).
KillWait=30
MailProg=/bin/true
SchedulerType=sched/backfill
# Heterogeneous jobs are started only by the backfill pass: run it every second.
SchedulerParameters=bf_interval=1
GresTypes=gpu
{node_lines}
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        if self.gpus:
            # Slurm drops file-less GPUs, so each fake GPU is a /dev/null look-alike
            # (char device 1:3): the scheduler counts it, nothing can use it.
            lines = ["AutoDetect=off"]
            for node in self.nodes:
                for i in range(self.gpus):
                    dev = self.root / f"fakegpu-{node}-{i}"
                    os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
                    lines.append(f"NodeName={node} Name=gpu File={dev}")
            (self.root / "gres.conf").write_text("\n".join(lines) + "\n")

    def _nodes_idle(self) -> bool:
        """Whether sinfo shows every node idle: nothing allocated, nothing completing."""
        out = self._client(["sinfo", "-h", "-N", "-o", "%N %t"], timeout=10, check=False)
        states = dict(line.split()[:2] for line in out.stdout.splitlines() if len(line.split()) >= 2)
        return out.returncode == 0 and all(states.get(node) == "idle" for node in self.nodes)

    def _wait_idle(self) -> None:
        def idle() -> bool:
            for name, proc in self._procs:
                if proc.poll() is not None:
                    raise SlurmHarnessError(f"{name} exited with {proc.returncode} while starting\n{self.logs()}")
            return self._nodes_idle()
        self._wait_for(idle, self.start_timeout, f"nodes {','.join(self.nodes)} to be idle in sinfo",
                       extra=lambda: self._client(["sinfo", "-N", "-l"], timeout=10, check=False).stdout + self.logs())

    # -- helpers -------------------------------------------------------------

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment a Slurm client command (or a submitted job) sees."""
        if self.conf is None:
            raise SlurmHarnessError("the cluster is not running")
        env = dict(os.environ)
        # Both nodes are this host at 127.0.0.1: MPICH's UCX netmod must use loopback between
        # them (left to itself it may pick an interface whose address it cannot exchange).
        env.setdefault("UCX_NET_DEVICES", "lo")
        env.update(extra or {})
        env["SLURM_CONF"] = str(self.conf)
        return env

    def _client(self, cmd: list[str], timeout: float = 30, check: bool = True,
                env: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env=self.env(env), cwd=cwd)
        except subprocess.TimeoutExpired as exc:
            raise SlurmHarnessError(f"`{' '.join(cmd)}` did not answer in {timeout:.0f} s\n{self.logs()}") from exc
        if check and proc.returncode != 0:
            raise SlurmHarnessError(f"`{' '.join(cmd)}` exited {proc.returncode}: {proc.stderr.strip()}\n{self.logs()}")
        return proc

    @staticmethod
    def _wait_for(cond, timeout: float, what: str, extra=lambda: "") -> None:
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            if cond():
                return
            if time.monotonic() > deadline:
                raise SlurmHarnessError(f"timed out after {timeout:.0f} s waiting for {what}\n{extra()}")
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    @staticmethod
    def _tail(path: Path, chars: int = 2500) -> str:
        try:
            return f"--- {path} ---\n{path.read_text(errors='replace')[-chars:]}\n"
        except OSError:
            return f"--- {path}: not there ---\n"

    def logs(self) -> str:
        """The tails of the daemons' logs, for error messages."""
        if self.root is None:
            return ""
        # A daemon that died before opening its log file said why on the console.
        out = []
        for daemon in ["slurmctld", *(f"slurmd-{node}" for node in self.nodes)]:
            log, console = self.root / f"{daemon}.log", self.root / f"{daemon}.console.log"
            out.append(self._tail(log if log.is_file() and log.stat().st_size else console, 1500))
        return "".join(out)

    def job_log(self, job_id: int, lines: int = 80) -> str:
        """Every daemon's log lines about job ``job_id`` (its launches, requeues, exits), for a failed job's
        message: the logs go with the cluster's temporary directory."""
        if self.root is None:
            return ""
        marks = re.compile(rf"(JobId={job_id}\b|[Jj]ob[ _]?{job_id}\b|\[{job_id}\.|StepId={job_id}\.)")
        out = []
        for daemon in ["slurmctld", *(f"slurmd-{node}" for node in self.nodes)]:
            try:
                text = (self.root / f"{daemon}.log").read_text(errors="replace")
            except OSError:
                continue
            hits = [line for line in text.splitlines() if marks.search(line)]
            out.append(f"--- {daemon}.log, job {job_id} ({len(hits)} lines, last {lines}) ---\n"
                       + "\n".join(hits[-lines:]) + "\n")
        return "".join(out)

    # -- jobs ----------------------------------------------------------------

    def submit(self, script: str | Path, env: Mapping[str, str] | None = None,
               args: Sequence[str] = (), cwd: str | Path | None = None) -> int:
        """``sbatch [args] script`` with ``env`` added to this environment (``--export=ALL``); the job id."""
        cmd = ["sbatch", "--parsable", "--export=ALL", *args, str(script)]
        out = self._client(cmd, timeout=30, env=env, cwd=cwd)
        match = re.match(r"^(\d+)", out.stdout.strip())
        if not match:
            raise SlurmHarnessError(f"sbatch printed no job id: {out.stdout!r} {out.stderr!r}")
        return int(match.group(1))

    def test_only(self, script: str | Path, env: Mapping[str, str] | None = None,
                  args: Sequence[str] = (), cwd: str | Path | None = None) -> str:
        """``sbatch --test-only``: would Slurm accept the script as written? Its answer, or raise."""
        cmd = ["sbatch", "--test-only", "--export=ALL", *args, str(script)]
        out = self._client(cmd, timeout=30, env=env, cwd=cwd, check=False)
        answer = (out.stdout + out.stderr).strip()
        if out.returncode != 0 or "to start at" not in answer:
            raise SlurmHarnessError(f"`{' '.join(cmd)}` refused the job: {answer}")
        return answer

    def job(self, job_id: int) -> list[JobInfo]:
        """``scontrol show job``: one record per component (het jobs) or array task."""
        out = self._client(["scontrol", "show", "job", "-o", str(job_id)], timeout=15)
        infos = []
        for line in out.stdout.splitlines():
            fields = dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))
            if "JobId" in fields:
                infos.append(JobInfo(int(fields["JobId"]), fields.get("JobState", "?"),
                                     fields.get("ExitCode", "?"), fields))
        if not infos:
            raise SlurmHarnessError(f"scontrol knows no job {job_id}: {out.stdout!r}")
        return infos

    def wait(self, job_id: int, timeout: float) -> list[JobInfo]:
        """Wait until every record of ``job_id`` is in a final state; cancel it and raise on timeout."""
        result: list[JobInfo] = []

        def done() -> bool:
            nonlocal result
            result = self.job(job_id)
            return all(info.state in FINAL_STATES for info in result)

        try:
            self._wait_for(done, timeout, f"job {job_id} to finish")
        except SlurmHarnessError as exc:
            self._client(["scancel", str(job_id)], timeout=15, check=False)
            states = ", ".join(f"{i.job_id}:{i.state} (reason {i.fields.get('Reason', '?')})" for i in result)
            outputs = "".join(self.job_output(i) for i in result)
            raise SlurmHarnessError(f"{exc}\nlast states: {states}\n{outputs}{self.job_log(job_id)}{self.logs()}") from None
        return result

    def start_requeued_now(self, job_id: int, timeout: float, **updates: str) -> None:
        """Wait until ``job_id`` is back in the queue after a requeue, then let it start at once
        (after ``scontrol update`` of ``updates``, e.g. ``TimeLimit="10"``, if any).

        Slurm holds a requeued batch job until two minutes after its requeue
        (its BeginTime); an administrator may move that with ``scontrol update
        StartTime=now``, which saves each requeue test those two minutes. Only once the nodes
        are idle again and no process of the requeued instance is left (its batch shell, launcher and
        ranks), though: the hold also lets that instance finish on its node, and a start while any of
        it is still exiting fails the job's launch."""
        def requeued() -> bool:
            (info,) = self.job(job_id)
            return (int(info.fields.get("Restarts", 0)) >= 1 and info.state == "PENDING" and self._nodes_idle()
                    and not _job_pids(job_id))

        self._wait_for(requeued, timeout, f"job {job_id} to be requeued, its nodes idle and its processes gone",
                       extra=lambda: self.job_log(job_id))
        # slurmd revokes the ended instance's credential at the requeue and refuses a new one created in
        # the same second or before ("Job credential revoked": its times have one-second resolution)
        time.sleep(1.1)
        if updates:
            self._client(["scontrol", "update", f"JobId={job_id}", *(f"{k}={v}" for k, v in updates.items())],
                         timeout=15)
        self._client(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], timeout=15)

    def job_output(self, info: JobInfo) -> str:
        """The job's stdout file (sbatch default joins stderr into it), for messages."""
        path = info.stdout_path
        return self._tail(path, 6000) if path else f"--- job {info.job_id}: no StdOut ---\n"
