"""Nodes as network namespaces, links as veth pairs on a bridge, shaped with ``tbf``.

For a cluster named ``main`` with N nodes (other names: ``<name>1``, ``<name>2``, ...):

    root namespace    bridge dtbr-main 10.77.0.1/24 (the controller's address; no route out)
    node n1           namespace dtlab-main-n1, UTS namespace with host name n1, interface
                      eth0 (or --ifnames) 10.77.0.11/24, its own lo, sshd on 10.77.0.11:22
    node n2           ... 10.77.0.12, and so on; /etc/hosts maps n1, n2, ... to them

Every node-to-node packet leaves one node's interface and enters the other's through the
bridge; with ``--inter-node RATE`` both ends of every node's link are shaped with
``tc qdisc tbf rate RATE`` (each direction passes one shaper at RATE). Ranks of one node talk
over that node's own loopback, unshaped: a real two-level hierarchy. ``tbf`` and ``htb`` are
what this kernel offers; ``netem`` is not, so latency is what the veth gives, never simulated.

The subnet (default 10.77.0.0/24, documented in docs/cluster.md) is checked against every
address and route of the machine before ``up``; the nodes get no default route, so nothing
they send can leave the cluster. Everything ``up`` creates is written to a journal in
``/run/dtlab-cluster/<name>/`` *before* it is created, so ``down`` undoes it all, also after
``up`` died half-way; ``down`` also sweeps by name what a lost journal would miss.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from dtlab.errors import UsageError

STATE_ROOT = Path("/run/dtlab-cluster")
HOSTS = Path("/etc/hosts")
DEFAULT_SUBNET = "10.77.0.0/24"
NAME = re.compile(r"[a-z][a-z0-9]{0,5}")        # short: interface names hold 15 characters
IFNAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,14}")
RATE = re.compile(r"(\d+(?:\.\d+)?)(kbit|mbit|gbit)")
SHM_SIZE = re.compile(r"[1-9]\d{0,6}[kmg]")
PORTS = re.compile(r"(\d{1,5})(?:-(\d{1,5}))?")
MAX_NODES = 64
SSH_WAIT_S = 20.0
END_GRACE_S = 2.0     # from SIGTERM to SIGKILL for what is left inside a node at `down`


class ClusterError(UsageError):
    """Bad input or a machine that cannot host the cluster; one line, exit status 2."""


def check_name(name: str, flag: str = "--name") -> str:
    """A cluster name, from whichever flag gave it: it becomes a folder under STATE_ROOT and
    part of interface and namespace names, so nothing but the short form is let through (no
    ``/``, no ``..``)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ClusterError(f"{flag} {name!r}: 1-6 lowercase letters and digits, starting with a "
                           "letter (it goes into interface names of 15 characters)")
    return name


def _run(argv: list[str], check: bool = True, timeout: float = 60,
         **kw) -> subprocess.CompletedProcess:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    except FileNotFoundError:
        raise ClusterError(f"`{argv[0]}` is not installed (Debian: iproute2, util-linux, "
                           "openssh-server)") from None
    if check and p.returncode != 0:
        raise ClusterError(f"`{' '.join(argv)}` failed: {(p.stderr or p.stdout).strip()[:300]}")
    return p


def rate_bits(rate: str | None) -> float | None:
    """'100mbit' -> 1e8 bits/s; None (unshaped) -> None."""
    if rate is None:
        return None
    m = RATE.fullmatch(rate)
    scale = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}[m.group(2)]
    return float(m.group(1)) * scale


def parse_rate(text: str) -> str | None:
    """``--inter-node``: 100mbit, 1gbit, 10gbit, 250kbit ... or unshaped."""
    t = text.strip().lower()
    if t in ("unshaped", "none", "0"):
        return None
    if not RATE.fullmatch(t) or float(RATE.fullmatch(t).group(1)) <= 0:
        raise ClusterError(f"--inter-node {text!r}: give a rate such as 100mbit, 1gbit, 10gbit "
                           "(kbit, mbit or gbit), or unshaped")
    if rate_bits(t) > 100e9:
        raise ClusterError(f"--inter-node {text!r}: above 100gbit a veth cannot be shaped "
                           "meaningfully; use unshaped")
    return t


