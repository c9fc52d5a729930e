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
    interfaces       NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME match an interface with an address
                     on every host (NCCL's prefix, `=exact` and `^exclude` rules)
    exports          which variables reach the other hosts (NCCL*, PYTHON*, MV2*, UCX*, MLFLOW*
                     and .deepspeed_env) and which set here will not; .deepspeed_env linted
    slots            slots per host against the GPUs visible there; GPU model and
                     `nvidia-smi topo -m` where present
    ds_report        (--ds-report) DeepSpeed's op report on every host, differences flagged

Safety: host names and values from files are validated before use (no leading '-', no shell
characters) and ssh always gets an argument list; the remote command is quoted with shlex.

Exit status: 0 no errors, 1 at least one error, 2 bad command line.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dtlab.tools import report
from dtlab.tools.hostfile import Finding, Hostfile, load, resolve, safe_name

EXPORT_PREFIXES = ("NCCL", "PYTHON", "MV2", "UCX", "MLFLOW")  # DeepSpeed 0.19.8 with CUDA
NOT_EXPORTED = ("GLOO_SOCKET_IFNAME", "CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH", "OMP_NUM_THREADS",
                "TP_SOCKET_IFNAME")
LAUNCHER_PROGRAMS = {"pdsh": "pdsh", "openmpi": "mpirun", "mpich": "mpirun", "impi": "mpirun",
                     "mvapich": "mpirun_rsh", "slurm": "srun"}

# Runs on every host with the Python DeepSpeed would use; prints one JSON line.
PROBE = r"""
import json, os, socket, sys
cwd = sys.argv[1]
out = {"hostname": socket.gethostname(), "python": sys.version.split()[0],
       "cwd_exists": os.path.isdir(cwd), "interfaces": {}}
try:
    import fcntl, struct
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _, name in socket.if_nameindex():
        try:
            raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
            out["interfaces"].setdefault(name, []).append(socket.inet_ntoa(raw[20:24]))
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
try:
    s.bind((addr, port))
except OSError as e:
    print(f"DTLAB-LISTEN error {e.errno} {e.strerror}", flush=True)
    sys.exit(0)
s.listen(64)
print("DTLAB-LISTEN ok", flush=True)
import select
end = time.time() + wait
while time.time() < end:  # until the doctor closes our stdin (ssh ends), so the port is free
    ready, _, _ = select.select([s, sys.stdin], [], [], 0.5)
    if sys.stdin in ready and not sys.stdin.readline():
        break
    if s in ready:
        # Let the client close first: the side that closes first keeps the port in TIME_WAIT,
        # and a master port in TIME_WAIT cannot be bound by the real launch for a minute.
        c = s.accept()[0]
        c.settimeout(5)
        try:
            c.recv(1)
        except OSError:
            pass
        c.close()
s.close()
"""

CONNECT = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("DTLAB-CONNECT ok")
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
        self.check_deepspeed_env()
        self.check_exports()
        if hf is None or not hf.hosts:
            self.check_local_only()
            return self.findings
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
        if self.a.ds_report:
            self.check_ds_report()
        self.check_interfaces()
        if self.reachable and hosts[0] in self.reachable:
            self.check_master(hosts[0])
        elif hosts:
            self.add("master", "error", f"the first host '{hosts[0]}' (the master, rank 0) is not "
                     "reachable, so nothing can start", "fix the ssh/resolve findings for it",
                     hosts[0])
        return self.findings

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
                    self.add("include/exclude", "error", "--include/--exclude need a hostfile",
                             "pass --hostfile FILE")
                return None
        hf = load(a.hostfile)
        self.findings += hf.findings
        if hf.hosts and hf.ok:
            self.add("hostfile", "ok", f"{a.hostfile}: {len(hf.hosts)} host(s), "
                     f"{sum(hf.hosts.values())} slot(s), node ranks in file order: "
                     + ", ".join(hf.hosts))
        return hf

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
        return [p for p in (Path.home() / name, Path(self.cwd) / name) if p.is_file()]

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

    def check_exports(self) -> None:
        exported = sorted(k for k in os.environ if k.startswith(EXPORT_PREFIXES))
        if exported:
            self.add("exports", "info", "exported to the other nodes from this shell: "
                     + ", ".join(exported))
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
            try:
                s.bind(("0.0.0.0", port))
                self.add("master", "ok", f"port {port} is free here")
            except OSError as e:
                self.add("master", "error", f"port {port} is in use here ({e.strerror}); the "
                         "launch would fail with 'address already in use' (errno 98)",
                         "choose another --master_port")

    def check_resolve(self, host: str) -> bool:
        try:
            addrs = sorted({ai[4][0] for ai in socket.getaddrinfo(host, None)})
        except socket.gaierror as e:
            self.add("resolve", "error", f"'{host}' does not resolve ({e.strerror}); ssh and pdsh "
                     "would say 'Could not resolve hostname'", "add it to DNS or /etc/hosts on "
                     "every node, or use its address", host)
            return False
        self.add("resolve", "ok", f"{host} -> {', '.join(addrs)}", host=host)
        return True

    def probe(self, host: str) -> tuple[bool, list[Finding]]:
        found: list[Finding] = []
        ok = self._probe(host, lambda *a, **k: found.append(Finding(*a, **k)))
        return ok, found

    def _probe(self, host: str, add) -> bool:
        p = self.ssh(host, [self.python, "-c", PROBE, self.cwd])
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

    def check_ds_report(self) -> None:
        """DeepSpeed's op report on every host: which C++/CUDA ops are built or can be built."""
        import re
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
        env = dict(self.deepspeed_env())
        for var in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
            value = os.environ.get(var) if var.startswith("NCCL") else None
            value = env.get(var, value if value is not None else os.environ.get(var))
            if not value:
                continue
            for host, p in self.probes.items():
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

    def master_address(self, first: str) -> str | None:
        if self.a.master_addr:
            return self.a.master_addr
        p = self.ssh(first, ["hostname", "-I"])
        addrs = p.stdout.split()
        if p.returncode != 0 or not addrs:
            self.add("master", "error", f"DeepSpeed derives the master address with `ssh {first} "
                     f"hostname -I`, which gave nothing", "pass --master_addr to deepspeed", first)
            return None
        if addrs[0].startswith(("172.17.", "172.18.")):
            self.add("master", "warn", f"derived master address {addrs[0]} looks like a docker "
                     "bridge; other hosts cannot reach it", "pass --master_addr", first)
        self.add("master", "info", f"master address derived as DeepSpeed does (`ssh {first} "
                 f"hostname -I`, first word): {addrs[0]}", host=first)
        return addrs[0]

    def check_master(self, first: str) -> None:
        addr, port = self.master_address(first), self.a.master_port
        if addr is None:
            return
        wait = self.a.connect_timeout * 2 + 10
        argv = self.ssh_argv(first, [self.python, "-c", LISTEN, addr, str(port), str(wait)])
        listener = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        try:
            line = _readline(listener.stdout, self.a.connect_timeout + 30)
            if line is None:
                self.add("master", "error", f"no answer from {first} within "
                         f"{self.a.connect_timeout + 30:g} s while testing port {port}",
                         "check ssh to the host and that its python starts", first)
                return
            if not line.startswith("DTLAB-LISTEN"):
                self.add("master", "error", f"could not test port {port} on {first}: "
                         f"{listener.stderr.read().strip()[-200:]}", "check ssh to the host", first)
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
                    self.add("master", "ok", f"{host} reaches {addr}:{port}", host=host)
                else:
                    self.add("master", "error", f"{host} cannot reach {addr}:{port} "
                             f"({p.stdout.strip() or p.stderr.strip()}); torch would report "
                             "'client socket has timed out'", "open the port in the firewall or "
                             "pass a --master_addr every host can route to", host)
        finally:
            listener.stdin.close()  # the remote listener exits and frees the port
            try:
                listener.wait(timeout=10)
            except subprocess.TimeoutExpired:
                listener.kill()
                listener.wait()


def _readline(stream, timeout: float) -> str | None:
    """One line from a pipe, or None when none comes within ``timeout`` seconds (a remote
    command that hangs must not hang the doctor)."""
    import selectors
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        if not sel.select(timeout):
            return None
    return stream.readline().strip()


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
    p.add_argument("--json", action="store_true", help="every finding as JSON")
    return p


def run(a: argparse.Namespace) -> int:
    for flag in ("master_addr", "python", "cwd"):
        v = getattr(a, flag)
        if v is not None and (v.startswith("-") or any(c in v for c in "\n\r\0")):
            print(f"dtlab: error: --{flag.replace('_', '-')} {v!r} refused", file=sys.stderr)
            return 2
    if not (1 <= a.master_port <= 65535) or (a.ssh_port is not None and not 1 <= a.ssh_port <= 65535):
        print("dtlab: error: ports must be within 1..65535", file=sys.stderr)
        return 2
    if a.connect_timeout < 1:
        print("dtlab: error: --connect-timeout must be >= 1", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    d = Doctor(a)
    findings = d.run()
    errors = sum(f.severity == "error" for f in findings)
    warns = sum(f.severity == "warn" for f in findings)
    if a.json:
        print(json.dumps({"findings": [f.as_dict() for f in findings], "hosts": d.probes,
                          "active": getattr(d, "active", None), "errors": errors,
                          "warnings": warns, "seconds": round(time.monotonic() - t0, 2)},
                         indent=2))
    else:
        print_table(findings, errors, warns)
    return 1 if errors else 0


def print_table(findings, errors, warns) -> None:
    from rich.table import Table
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
