"""The doctor's network checks beyond the master port: the address each library will use on
every host, a sample of the ports the ranks will connect to, and ``--collective``, a real tiny job
across every host (dtlab/doctor/collective_check.py) whose failure is traced to a host and a cause.

    interfaces   with GLOO_SOCKET_IFNAME unset, gloo binds the first address its host name
                 resolves to that can be bound, else the loopback address (torch's
                 ProcessGroupGloo.createDefaultDevice); with NCCL_SOCKET_IFNAME unset, NCCL takes
                 interfaces named ib* first, else any but docker*, lo and virbr*, else docker*,
                 else lo (NCCL's socket code). A loopback pick on one of several hosts hangs the
                 job in init_process_group.
    ports        gloo and NCCL connect rank to rank on ports the kernel picks from
                 ip_local_port_range; every host listens on a few such ports, every other host
                 connects to them at the address the library will use there.
    collective   started as the real job will be (DeepSpeed's launcher over pdsh, or torchrun
                 on every host over ssh): rendezvous, process group, all-reduce and broadcast of
                 known values, then an 8 MiB all-reduce timed for the bus bandwidth.
"""
from __future__ import annotations

import ipaddress
import json
import selectors
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dtlab.launch import sessions

SAMPLE_PORTS = 4       # ephemeral ports opened on every host for the reachability sample
MAX_PAIRS = 64         # beyond this many host pairs, each host is tested against its neighbours

# The serving loop of both listeners (this module's sample ports, the doctor's master port):
# accept until the doctor closes our stdin (its ssh ends), so every port is free again after.
SERVE = r"""
import select
end = time.time() + wait
while time.time() < end:
    ready, _, _ = select.select(socks + [sys.stdin], [], [], 0.5)
    if sys.stdin in ready and not sys.stdin.readline():
        break
    for s in ready:
        if s is not sys.stdin:
            # Let the client close first: the side that closes first keeps the port in
            # TIME_WAIT, and a master port in TIME_WAIT cannot be bound by the launch for a minute.
            c = s.accept()[0]
            c.settimeout(5)
            try:
                c.recv(1)
            except OSError:
                pass
            c.close()
"""

LISTEN_MANY = r"""
import socket, sys, time
n, wait = int(sys.argv[1]), float(sys.argv[2])
socks = []
for _ in range(n):
    s = socket.socket()
    s.bind(("0.0.0.0", 0))  # a port from ip_local_port_range, as gloo's and NCCL's are
    s.listen(64)
    socks.append(s)
print("DTLAB-PORTS " + ",".join(str(s.getsockname()[1]) for s in socks), flush=True)
""" + SERVE