@dataclass(frozen=True)
class Node:
    name: str
    index: int
    address: str
    ifname: str
    netns: str
    host_veth: str
    uts: str
    cores: tuple[int, ...] = ()
    mnt: str = ""          # its own mount namespace (a /dev/shm of its own size), if any


@dataclass
class Cluster:
    name: str = "main"
    nodes: int = 2
    rate: str | None = None
    ifnames: tuple[str, ...] = ("eth0",)
    subnet: str = DEFAULT_SUBNET
    cores_per_node: int = 0
    ranks_per_node: int = 2      # the CPUs a node declares to Slurm: the ranks it takes
    slurm: bool = False
    shm: dict = field(default_factory=dict)   # node name -> size of its own /dev/shm ("64m")
    extra: dict = field(default_factory=dict)

    # ---- names and addresses
    @property
    def state_dir(self) -> Path:
        return STATE_ROOT / self.name

    @property
    def bridge(self) -> str:
        return f"dtbr-{self.name}"

    @property
    def net(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def bridge_address(self) -> str:
        return str(self.net.network_address + 1)

    @property
    def hosts_mark(self) -> str:
        return f"# dtlab cluster {self.name}"

    def node_name(self, i: int) -> str:
        return f"n{i}" if self.name == "main" else f"{self.name}{i}"

    def node(self, i: int) -> Node:
        name = self.node_name(i)
        ifname = self.ifnames[min(i, len(self.ifnames)) - 1]
        cores = ()
        if self.cores_per_node:
            ncpu = os.cpu_count() or 1
            cores = tuple(((i - 1) * self.cores_per_node + k) % ncpu
                          for k in range(self.cores_per_node))
        return Node(name, i, str(self.net.network_address + 10 + i), ifname,
                    f"dtlab-{self.name}-{name}", f"dtv{i}-{self.name}"[:15],
                    str(self.state_dir / "uts" / name), cores,
                    str(self.state_dir / "uts" / f"{name}.mnt") if name in self.shm else "")

    def all_nodes(self) -> list[Node]:
        return [self.node(i) for i in range(1, self.nodes + 1)]

    def find(self, name: str) -> Node:
        for n in self.all_nodes():
            if n.name == name:
                return n
        raise ClusterError(f"no node {name!r} in cluster {self.name!r}; nodes: "
                           f"{', '.join(n.name for n in self.all_nodes())}")

    # ---- validation (before anything is created)
    def validate(self) -> None:
        check_name(self.name)
        if not 1 <= self.nodes <= MAX_NODES:
            raise ClusterError(f"--nodes must be in 1..{MAX_NODES}, got {self.nodes}")
        for ifn in self.ifnames:
            if not IFNAME.fullmatch(ifn) or ifn == "lo":
                raise ClusterError(f"--ifnames: {ifn!r} is not a usable interface name (a "
                                   "letter, then up to 14 letters, digits, _ . -; not lo)")
        try:
            net = ipaddress.IPv4Network(self.subnet)
        except ValueError as e:
            raise ClusterError(f"--subnet {self.subnet!r}: {e}") from None
        if not net.is_private or net.num_addresses < self.nodes + 16:
            raise ClusterError(f"--subnet {self.subnet}: give a private IPv4 subnet with room for "
                               f"{self.nodes} nodes (e.g. {DEFAULT_SUBNET})")
        if not 1 <= self.ranks_per_node <= 256:
            raise ClusterError(f"--ranks-per-node must be in 1..256, got {self.ranks_per_node}")
        names = {self.node_name(i) for i in range(1, self.nodes + 1)}
        for node, size in self.shm.items():
            if node not in names:
                raise ClusterError(f"--shm {node}={size}: no node {node!r} (nodes: "
                                   f"{', '.join(sorted(names))})")
            if not SHM_SIZE.fullmatch(size):
                raise ClusterError(f"--shm {node}={size}: give a size like 64m or 1g (a number "
                                   "and k, m or g)")
        if self.cores_per_node < 0 or self.cores_per_node > (os.cpu_count() or 1):
            raise ClusterError(f"--cores-per-node must be in 0..{os.cpu_count()}, got "
                               f"{self.cores_per_node}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def load(cls, name: str = "main", flag: str = "--cluster") -> "Cluster":
        """The cluster that is up under ``name`` (``flag``: the option it came from, for the
        error; the commands of other families take it as --cluster)."""
        f = STATE_ROOT / check_name(name, flag) / "cluster.json"
        if not f.is_file():
            raise ClusterError(f"no cluster {name!r} is up; start one with `dtlab cluster up` "
                               "(as root)")
        d = json.loads(f.read_text())
        d["ifnames"] = tuple(d["ifnames"])
        # A state written by another dtlab version may carry fields this one does not know; the
        # journal, not these fields, is what `down` undoes, so they are dropped here.
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------- the journal

class Journal:
    """What ``up`` created, one JSON line per resource, written before the resource exists."""

    def __init__(self, state_dir: Path):
        self.path = state_dir / "journal"

    def add(self, kind: str, **what) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, **what}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def entries(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a crash
        return out


def _require_root() -> None:
    if os.geteuid() != 0:
        raise ClusterError("the namespace cluster needs root (network namespaces, bridges, "
                           "/etc/hosts); run it with sudo")


def _check_subnet_free(c: Cluster) -> None:
    """Refuse a subnet the machine already uses (an address or a route that overlaps it), except
    by this cluster's own bridge."""
    net = c.net
    addrs = json.loads(_run(["ip", "-j", "-4", "addr"]).stdout or "[]")
    for link in addrs:
        for a in link.get("addr_info", []):
            ours = link.get("ifname") == c.bridge
            if not ours and ipaddress.IPv4Network(f"{a['local']}/{a['prefixlen']}",
                                                  strict=False).overlaps(net):
                raise ClusterError(
                    f"the subnet {net} is already used here ({link['ifname']} has "
                    f"{a['local']}/{a['prefixlen']}); give the cluster another one with --subnet")
    for r in json.loads(_run(["ip", "-j", "-4", "route"]).stdout or "[]"):
        dst = r.get("dst", "")
        if dst in ("default", "") or r.get("dev") == c.bridge:
            continue
        if ipaddress.IPv4Network(dst if "/" in dst else f"{dst}/32", strict=False).overlaps(net):
            raise ClusterError(f"the subnet {net} overlaps the route to {dst} via "
                               f"{r.get('dev')} here; give the cluster another one with --subnet")


def hosts_lines(path: Path = HOSTS) -> list[str]:
    return Path(path).read_text().splitlines()


def _is_mount_point(path: Path) -> bool:
    """A file mounted over its place (Docker and Podman bind-mount /etc/hosts): on another
    device than its folder, or listed as a mount point."""
    if os.path.ismount(path) or os.stat(path).st_dev != os.stat(Path(path).parent).st_dev:
        return True
    try:
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return False
    # the fifth field is the mount point, with spaces and the like written as \NNN octal
    return any(len(f := ln.split()) > 4 and f[4].encode().decode("unicode_escape") == str(path)
               for ln in mounts)


def write_hosts(lines: list[str], path: Path = HOSTS) -> None:
    """Replace the hosts file whole, so no reader (a resolver, another node's start) sees half
    of it: a new file renamed over it, with the old one's mode and owner."""
    path = Path(path)
    text = "\n".join(lines) + "\n"
    st = os.stat(path)
    if _is_mount_point(path):
        # a rename over a mount point fails (EBUSY), and would not reach the file the mount
        # shows: write the same inode, whole, and flush it to the disk before going on
        with open(path, "r+") as f:
            f.write(text)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.dtlab-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), stat.S_IMODE(st.st_mode))
            os.fchown(f.fileno(), st.st_uid, st.st_gid)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_names_free(c: Cluster) -> None:
    for n in c.all_nodes():
        p = _run(["getent", "hosts", n.name], check=False)
        if p.returncode == 0 and p.stdout.split()[0] != n.address:
            raise ClusterError(f"the host name {n.name} already resolves to "
                               f"{p.stdout.split()[0]} here (a real host?); the cluster needs it "
                               "for its node: remove that entry or give another --name")


