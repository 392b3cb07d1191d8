"""A real Slurm for the launch tests: `slurm_cluster` starts a controller and two
`slurmd -N` daemons (nodes zn1, zn2) on this machine with a munged of its own, in a
temporary directory, and stops them all in `finally` (recipe: SLURM.md of the project's
shared notes). `scontrol` gives a SLURM_CONF for `scontrol show hostnames`, which needs
no controller.

Tests that use either carry the `slurm` marker. Without slurm-wlm and munge installed,
or without root (slurmd runs as root here), they are skipped with the reason shown --
except under CI=true, where they fail instead: .ci/run installs both, so a skip there
would hide a test that never ran.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
NODES = ("zn1", "zn2")
# zn1, zn2 resolve to two loopback addresses, so the two "hosts" bind and advertise
# different addresses (tests of the node transport rely on that).
HOSTS_LINES = {"zn1": "127.0.0.2", "zn2": "127.0.0.3"}
_PROGRAMS = ("slurmctld", "slurmd", "srun", "salloc", "sinfo", "scontrol", "munged")
# What a launcher may have set in the environment the tests run in (pytest itself under
# srun, in a pod): the launch tests build every environment they resolve from scratch.
LAUNCH_PREFIXES = ("SLURM_", "SLURMD_", "PET_", "TORCHELASTIC_")
LAUNCH_VARS = (
    "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GROUP_RANK", "RANK", "LOCAL_RANK",
    "WORLD_SIZE", "GROUP_WORLD_SIZE", "LOCAL_WORLD_SIZE", "NNODES", "JOB_COMPLETION_INDEX",
    "JOB_INDEX", "JOBSET_NAME", "ZEROTRAIN_NODES", "ZEROTRAIN_NODE_RANK", "ZEROTRAIN_MASTER",
    "ZEROTRAIN_RANKS_PER_NODE", "ZEROTRAIN_ADVERTISE_ADDR", "ZEROTRAIN_RUN_ID",
)  # fmt: skip


def without_launch_vars(environ) -> dict:
    return {
        k: v
        for k, v in environ.items()
        if k not in LAUNCH_VARS and not k.startswith(LAUNCH_PREFIXES)
    }


@pytest.fixture(autouse=True)
def no_launcher_in_the_environment(monkeypatch):
    for name in set(os.environ) - set(without_launch_vars(os.environ)):
        monkeypatch.delenv(name)


def _which(program: str) -> str | None:
    """The program's path; the daemons live in /usr/sbin, which a user's PATH may lack."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which(program, path=path)


def _missing_slurm(programs=_PROGRAMS, root: bool = True) -> str | None:
    """Why a real Slurm cannot run here, or None."""
    missing = [p for p in programs if _which(p) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install -y slurm-wlm munge)"
    if root and os.geteuid() != 0:
        return "slurmd and munged here need root"
    return None