CONNECT_MANY = r"""
import socket, sys, threading
addr, ports, timeout = sys.argv[1], sys.argv[2].split(","), float(sys.argv[3])
def one(p):
    try:
        socket.create_connection((addr, int(p)), timeout=timeout).close()
        print(f"DTLAB-REACH {p} ok", flush=True)
    except OSError as e:
        print(f"DTLAB-REACH {p} {type(e).__name__}: {e}", flush=True)
threads = [threading.Thread(target=one, args=(p,)) for p in ports]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


def readline(stream, timeout: float) -> str | None:
    """One line from a pipe, or None when none comes within ``timeout`` seconds (a remote
    command that hangs must not hang the doctor)."""
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        if not sel.select(timeout):
            return None
    return stream.readline().strip()


def is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr.split("%")[0]).is_loopback
    except ValueError:
        return False


def _sorts_above(a: str, b: str) -> bool:
    """Does address ``a`` compare above ``b`` as gloo compares them (bytes; another family:
    cannot pair at all, counted as above)."""
    try:
        x, y = ipaddress.ip_address(a.split("%")[0]), ipaddress.ip_address(b.split("%")[0])
    except ValueError:
        return True
    return x.version != y.version or x.packed > y.packed


def interface_of(probe: dict, addr: str) -> str | None:
    return next((i["name"] for i in probe.get("ipv4", []) if i["addr"] == addr), None)


def nccl_pick(probe: dict) -> dict | None:
    """The interface NCCL would take on this host with NCCL_SOCKET_IFNAME unset, by its
    documented order; None when the host has no IPv4 address at all."""
    ifs = probe.get("ipv4", [])
    rules = [lambda n: n.startswith("ib"),
             lambda n: not n.startswith(("docker", "lo", "virbr")),
             lambda n: n.startswith("docker"), lambda n: n.startswith("lo")]
    for rule in rules:
        hit = [i for i in ifs if rule(i["name"])]
        if hit:
            return hit[0]
    return None


def same_network(a: dict, addr: str) -> bool:
    try:
        net = ipaddress.ip_network(f"{a['addr']}/{a['prefix']}", strict=False)
        return ipaddress.ip_address(addr) in net
    except ValueError:
        return False


def check_predictions(doc, env: dict) -> None:
    """Where GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME are unset on a host, say what the library
    will pick there, and flag a pick the other hosts cannot reach."""
    # several machines (the ssh test hosts are one machine under several names: loopback works)
    multi = len({p["hostname"] for p in doc.probes.values()}) > 1
    for host, p in doc.probes.items():
        g = p.get("gloo")
        if g and not (p.get("env") or {}).get("GLOO_SOCKET_IFNAME"):
            addr = g["address"]
            how = (f"its host name {p['hostname']!r} does not resolve to an address of its own, "
                   "so torch falls back to the loopback address" if g["fallback"] else
                   f"its host name {p['hostname']!r} resolves to {', '.join(g['resolved'])}")
            if is_loopback(addr) and multi:
                fix = ("set GLOO_SOCKET_IFNAME to the interface that reaches the other hosts in "
                       "./.deepspeed_env (exported to every node), or map the host name to its "
                       "network address in /etc/hosts")
                # gloo pairs two ranks by their addresses: the lower one listens, the higher
                # connects; a peer above the loopback address connects to its own loopback
                above = [h for h in doc.probes if h != host and
                         _sorts_above(target_address(doc, h), addr)]
                if above:
                    doc.add("interfaces", "error", f"{host}: with GLOO_SOCKET_IFNAME unset gloo "
                            f"will bind {addr}: {how}. gloo lets the higher address of a pair "
                            f"connect to the lower: {', '.join(above)} would connect to "
                            f"{addr}, their own loopback, and the job hangs in "
                            "init_process_group until the timeout", fix, host)
                else:
                    doc.add("interfaces", "warn", f"{host}: with GLOO_SOCKET_IFNAME unset gloo "
                            f"will bind {addr}: {how}. It works only because every other host's "
                            f"address sorts below {addr} (gloo lets the higher address of a pair "
                            "connect to the lower): one host above it and the job hangs", fix,
                            host)
            else:
                doc.add("interfaces", "ok" if multi else "info", f"{host}: gloo will bind "
                        f"{addr} ({interface_of(p, addr) or '?'}); {how}", host=host)
        if not (p.get("env") or {}).get("NCCL_SOCKET_IFNAME"):
            pick = nccl_pick(p)
            gpus = p.get("gpus", 0)
            doc.probes[host]["nccl_pick"] = pick
            text = (f"{host}: NCCL would take {pick['name']} ({pick['addr']}/{pick['prefix']})"
                    if pick else f"{host}: NCCL would find no IPv4 interface")
            if gpus and pick and pick["name"].startswith(("lo", "docker")) and multi:
                doc.add("interfaces", "error", text + ": only a loopback or container bridge "
                        "is left, which the other hosts cannot reach", "set NCCL_SOCKET_IFNAME",
                        host)
            else:
                doc.add("interfaces", "info", text + ("" if gpus else " (no GPU here: NCCL is "
                                                       "not used, gloo is)"), host=host)
    picks = {h: p["nccl_pick"] for h, p in doc.probes.items() if p.get("nccl_pick") and
             p.get("gpus")}
    nets = {str(ipaddress.ip_network(f"{i['addr']}/{i['prefix']}", strict=False))
            for i in picks.values()}
    if len(nets) > 1:
        doc.add("interfaces", "warn", "NCCL's picks are on different networks: " + ", ".join(
            f"{h} {i['name']} {i['addr']}/{i['prefix']}" for h, i in picks.items()),
            "set NCCL_SOCKET_IFNAME to the interfaces of one network (a prefix, or =name)")


def check_route_to_master(doc, host: str, src: str, master: str) -> None:
    """The master was reached from ``src``: does the library's pick on ``host`` match it?"""
    p = doc.probes.get(host) or {}
    g = p.get("gloo")
    if g and not (p.get("env") or {}).get("GLOO_SOCKET_IFNAME") and not is_loopback(g["address"]) \
            and g["address"] != src and not is_loopback(src):
        doc.add("interfaces", "warn", f"{host}: gloo will bind {g['address']} but reaches the "
                f"master {master} from {src} ({interface_of(p, src) or '?'}): the ranks will "
                "meet on another network than the one their traffic takes to the master",
                "set GLOO_SOCKET_IFNAME to the interface that reaches the master", host)
    pick = p.get("nccl_pick")
    if p.get("gpus") and pick and not (p.get("env") or {}).get("NCCL_SOCKET_IFNAME") and \
            not same_network(pick, master) and pick["addr"] != src:
        doc.add("interfaces", "warn", f"{host}: NCCL would take {pick['name']} "
                f"({pick['addr']}) but the master {master} is reached from {src} "
                f"({interface_of(p, src) or '?'})", "set NCCL_SOCKET_IFNAME to that interface",
                host)