def _alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text().strip()), 0)
        return True
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- node commands

def node_argv(c: Cluster, node: Node, argv: list[str]) -> list[str]:
    """``argv`` run inside ``node``: its network and host name (and its cores, if pinned)."""
    pin = ["taskset", "-c", ",".join(map(str, node.cores))] if node.cores else []
    mnt = [f"--mount={node.mnt}"] if node.mnt else []
    return ["nsenter", f"--net=/run/netns/{node.netns}", f"--uts={node.uts}", *mnt, "--",
            *pin, *argv]


def _shape(c: Cluster, node: Node, rate: str | None) -> None:
    """tbf at ``rate`` on both ends of the node's link (or none, unshaped)."""
    ends = [([], node.host_veth), (["ip", "netns", "exec", node.netns], node.ifname)]
    for prefix, dev in ends:
        _run([*prefix, "tc", "qdisc", "del", "dev", dev, "root"], check=False)
        if rate is not None:
            # a bucket of 10 ms of traffic (at least 64 KiB): tbf needs one timer tick's worth
            burst = max(64 * 1024, int(rate_bits(rate) / 8 / 100))
            _run([*prefix, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                  "burst", str(burst), "latency", "50ms"])


def _crash_point(where: str) -> None:
    """Test hook: ``DTLAB_CLUSTER_CRASH_AT=<where>`` kills ``up`` there (as a power cut or a
    SIGKILL would), so the test can prove that ``down`` still removes everything."""
    if os.environ.get("DTLAB_CLUSTER_CRASH_AT") == where:
        os.kill(os.getpid(), signal.SIGKILL)


