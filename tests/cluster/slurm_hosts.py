"""A real Slurm across the namespace hosts of hosts.py: one slurmd per host, slurmctld on node1.

    with Cluster(2, work) as cluster, SlurmHosts(cluster) as slurm:
        p = slurm.run(["sbatch", "--nodes=2", ...], cwd=ROOT, env=env)   # runs on node1
        slurm.scontrol("update", "nodename=node2", "state=down", "reason=test")

Each daemon runs on its host (``Host.start``: its network namespace, hostname ``nodeK``, cgroups):
munged and slurmctld on node1, ``slurmd`` on every host (``NodeName=nodeK NodeAddr=10.213.0.K``).
Everything they write lives in one temporary folder (``SlurmHosts.dir``): the configuration,
passed as ``SLURM_CONF`` to the daemons and to every command (the machine's /etc/slurm/slurm.conf,
which tests/slurm/cluster.sh may use for its own one-node cluster, is not read or touched), state,
spool folders, pid and log files. munged is this cluster's own too (a socket in that folder, the
machine's /etc/munge/munge.key): the one-node cluster's munged may or may not run. Slurm's ports
are the usual 6817/6818, free in the hosts' own network namespaces.

The settings are those of tests/slurm/cluster.sh (which says why each is there): root daemons,
proctrack/pgid (no cgroup setup; slurmd still wants the machine's cgroup filesystems, which are
mounted again in each slurmd's mount namespace), cred_expire=10 and sched_interval=2 so that a
requeued job starts again within about 15 s, MinJobAge=16; and SlurmdTimeout=20 (not 60): a
host whose slurmd stops answering is DOWN, and its jobs requeued, after 20 to 30 s. Measured: up
in about 1 s.

Cleanup: :meth:`SlurmHosts.close` sends SIGTERM to the daemons, waits for them and removes the
folder; the hosts' ``Cluster.close`` then SIGKILLs whatever is left in the namespaces (job steps, a
stuck daemon). When the test process was killed before that, ``sweep`` removes its namespaces and
the next ``SlurmHosts`` its folder.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .hosts import Cluster

DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo")
MUNGE_KEY = Path("/etc/munge/munge.key")
FOLDER = "idh-slurm-"  # /tmp/idh-slurm-<pid of the test process>-XXXX


def _sweep_folders() -> None:
    """Remove the folders of test processes that are gone (killed before their cleanup ran)."""
    for d in Path("/tmp").glob(f"{FOLDER}*-*"):
        owner = d.name[len(FOLDER) :].split("-")[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            shutil.rmtree(d, ignore_errors=True)


def available() -> str:
    """'' when Slurm and munge are installed here, else why not (the tests skip with it)."""
    if os.geteuid() != 0:
        return "the Slurm hosts need root (daemons in network namespaces)"
    missing = [d for d in DAEMONS if not os.access(d, os.X_OK)]
    missing += [c for c in CLIENTS if shutil.which(c) is None]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing; tests/slurm/start.sh installs it)"
    if not MUNGE_KEY.is_file():
        return f"no {MUNGE_KEY} (tests/slurm/start.sh creates it)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (the munge package makes it)"
    return ""


def _config(d: Path, cluster: Cluster) -> str:
    nodes = "".join(
        f"NodeName={h.hostname} NodeAddr={h.addr} CPUs={os.cpu_count()} State=UNKNOWN\n"
        for h in cluster.hosts
    )
    ctl = cluster.hosts[0]
    return f"""\
# A test cluster across network-namespace hosts (tests/cluster/slurm_hosts.py).
ClusterName=idh
SlurmctldHost={ctl.hostname}({ctl.addr})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge/socket,cred_expire=10
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=20
InactiveLimit=0
MinJobAge=16
KillWait=30
Waittime=0
StateSaveLocation={d}/ctld
SlurmdSpoolDir={d}/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
SlurmctldPort=6817
SlurmdPort=6818
{nodes}PartitionName=hosts Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