def target_address(doc, host: str) -> str:
    """The address the others will connect to on ``host``: gloo's pick unless it is loopback
    (already an error), else the host's own resolved address."""
    p = doc.probes[host]
    g = p.get("gloo") or {}
    ifname = (p.get("env") or {}).get("GLOO_SOCKET_IFNAME")
    if ifname:
        addrs = [i["addr"] for i in p.get("ipv4", []) if i["name"] == ifname]
        if addrs:
            return addrs[0]
    if g.get("address") and not is_loopback(g["address"]):
        return g["address"]
    return doc.resolved.get(host, [host])[0]


def check_ports(doc) -> None:
    """From every host to every other host: connections to a sample of ephemeral ports."""
    hosts = list(doc.probes)
    if len(hosts) < 2:
        return
    pairs = [(a, b) for a in hosts for b in hosts if a != b]
    if len(pairs) > MAX_PAIRS:
        pairs = [(hosts[i], hosts[(i + 1) % len(hosts)]) for i in range(len(hosts))]
    timeout = doc.a.connect_timeout
    listeners, ports = {}, {}
    try:
        for h in hosts:
            argv = doc.ssh_argv(h, [doc.python, "-c", LISTEN_MANY, str(SAMPLE_PORTS),
                                    str(len(hosts) * (timeout + 20) + 30)])
            listeners[h] = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.DEVNULL, text=True)
        for h, proc in listeners.items():
            line = readline(proc.stdout, timeout + 30) or ""
            if line.startswith("DTLAB-PORTS "):
                ports[h] = line.split()[1]
            else:
                doc.add("ports", "error", f"{h}: could not open sample ports ({line or 'no answer'})",
                        "check ssh and python there", h)

        def reach(pair):
            a, b = pair
            if b not in ports:
                return pair, None
            addr = target_address(doc, b)
            r = doc.ssh(a, [doc.python, "-c", CONNECT_MANY, addr, ports[b], str(timeout)],
                        timeout=timeout + 60)
            return pair, (addr, [ln.split(" ", 2)[1:] for ln in r.stdout.splitlines()
                                 if ln.startswith("DTLAB-REACH ")])

        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(reach, pairs))
    finally:
        for proc in listeners.values():
            try:
                proc.stdin.close()
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
    bad_targets: dict[str, list] = {}
    for (a, b), res in results:
        if res is None:
            continue
        addr, rows = res
        failed = [(p, why) for p, why in rows if why != "ok"]
        if not rows:
            doc.add("ports", "error", f"{a}: could not test its connections to {b}", "check ssh "
                    "and python there", a)
        elif failed:
            bad_targets.setdefault(b, []).append((a, addr, failed, len(rows)))
        else:
            doc.add("ports", "ok", f"{a} -> {b} ({addr}): {len(rows)} of {len(rows)} sample "
                    f"ports reached", host=a)
    for b, rows in bad_targets.items():
        rng = doc.probes[b].get("port_range") or ["?", "?"]
        for a, addr, failed, total in rows:
            why = failed[0][1]
            cause = ("a firewall drops them (no answer)" if "imed out" in why else
                     "the host refuses them" if "refused" in why.lower() else why)
            doc.add("ports", "error", f"{a} -> {b} ({addr}): {len(failed)} of {total} sample "
                    f"ports in {b}'s ephemeral range {rng[0]}-{rng[1]} unreachable: {cause}. gloo "
                    "and NCCL open their rank-to-rank connections to such ports (which side "
                    "connects depends on the ranks): a job can hang after the rendezvous", f"open TCP {rng[0]}-{rng[1]} between the hosts (or pin the range "
                    "with net.ipv4.ip_local_port_range and open that)", b)