def _start_node(c: Cluster, node: Node, journal: Journal, key: Path) -> None:
    ns = ["ip", "netns", "exec", node.netns]
    journal.add("netns", name=node.netns)
    _run(["ip", "netns", "add", node.netns])
    journal.add("link", name=node.host_veth)
    tmp = f"dtp{node.index}-{c.name}"[:15]  # the node's end, renamed once inside the node
    _run(["ip", "link", "add", node.host_veth, "type", "veth", "peer", "name", tmp])
    _run(["ip", "link", "set", tmp, "netns", node.netns])
    _run([*ns, "ip", "link", "set", tmp, "name", node.ifname])
    _run([*ns, "ip", "addr", "add", f"{node.address}/{c.net.prefixlen}", "dev", node.ifname])
    _run([*ns, "ip", "link", "set", node.ifname, "up"])
    _run([*ns, "ip", "link", "set", "lo", "up"])
    _run(["ip", "link", "set", node.host_veth, "master", c.bridge])
    _run(["ip", "link", "set", node.host_veth, "up"])
    _shape(c, node, c.rate)
    journal.add("uts", path=node.uts)
    Path(node.uts).touch()
    _run(["unshare", f"--uts={node.uts}", "hostname", node.name])
    if node.mnt:  # a container-like node: /dev/shm of its own, of the size asked
        journal.add("uts", path=node.mnt)
        Path(node.mnt).touch()
        _run(["unshare", f"--mount={node.mnt}", "--propagation", "private", "mount", "-t",
              "tmpfs", "-o", f"size={c.shm[node.name]},mode=1777", "dtlab-shm", "/dev/shm"])
    journal.add("hosts", name=node.name)
    lines = [ln for ln in hosts_lines() if not ln.endswith(f" {node.name}   {c.hosts_mark}")]
    write_hosts(lines + [f"{node.address} {node.name}   {c.hosts_mark}"])
    _crash_point(f"node{node.index}")
    cfg = c.state_dir / f"sshd-{node.name}.conf"
    pidfile = c.state_dir / f"sshd-{node.name}.pid"
    cfg.write_text(f"ListenAddress {node.address}\nPort 22\nPidFile {pidfile}\nHostKey {key}\n"
                   "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                   "KbdInteractiveAuthentication no\nUsePAM no\nAcceptEnv LANG LC_*\n")
    journal.add("pidfile", path=str(pidfile))
    os.makedirs("/run/sshd", exist_ok=True)
    _run(node_argv(c, node, ["/usr/sbin/sshd", "-f", str(cfg)]))


def _refuse_link(path: Path) -> Path:
    if path.is_symlink():
        raise ClusterError(f"{path} is a symbolic link (to {os.readlink(path)}); the cluster "
                           "writes root's ssh files only where they are, never through a link: "
                           "put the real folder or file there")
    return path


def ssh_dir() -> Path:
    """Root's ~/.ssh, from the password database as ssh itself finds it: under ``sudo -E`` HOME
    is the invoking user's, whose files root must not write. Made (0700) if missing; a symbolic
    link there is refused, not followed."""
    d = _refuse_link(Path(pwd.getpwuid(os.getuid()).pw_dir) / ".ssh")
    try:
        d.mkdir(mode=0o700)
    except FileExistsError:
        if not d.is_dir():
            raise ClusterError(f"{d} is not a folder; root's ssh keys go there") from None
    return d


def append_line(path: Path, line: str) -> None:
    """``line`` appended to ``path`` (made 0600 if missing), never through a symbolic link."""
    _refuse_link(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except OSError as e:  # ELOOP: a link put there since the check
        raise ClusterError(f"{path}: {e.strerror}; not written") from None
    with os.fdopen(fd, "a") as f:
        f.write(line + "\n")


def _ssh_ready(c: Cluster, key: Path, journal: Journal) -> None:
    """Every node's sshd answers with the cluster's host key, which root's known_hosts learns
    (so DeepSpeed's and pdsh's BatchMode ssh works), and root's key is authorized."""
    home = ssh_dir()
    ident, pub_file, auth, known = (_refuse_link(home / f) for f in (
        "id_ed25519", "id_ed25519.pub", "authorized_keys", "known_hosts"))
    if not ident.is_file():
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ident)])
    pub = pub_file.read_text().strip()
    if not auth.is_file() or pub not in auth.read_text():
        append_line(auth, pub)
        auth.chmod(0o600)
    host_pub = Path(f"{key}.pub").read_text().split()[:2]
    for n in c.all_nodes():
        journal.add("known_host", name=n.name)
        for name in (n.name, n.address):
            _run(["ssh-keygen", "-R", name, "-f", str(known)], check=False)
        append_line(known, f"{n.name},{n.address} {' '.join(host_pub)}")
    deadline = time.time() + SSH_WAIT_S
    for n in c.all_nodes():
        while True:
            p = _run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=3", n.name, "true"],
                     check=False, timeout=10)
            if p.returncode == 0:
                break
            if time.time() > deadline:
                raise ClusterError(f"sshd on {n.name} does not answer after {SSH_WAIT_S:g} s: "
                                   f"{p.stderr.strip()[:200]}")
            time.sleep(0.2)


