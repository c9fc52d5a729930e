"""The doctor's straggler preflight: a GEMM timed on every host and every host's link timed from
here, and a host named when it is at least 2x worse than the median of the others (one slow node
sets every rank's step time).

It runs after every other check and only when none found an error, one host at a time (hosts of
the namespace cluster share this machine's cores; timed side by side they would slow each other).
Each host gets one ssh command: it times fp32 GEMMs on one thread for half a second of wall time
(a throttled CPU shows in wall time, not in one GEMM's), then takes what the doctor sends it for
a moment and reports the bytes and seconds it received them in.
"""
from __future__ import annotations

import json
import socket
import statistics
import subprocess
import time

from dtlab.doctor.connectivity import readline, target_address

WORSE = 2.0          # this many times the median of the others: a straggler
SEND_S = 0.3         # seconds the doctor sends to each host
GEMM_N = 384

REMOTE = r"""
import json, socket, sys, time
import torch
torch.set_num_threads(1)
n = int(sys.argv[2])
a, b = torch.randn(n, n), torch.randn(n, n)
for _ in range(3):
    a @ b
count, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < 0.5:
    a @ b
    count += 1
gemm_s = (time.perf_counter() - t0) / count
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen(1)
s.settimeout(20)
print("DTLAB-SINK", s.getsockname()[1], flush=True)
c, _ = s.accept()
c.settimeout(20)
got, first = 0, None
while True:
    data = c.recv(1 << 16)
    if not data:
        break
    first = first or time.perf_counter()
    got += len(data)
seconds = time.perf_counter() - first if first else 0.0
print("DTLAB-STRAGGLER " + json.dumps({"gemm_s": gemm_s, "bytes": got, "seconds": seconds}),
      flush=True)
"""


def _local(addr: str) -> bool:
    """An address of this machine (the doctor's host is one of the nodes): its link is
    loopback, not comparable with the others'."""
    try:
        with socket.socket() as s:
            s.bind((addr, 0))
        return True
    except OSError:
        return False


def _send(addr: str, port: int, timeout: float) -> None:
    with socket.create_connection((addr, port), timeout=timeout) as c:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)  # bounds the drain
        chunk, end = b"\0" * (1 << 16), time.monotonic() + SEND_S
        while time.monotonic() < end:
            c.sendall(chunk)


def measure(doc, host: str) -> dict:
    addr = target_address(doc, host)
    timeout = doc.a.connect_timeout + 30
    argv = doc.ssh_argv(host, [doc.python, "-c", REMOTE, "0.0.0.0", str(GEMM_N)])
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        line = readline(p.stdout, timeout) or ""
        if not line.startswith("DTLAB-SINK "):
            return {"error": f"no answer ({line or (p.stderr.read() or '')[-200:]})"}
        local = _local(addr)
        _send(addr, int(line.split()[1]), timeout)
        line = readline(p.stdout, timeout) or ""
        if not line.startswith("DTLAB-STRAGGLER "):
            return {"error": f"no measurement ({line or 'no answer'})"}
        r = json.loads(line.split(" ", 1)[1])
        bw = r["bytes"] / r["seconds"] if r["seconds"] > 0 else None
        return {"gemm_ms": r["gemm_s"] * 1e3, "link_Mbps": None if local or bw is None
                else bw * 8 / 1e6, "address": addr, "local": local}
    except OSError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def worse(values: dict[str, float], higher_is_worse: bool) -> dict[str, float]:
    """host -> how many times worse than the median of the others, for the hosts at least
    WORSE times worse."""
    out = {}
    for h, v in values.items():
        others = [x for o, x in values.items() if o != h]
        if not others or v <= 0:
            continue
        med = statistics.median(others)
        ratio = v / med if higher_is_worse else med / v
        if ratio >= WORSE:
            out[h] = ratio
    return out


def check(doc) -> dict | None:
    hosts = list(doc.probes)
    if len(hosts) < 2:
        return None
    got = {h: measure(doc, h) for h in hosts}  # one at a time: see the module's docstring
    for h, r in got.items():
        if "error" in r:
            doc.add("straggler", "warn", f"{h}: not timed: {r['error']}",
                    "check ssh and torch there", h)
    ok = {h: r for h, r in got.items() if "error" not in r}
    gemm = {h: r["gemm_ms"] for h, r in ok.items()}
    link = {h: r["link_Mbps"] for h, r in ok.items() if r["link_Mbps"]}
    slow_gemm, slow_link = worse(gemm, True), worse(link, False)
    for h, x in slow_gemm.items():
        doc.add("straggler", "warn", f"{h}: a {GEMM_N}x{GEMM_N} fp32 GEMM takes "
                f"{gemm[h]:.1f} ms, {x:.1f}x the median of the others "
                f"({statistics.median([v for o, v in gemm.items() if o != h]):.1f} ms): a "
                "straggler; every collective waits for its ranks", "look for a CPU limit "
                "(cgroup cpu.max, a container's --cpus), thermal throttling or another job "
                "on that host", h)
    for h, x in slow_link.items():
        doc.add("straggler", "warn", f"{h}: its link carries {link[h]:.0f} Mbit/s from here, "
                f"{x:.1f}x less than the median of the others "
                f"({statistics.median([v for o, v in link.items() if o != h]):.0f} Mbit/s): a "
                "straggler; every collective waits for it", "look at that host's link: its "
                "negotiated speed (ethtool), a shaping qdisc (tc qdisc show), a bad cable", h)
    if ok and not slow_gemm and not slow_link:
        doc.add("straggler", "ok", "no straggler: GEMM " + ", ".join(
            f"{h} {v:.1f} ms" for h, v in gemm.items()) + "; link from here " + (", ".join(
                f"{h} {v:.0f} Mbit/s" for h, v in link.items()) or "not timed (local)")
            + f" (none {WORSE:g}x worse than the median of the others)")
    return {"hosts": got, "slow_gemm": sorted(slow_gemm), "slow_link": sorted(slow_link)}