# ---------------------------------------------------------------------- the collective job

def collective_argv_deepspeed(doc, hostfile: str, addr: str, port: int, timeout: float) -> list:
    argv = [str(Path(doc.python).with_name("deepspeed")), "--hostfile", hostfile,
            "--master_addr", addr, "--master_port", str(port)]
    for flag in ("include", "exclude"):
        if getattr(doc.a, flag):
            argv += [f"--{flag}", getattr(doc.a, flag)]
    if doc.a.ssh_port:
        argv += ["--ssh_port", str(doc.a.ssh_port)]
    if getattr(doc.a, "force_multi", False):
        argv += ["--force_multi"]
    return argv + ["--module", "dtlab.doctor.collective_check", "--timeout", f"{timeout:g}"]


def remote_limit(timeout: float) -> float:
    """Seconds one host's part of the job may take: the ranks' own 2 x timeout + 5 s, and room
    for the interpreter and torch to start on a loaded host."""
    return 2 * timeout + 25


def _torchrun_remote(doc, i: int, n: int, slots: int, addr: str, port: int,
                     timeout: float) -> list[str]:
    env = [f"{k}={v}" for k, v in doc.exported_env().items()]
    # torchrun's node 0 waits for the other nodes without end when one never comes (its sshd
    # down): coreutils' timeout ends it on the host itself, where killing our ssh would not
    return ["sh", "-c", 'cd "$0" && exec "$@"', doc.cwd, "timeout", "-k", "5",
            f"{remote_limit(timeout):g}", "env", *env, doc.python, "-m",
            "torch.distributed.run", f"--nnodes={n}", f"--node_rank={i}",
            f"--nproc_per_node={slots}", f"--master_addr={addr}", f"--master_port={port}",
            "-m", "dtlab.doctor.collective_check", "--timeout", f"{timeout:g}"]


def _parse(lines: list[str]) -> tuple[dict | None, list[dict]]:
    summary, solo = None, []
    for ln in lines:
        for tag in ("DTLAB-COLLECTIVE ", "DTLAB-COLLECTIVE-RANK "):
            at = ln.find(tag)
            if at >= 0:
                try:
                    obj = json.loads(ln[at + len(tag):])
                except ValueError:
                    continue
                if tag.startswith("DTLAB-COLLECTIVE "):
                    summary = obj
                else:
                    solo.append(obj)
    return summary, solo


def run_collective(doc, active: dict, addr: str, port: int, pool: dict) -> dict:
    """Start the tiny job on every active host; returns what each rank reported. ``pool`` is
    the validated hostfile (host -> slots): DeepSpeed reads a copy the doctor writes of it,
    never the user's file, so no line the checks refused or skipped can reach it."""
    timeout = float(doc.a.collective_timeout)
    hosts = list(active)
    rank_host = [h for h in hosts for _ in active[h]]
    t0 = time.monotonic()
    if doc.a.collective_launcher == "deepspeed":
        with tempfile.TemporaryDirectory(prefix="dtlab-doctor-") as folder:
            hostfile = Path(folder) / "hostfile"
            hostfile.write_text("".join(f"{h} slots={n}\n" for h, n in pool.items()))
            argv = collective_argv_deepspeed(doc, str(hostfile), addr, port, timeout)
            try:
                p = sessions.run(argv, cwd=doc.cwd, capture_output=True, text=True,
                                 timeout=3 * timeout + 90)
                text, rc = p.stdout + p.stderr, p.returncode
            except subprocess.TimeoutExpired as e:
                text, rc = f"{e.stdout or ''}{e.stderr or ''}", None
        per_host_rc = {}
    else:
        procs = {h: subprocess.Popen(doc.ssh_argv(h, _torchrun_remote(
            doc, i, len(hosts), len(active[h]), addr, port, timeout)), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True) for i, h in enumerate(hosts)}
        text, per_host_rc, rc = "", {}, 0
        for h, proc in procs.items():
            try:
                out, _ = proc.communicate(timeout=max(1.0, remote_limit(timeout) + 15
                                                      - (time.monotonic() - t0)))
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            per_host_rc[h] = proc.returncode
            text += "".join(f"{h}: {ln}\n" for ln in out.splitlines())
            rc = rc or proc.returncode
    summary, solo = _parse(text.splitlines())
    return {"summary": summary, "solo": solo, "rank_host": rank_host, "rc": rc,
            "per_host_rc": per_host_rc, "seconds": round(time.monotonic() - t0, 1),
            "tail": [ln[:300] for ln in text.strip().splitlines()[-15:]], "timeout": timeout}