def up(c: Cluster, log=print) -> Cluster:
    """Bring the cluster up (idempotent: a cluster of the same shape that is up stays; only a
    new --inter-node rate is applied)."""
    _require_root()
    c.validate()
    for tool in ("ip", "tc", "nsenter", "unshare", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            raise ClusterError(f"`{tool}` is not installed (Debian: iproute2, util-linux, "
                               "openssh-client, openssh-server)")
    if not Path("/usr/sbin/sshd").exists():
        raise ClusterError("sshd is not installed (Debian: apt-get install openssh-server)")
    if (c.state_dir / "cluster.json").is_file():
        old = Cluster.load(c.name)
        same = {k: v for k, v in asdict(old).items() if k not in ("rate", "extra")} == \
            {k: v for k, v in asdict(c).items() if k not in ("rate", "extra")}
        if not same:
            raise ClusterError(f"cluster {c.name!r} is up with other settings ({old.nodes} "
                               f"nodes, {old.subnet}); `dtlab cluster down` first")
        if healthy(old):
            if old.rate != c.rate:
                for n in c.all_nodes():
                    _shape(c, n, c.rate)
                old.rate = c.rate
                (c.state_dir / "cluster.json").write_text(old.to_json())
                log(f"cluster {c.name}: inter-node links now {c.rate or 'unshaped'}")
            else:
                log(f"cluster {c.name} is already up")
            return old
        log(f"cluster {c.name} is up but not whole; rebuilding it")
        down(c.name, log=lambda *a: None)
    elif c.state_dir.exists():  # a journal without a cluster: an up that died
        down(c.name, log=lambda *a: None)
    _check_subnet_free(c)
    _check_names_free(c)
    try:
        _build(c, log)
    except BaseException:  # a refusal half-way, a command's timeout, Ctrl-C: none stays half-up
        rollback(c.name, log)
        raise
    return c


def _build(c: Cluster, log) -> None:
    c.state_dir.mkdir(parents=True, exist_ok=True)
    journal = Journal(c.state_dir)
    journal.add("link", name=c.bridge)
    _run(["ip", "link", "add", c.bridge, "type", "bridge"])
    _run(["ip", "addr", "add", f"{c.bridge_address}/{c.net.prefixlen}", "dev", c.bridge])
    _run(["ip", "link", "set", c.bridge, "up"])
    uts_dir = c.state_dir / "uts"
    uts_dir.mkdir(exist_ok=True)
    journal.add("mount", path=str(uts_dir))
    _run(["mount", "--bind", str(uts_dir), str(uts_dir)])
    _run(["mount", "--make-private", str(uts_dir)])
    key = c.state_dir / "ssh_host_ed25519_key"
    if not key.is_file():
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
    for n in c.all_nodes():
        _start_node(c, n, journal, key)
    _ssh_ready(c, key, journal)
    (c.state_dir / "cluster.json").write_text(c.to_json())
    log(f"cluster {c.name} up: " + ", ".join(f"{n.name} {n.address} ({n.ifname})"
                                               for n in c.all_nodes())
        + f"; inter-node links {c.rate or 'unshaped'}; bridge {c.bridge} {c.bridge_address}")


@contextlib.contextmanager
def _uninterrupted():
    """SIGINT ignored for a while (in the main thread): a second Ctrl-C must not cut a rollback
    short and leave half a cluster. Every command run meanwhile has its own timeout."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def rollback(name: str, log=print) -> None:
    """Remove what an ``up`` that did not finish made: the journal names every resource and
    daemon before it exists, and ``down`` ends whatever else runs in the nodes."""
    with _uninterrupted():
        try:
            down(name, log=lambda *a: None)
        except Exception as e:  # the error that stopped `up` is the one to report
            log(f"cluster {name}: removing what the unfinished up made failed too ({e}); run "
                f"`dtlab cluster down --name {name}`")
            return
    log(f"cluster {name}: up did not finish; what it had made is removed")


def is_up(name: str) -> bool:
    """Cluster ``name`` is up and whole (``up`` would leave it as it is)."""
    check_name(name)
    return (STATE_ROOT / name / "cluster.json").is_file() and healthy(Cluster.load(name, "--name"))


def healthy(c: Cluster) -> bool:
    return all(Path(f"/run/netns/{n.netns}").exists() and
               _alive(c.state_dir / f"sshd-{n.name}.pid") for n in c.all_nodes())


def _kill(pidfile: Path) -> None:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            time.sleep(0.1)
            os.kill(pid, 0)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _netns_pids(names: list[str]) -> set[int]:
    pids = set()
    for ns in names:
        p = _run(["ip", "netns", "pids", ns], check=False, timeout=10)
        pids |= {int(t) for t in p.stdout.split() if t.isdigit()}
    return pids - {os.getpid()}


def end_processes(names: list[str], grace: float = END_GRACE_S) -> list[int]:
    """End every process inside the namespaces ``names``: what the daemons spawned (a session's
    shell, a job step, a rank) outlives its daemon and keeps a deleted namespace alive. SIGTERM,
    ``grace`` seconds, then SIGKILL; returns the pids that had to be ended. A process started
    meanwhile is found on the next look."""
    ended, termed = set(), set()
    kill_at = time.monotonic() + grace
    while True:
        pids = _netns_pids(names)  # a zombie has left its namespace and is not listed
        if not pids:
            return sorted(ended)
        late = time.monotonic() > kill_at
        for pid in pids if late else pids - termed:
            try:
                os.kill(pid, signal.SIGKILL if late else signal.SIGTERM)
            except ProcessLookupError:
                pass
        ended |= pids
        termed |= pids
        if time.monotonic() > kill_at + 5:  # SIGKILL not taken (a task stuck in the kernel)
            return sorted(ended)
        time.sleep(0.05)


def end_jobs(c: Cluster, grace: float = END_GRACE_S) -> list[int]:
    """End what a job left inside the nodes (ranks, their ssh sessions), the nodes' daemons
    spared: SIGTERM, ``grace`` seconds, SIGKILL. Returns the pids it ended."""
    daemons = set()
    for f in c.state_dir.glob("*.pid"):
        try:
            daemons.add(int(f.read_text().strip()))
        except (OSError, ValueError):
            pass
    names = [n.netns for n in c.all_nodes()]
    ended, kill_at = set(), time.monotonic() + grace
    while pids := _netns_pids(names) - daemons:
        late = time.monotonic() > kill_at
        for pid in pids - (set() if late else ended):
            try:
                os.kill(pid, signal.SIGKILL if late else signal.SIGTERM)
            except ProcessLookupError:
                pass
        ended |= pids
        if time.monotonic() > kill_at + 5:
            break
        time.sleep(0.05)
    return sorted(ended)


def down(name: str = "main", log=print) -> list[str]:
    """Remove everything cluster ``name`` created, from its journal and by name; returns what
    was removed. Safe to run when nothing is up."""
    check_name(name)
    _require_root()
    state = STATE_ROOT / name
    removed = []
    entries = Journal(state).entries()
    # daemons first (by their pid files: slurmctld and munged live outside the nodes), then
    # whatever is still inside a node, then the rest in reverse order of creation
    for e in entries:
        if e["kind"] == "pidfile":
            _kill(Path(e["path"]))
    listed = [ns.split(" ")[0] for ns in _run(["ip", "netns", "list"], check=False).stdout
              .splitlines()]
    namespaces = [e["name"] for e in entries if e["kind"] == "netns"]
    namespaces += [ns for ns in listed if ns.startswith(f"dtlab-{name}-") and ns not in namespaces]
    if end_processes([ns for ns in namespaces if ns in listed]):
        removed.append("the processes left in its nodes")
    for e in reversed(entries):
        k = e["kind"]
        if k == "netns" and _run(["ip", "netns", "del", e["name"]], check=False).returncode == 0:
            removed.append(f"namespace {e['name']}")
        elif k == "link" and _run(["ip", "link", "del", e["name"]],
                                  check=False).returncode == 0:
            removed.append(f"link {e['name']}")
        elif k == "uts":
            _run(["umount", e["path"]], check=False)
        elif k == "mount":
            _run(["umount", "-l", e["path"]], check=False)
        elif k == "file":
            f = Path(e["path"])
            if f.is_file() and f.read_text().startswith("# written by dtlab"):
                f.unlink()
        elif k == "known_host":
            known = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".ssh" / "known_hosts"
            if not known.is_symlink() and not known.parent.is_symlink():  # up never wrote one
                _run(["ssh-keygen", "-R", e["name"], "-f", str(known)], check=False)
    mark = f"# dtlab cluster {name}"
    lines = hosts_lines()
    if any(ln.endswith(mark) for ln in lines):
        write_hosts([ln for ln in lines if not ln.endswith(mark)])
        removed.append("/etc/hosts lines")
    # what a lost or cut journal would miss: anything named like this cluster's
    for ns in _run(["ip", "netns", "list"], check=False).stdout.splitlines():
        ns = ns.split(" ")[0]
        if ns.startswith(f"dtlab-{name}-"):
            _run(["ip", "netns", "del", ns], check=False)
            removed.append(f"namespace {ns}")
    for link in (f"dtbr-{name}",):
        if _run(["ip", "link", "del", link], check=False).returncode == 0:
            removed.append(f"link {link}")
    if state.exists():
        for uts in (state / "uts").glob("*") if (state / "uts").is_dir() else []:
            _run(["umount", str(uts)], check=False)
        _run(["umount", "-l", str(state / "uts")], check=False)
        shutil.rmtree(state, ignore_errors=True)
    log(f"cluster {name} down" + (f": removed {', '.join(dict.fromkeys(removed))}" if removed
                                  else ": nothing was up"))
    return removed


def link_state(node: Node) -> str:
    p = _run(["ip", "-o", "link", "show", node.host_veth], check=False)
    flags = p.stdout.split("<", 1)[1].split(">", 1)[0].split(",") if "<" in p.stdout else []
    return "up" if p.returncode == 0 and "UP" in flags else "down"


def set_link(name: str, node_name: str, state: str) -> str:
    """Pull (``down``) or plug (``up``) a node's cable: its link's end on the bridge."""
    check_name(name)
    _require_root()
    if state not in ("up", "down"):
        raise ClusterError(f"link state {state!r}: give up or down")
    c = Cluster.load(name, "--name")
    node = c.find(node_name)
    _run(["ip", "link", "set", node.host_veth, state])
    return f"{node.name}: link {state}"


def parse_ports(spec: str) -> list[str]:
    """'29500,32768-60999' -> ['29500', '32768-60999'] (each checked: 1..65535, low <= high)."""
    out = []
    for part in spec.split(","):
        m = PORTS.fullmatch(part.strip())
        lo, hi = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (0, 0)
        if not m or not 1 <= lo <= hi <= 65535:
            raise ClusterError(f"--block {spec!r}: give ports or ranges within 1..65535, "
                               "comma-separated (e.g. 32768-60999)")
        out.append(f"{lo}-{hi}" if hi != lo else str(lo))
    return out


def firewall(name: str, node_name: str, block: str | None) -> str:
    """Drop TCP connections to ``block`` ports on a node (its own nftables table, inside its
    namespace), or remove that table (``block`` None)."""
    check_name(name)
    _require_root()
    c = Cluster.load(name, "--name")
    node = c.find(node_name)
    if shutil.which("nft") is None:
        raise ClusterError("`nft` is not installed (Debian: apt-get install nftables)")
    ns = ["ip", "netns", "exec", node.netns, "nft"]
    _run([*ns, "delete", "table", "inet", "dtlab"], check=False)
    if block is None:
        return f"{node.name}: firewall cleared"
    ports = parse_ports(block)
    if any(int(p.split("-")[0]) <= 22 <= int(p.split("-")[-1]) for p in ports):
        raise ClusterError(f"--block {block}: would block sshd (port 22), and with it every "
                           "launcher; leave 22 out")
    _run([*ns, "add", "table", "inet", "dtlab"])
    _run([*ns, "add", "chain", "inet", "dtlab", "input",
          "{ type filter hook input priority 0; policy accept; }"])
    # new connections only (SYN without ACK): replies to the node's own connections, which
    # arrive on its ephemeral ports, still pass, as behind a stateful firewall
    _run([*ns, "add", "rule", "inet", "dtlab", "input", "tcp", "dport",
          "{ " + ", ".join(ports) + " }", "tcp", "flags", "&", "(syn", "|", "ack)", "==", "syn",
          "drop"])
    return f"{node.name}: new incoming TCP connections to ports {', '.join(ports)} dropped"


def status(name: str = "main") -> dict:
    c = Cluster.load(name, "--name")
    nodes = []
    for n in c.all_nodes():
        nodes.append({"node": n.name, "address": n.address, "ifname": n.ifname,
                      "cores": list(n.cores), "link": link_state(n),
                      "shm": c.shm.get(n.name),
                      "namespace": Path(f"/run/netns/{n.netns}").exists(),
                      "sshd": _alive(c.state_dir / f"sshd-{n.name}.pid"),
                      "slurmd": _alive(c.state_dir / f"slurmd-{n.name}.pid")})
    return {"name": c.name, "rate": c.rate or "unshaped", "subnet": c.subnet,
            "bridge": f"{c.bridge} {c.bridge_address}", "slurm": c.slurm, "nodes": nodes}
