"""``dtlab doctor``: find what is wrong with a DeepSpeed hostfile and a multi-node setup before the
launch does, and say how to fix it.

Every check that applies is run, from the cheapest to the most involved:

    hostfile         grammar exactly as DeepSpeed parses it, plus what it accepts silently
    include/exclude  resolved to the hosts and slots DeepSpeed will use
    launcher         the launcher program (pdsh, mpirun, srun) is installed here
    resolve          every host name resolves
    ssh              passwordless ssh to EVERY host (DeepSpeed tests only the first one)
    python / cwd     DeepSpeed runs `cd <cwd>; <this python> -u -m deepspeed.launcher.launch`
                     on every host: both paths must exist there
    versions         python, torch, CUDA, NCCL, DeepSpeed on every host, differences flagged
    master           the master address (given, or derived as DeepSpeed does with
                     `ssh <first host> hostname -I`) is an address of the first host, the master
                     port can be bound there, and every host can connect to it
    interfaces       NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME (as the ranks will see them, with
                     .deepspeed_env applied) match an interface with an address on every host
                     (NCCL's prefix, `=exact` and `^exclude` rules); where unset, the address
                     each library will pick there, flagged when the others cannot reach it
    ports            from every host to every other: a sample of the ephemeral ports gloo and
                     NCCL connect to (dtlab/doctor/connectivity.py)
    shm              /dev/shm per host against what NCCL or DeepSpeed's CPU all-reduce maps
    known bugs       launcher bugs of the installed DeepSpeed version the command would hit
    collective       (--collective) a real tiny job across every host, launched as the real one
                     will be: the group forms, all-reduce and broadcast give the right values,
                     the bus bandwidth; a failure is named by host and likely cause
    straggler        (last, only when nothing failed) a GEMM timed on every host and every
                     host's link timed from here; a host 2x worse than the median of the
                     others is named (dtlab/doctor/straggler.py; --no-straggler skips it)
    exports          which variables reach the other hosts (NCCL*, PYTHON*, MV2*, UCX*, MLFLOW*
                     and .deepspeed_env) and which set here will not; .deepspeed_env linted
    slots            slots per host against the GPUs visible there; GPU model and
                     `nvidia-smi topo -m` where present
    ds_report        (--ds-report) DeepSpeed's op report on every host, differences flagged

The remote probes run as DeepSpeed runs its ranks: in --cwd, with the variables DeepSpeed
exports (MLFLOW*, PYTHON*, MV2*, UCX*, NCCL* with CUDA) and .deepspeed_env applied.

Safety: host names and values from files are validated before use (no leading '-', no shell
characters) and ssh always gets an argument list; the remote command is quoted with shlex.

Exit status: 0 no errors, 1 at least one error, 2 bad command line.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dtlab.doctor import connectivity, straggler
from dtlab.report import tables as report
from dtlab.doctor.connectivity import readline as _readline
from dtlab.doctor.hostfile import (REMOTE_FIX, Finding, Hostfile, load, parse_filter, resolve,
                                   safe_name, why_unsafe, why_unsafe_path)

EXPORT_PREFIXES = ("PYTHON", "MV2", "UCX", "MLFLOW")  # DeepSpeed 0.19.8; NCCL too with CUDA
SHM_PER_RANK_DS_CPU = 2 * 2**20 + 2 * 32 * 2**20    # DeepSpeed's shm_comm workspace per rank
SHM_NCCL_ADVICE = 2**30                             # NVIDIA's containers: --shm-size=1g
SHM_LOW_FREE = 32 * 2**20     # /dev/shm this empty (and under a tenth free): warned as full
DOCKER_BRIDGE = "172.17.0.0/16"                     # Docker's default bridge network
# Launcher bugs of DeepSpeed releases: (fixed in, what triggers it, what happens, the fix)
KNOWN_BUGS = [
    ((0, 14, 1), "ssh_port", "--ssh_port with the pdsh launcher stops the runner with "
     "KeyError: 'PDSH_SSH_ARGS_APPEND' (it appends to a variable it never set)",
     "upgrade DeepSpeed to 0.14.1 or later, or set the port in ~/.ssh/config instead"),
]
NOT_EXPORTED = ("GLOO_SOCKET_IFNAME", "CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH", "OMP_NUM_THREADS",
                "TP_SOCKET_IFNAME")
REMOTE_WHY = ("DeepSpeed writes `cd <cwd>; <python> -u -m deepspeed.launcher.launch ... "
              "--master_addr=<addr>` unquoted into the command pdsh runs on every node, where a "
              "shell would run or split it")
LISTENER_EXIT_S = 10.0  # seconds the master-port listener may take to end once told to
# What the launch is made of: while one of these has an error, --collective launches nothing
INPUT_CHECKS = ("hostfile", "include/exclude", "exports", "flags")
LAUNCHER_PROGRAMS = {"pdsh": "pdsh", "openmpi": "mpirun", "mpich": "mpirun", "impi": "mpirun",
                     "mvapich": "mpirun_rsh", "slurm": "srun"}

# Runs on every host with the Python DeepSpeed would use; prints one JSON line.
PROBE = r"""
import json, os, socket, sys
cwd = sys.argv[1]
out = {"hostname": socket.gethostname(), "python": sys.version.split()[0],
       "executable": sys.executable, "cwd_exists": os.path.isdir(cwd), "interfaces": {},
       "ipv4": [], "env": {k: os.environ.get(k) for k in (
           "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "PYTHONPATH", "LD_LIBRARY_PATH")}}
try:
    st = os.statvfs("/dev/shm")
    out["shm"] = {"size": st.f_blocks * st.f_frsize, "free": st.f_bavail * st.f_frsize}
    files = []
    for e in os.scandir("/dev/shm"):
        try:
            files.append((e.stat(follow_symlinks=False).st_size, e.name))
        except OSError:
            pass
    out["shm"]["files"] = len(files)
    out["shm"]["largest"] = sorted(files, reverse=True)[:3]
except OSError:
    out["shm"] = None
try:
    out["port_range"] = [int(x) for x in open("/proc/sys/net/ipv4/ip_local_port_range").read().split()]
except (OSError, ValueError):
    out["port_range"] = None
# gloo without GLOO_SOCKET_IFNAME: the first address its host name resolves to that can be
# bound, else the loopback address (torch's ProcessGroupGloo.createDefaultDevice)
addrs = []
try:
    addrs = list(dict.fromkeys(ai[4][0] for ai in socket.getaddrinfo(
        socket.gethostname(), None, 0, socket.SOCK_STREAM)))
except OSError:
    pass
pick = None
for a in addrs:
    try:
        with socket.socket(socket.AF_INET6 if ":" in a else socket.AF_INET) as b:
            b.bind((a, 0))
        pick = a
        break
    except OSError:
        pass
out["gloo"] = {"resolved": addrs, "address": pick or "127.0.0.1", "fallback": pick is None}
try:
    import fcntl, struct
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _, name in socket.if_nameindex():
        try:
            req = struct.pack("256s", name[:15].encode())
            raw = fcntl.ioctl(s.fileno(), 0x8915, req)
            mask = fcntl.ioctl(s.fileno(), 0x891b, req)
            addr = socket.inet_ntoa(raw[20:24])
            out["interfaces"].setdefault(name, []).append(addr)
            out["ipv4"].append({"name": name, "addr": addr, "prefix": bin(int.from_bytes(
                mask[20:24], "big")).count("1")})
        except OSError:
            out["interfaces"].setdefault(name, [])
    for line in open("/proc/net/if_inet6"):
        f = line.split()
        out["interfaces"].setdefault(f[5], []).append(":".join(f[0][i:i + 4] for i in range(0, 32, 4)))
except Exception as e:
    out["interfaces_error"] = str(e)
try:
    import torch
    out["torch"] = torch.__version__.split("+")[0]
    out["cuda"] = torch.version.cuda
    out["gpus"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if out["gpus"]:
        out["gpu_names"] = sorted({torch.cuda.get_device_name(i) for i in range(out["gpus"])})
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
except Exception as e:
    out["torch"] = None
    out["torch_error"] = str(e)
try:
    from importlib.metadata import version
    out["deepspeed"] = version("deepspeed")
except Exception:
    out["deepspeed"] = None
import shutil, subprocess
if shutil.which("nvidia-smi"):
    try:
        out["topo"] = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True,
                                     text=True, timeout=20).stdout
    except Exception as e:
        out["topo"] = f"nvidia-smi topo -m failed: {e}"
print("DTLAB-PROBE " + json.dumps(out))
"""

LISTEN = r"""
import socket, sys, time
addr, port, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's store: TIME_WAIT is no bar
try:
    s.bind((addr, port))
except OSError as e:
    print(f"DTLAB-LISTEN error {e.errno} {e.strerror}", flush=True)
    sys.exit(0)
s.listen(64)
print("DTLAB-LISTEN ok", flush=True)
socks = [s]
""" + connectivity.SERVE

CONNECT = r"""
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print(f"DTLAB-CONNECT ok {c.getsockname()[0]}")  # the local address the route chose
    c.close()
except OSError as e:
    print(f"DTLAB-CONNECT error {e}")
"""


class Doctor:
    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.findings: list[Finding] = []
        self.probes: dict[str, dict] = {}
        self.reachable: list[str] = []
        self.python = args.python or sys.executable
        self.cwd = args.cwd or os.getcwd()
        self.resolved: dict[str, list[str]] = {}
        self.collective: dict | None = None
        self.straggler: dict | None = None

    # ---- helpers
    def add(self, check, severity, message, fix="", host=None, line=None):
        self.findings.append(Finding(check, severity, message, fix, line, host))

    def ssh_argv(self, host: str, remote: list[str]) -> list[str]:
        if not safe_name(host):  # filtered before; this stays even under python -O
            raise ValueError(f"refusing to pass host name {host!r} to ssh")
        argv = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.a.connect_timeout}"]
        if self.a.ssh_port:
            argv += ["-p", str(self.a.ssh_port)]
        return argv + [host, shlex.join(remote)]

    def ssh(self, host: str, remote: list[str], timeout: float | None = None):
        try:
            return subprocess.run(self.ssh_argv(host, remote), capture_output=True, text=True,
                                  timeout=timeout or self.a.connect_timeout + 60)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess([], 255, "", "timed out")

    # ---- checks
    def run(self) -> list[Finding]:
        a = self.a
        hf = self.check_hostfile()
        self.check_launcher()
        self.check_known_bugs()
        self.check_deepspeed_env()
        self.check_exports()
        if hf is None or not hf.hosts:
            self.check_local_only()
            return self.findings
        self.check_flags()
        active = resolve(hf, a.include or "", a.exclude or "")
        self.findings += [f for f in hf.findings if f.check == "include/exclude"]
        self.active = active
        hosts = list(active) or list(hf.hosts)
        self.add("include/exclude", "info", "DeepSpeed will use " + ", ".join(
            f"{h} slots {s}" for h, s in active.items()) if active else "no host left")
        resolved = [h for h in hosts if self.check_resolve(h)]
        with ThreadPoolExecutor(max_workers=8) as pool:  # in parallel, reported in host order
            results = dict(zip(resolved, pool.map(self.probe, resolved)))
        for h in resolved:
            self.findings += results[h][1]
        self.reachable = [h for h in resolved if results[h][0]]
        self.probes = {h: self.probes[h] for h in self.reachable}
        self.check_versions()
        self.check_slots(active)
        self.check_single_host(active)
        self.check_shm(active)
        if self.a.ds_report:
            self.check_ds_report()
        self.check_interfaces()
        addr = None
        if self.reachable and hosts[0] in self.reachable:
            addr = self.check_master(hosts[0])
        elif hosts:
            self.add("master", "error", f"the first host '{hosts[0]}' (the master, rank 0) is not "
                     "reachable, so nothing can start", "fix the ssh/resolve findings for it",
                     hosts[0])
        if not self.a.no_ports:
            connectivity.check_ports(self)
        if self.a.collective:
            self.check_collective(hf, active, addr)
        if not self.a.no_straggler and not any(f.severity == "error" for f in self.findings):
            self.straggler = straggler.check(self)  # only on hosts that passed everything
        return self.findings

    def check_collective(self, hf: Hostfile, active, addr: str | None) -> None:
        """Launch the tiny job only when nothing it would be launched with was refused."""
        refused = [f for f in self.findings if f.severity == "error" and f.check in INPUT_CHECKS]
        if refused:  # a refused line or value must never reach DeepSpeed, pdsh or a shell
            self.add("collective", "error", f"not launching the collective: {len(refused)} "
                     f"error(s) above ({', '.join(INPUT_CHECKS)})",
                     "fix them and run the doctor again")
            self.collective = {"ok": False, "not_run": True}
            return
        down = [h for h in active if h not in self.reachable]
        if addr is None:
            self.add("collective", "error", "not run: no master address to meet at (see the "
                     "master findings)", "fix them and run again")
        elif down:  # the launch would fail there, and the others wait out the timeout
            for h in down:
                self.add("collective", "error", f"{h}: not run: the job cannot start there, "
                         "the launcher reaches hosts over ssh and the ssh check failed for "
                         "it (a real launch would hang the other hosts until the timeout)",
                         "fix that host's ssh finding above and run the doctor again", h)
            self.collective = {"ok": False, "failed_hosts": down, "not_run": True}
        else:
            result = connectivity.run_collective(self, active, addr, self.a.master_port,
                                                 pool=hf.hosts)
            connectivity.report_collective(self, result, f"{addr}:{self.a.master_port}")

    def check_hostfile(self) -> Hostfile | None:
        a = self.a
        if not a.hostfile:
            default = Path("/job/hostfile")
            if default.is_file():
                a.hostfile = str(default)
            else:
                self.add("hostfile", "info", "no --hostfile and no /job/hostfile: DeepSpeed runs "
                         "on this machine only", "pass --hostfile FILE to check a multi-node setup")
                if a.include or a.exclude:
                    self.check_filter_without_hostfile()
                return None
        hf = load(a.hostfile)
        self.findings += hf.findings
        if hf.hosts and hf.ok:
            self.add("hostfile", "ok", f"{a.hostfile}: {len(hf.hosts)} host(s), "
                     f"{sum(hf.hosts.values())} slot(s), node ranks in file order: "
                     + ", ".join(hf.hosts))
        return hf

    def check_filter_without_hostfile(self) -> None:
        """Without a hostfile DeepSpeed's pool is {'localhost': its device count}, and
        --include/--exclude may name that host alone."""
        a = self.a
        flag, spec = ("--include", a.include) if a.include else ("--exclude", a.exclude)
        hosts, errors = parse_filter(spec, flag)
        for e in errors:
            self.add("include/exclude", "error", e, "fix the filter")
        others = [h for h in hosts if h != "localhost"]
        if others:
            self.add("include/exclude", "error", f"{flag} {spec!r} names {', '.join(others)}, but "
                     "without a hostfile DeepSpeed knows only 'localhost' (ValueError: Hostname "
                     f"'{others[0]}' not found in hostfile)", "pass --hostfile FILE, or name "
                     "localhost")
        elif not errors:
            self.add("include/exclude", "ok", f"{flag} {spec!r} on this machine's devices "
                     "(no hostfile: DeepSpeed's pool is localhost)")

    def check_flags(self) -> None:
        """The defaults of --cwd and --python (given ones are checked with the command line):
        DeepSpeed writes them into the command every node's shell runs."""
        for flag, value, given in (("--cwd", self.cwd, self.a.cwd),
                                   ("--python", self.python, self.a.python)):
            if given is None and (why := why_unsafe_path(value)):
                self.add("flags", "error", f"{flag} defaults to {value!r}, which a multi-node "
                         f"launch cannot use: {why}; {REMOTE_WHY}", f"run from (or install "
                         f"into) a path that passes: {REMOTE_FIX}")

    def check_known_bugs(self) -> None:
        """Launcher bugs of the installed DeepSpeed that this command would hit."""
        version = deepspeed_version()
        if version is None:
            return
        for finding in known_bugs(version, {"ssh_port": self.a.ssh_port}):
            self.add("known bugs", "error", finding[0], finding[1])

    def check_launcher(self) -> None:
        prog = LAUNCHER_PROGRAMS[self.a.launcher]
        if shutil.which(prog):
            self.add("launcher", "ok", f"{self.a.launcher}: {shutil.which(prog)}")
        else:
            self.add("launcher", "error" if self.a.hostfile else "warn",
                     f"launcher '{self.a.launcher}' needs `{prog}`, not installed here "
                     f"(DeepSpeed: \"launcher '{self.a.launcher}' not installed\")",
                     f"install it (Debian: apt-get install {'pdsh' if prog == 'pdsh' else prog})"
                     " or choose --launcher")

    def env_files(self) -> list[Path]:
        name = os.environ.get("DS_ENV_FILE", ".deepspeed_env")
        found = [p for p in (Path.home() / name, Path(self.cwd) / name) if p.is_file()]
        return list({p.resolve(): p for p in found}.values())  # ~ may be the cwd: one report

    def env_lines(self, f: Path) -> list[str] | None:
        """The lines of a .deepspeed_env as DeepSpeed reads them (text mode, universal
        newlines), or None when it is not UTF-8 text (DeepSpeed would crash on it)."""
        try:
            return f.read_bytes().decode("utf-8").replace("\r\n", "\n").replace(
                "\r", "\n").split("\n")
        except UnicodeDecodeError:
            return None

    def deepspeed_env(self) -> dict[str, str]:
        out = {}
        for f in self.env_files():
            for line in self.env_lines(f) or []:
                if "=" in line:
                    k, v = line.split("=", 1)
                    out[k.strip()] = v.strip()
        return out

    def check_deepspeed_env(self) -> None:
        for f in self.env_files():
            lines = self.env_lines(f)
            if lines is None:
                self.add("exports", "error", f"{f}: not UTF-8 text; DeepSpeed reads it as text "
                         "and stops with a UnicodeDecodeError", "write it as KEY=VALUE lines of "
                         "plain text")
                continue
            if lines and lines[-1] == "":
                lines = lines[:-1]  # the newline that ends the last line
            bad = False
            for n, line in enumerate(lines, start=1):
                if "=" not in line:
                    bad = True
                    what = "a blank line" if not line.strip() else \
                        ("a comment" if line.strip().startswith("#") else f"{line!r}")
                    self.add("exports", "error", f"{f}:{n}: {what}: DeepSpeed splits every line "
                             "at '=' and crashes the launch (ValueError: not enough values to "
                             "unpack)", "keep only KEY=VALUE lines: no blank or comment lines",
                             line=n)
                    continue
                key, value = (t.strip() for t in line.split("=", 1))
                if not key.isidentifier() or line.strip().startswith("#"):
                    bad = True
                    self.add("exports", "error", f"{f}:{n}: {key!r} is not a variable name; "
                             "DeepSpeed would export it as written", "use KEY=VALUE", line=n)
                elif (hit := next((c for c in ('"', "$", "`", "\\") if c in value), None)):
                    bad = True
                    self.add("exports", "error", f"{f}:{n}: the value of {key} holds {hit!r}: "
                             "DeepSpeed puts such values in double quotes inside the command it "
                             "runs on every node, where the remote shell still expands $, "
                             "backticks, \\ and \", so it would run or break there",
                             "keep values to letters, digits and @%+=:,./- (or set the variable "
                             "in the nodes' own environment)", line=n)
            if not bad:
                self.add("exports", "ok", f"{f}: {len(self.deepspeed_env())} variable(s), "
                         "exported to every node")

    def exported_env(self) -> dict[str, str]:
        """What DeepSpeed's pdsh runner exports to every node: this shell's MLFLOW*, PYTHON*,
        MV2*, UCX* (and NCCL* when its accelerator is CUDA), then .deepspeed_env."""
        prefixes = EXPORT_PREFIXES + (("NCCL",) if _cuda_here() else ())
        out = {k: v for k, v in os.environ.items() if k.startswith(prefixes)}
        for k, v in self.deepspeed_env().items():
            if k.isidentifier() and not any(c in v for c in '"$`\\\n'):
                out[k] = v
        return out

    def remote(self, argv: list[str]) -> list[str]:
        """``argv`` as DeepSpeed would run it on a node: in the cwd, with its exports."""
        env = [f"{k}={v}" for k, v in self.exported_env().items()]
        return ["sh", "-c", 'cd "$0" 2>/dev/null; exec "$@"', self.cwd, "env", *env, *argv]

    def check_exports(self) -> None:
        exported = sorted(k for k in os.environ if k.startswith(EXPORT_PREFIXES))
        if exported:
            self.add("exports", "info", "exported to the other nodes from this shell: "
                     + ", ".join(exported))
        prefixes = EXPORT_PREFIXES + (("NCCL",) if _cuda_here() else ())
        for k in sorted(k for k in os.environ if k.startswith(prefixes) and self.a.hostfile):
            if (hit := next((c for c in '"$`\\' if c in os.environ[k]), None)):
                self.add("exports", "error", f"{k}, set in this shell, holds {hit!r}: DeepSpeed "
                         "exports it to every node in double quotes inside the command it runs "
                         "there, where the remote shell still expands $, backticks, \\ and \"",
                         f"unset {k} or keep its value to letters, digits and @%+=:,./-")
        from_file = self.deepspeed_env()
        for k in NOT_EXPORTED:
            if k in os.environ and k not in from_file:
                self.add("exports", "warn", f"{k} is set here but DeepSpeed does not export it: "
                         "the other nodes will not see it", f"add {k}={os.environ[k]} to "
                         "./.deepspeed_env")
        if "NCCL_SOCKET_IFNAME" in os.environ:
            self.add("exports", "info", "NCCL* variables are exported only when DeepSpeed's "
                     "accelerator is CUDA (its CPU accelerator exports none)")

    def check_local_only(self) -> None:
        port = self.a.master_port
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's store does
            try:
                s.bind(("0.0.0.0", port))
                self.add("master", "ok", f"port {port} is free here")
            except OSError as e:
                self.add("master", "error", f"port {port} is in use here ({e.strerror}); the "
                         "launch would fail with 'address already in use' (errno 98)",
                         "choose another --master_port")

    def check_resolve(self, host: str) -> bool:
        try:
            addrs = list(dict.fromkeys(ai[4][0] for ai in socket.getaddrinfo(
                host.rpartition("@")[2].split("%")[0], None)))
        except socket.gaierror as e:
            self.add("resolve", "error", f"'{host}' does not resolve ({e.strerror}); ssh and pdsh "
                     "would say 'Could not resolve hostname'", "add it to DNS or /etc/hosts on "
                     "every node, or use its address", host)
            return False
        self.resolved[host] = addrs
        self.add("resolve", "ok", f"{host} -> {', '.join(addrs)}", host=host)
        return True

    def probe(self, host: str) -> tuple[bool, list[Finding]]:
        found: list[Finding] = []
        ok = self._probe(host, lambda *a, **k: found.append(Finding(*a, **k)))
        return ok, found

    def _probe(self, host: str, add) -> bool:
        p = self.ssh(host, self.remote([self.python, "-c", PROBE, self.cwd]))
        line = next((x for x in p.stdout.splitlines() if x.startswith("DTLAB-PROBE ")), None)
        if line is None:
            err = (p.stderr or p.stdout).strip().splitlines()
            text = err[-1] if err else f"exit status {p.returncode}"
            if p.returncode == 255 or "ssh:" in text or "Permission denied" in text or \
                    "Host key verification failed" in text or "timed out" in text:
                fix = {"Permission denied": "install this user's public key in the host's "
                       "~/.ssh/authorized_keys (ssh-copy-id)",
                       "Host key verification failed": f"accept the host key once: ssh-keyscan "
                       f"{host} >> ~/.ssh/known_hosts",
                       "Connection refused": "start sshd on the host or give --ssh-port",
                       "timed out": "check the address, routes and firewall"}
                hint = next((v for k, v in fix.items() if k in text), "check ssh to the host")
                add("ssh", "error", f"passwordless ssh to {host} failed: {text}", hint, host=host)
            else:
                add("python", "error", f"{host}: cannot run {self.python} ({text}); DeepSpeed "
                         "starts this exact path on every node", "install the same environment "
                         "at the same path on every node", host=host)
            return False
        info = json.loads(line.split(" ", 1)[1])
        self.probes[host] = info
        add("ssh", "ok", f"passwordless ssh to {host} ({info['hostname']})", host=host)
        if not info["cwd_exists"]:
            add("cwd", "error", f"{host}: no directory {self.cwd}; DeepSpeed runs `cd "
                     f"{self.cwd}` there first", "use the same checkout path on every node (or a "
                     "shared filesystem)", host=host)
        return True

    def check_versions(self) -> None:
        if not self.probes:
            return
        first = next(iter(self.probes))
        ref = self.probes[first]
        for key, severity in (("python", "warn"), ("torch", "error"), ("cuda", "error"),
                              ("nccl", "error"), ("deepspeed", "error")):
            values = {h: p.get(key) for h, p in self.probes.items()}
            if key == "python":
                values = {h: v.rsplit(".", 1)[0] if v else v for h, v in values.items()}
                severity = "error" if len(set(values.values())) > 1 else severity
            if len(set(values.values())) > 1:
                self.add("versions", severity, f"{key} differs: " + ", ".join(
                    f"{h} {v}" for h, v in values.items()), f"install the same {key} everywhere")
        exported = self.exported_env()
        for h, p in self.probes.items():
            if p.get("torch") is None:
                note = (" with what DeepSpeed exports there (" + ", ".join(
                    f"{k}={v}" for k, v in exported.items() if k in ("PYTHONPATH", "PATH",
                                                                     "LD_LIBRARY_PATH", "PYTHONHOME"))
                    + ")") if exported else ""
                self.add("versions", "error", f"{h}: torch does not import for {self.python}"
                         f"{note}: {p.get('torch_error', '?')[:200]}", "fix the environment "
                         "(.deepspeed_env's PYTHONPATH/LD_LIBRARY_PATH apply on every node)", h)
        if ref.get("deepspeed") is None:
            self.add("versions", "error", f"DeepSpeed is not installed for {self.python} on "
                     f"{first}", "pip install deepspeed in that environment", first)
        summary = ", ".join(f"{k} {ref.get(k)}" for k in ("python", "torch", "cuda", "nccl",
                                                          "deepspeed"))
        self.add("versions", "ok" if all(f.check != "versions" or f.severity == "ok"
                                         for f in self.findings) else "info",
                 f"{first}: {summary}")

    def check_slots(self, active) -> None:
        for host, slots in active.items():
            p = self.probes.get(host)
            if p is None:
                continue
            gpus = p.get("gpus", 0)
            if gpus and max(slots) >= gpus:
                self.add("slots", "error", f"{host}: slots up to {max(slots)} but {gpus} GPU(s) "
                         "visible; ranks would share or miss devices",
                         f"set slots={gpus} or fewer (or check CUDA_VISIBLE_DEVICES)", host)
            elif not gpus:
                self.add("slots", "info", f"{host}: no GPU visible; {len(slots)} CPU process(es) "
                         "(gloo) will start", host=host)
            else:
                self.add("slots", "ok", f"{host}: {len(slots)} of {gpus} GPU(s): "
                         + ", ".join(p.get("gpu_names", [])), host=host)
            if p.get("topo"):
                self.add("slots", "info", f"{host}: nvidia-smi topo -m\n{p['topo']}", host=host)

    def check_single_host(self, active) -> None:
        """DeepSpeed starts a one-host job on this machine, without ssh, whatever the host."""
        if len(active) != 1 or getattr(self.a, "force_multi", False):
            return
        host = next(iter(active))
        p = self.probes.get(host)
        if p and p["hostname"] != socket.gethostname():
            self.add("hostfile", "warn", f"only {host} is active: DeepSpeed runs a one-host job "
                     f"here on {socket.gethostname()} without ssh, not on {host} "
                     f"({p['hostname']})", "pass --force_multi to deepspeed to run it there "
                     "(and --force-multi to the doctor)", host)

    def check_shm(self, active) -> None:
        """/dev/shm per host against what the ranks there will map."""
        single = len(active) == 1
        for host, slots in active.items():
            p = self.probes.get(host)
            if not p or not p.get("shm"):
                continue
            size, n = p["shm"]["size"], len(slots)
            mib = f"{size / 2**20:.0f} MiB"
            free = p["shm"]["free"]
            if size and free < min(SHM_LOW_FREE, size / 10):
                big = ", ".join(f"{name} {b / 2**20:.0f} MiB"
                                for b, name in p["shm"].get("largest", [])[:3])
                self.add("shm", "warn", f"{host}: /dev/shm is {mib} with {free / 2**20:.1f} MiB "
                         f"free ({p['shm'].get('files', '?')} file(s)"
                         + (f"; the largest: {big}" if big else "") + "). Ranks sharing memory "
                         "there (NCCL between a host's GPUs, DeepSpeed's CPU all-reduce, "
                         "torch.multiprocessing's tensors, dtlab's shm and hier all-reduce) die "
                         "of SIGBUS when it runs out", "remove what crashed jobs left there "
                         "(ls -la /dev/shm; only files no running process has open: fuser), "
                         "or give the host a larger /dev/shm", host)
                continue
            if p.get("gpus") and n > 1 and size < SHM_NCCL_ADVICE:
                self.add("shm", "error" if size <= 64 * 2**20 else "warn",
                         f"{host}: /dev/shm is {mib} for {n} GPU ranks; NCCL's transport between "
                         "GPUs of one host lives there (NCCL WARN 'Error while creating shared "
                         "memory segment'; NVIDIA runs its containers with --shm-size=1g)",
                         "docker run --shm-size=1g (Kubernetes: an emptyDir of medium Memory at "
                         "/dev/shm)", host)
            elif not p.get("gpus") and single and p.get("deepspeed") and \
                    size < n * SHM_PER_RANK_DS_CPU:
                need = n * SHM_PER_RANK_DS_CPU / 2**20
                self.add("shm", "warn", f"{host}: /dev/shm is {mib}; when all ranks share a host "
                         f"DeepSpeed's CPU shared-memory all-reduce maps "
                         f"{SHM_PER_RANK_DS_CPU / 2**20:.0f} MiB per rank there, {need:.0f} MiB "
                         f"for {n}: its workspace is cut short and its first all-reduce "
                         "(deepspeed.comm.inference_all_reduce) dies of SIGBUS or SIGSEGV. "
                         "Training's all-reduce goes through gloo and is not affected", f"give /dev/shm at least "
                         f"{need:.0f} MiB (docker run --shm-size=1g)", host)
            else:
                self.add("shm", "ok", f"{host}: /dev/shm {mib} ({p['shm']['free'] / 2**20:.0f} "
                         "MiB free)", host=host)

    def check_ds_report(self) -> None:
        """DeepSpeed's op report on every host: which C++/CUDA ops are built or can be built."""
        ds_report = str(Path(self.python).with_name("ds_report"))
        ansi = re.compile(r"\x1b\[[0-9;]*m")
        row = re.compile(r"^(\w+) \.+ \[(NO|YES|OKAY)\] \.+ \[(NO|OKAY)\]")
        reports = {}
        for host in self.reachable:
            p = self.ssh(host, [ds_report], timeout=self.a.connect_timeout + 120)
            ops = {}
            for line in ansi.sub("", p.stdout).splitlines():
                m = row.match(line.strip())
                if m:
                    ops[m.group(1)] = {"installed": m.group(2) != "NO",
                                       "compatible": m.group(3) == "OKAY"}
            if not ops:
                self.add("ds_report", "warn", f"{host}: ds_report gave no op table "
                         f"({(p.stderr or p.stdout).strip()[-200:]})", "run ds_report there",
                         host)
                continue
            reports[host] = ops
            bad = sorted(k for k, v in ops.items() if not v["compatible"])
            built = sorted(k for k, v in ops.items() if v["installed"])
            self.add("ds_report", "info", f"{host}: {len(ops)} ops, built: "
                     f"{', '.join(built) or 'none (JIT on first use)'}; cannot build: "
                     f"{', '.join(bad) or 'none'}", "async_io needs libaio-dev (NVMe offload)"
                     if "async_io" in bad else "", host)
            self.probes.setdefault(host, {})["ds_report"] = ops
        if len({json.dumps(r, sort_keys=True) for r in reports.values()}) > 1:
            self.add("ds_report", "warn", "DeepSpeed ops differ between hosts: " + "; ".join(
                f"{h}: {sorted(k for k, v in r.items() if v['compatible'])}"
                for h, r in reports.items()), "build the same ops everywhere (DS_BUILD_OPS=1 "
                "pip install deepspeed, or the same image)")

    def check_interfaces(self) -> None:
        for var in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
            for host, p in self.probes.items():
                # as the ranks will see it there: exported, from .deepspeed_env, or the node's own
                value = (p.get("env") or {}).get(var)
                if not value:
                    continue
                with_addr = {n for n, addrs in p["interfaces"].items() if addrs}
                match = sorted(matching_interfaces(var, value, with_addr))
                if match:
                    self.add("interfaces", "ok", f"{host}: {var}={value} -> {', '.join(match)}",
                             host=host)
                else:
                    self.add("interfaces", "error", f"{host}: {var}={value} matches no interface "
                             f"with an address (it has {', '.join(sorted(with_addr))}); the job "
                             "would hang after init or fail with 'connection reset by peer'",
                             f"set {var} to one of those (NCCL: a prefix, =exact, ^exclude)",
                             host)
        connectivity.check_predictions(self, {})

    def master_address(self, first: str) -> str | None:
        if self.a.master_addr:
            self.check_bridge(self.a.master_addr, "the given master address")
            return self.a.master_addr
        p = self.ssh(first, ["hostname", "-I"])
        addrs = p.stdout.split()
        if p.returncode != 0 or not addrs:
            self.add("master", "error", f"DeepSpeed derives the master address with `ssh {first} "
                     f"hostname -I`, which gave nothing", "pass --master_addr to deepspeed", first)
            return None
        self.check_bridge(addrs[0], f"the master address derived from `ssh {first} hostname -I`")
        self.add("master", "info", f"master address derived as DeepSpeed does (`ssh {first} "
                 f"hostname -I`, first word): {addrs[0]}", host=first)
        return addrs[0]

    def check_bridge(self, addr: str, what: str) -> None:
        """A master address on a container bridge: reachable from that host only."""
        try:
            ips = {ai[4][0] for ai in socket.getaddrinfo(addr, None)}
        except socket.gaierror:
            return  # the connect check reports it
        for ip in ips:
            try:
                on_bridge = ipaddress.ip_address(ip) in ipaddress.ip_network(DOCKER_BRIDGE)
            except ValueError:
                continue
            if on_bridge:
                self.add("master", "error", f"{what}, {addr} ({ip}), is on Docker's default "
                         f"bridge {DOCKER_BRIDGE}: only containers of that one host can reach it",
                         "pass --master_addr with the first host's address on the network the "
                         "hosts share (or run the containers with --network host)")

    def check_master(self, first: str) -> str | None:
        """The master address (returned) can be bound on the first host and reached from
        every host."""
        addr, port = self.master_address(first), self.a.master_port
        if addr is None:
            return None
        wait = self.a.connect_timeout * 2 + 10
        argv = self.ssh_argv(first, [self.python, "-c", LISTEN, addr, str(port), str(wait)])
        # a session of its own: on a deadline the ssh and whatever it started die together
        listener = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            line = _readline(listener.stdout, self.a.connect_timeout + 30)
            if line is None:
                self.add("master", "error", f"no answer from {first} within "
                         f"{self.a.connect_timeout + 30:g} s while testing port {port}",
                         "check ssh to the host and that its python starts", first)
                return
            if not line.startswith("DTLAB-LISTEN"):
                self.add("master", "error", f"could not test port {port} on {first}: "
                         f"{_ended_output(listener, LISTENER_EXIT_S) or line}"[:300],
                         "check ssh to the host", first)
                return
            if line != "DTLAB-LISTEN ok":
                errno_text = line.split(" ", 2)[2]
                if errno_text.startswith("98 ") or errno_text.startswith("48 "):
                    self.add("master", "error", f"master port {port} is already in use on {first} "
                             "(errno 98, 'address already in use')", "pass another "
                             "--master_port, or stop what holds it", first)
                else:
                    self.add("master", "error", f"cannot bind {addr}:{port} on {first} "
                             f"({errno_text}): the master address must be one of the first "
                             "host's addresses", "pass the first host's address as --master_addr",
                             first)
                return
            self.add("master", "ok", f"{addr}:{port} bindable on {first}", host=first)
            for host in self.reachable:
                p = self.ssh(host, [self.python, "-c", CONNECT, addr, str(port),
                                    str(self.a.connect_timeout)])
                if "DTLAB-CONNECT ok" in p.stdout:
                    src = p.stdout.split("DTLAB-CONNECT ok", 1)[1].split()[:1]
                    self.add("master", "ok", f"{host} reaches {addr}:{port}"
                             + (f" from {src[0]}" if src else ""), host=host)
                    if src:
                        connectivity.check_route_to_master(self, host, src[0], addr)
                else:
                    self.add("master", "error", f"{host} cannot reach {addr}:{port} "
                             f"({p.stdout.strip() or p.stderr.strip()}); torch would report "
                             "'client socket has timed out'", "open the port in the firewall or "
                             "pass a --master_addr every host can route to", host)
        finally:
            if listener.returncode is None:
                listener.stdin.close()  # the remote listener exits and frees the port
                try:
                    listener.wait(timeout=LISTENER_EXIT_S)
                except subprocess.TimeoutExpired:
                    _kill_group(listener)
        return addr


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill ``proc`` (started with start_new_session) and everything in its process group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _ended_output(proc: subprocess.Popen, timeout: float) -> str:
    """The last of what ``proc`` wrote to stderr once it ends, its stdin closed; after
    ``timeout`` seconds its process group is killed and what it wrote until then is used."""
    try:
        _, err = proc.communicate(timeout=timeout)  # closes stdin
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        try:  # a child that left the group may still hold the pipe: not waited for long
            _, err = proc.communicate(timeout=2)
        except subprocess.TimeoutExpired:
            err = ""
    return (err or "").strip()[-200:]


def _cuda_here() -> bool:
    try:
        import torch  # torch: optional here (the doctor runs on a python without it)
        return torch.cuda.is_available()
    except ImportError:
        return False


def deepspeed_version() -> tuple[int, ...] | None:
    from importlib.metadata import (  # start-up: it loads email, zipfile and csv
        PackageNotFoundError, version)
    try:
        text = version("deepspeed")
    except PackageNotFoundError:
        return None
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def known_bugs(version: tuple[int, ...], used: dict) -> list[tuple[str, str]]:
    """(message, fix) for every known launcher bug of DeepSpeed ``version`` that the options in
    ``used`` (option -> value, None when not given) would trigger."""
    out = []
    for fixed_in, option, what, fix in KNOWN_BUGS:
        if used.get(option) is not None and tuple(version) < fixed_in:
            out.append((f"DeepSpeed {'.'.join(map(str, version))}: {what}; fixed in "
                        f"{'.'.join(map(str, fixed_in))}", fix))
    return out


def matching_interfaces(var: str, value: str, names: set[str]) -> set[str]:
    """Interfaces selected by NCCL_SOCKET_IFNAME (prefixes; '=' exact; '^' excludes) or
    GLOO_SOCKET_IFNAME (exact names)."""
    if var.startswith("GLOO"):
        return {n for n in value.split(",") if n in names}
    exclude = value.startswith("^")
    spec = value[1:] if exclude else value
    exact = spec.startswith("=")
    spec = spec[1:] if exact else spec
    parts = [s for s in spec.split(",") if s]
    hit = {n for n in names if any(n == s if exact else n.startswith(s) for s in parts)}
    return names - hit if exclude else hit


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--hostfile", help="DeepSpeed hostfile (default /job/hostfile if present)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--include", help="NAME[:SLOT[,SLOT]][@NAME...] as for deepspeed")
    g.add_argument("--exclude", help="NAME[:SLOT[,SLOT]][@NAME...] as for deepspeed")
    p.add_argument("--launcher", default="pdsh", choices=sorted(LAUNCHER_PROGRAMS))
    p.add_argument("--master-addr", help="the address deepspeed will get as --master_addr")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--ssh-port", type=int, default=None)
    p.add_argument("--connect-timeout", type=int, default=5, help="ssh/connect seconds (5)")
    p.add_argument("--python", help="the Python DeepSpeed will run (default: this one)")
    p.add_argument("--cwd", help="the directory DeepSpeed will cd to (default: this one)")
    p.add_argument("--ds-report", action="store_true",
                   help="also run DeepSpeed's ds_report on every host (op build status)")
    p.add_argument("--force-multi", action="store_true",
                   help="the job will be launched with deepspeed --force_multi")
    p.add_argument("--no-ports", action="store_true",
                   help="skip the host-to-host sample of ephemeral ports")
    p.add_argument("--collective", action="store_true",
                   help="also run a tiny real job across every host: group, all-reduce, "
                        "broadcast, bus bandwidth; a failure named by host and cause")
    p.add_argument("--collective-launcher", choices=("deepspeed", "torchrun"),
                   default="deepspeed", help="start it with DeepSpeed's launcher over pdsh "
                   "(default) or torchrun on every host over ssh")
    p.add_argument("--collective-timeout", type=float, default=20.0,
                   help="seconds each phase of the tiny job may take (default 20)")
    p.add_argument("--no-straggler", action="store_true",
                   help="skip the straggler preflight (a GEMM timed on every host and every "
                        "host's link timed from here; it runs only when nothing else failed)")
    p.add_argument("--json", action="store_true", help="every finding as JSON")
    return p


def run(a: argparse.Namespace) -> int:
    for flag in ("master_addr", "python", "cwd"):
        v = getattr(a, flag)
        why = None if v is None else why_unsafe(v) if flag == "master_addr" else \
            why_unsafe_path(v)
        if why:
            print(f"dtlab: error: --{flag.replace('_', '-')} {v!r} refused: {why}; {REMOTE_WHY}; "
                  f"{REMOTE_FIX}", file=sys.stderr)
            return 2
    if not (1 <= a.master_port <= 65535) or (a.ssh_port is not None and not 1 <= a.ssh_port <= 65535):
        print("dtlab: error: ports must be within 1..65535", file=sys.stderr)
        return 2
    if a.connect_timeout < 1:
        print("dtlab: error: --connect-timeout must be >= 1", file=sys.stderr)
        return 2
    if not 1 <= a.collective_timeout <= 600:
        print("dtlab: error: --collective-timeout must be within 1..600 seconds",
              file=sys.stderr)
        return 2
    t0 = time.monotonic()
    d = Doctor(a)
    findings = d.run()
    errors = sum(f.severity == "error" for f in findings)
    warns = sum(f.severity == "warn" for f in findings)
    if a.json:
        print(json.dumps({"findings": [f.as_dict() for f in findings], "hosts": d.probes,
                          "active": getattr(d, "active", None), "collective": d.collective,
                          "straggler": d.straggler,
                          "errors": errors,
                          "warnings": warns, "seconds": round(time.monotonic() - t0, 2)},
                         indent=2))
    else:
        print_table(findings, errors, warns)
    return 1 if errors else 0


def print_table(findings, errors, warns) -> None:
    from rich.table import Table  # rich: start-up (the CLI parser imports this)
    from rich.markup import escape

    t = Table(title="dtlab doctor")
    for c in ("check", "host", "", "finding", "fix"):
        t.add_column(c)
    colour = {"ok": "green", "info": "blue", "warn": "yellow", "error": "bold red"}
    for f in findings:
        t.add_row(f.check, f.host or "", f"[{colour[f.severity]}]{f.severity}[/]",
                  escape(f.message), escape(f.fix))
    console = report.console()
    console.print(t)
    console.print(f"{errors} error(s), {warns} warning(s)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dtlab doctor", description=__doc__.splitlines()[0])
    return run(add_arguments(p).parse_args(argv))