def _host_of(doc, addr: str) -> str | None:
    """The probed host that owns ``addr`` (by name or by one of its IPv4 addresses)."""
    for host, p in doc.probes.items():
        if addr == host or any(a.get("addr") == addr for a in p.get("ipv4", [])):
            return host
    return None


def _cause(doc, host: str, rank: dict, master: str, serving: bool = False) -> str:
    """The likely cause of a rank's failure, from its error and the static findings."""
    err = rank.get("error") or ""
    mine = [f for f in doc.findings if f.host == host and f.severity == "error"]
    order = (("ssh", "ssh to the host fails"), ("python", "its python does not start"),
             ("master", "it cannot reach the master"),
             ("interfaces", "its network interface setting"),
             ("ports", "ports between the hosts are blocked"))
    if serving:  # the store's own host: what keeps others out of it comes first
        order = (("ports", "it refuses connections to its ports (a firewall)"),
                 ("master", "the master port is not reachable on it")) + order
    for check, text in order:
        hit = next((f for f in mine if f.check == check), None)
        if hit:
            return f"{text} (the {check} check: {hit.message[:160]})"
    if rank.get("phase") in (None, "started"):
        if "rendezvous store" in err or "reach" in err:
            return (f"it cannot reach the master {master}: a wrong --master_addr, a blocked "
                    "master port, or no route from this host")
        return "the launcher did not start it there (see the launcher output)"
    if "Unable to find address" in err or "no device" in err.lower() or "interface" in err:
        return "the interface named by GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME does not exist there"
    if rank.get("phase") == "store":
        return ("it reached the master but not the other ranks: the address its library bound "
                "(GLOO/NCCL_SOCKET_IFNAME, host name resolution) or the ports between the hosts")
    return "the collective itself failed (see the error)"