def _require(reason: str | None) -> None:
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"a slurm test cannot run under CI=true: {reason}")
    pytest.skip(f"slurm test: {reason}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_conf(root: Path, munge_socket: Path) -> Path:
    host = socket.gethostname().split(".")[0]
    ports = [_free_port() for _ in range(3)]
    nodes = "\n".join(
        f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=2"
        for name, port in zip(NODES, ports[1:], strict=True)
    )
    conf = root / "slurm.conf"
    conf.write_text(
        f"""ClusterName=zt
SlurmctldHost={host}
SlurmctldPort={ports[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmctldPidFile={root}/slurmctld.pid
SlurmctldLogFile={root}/log/ctld.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
SlurmdPidFile={root}/slurmd.%n.pid
SlurmdLogFile={root}/log/d.%n.log
SlurmdSpoolDir={root}/spool/%n
{nodes}
PartitionName=debug Nodes=zn[1-2] Default=YES MaxTime=INFINITE State=UP
"""
    )
    return conf


def _add_hosts_lines() -> None:
    hosts = Path("/etc/hosts")
    known = hosts.read_text().split()
    lines = "".join(f"{addr} {name}\n" for name, addr in HOSTS_LINES.items() if name not in known)
    if lines:
        with hosts.open("a") as f:
            f.write(lines)


@dataclass(frozen=True)
class SlurmCluster:
    """A running two-node Slurm: `env` has SLURM_CONF for srun, salloc, sinfo."""

    root: Path
    env: dict

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """A Slurm client command (srun, salloc, ...) against this cluster."""
        return subprocess.run(
            list(argv), env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def zerotrain(self) -> list[str]:
        """How a task runs this checkout's `zerotrain`: the console script installed
        beside this interpreter (PYTHONPATH in `env` puts this checkout first), else
        `python -m pipelines.cli`, the same entry point."""
        script = Path(sys.executable).with_name("zerotrain")
        return [str(script)] if script.exists() else [sys.executable, "-m", "pipelines.cli"]


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    _require(_missing_slurm())
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "log", "spool"):
        (root / sub).mkdir()
    root.chmod(0o700)  # munged refuses a socket directory others may write
    _add_hosts_lines()
    munge_key, munge_socket = root / "munge.key", root / "munge.sock"
    munge_key.write_bytes(os.urandom(1024))
    munge_key.chmod(0o400)
    conf = _write_conf(root, munge_socket)
    env = dict(without_launch_vars(os.environ), SLURM_CONF=str(conf))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(var, None)  # as tests/pipelines/cli_util.py: the CLI's default holds
    daemons: list[subprocess.Popen] = []

    def start(name: str, program: str, *args: str) -> None:
        with (root / "log" / f"{name}.out").open("w") as log:
            argv = [_which(program), *args]
            daemons.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))

    try:
        start(
            "munged",
            "munged", "--foreground", "--force", f"--socket={munge_socket}",
            f"--key-file={munge_key}", f"--pid-file={root}/munged.pid",
            f"--log-file={root}/log/munged.log", f"--seed-file={root}/munged.seed",
        )  # fmt: skip
        _wait_for(lambda: munge_socket.exists(), 10, "munged's socket", root)
        start("slurmctld", "slurmctld", "-D", "-f", str(conf))
        for node in NODES:
            start(f"slurmd.{node}", "slurmd", "-D", "-f", str(conf), "-N", node)

        def idle() -> bool:
            out = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True
            ).stdout.split()
            return out.count("idle") == len(NODES)

        _wait_for(idle, 60, "both slurmd idle in sinfo", root)
        yield SlurmCluster(root, env)
    finally:
        for proc in reversed(daemons):
            proc.terminate()
        for proc in reversed(daemons):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_for(ready, seconds: float, what: str, root: Path) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline:
            logs = ", ".join(sorted(p.name for p in (root / "log").iterdir()))
            pytest.fail(f"slurm fixture: no {what} after {seconds} s (logs in {root}/log: {logs})")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def scontrol(tmp_path_factory):
    """`scontrol(hostlist) -> list of names or None` (None: scontrol calls it invalid),
    from the real `scontrol show hostnames` with a SLURM_CONF and no controller."""
    _require(_missing_slurm(("scontrol",), root=False))
    root = tmp_path_factory.mktemp("scontrol")
    conf = root / "slurm.conf"
    conf.write_text(
        f"ClusterName=zt\nSlurmctldHost={socket.gethostname().split('.')[0]}\n"
        "NodeName=zn1 CPUs=1\nPartitionName=debug Nodes=zn1 Default=YES\n"
    )
    env = dict(os.environ, SLURM_CONF=str(conf))

    def show_hostnames(hostlist: str) -> list[str] | None:
        done = subprocess.run(
            [_which("scontrol"), "show", "hostnames", hostlist],
            env=env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if "Invalid hostlist" in done.stderr + done.stdout or done.returncode:
            return None
        return done.stdout.split()

    return show_hostnames