def _mount_cgroups() -> str:
    """A shell command that mounts this machine's /sys/fs/cgroup (tmpfs and hierarchies) again."""
    cmds = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, where, kind, opts = line.split()[:4]
        if where == "/sys/fs/cgroup" or where.startswith("/sys/fs/cgroup/"):
            mkdir = f"mkdir -p {where} && " if where != "/sys/fs/cgroup" else ""
            cmds.append(f"{mkdir}mount -t {kind} -o {opts} {kind} {where}")
    return " && ".join(cmds) or "true"


class SlurmHosts:
    """munged + slurmctld on node1 and a slurmd on every host of ``cluster``; a context manager."""

    def __init__(self, cluster: Cluster, timeout: float = 60) -> None:
        self.cluster = cluster
        self.ctl = cluster.hosts[0]
        # Short: slurmstepd's sockets are SlurmdSpoolDir/nodeK_JOB.STEP (108 bytes at most).
        _sweep_folders()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{FOLDER}{os.getpid()}-", dir="/tmp"))
        self.conf = self.dir / "slurm.conf"
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []
        try:
            self._start(timeout)
        except BaseException:
            self.close()
            raise

    def _start(self, timeout: float) -> None:
        d = self.dir
        d.chmod(0o755)  # munged (user munge) must reach its socket folder
        munge = d / "munge"
        munge.mkdir()
        shutil.chown(munge, "munge", "munge")
        (d / "ctld").mkdir()
        self.conf.write_text(_config(d, self.cluster))
        log = d / "daemons.log"
        sock = munge / "socket"
        self.procs.append(
            self.ctl.start(
                ["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--foreground", f"--socket={sock}"]
                + [f"--pid-file={munge}/pid", f"--log-file={munge}/log", f"--seed-file={munge}/seed"],
                log,
                self.env,
            )
        )
        self._wait("munged", lambda: sock.is_socket(), timeout)
        self.procs.append(self.ctl.start(["/usr/sbin/slurmctld", "-D", "-c"], log, self.env))
        self._wait("slurmctld (scontrol ping)", lambda: "UP" in self.scontrol("ping").stdout, timeout)
        # slurmd will not start without a cgroup filesystem at /sys/fs/cgroup (even with
        # proctrack/pgid), and `ip netns exec` mounts a fresh /sys without one: the machine's
        # cgroup hierarchies are mounted again there, in the host's own mount namespace.
        slurmd = f"{_mount_cgroups()} && exec /usr/sbin/slurmd -D"
        for h in self.cluster.hosts:
            (d / h.hostname).mkdir()  # its SlurmdSpoolDir
            self.procs.append(h.start(["sh", "-c", slurmd], log, self.env))
        names = ",".join(h.hostname for h in self.cluster.hosts)
        self._wait(f"{names} to be idle", lambda: self.node_states() == {"idle"}, timeout)

    def _wait(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            ended = [p.args[-1] for p in self.procs if p.poll() is not None]
            if ended or time.monotonic() > deadline:
                why = f"{ended} ended" if ended else f"timed out after {timeout:.0f} s"
                raise RuntimeError(f"Slurm hosts: waiting for {what}: {why}\n{self.logs()}")
            time.sleep(0.2)

    # -- commands, run on node1 (the controller's host: the other hosts reach it, the machine does not)
    def run(self, cmd: list, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        env = {**kw.pop("env", self.env), "SLURM_CONF": str(self.conf)}
        return subprocess.run(
            self.ctl.command(cmd), capture_output=True, text=True, timeout=timeout, env=env, **kw
        )

    def scontrol(self, *args: str) -> subprocess.CompletedProcess:
        return self.run(["scontrol", *args], timeout=30)

    def node_states(self) -> set[str]:
        p = self.run(["sinfo", "-h", "-N", "-o", "%T"], timeout=30)
        return set(p.stdout.split()) if p.returncode == 0 else {"?"}

    def logs(self, tail: int = 3000) -> str:
        files = [self.dir / "daemons.log", self.dir / "slurmctld.log"]
        files += [self.dir / f"slurmd-{h.hostname}.log" for h in self.cluster.hosts]
        return "\n".join(f"== {f.name}\n{f.read_text(errors='replace')[-tail:]}" for f in files if f.exists())

    # -- cleanup ----------------------------------------------------------------------------------
    def __enter__(self) -> SlurmHosts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the daemons (slurmd first, munged last); what remains dies with the namespaces."""
        for p in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