def report_collective(doc, result: dict, master: str) -> None:
    s = result["summary"]
    ranks = {r["rank"]: r for r in result["solo"]}
    if s:
        ranks.update({r["rank"]: r for r in s["ranks"] if r.get("phase") is not None or
                      r["rank"] not in ranks})
    world = len(result["rank_host"])
    # where each rank really ran (its own host name) against where it should have: DeepSpeed
    # runs a job of one active host on this machine, without pdsh
    ran_on = [ranks.get(r, {}).get("host") for r in range(world)]
    elsewhere: dict[str, list] = {}
    for r, (host, actual) in enumerate(zip(result["rank_host"], ran_on)):
        expected = (doc.probes.get(host) or {}).get("hostname")
        if actual and expected and actual != expected:
            elsewhere.setdefault(host, []).append((r, actual, expected))
    for host, items in elsewhere.items():
        single = len(set(result["rank_host"])) == 1 and not getattr(doc.a, "force_multi", False)
        doc.add("collective", "error", f"{host}: rank(s) {', '.join(str(r) for r, _, _ in items)} "
                f"ran on {', '.join(sorted({a for _, a, _ in items}))}, not on {host} "
                f"({items[0][2]}): " + ("with one active host DeepSpeed starts the job on this "
                                        "machine, without ssh or pdsh, so this result says "
                                        "nothing about that host" if single else
                                        "the launcher placed the rank elsewhere"),
                "pass --force_multi to deepspeed (and --force-multi to the doctor) to run it "
                "there" if single else "check the hostfile's names and the launcher", host)
    bad = []
    for r in range(world):
        info = ranks.get(r, {"rank": r, "phase": None, "error": "no report at all"})
        host = result["rank_host"][r]
        if info.get("phase") == "bandwidth" and not info.get("error"):
            continue
        bad.append((r, host, info))
    if not bad and s:
        bw = s["ranks"][0].get("busbw_GBps")
        where = ", ".join(dict.fromkeys(h for h in ran_on if h))
        if elsewhere:
            doc.collective = {"ok": False, "seconds": result["seconds"], "ranks": s["ranks"],
                              "ran_on": ran_on, "failed_hosts": list(elsewhere)}
            return
        doc.add("collective", "ok", f"{world} rank(s) on {len(set(result['rank_host']))} host(s) "
                f"(ran on {where}) formed the group, all-reduced and broadcast the right values "
                f"in {result['seconds']:g} s" + (f"; 8 MiB all-reduce bus bandwidth {bw:.3f} "
                                                 f"GB/s ({bw * 8:.2f} Gbit/s)" if bw else ""))
        doc.collective = {"ok": True, "busbw_GBps": bw, "seconds": result["seconds"],
                          "ranks": s["ranks"], "ran_on": ran_on}
        return
    if not bad:  # every rank fine by its own word, but rank 0 never summed up
        bad = [(0, result["rank_host"][0], {"rank": 0, "phase": None,
                                            "error": "rank 0 gave no summary"})]
    by_host: dict[str, list] = {}
    for r, host, info in bad:
        by_host.setdefault(host, []).append((r, info))
    # A rank that only waited (a timeout) is the consequence of one that failed for a reason,
    # or of a host the static checks flagged: name those hosts, and the others as waiting.
    def waited(info):
        e = info.get("error") or ""
        return info.get("phase") not in (None, "started") and any(
            t in e for t in ("wait timeout", "imed out", "timeout", "Connection reset",
                             "no progress"))
    # A rank with no report at all did not run (its launcher failed on that host, or waited
    # for one that did): the static findings say which host is to blame.
    flagged = {f.host for f in doc.findings if f.severity == "error" and f.host}
    failing = [h for h, items in by_host.items()
               if any(i.get("phase") is not None and not waited(i) for _, i in items)]
    silent = [h for h, items in by_host.items() if all(i.get("phase") is None for _, i in items)]
    culprits = failing + [h for h in silent if h in flagged]
    culprits = culprits or [h for h in by_host if h in flagged] or silent or list(by_host)
    # Every rank failed to reach the store: the fault is where the store listens, not everywhere.
    serving = _host_of(doc, master.rsplit(":", 1)[0])
    store_down = bool(serving and len(bad) == world and len(culprits) > 1 and all(
        i.get("phase") == "started" and "rendezvous store" in (i.get("error") or "")
        for _, _, i in bad))
    if store_down:
        culprits = [serving]
        by_host.setdefault(serving, [])
    for host, items in by_host.items():
        if host not in culprits:
            what = ("could not reach the rendezvous store on" if store_down else
                    "waited for the failing rank(s) on")
            doc.add("collective", "info", f"{host}: rank(s) {', '.join(str(r) for r, _ in items)} "
                    f"{what} {', '.join(culprits)} and gave up", host=host)
    for host, items in by_host.items():
        if host not in culprits:
            continue
        if store_down:  # the host of the store, with or without a rank of its own
            info = items[0][1] if items else {"phase": "started"}
            doc.add("collective", "error", f"{host}: no rank on any host reached the rendezvous "
                    f"store at {master}, which {host} serves; likely cause: "
                    f"{_cause(doc, host, info, master, serving=True)}",
                    "fix that host's finding above and run the doctor again", host)
            continue
        ranks_txt = ", ".join(str(r) for r, _ in items)
        r, info = items[0]
        phase = info.get("phase")
        got = {None: "never started or never reported", "started": "did not reach the "
               "rendezvous", "store": "reached the rendezvous but the process group did not "
               "form", "group": "formed the group but the collective failed", "collective":
               "gave wrong results", "bandwidth": "failed timing"}[phase]
        doc.add("collective", "error", f"{host}: rank(s) {ranks_txt} {got} "
                f"({(info.get('error') or 'no error of its own reported')[:200]}); likely cause: "
                f"{_cause(doc, host, info, master)}", "fix that host's finding above and run "
                "the doctor again", host)
    doc.collective = {"ok": False, "seconds": result["seconds"], "failed_hosts": culprits,
                      "ranks": [ranks.get(r) for r in range(world)], "ran_on": ran_on,
                      "launcher_tail": result["tail"]}

