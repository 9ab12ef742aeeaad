"""A throwaway single-node SLURM cluster for the tests.

`SlurmCluster(root).start()` runs ``munged``, ``slurmctld`` and ``slurmd`` in the
foreground as child processes of the test, with every key, socket, state, spool,
PID and log file under ``root`` and with free, non-default TCP ports, so it never
touches a SLURM or MUNGE installation the machine may already have. The node has
the machine's CPUs, a generous declared memory (``SlurmdParameters=config_overrides``,
so the profile's ``mem_mb`` requests are accepted; nothing enforces them without
cgroups) and two GPUs declared as a generic resource (``Gres=gpu:2``, gres.conf
with ``Count=2`` and AutoDetect off; see `placeholder_gpu_files` for why it names
files), so ``sbatch --gpus=1`` is scheduled and counted without any GPU present.
Partitions ``cpu`` and ``gpu`` (both on the one node) carry the names the
workflow profile uses. There is no accounting database: job states come from
``squeue`` (``MinJobAge`` keeps finished jobs visible for 10 minutes).

`stop()` cancels the jobs of this cluster and ends only the three processes it
started. `ensure_installed()` installs Debian's packages with apt-get when the
daemons are missing (as root only); `ClusterUnavailable` carries the reason why a
cluster cannot be provided on this machine, for `pytest.skip`.

By hand (e.g. to try the profile interactively)::

    python -m tests.slurm.cluster /tmp/slurm-play   # prints SLURM_CONF=..., Ctrl-C stops it
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client"]
DAEMONS = {"munged": "munge", "slurmctld": "slurmctld", "slurmd": "slurmd"}
CLIENTS = {"sbatch": "slurm-client", "squeue": "slurm-client", "scontrol": "slurm-client",
           "scancel": "slurm-client", "srun": "slurm-client", "sinfo": "slurm-client"}
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
GPUS = 2
DECLARED_MEMORY_MB = 256_000  # >= every mem_mb in profiles/slurm (config_overrides: not checked against RAM)


class ClusterUnavailable(RuntimeError):
    """SLURM cannot be installed or started here; the message says why."""


def _which(binary: str) -> str | None:
    return shutil.which(binary, path=SBIN_PATH)


def missing_binaries() -> list[str]:
    return [binary for binary in [*DAEMONS, *CLIENTS] if _which(binary) is None]


def ensure_installed(timeout: float = 300) -> str:
    """Install munge and SLURM with apt-get when missing; return what was done (for the test log)."""
    missing = missing_binaries()
    if not missing:
        return "slurm and munge already installed"
    if not sys.platform.startswith("linux"):
        raise ClusterUnavailable(f"SLURM test cluster needs Linux (missing: {', '.join(missing)})")
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"{', '.join(missing)} not installed and not running as root to apt-get install them")
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable(f"{', '.join(missing)} not installed and no apt-get on this machine")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    started = time.monotonic()
    attempts = []
    for command in (install, ["apt-get", "update", "-q"], install):
        try:
            result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ClusterUnavailable(f"`{' '.join(command)}` did not finish within {timeout:.0f} s") from None
        attempts.append(result)
        if command is install and result.returncode == 0:
            break
    else:  # the second install failed too (the first failure triggers the update)
        raise ClusterUnavailable(f"`{' '.join(install)}` failed ({attempts[-1].returncode}): "
                                 f"{(attempts[-1].stderr or attempts[-1].stdout).strip()[-800:]}")
    still_missing = missing_binaries()
    if still_missing:
        raise ClusterUnavailable(f"apt-get installed {' '.join(PACKAGES)} but {', '.join(still_missing)} still missing")
    return f"apt-get installed {' '.join(PACKAGES)} in {time.monotonic() - started:.1f} s"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


SLURM_CONF = """\
# Single-node test cluster written by tests/slurm/cluster.py
ClusterName=bismaptest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SchedulerParameters=sched_min_interval=0,batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
InactiveLimit=0
KillWait=5
SlurmdTimeout=60
SlurmctldTimeout=30
MessageTimeout=20
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} Gres=gpu:{gpus} State=UNKNOWN
PartitionName=cpu Nodes={host} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes={host} MaxTime=INFINITE State=UP
"""

GRES_CONF = """\
# Two placeholder GPUs: scheduling and --gpus accounting only. no_gpu_env: no
# CUDA_VISIBLE_DEVICES naming devices that do not exist, so jobs run on the CPU.
AutoDetect=off
NodeName={host} Name=gpu Count={gpus} File={gpu_files} Flags=no_gpu_env
"""


def placeholder_gpu_files(folder: Path, count: int) -> str:
    """``File=`` for gres.conf: `count` stand-ins for /dev/nvidia<i> under `folder`.

    Slurm 22.05's gres/gpu plugin drops a GPU line without ``File=`` ("Removing
    file-less GPU gpu:(null) from final GRES list"), so the node would register
    with 0 of its 2 GPUs and be drained. The files are character devices with
    /dev/null's numbers (plain files where mknod is not permitted; slurmd then
    logs "not a valid character or block device" but still counts them). No job
    opens them. ``Flags=no_gpu_env`` stops Slurm from exporting CUDA_VISIBLE_DEVICES
    for them: with it set, bismap.devices would pick ``cuda:0`` on a node without
    a driver and the job would fail; without it, GPU jobs run on the CPU as they
    do locally.
    """
    folder.mkdir(parents=True, exist_ok=True)
    null = os.stat("/dev/null").st_rdev
    for index in range(count):
        path = folder / f"gpu{index}"
        if not path.exists():
            try:
                os.mknod(path, 0o666 | stat.S_IFCHR, null)
            except OSError:
                path.touch()
    return f"{folder}/gpu[0-{count - 1}]" if count > 1 else f"{folder}/gpu0"


class SlurmCluster:
    def __init__(self, root: Path, cpus: int | None = None):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus or max(2, os.cpu_count() or 2)
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.processes: dict[str, subprocess.Popen] = {}

    @property
    def environment(self) -> dict[str, str]:
        """What a client (sbatch, squeue, Snakemake) needs to talk to this cluster."""
        return {"SLURM_CONF": str(self.conf), "PATH": f"{self.root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}

    def _write_srun_shim(self) -> None:
        """`srun` for the jobs: the real one, with SLURM_CONF restored.

        snakemake-executor-plugin-slurm-jobstep 0.6 removes every SLURM_* variable
        but the job ids before it runs ``srun`` inside the job, SLURM_CONF included,
        so srun looks for /etc/slurm/slurm.conf, then DNS SRV records, and fails
        ("Could not establish a configuration source"). A cluster configured in
        /etc/slurm (the usual case) is unaffected; this one lives in a temp dir,
        so the jobs find this shim first on their PATH (sbatch --export=ALL).
        """
        shim = self.root / "bin" / "srun"
        shim.parent.mkdir(parents=True, exist_ok=True)
        shim.write_text(f'#!/bin/sh\nSLURM_CONF="{self.conf}" exec "{_which("srun")}" "$@"\n')
        shim.chmod(0o755)

    def client_env(self) -> dict[str, str]:
        return {**os.environ, **self.environment}

    def log(self, name: str, lines: int = 4) -> str:
        """The last error lines (else last lines) of one of the daemons' logs, for a skip reason."""
        path = self.root / "log" / name
        if not path.exists():
            return ""
        text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in text if "error" in line.lower() or "fatal" in line.lower()]
        return " | ".join((errors or text)[-lines:])

    def _spawn(self, name: str, command: list[str]) -> None:
        """Start `command` under `supervise` (this file run as a script), in a process group of its own."""
        output = open(self.root / "log" / f"{name}.stdout", "w")
        self.processes[name] = subprocess.Popen([sys.executable, __file__, "--supervise", *command],
                                                stdout=output, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=self.client_env(),
                                                start_new_session=True)
        output.close()

    def _wait(self, what: str, ready, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            process = self.processes.get(name)
            if process is not None and process.poll() is not None:
                problem = f"{name} exited with {process.returncode} while waiting for {what}"
                break
            if ready():
                return
            time.sleep(0.2)
        else:
            problem = f"timed out after {timeout:.0f} s waiting for {what}"
        detail = self.log(f"{name}.log") or self.log(f"{name}.stdout")
        raise ClusterUnavailable(f"{problem}: {detail} (logs in {self.root / 'log'})")

    def start(self, timeout: float = 60) -> SlurmCluster:
        if os.geteuid() != 0:
            raise ClusterUnavailable("slurmd must run as root to launch jobs; not root")
        for folder in ("etc", "munge", "state", "spool", "run", "log"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        munge = self.root / "munge"
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={munge / 'munged.pid'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}",
                               f"--seed-file={munge / 'munged.seed'}"])
        self._wait("the munge socket", self.munge_socket.exists, "munged", timeout)

        settings = dict(host=self.host, root=self.root, munge_socket=self.munge_socket, cpus=self.cpus,
                        memory=DECLARED_MEMORY_MB, gpus=GPUS, ctld_port=free_port(), slurmd_port=free_port(),
                        gpu_files=placeholder_gpu_files(self.root / "dev", GPUS))
        self.conf.write_text(SLURM_CONF.format(**settings))
        (self.conf.parent / "gres.conf").write_text(GRES_CONF.format(**settings))
        self._write_srun_shim()

        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait("slurmctld to answer", lambda: self._quiet(["scontrol", "ping"], "UP"), "slurmctld", timeout)
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.host])
        self._wait("the node to become idle",
                   lambda: self._quiet(["sinfo", "-h", "-N", "-o", "%T"], "idle"), "slurmd", timeout)

    def _quiet(self, command: list[str], expected: str) -> bool:
        try:
            result = subprocess.run(command, capture_output=True, text=True, env=self.client_env(), timeout=10)
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0 and expected in result.stdout

    def squeue(self) -> list[dict[str, str]]:
        """Every job this controller still knows (finished ones for MinJobAge): id, name, comment, state, times."""
        result = subprocess.run(["squeue", "--states=all", "--noheader", "--format=%i|%j|%k|%T|%M|%b|%P"],
                                capture_output=True, text=True, env=self.client_env(), timeout=30)
        jobs = []
        for line in result.stdout.splitlines():
            fields = line.split("|")
            if len(fields) == 7:
                jobs.append(dict(zip(("id", "name", "comment", "state", "elapsed", "gres", "partition"), fields)))
        return jobs

    def stop(self) -> None:
        """Cancel this cluster's jobs, then end slurmd, slurmctld and munged (only the processes started here)."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--user", "root"], capture_output=True, env=self.client_env(),
                           timeout=30)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and any(
                    job["state"] in ("RUNNING", "COMPLETING", "PENDING", "CONFIGURING") for job in self.squeue()):
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.terminate()  # the supervisor passes SIGTERM on to its daemon
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # its own group: the supervisor and what it started
                process.wait(timeout=15)


def supervise(command: list[str]) -> int:
    """Run `command`, pass SIGTERM/SIGINT on to it and reap every orphan it leaves.

    slurmd double-forks a slurmstepd per job step; orphans go to the nearest
    "child subreaper", which this process becomes, so they do not pile up as
    zombies under a container's PID 1 that never reaps them. Returns the
    command's exit code.
    """
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    child = os.posix_spawn(command[0], command, os.environ)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, frame: os.kill(child, number))
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 1
        if pid == child:
            return os.waitstatus_to_exitcode(status)


if __name__ == "__main__" and sys.argv[1:2] == ["--supervise"]:
    sys.exit(supervise(sys.argv[2:]))
elif __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/bismap-slurm")
    print(ensure_installed())
    cluster = SlurmCluster(root).start()
    print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C stops the cluster")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
