"""Several hosts on one machine: Linux network namespaces on a private switch, for the cluster tests.

    with Cluster(2, work) as cluster:          # hosts node1, node2 (needs root)
        node1, node2 = cluster.hosts
        p = node1.start(["launch/train.sh", ...], log=work / "node1.log", env=env)
        node2.kill()                           # SIGKILL every process of the host
        node2.freeze(); node2.thaw()           # cgroup v1 freezer: TCP stays open, nothing answers
        node2.link_down(); node2.link_up()     # its switch port dark: no RST, just silence
        node2.slow_cpu(0.25)                   # CPU quota: a quarter of one core for the whole host

Each host is a network namespace ``idh-<pid>-nodeK`` (``<pid>``: the test process that made it) with
its own UTS hostname ``nodeK`` (every command starts under ``unshare --uts``), its own ``/etc/hosts``
(``ip netns exec`` binds ``/etc/netns/<ns>/hosts``, which lists every host), one address 10.213.0.K
on ``eth0``, a veth pair whose other end is a port of a bridge in a switch namespace
``idh-<pid>-sw``, a node-local scratch folder (``TMPDIR``) and two cgroups (v1 freezer and cpu) that
every process started on it joins. No address or route is added to the machine's own namespace: the
hosts reach each other and nothing else. The repository and the test's folders are the shared
filesystem.

Cleanup: :meth:`Cluster.close` (the fixture's finalizer, also after a failure) thaws, SIGKILLs every
process in each namespace, deletes the namespaces (which deletes their links), ``/etc/netns/<ns>``
and the cgroups. :func:`sweep` removes what an earlier test process left behind (it was killed
before its finalizer ran): every ``idh-`` namespace whose owner pid is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

PREFIX = "idh-"
SUBNET = "10.213.0"  # private; exists only inside the namespaces made here
CGROUP_V1 = Path("/sys/fs/cgroup")
CONTROLLERS = ("freezer", "cpu")
_NAME = re.compile(rf"^{PREFIX}(\d+)-(\w+)$")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def available() -> str:
    """'' when this machine can make hosts, else why not (the tests skip with it)."""
    if os.geteuid() != 0:
        return "the cluster tests need root (network namespaces, veth pairs, cgroups)"
    for tool in ("ip", "unshare", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    for c in CONTROLLERS:
        if not (CGROUP_V1 / c / "cgroup.procs").is_file():
            return f"no cgroup v1 {c} controller at {CGROUP_V1 / c}"
    probe = f"{PREFIX}{os.getpid()}-probe"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"cannot make a network namespace: {r.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return ""


def _namespaces() -> list[str]:
    r = _ip("netns", "list", check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.startswith(PREFIX)]


def _pids_in(ns: str) -> list[int]:
    r = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in r.stdout.split()]


def _kill_namespace_processes(ns: str, cgroups: list[Path]) -> None:
    """SIGKILL until nothing runs in ``ns`` (frozen tasks are thawed first: they die only then)."""
    for g in cgroups:
        if g.parent.name == "freezer" and (g / "freezer.state").is_file():
            with contextlib.suppress(OSError):
                (g / "freezer.state").write_text("THAWED")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        pids = _pids_in(ns)
        alive = [p for p in pids if not _is_zombie(p)]
        if not alive:
            return
        for p in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        time.sleep(0.1)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _remove(ns: str) -> None:
    cgroups = [CGROUP_V1 / c / ns for c in CONTROLLERS]
    _kill_namespace_processes(ns, cgroups)
    _ip("netns", "del", ns, check=False)
    shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
    for g in cgroups:
        for _ in range(50):  # a killed task leaves its cgroup a moment after it dies
            try:
                g.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)


def sweep() -> list[str]:
    """Remove the namespaces (and their cgroups, /etc/netns folders) of test processes that are
    gone; returns their names."""
    removed = []
    owners = {m.group(1) for ns in _namespaces() if (m := _NAME.match(ns))}
    for c in CONTROLLERS:
        owners |= {m.group(1) for p in (CGROUP_V1 / c).glob(f"{PREFIX}*") if (m := _NAME.match(p.name))}
    for owner in owners:
        if Path(f"/proc/{owner}").exists():
            continue
        names = {ns for ns in _namespaces() if ns.startswith(f"{PREFIX}{owner}-")}
        for c in CONTROLLERS:
            names |= {p.name for p in (CGROUP_V1 / c).glob(f"{PREFIX}{owner}-*")}
        names |= {p.name for p in Path("/etc/netns").glob(f"{PREFIX}{owner}-*")}
        for ns in sorted(names, key=lambda n: n.endswith("-sw")):  # hosts first, the switch last
            _remove(ns)
            removed.append(ns)
    return removed


class Host:
    """One host: a network namespace with its hostname, address, scratch folder and cgroups."""

    def __init__(self, cluster: Cluster, k: int) -> None:
        self.cluster = cluster
        self.hostname = f"node{k}"
        self.ns = f"{cluster.prefix}node{k}"
        self.addr = f"{SUBNET}.{k}"
        self.port = f"idh{os.getpid()}v{k}"[:15]  # its switch port (the veth end in the switch)
        self.scratch = cluster.scratch / self.hostname
        self.cgroups = {c: CGROUP_V1 / c / self.ns for c in CONTROLLERS}
        self.procs: list[subprocess.Popen] = []

    # -- making it --------------------------------------------------------------------------------
    def create(self, hosts_file: str) -> None:
        sw = self.cluster.switch
        _ip("netns", "add", self.ns)
        _ip("link", "add", self.port, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
        _ip("link", "set", self.port, "netns", sw)
        _ip("-n", sw, "link", "set", self.port, "master", "br0", "up")
        _ip("-n", self.ns, "addr", "add", f"{self.addr}/24", "dev", "eth0")
        _ip("-n", self.ns, "link", "set", "eth0", "up")
        _ip("-n", self.ns, "link", "set", "lo", "up")
        etc = Path("/etc/netns") / self.ns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(hosts_file)
        (etc / "hostname").write_text(self.hostname + "\n")
        self.scratch.mkdir(parents=True, exist_ok=True)
        for g in self.cgroups.values():
            g.mkdir(exist_ok=True)

    # -- running things on it ---------------------------------------------------------------------
    def command(self, cmd: list) -> list[str]:
        """``cmd`` as run on this host: in its namespace, under its hostname, in its cgroups."""
        # The cgroups are joined before entering the namespace: `ip netns exec` mounts a fresh
        # /sys there, without /sys/fs/cgroup.
        join = "; ".join(f'echo $$ > "{g}/cgroup.procs"' for g in self.cgroups.values())
        inner = 'hostname "$0"; exec "$@"'
        enter = f"exec ip netns exec {self.ns} unshare --uts -- sh -c '{inner}' {self.hostname}"
        return ["sh", "-c", f'{join}; {enter} "$@"', "sh"] + [str(c) for c in cmd]

    def start(self, cmd: list, log: Path, env: dict, cwd: Path | None = None) -> subprocess.Popen:
        """Start ``cmd`` on this host, stdout and stderr appended to ``log``."""
        env = {**env, "TMPDIR": str(self.scratch)}
        with open(log, "a") as f:
            f.write(f"$ [{self.hostname}] {' '.join(str(c) for c in cmd)}\n")
            f.flush()
            p = subprocess.Popen(
                self.command(cmd),
                cwd=cwd,
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(p)
        return p

    def run(self, cmd: list, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(cmd), capture_output=True, text=True, timeout=timeout)

    def pids(self) -> list[int]:
        """Every live process on this host."""
        return [p for p in _pids_in(self.ns) if not _is_zombie(p)]

    # -- faults, from outside ---------------------------------------------------------------------
    def kill(self) -> None:
        """SIGKILL every process of the host, as if it lost power."""
        _kill_namespace_processes(self.ns, [])

    def freeze(self) -> None:
        """Stop every process of the host (cgroup freezer): sockets stay open, nothing answers."""
        (self.cgroups["freezer"] / "freezer.state").write_text("FROZEN")

    def thaw(self) -> None:
        (self.cgroups["freezer"] / "freezer.state").write_text("THAWED")

    def link_down(self) -> None:
        """Its switch port goes dark: packets are dropped silently (no RST, no ICMP)."""
        _ip("-n", self.cluster.switch, "link", "set", self.port, "down")

    def link_up(self) -> None:
        _ip("-n", self.cluster.switch, "link", "set", self.port, "up")

    def slow_link(self, rate: str = "20mbit") -> None:
        """A token-bucket rate limit on the host's outgoing traffic."""
        subprocess.run(
            ["ip", "netns", "exec", self.ns, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf"]
            + ["rate", rate, "burst", "64kb", "latency", "200ms"],
            check=True,
            capture_output=True,
            timeout=30,
        )

    def slow_cpu(self, cpus: float) -> None:
        """A CPU quota for every process of the host together (``cpus`` x one core)."""
        g = self.cgroups["cpu"]
        period = int((g / "cpu.cfs_period_us").read_text())
        (g / "cpu.cfs_quota_us").write_text(str(max(1000, int(cpus * period))))


class Cluster:
    """``n`` hosts on one switch; a context manager whose exit removes everything."""

    def __init__(self, n: int, scratch: Path) -> None:
        self.prefix = f"{PREFIX}{os.getpid()}-"
        self.switch = f"{self.prefix}sw"
        self.scratch = Path(scratch)
        self.hosts = [Host(self, k) for k in range(1, n + 1)]
        try:
            sweep()
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            names = "".join(f"{h.addr}\t{h.hostname}\n" for h in self.hosts)
            hosts_file = f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{names}"
            for h in self.hosts:
                h.create(hosts_file)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for h in self.hosts:
            _remove(h.ns)
            for p in h.procs:
                with contextlib.suppress(Exception):
                    p.wait(timeout=5)
        _remove(self.switch)
