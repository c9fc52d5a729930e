"""A flight recorder: the last collectives and point-to-point operations each rank issued, kept
where a crash cannot erase them, dumped with the rank's Python stacks when a job hangs, and the
desync report built from them.

What is recorded. While the training loop runs, ``torch.distributed``'s collective and
point-to-point functions are wrapped (and restored afterwards). Every call looked up on the
module at call time passes through them: our labs' collectives and ring, DDP's communication
hook (labs/ddp.py registers one), DeepSpeed's comm layer, FSDP2's all-gathers and
reduce-scatters. Not seen: C++ callers (torch DDP without a hook), DTensor's functional
collectives, code that imported a function by name before the loop. Each entry: a sequence number
per group (the members of a group must issue its ops in the same order), the op, its bytes,
dtype and shape, the step, the line of ours that issued it, when it was issued and when the call
returned (for ``async_op=True``: when it was queued).

Where. Every rank maps ``RUN_DIR/flight/rank<R>.ring``, a file of fixed-size slots (a header
and the last ``CAPACITY`` entries), and writes each entry into it as it issues the op. The pages
belong to the kernel, so the record outlives the process: a rank killed by SIGKILL, by gloo's
abort on a size mismatch or by the OOM killer still leaves its last ops behind.

Dumps. A watchdog thread per rank writes ``flight/rank<R>.json`` (entries and every thread's
stack) when asked: by ``dtlab debug hang RUN_DIR`` (a request file), by a rank whose collective
failed (faults.report_failure), or by ``kill -USR1 <pid>`` (faulthandler writes the stacks to
``rank<R>.stacks.txt`` at once, from C; the thread sees the file grow and adds the record). A
thread, because a hung rank is blocked inside C++ with the GIL released: its main thread cannot
answer, another can. Fatal signals (SIGABRT, SIGSEGV) also leave their stacks in that file.

``desync_report`` compares what the ranks left: which rank is behind (issued fewer ops in a
group), what op every rank is blocked in, and which ranks issued a different op or size at the
same sequence number of a group (a collective mismatch); only where every rank's ring still holds
the ops, and it says which older ops had left a ring.
"""
from __future__ import annotations

import collections
import faulthandler
import json
import linecache
import mmap
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

CAPACITY = 64          # entries kept per rank
SLOT = 512             # bytes per slot of the ring file (slot 0: the header)
POLL_S = 0.2           # how often the watchdog looks for a dump request

# torch.distributed function -> the op's name in the record
WRAPPED = {"all_reduce": "all_reduce", "all_gather": "all_gather",
           "all_gather_into_tensor": "all_gather", "_all_gather_base": "all_gather",
           "reduce_scatter": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
           "_reduce_scatter_base": "reduce_scatter", "broadcast": "broadcast",
           "reduce": "reduce", "all_to_all_single": "all_to_all", "all_to_all": "all_to_all",
           "barrier": "barrier", "gather": "gather", "scatter": "scatter",
           "all_gather_object": "all_gather_object",
           "broadcast_object_list": "broadcast_object_list",
           "send": "send", "isend": "send", "recv": "recv", "irecv": "recv"}
P2P = {"send", "isend", "recv", "irecv"}


def flight_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "flight"


def _tensors(x):
    import torch
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)


def _group_key(group, world: int):
    """'world' for the default group (or one holding every rank), else its global ranks."""
    import torch.distributed as dist
    if group is None or group is dist.group.WORLD:
        return "world"
    try:
        ranks = list(dist.get_process_group_ranks(group))
    except Exception:  # noqa: BLE001  (a group this rank does not know as such)
        return ["?"]
    return "world" if len(ranks) == world else ranks


def _ours(path: str) -> int:
    """Where a lab or dtlab path starts in ``path`` (-1: not ours)."""
    return max(path.rfind("/labs/"), path.rfind("/dtlab/"))


def _installed(path: str) -> bool:
    """Python's own library and installed packages (torch, DeepSpeed, ...), or no file."""
    return path.startswith("<") or "-packages/" in path or any(
        path.startswith(os.path.join(p, "lib")) for p in {sys.base_prefix, sys.prefix})


def _site() -> str:
    """Who issued the op: the innermost frame of a lab, of dtlab outside this module, or of the
    user's own script (anything not installed)."""
    for frame, lineno in traceback.walk_stack(None):
        path = frame.f_code.co_filename
        if path.endswith(("reliability/flight.py", "measure/comm_counter.py")):
            continue
        at = _ours(path)
        if at >= 0:
            return f"{path[at + 1:]}:{lineno}"
        if not _installed(path):
            return f"{os.path.basename(path)}:{lineno}"
    return "?"


class Ring:
    """The ring file: slot 0 the header, slots 1..CAPACITY the last entries, each one JSON
    line padded with spaces."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            f.truncate((CAPACITY + 1) * SLOT)
        os.replace(tmp, path)  # a new file: an older run's mapping keeps its own
        self.file = open(path, "r+b")
        self.map = mmap.mmap(self.file.fileno(), (CAPACITY + 1) * SLOT)
        self.header = header
        self.put(0, header)

    def put(self, slot: int, obj: dict) -> None:
        data = json.dumps(obj, default=str).encode()
        if len(data) >= SLOT:  # a long shape or site: keep what identifies the op
            obj = {k: v for k, v in obj.items() if k not in ("shape", "site")}
            data = json.dumps(obj, default=str).encode()[:SLOT - 1]
        self.map[slot * SLOT:(slot + 1) * SLOT] = data.ljust(SLOT - 1) + b"\n"

    def close(self) -> None:
        self.map.close()
        self.file.close()


def read_ring(path: str | Path) -> tuple[dict, list[dict]]:
    """(header, entries oldest first) of a ring file, whatever state its writer died in."""
    raw = Path(path).read_bytes()
    slots = []
    for i in range(len(raw) // SLOT):
        chunk = raw[i * SLOT:(i + 1) * SLOT].strip(b" \n\0")
        try:
            slots.append(json.loads(chunk) if chunk else None)
        except ValueError:  # a slot torn by the crash itself
            slots.append(None)
    header = slots[0] if slots and slots[0] else {}
    entries = sorted((s for s in slots[1:] if s), key=lambda e: e["n"])
    return header, entries


class FlightRecorder:
    """The ring of one rank and the wrappers that fill it (enter it around the loop)."""

    def __init__(self, rank: int, world: int, run_dir: str | Path | None = None,
                 capacity: int = CAPACITY):
        self.rank, self.world = rank, world
        self.entries: collections.deque = collections.deque(maxlen=capacity)
        self.seq: dict = collections.defaultdict(int)
        self.count = 0
        self.step: int | None = None
        self.ring = None
        if run_dir is not None:
            d = flight_dir(run_dir)
            d.mkdir(parents=True, exist_ok=True)
            self.ring = Ring(d / f"rank{rank}.ring", {
                "rank": rank, "world": world, "pid": os.getpid(),
                "host": socket.gethostname(), "started": time.time(), "step": None,
                "main_thread": threading.main_thread().ident})

    def set_step(self, step: int) -> None:
        self.step = step
        if self.ring is not None:
            self.ring.header["step"] = step
            self.ring.put(0, self.ring.header)

    def record(self, op: str, group, tensors: list, peer: int | None = None) -> dict:
        if peer is not None:  # both ends of a pair count their messages in one sequence
            key = ["p2p", min(self.rank, peer), max(self.rank, peer)]
        else:
            key = _group_key(group, self.world)
        k = json.dumps(key)
        self.seq[k] += 1
        self.count += 1
        t = tensors[0] if tensors else None
        entry = {"n": self.count, "seq": self.seq[k], "group": key, "op": op,
                 "bytes": sum(x.numel() * x.element_size() for x in tensors),
                 "dtype": str(t.dtype).replace("torch.", "") if t is not None else None,
                 "shape": list(t.shape) if t is not None else None, "peer": peer,
                 "step": self.step, "site": _site(), "issued": round(time.time(), 4),
                 "returned": None}
        self.entries.append(entry)
        self._persist(entry)
        return entry

    def returned(self, entry: dict) -> None:
        entry["returned"] = round(time.time(), 4)
        self._persist(entry)

    def _persist(self, entry: dict) -> None:
        if self.ring is not None:
            self.ring.put(1 + (entry["n"] - 1) % CAPACITY, entry)

    def _wrap(self, name: str, fn):
        import inspect
        params = list(inspect.signature(fn).parameters)
        op, p2p = WRAPPED[name], name in P2P

        def recorded(*args, **kwargs):
            bound = dict(zip(params, args), **kwargs)
            first = args[0] if args else next(iter(kwargs.values()), None)
            peer = bound.get("dst", bound.get("src")) if p2p else None
            entry = self.record(op, bound.get("group"), list(_tensors(first)), peer)
            out = fn(*args, **kwargs)
            self.returned(entry)
            return out

        recorded.__wrapped__ = fn
        return recorded

    def __enter__(self):
        import torch.distributed as dist
        from torch.distributed import distributed_c10d as c10d
        self._saved = {n: getattr(dist, n) for n in WRAPPED if hasattr(dist, n)}
        self._c10d = {}
        for n, fn in self._saved.items():
            setattr(dist, n, self._wrap(n, fn))
            # P2POp accepts only torch's own isend/irecv, compared by identity with the names in
            # distributed_c10d (torch's pipeline schedules build them): the same wrapper there
            if n in ("isend", "irecv") and getattr(c10d, n, None) is fn:
                self._c10d[n] = fn
                setattr(c10d, n, getattr(dist, n))
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist
        from torch.distributed import distributed_c10d as c10d
        for n, fn in self._saved.items():
            setattr(dist, n, fn)
        for n, fn in self._c10d.items():
            setattr(c10d, n, fn)
        if self.ring is not None:
            self.ring.close()
            self.ring = None

    # ---- dumps
    def snapshot(self, why: str, blocked: dict | None = None) -> dict:
        """This rank's entries and stacks; ``blocked`` says where its main thread is when
        the caller knows better than the stack (a rank dumping from its failure path)."""
        main = threading.main_thread().ident
        frames = sys._current_frames()
        stacks = {("main" if tid == main else str(tid)):
                  traceback.format_stack(f) for tid, f in frames.items()}
        return {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(),
                "why": why, "time": time.time(), "step": self.step, "answered": True,
                "entries": list(self.entries), "stacks": stacks,
                "blocked_in": blocked or blocked_in(frames.get(main))}


def _blocked(frames: list[tuple[str, str]]) -> dict:
    """The innermost torch.distributed (or injected-fault) function among ``frames``
    ((path, function) pairs, innermost first) and the line of ours that led to it."""
    op, site = None, None
    for path, func, lineno in frames:
        if op is None and ("torch/distributed" in path or path.endswith("reliability/faults.py")):
            op = func
        at = _ours(path)
        if at >= 0 and not path.endswith(("reliability/faults.py", "reliability/flight.py")):
            if op is None:  # waiting in C++ called from our own line (a Work's wait())
                op = "`" + (linecache.getline(path, lineno).strip() or func) + "`"
            site = f"{path[at + 1:]}:{lineno}"
            break
    return {"op": op, "site": site}


def blocked_in(frame) -> dict:
    """What a thread is doing, from its innermost frame."""
    return _blocked([(f.f_code.co_filename, f.f_code.co_name, n)
                     for f, n in traceback.walk_stack(frame)])


FAULT_FRAME = re.compile(r'^\s+File "(.+)", line (\d+) in (\S+)')


def blocked_in_fault_dump(text: str, main_thread: int | None) -> dict | None:
    """The main thread's op from faulthandler's output (the last dump in ``text``)."""
    blocks = re.split(r"\n(?=(?:Current thread|Thread) 0x)", text)
    want = f"0x{main_thread:016x}" if main_thread else None
    for block in reversed(blocks):
        head = block.lstrip().split("\n", 1)[0]
        if want is None or want in head:
            frames = [(m.group(1), m.group(3), int(m.group(2)))
                      for m in map(FAULT_FRAME.match, block.splitlines()) if m]
            if frames:
                return _blocked(frames)
    return None


class Watchdog:
    """The thread that answers dump requests for this rank, and the signal set-up."""

    def __init__(self, recorder: FlightRecorder, run_dir: str | Path):
        self.rec, self.dir = recorder, flight_dir(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.request = self.dir / "dump-request"
        self.stacks_path = self.dir / f"rank{recorder.rank}.stacks.txt"
        self.seen = (self._mtime(), 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="dtlab-flight")
        self._stacks = None

    def _mtime(self) -> int:
        try:
            return self.request.stat().st_mtime_ns
        except OSError:
            return 0

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            now = (self._mtime(), self._stacks.tell() if self._stacks else 0)
            if now != self.seen:
                why = "requested" if now[0] != self.seen[0] else "SIGUSR1"
                self.seen = now
                try:
                    write_dump(self.rec, self.dir.parent, why)
                except OSError:
                    pass

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._stacks = open(self.stacks_path, "w")
            self._was_enabled = faulthandler.is_enabled()
            faulthandler.enable(file=self._stacks, all_threads=True)   # fatal signals
            faulthandler.register(signal.SIGUSR1, file=self._stacks, all_threads=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=2 * POLL_S + 1)
        if self._stacks is not None:
            faulthandler.unregister(signal.SIGUSR1)
            faulthandler.disable()
            if self._was_enabled:
                faulthandler.enable()
            self._stacks.close()


def write_dump(recorder: FlightRecorder, run_dir: str | Path, why: str,
               blocked: dict | None = None) -> Path:
    d = flight_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"rank{recorder.rank}.json"
    tmp = d / f".rank{recorder.rank}.json.tmp"
    tmp.write_text(json.dumps(recorder.snapshot(why, blocked), indent=1, default=str))
    os.replace(tmp, path)
    return path


def request_dumps(run_dir: str | Path) -> float:
    """Ask every rank of a live run for its dump; returns when the request was made."""
    d = flight_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    t = time.time()
    (d / "dump-request").write_text(f"{t}\n")
    return t


def rings(run_dir: str | Path) -> dict[int, tuple[dict, list[dict]]]:
    """Every rank's ring file of the run that last started in ``run_dir``."""
    out = {}
    for f in flight_dir(run_dir).glob("rank*.ring"):
        try:
            header, entries = read_ring(f)
        except OSError:
            continue
        if "rank" in header:
            out[header["rank"]] = (header, entries)
    if out:  # files of an older, larger run: not this run's
        newest = max(h["started"] for h, _ in out.values())
        out = {r: v for r, v in out.items() if v[0]["started"] >= newest - 600 and
               r < v[0]["world"]}
    return out


def live_world(run_dir: str | Path) -> int:
    """The world size of the run that last started in ``run_dir`` (from its ring headers)."""
    headers = [h for h, _ in rings(run_dir).values()]
    return max(headers, key=lambda h: h["started"])["world"] if headers else 0


def alive(host: str, pid: int) -> bool | None:
    if host != socket.gethostname():
        return None  # another machine's process: cannot tell from here
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def from_ring(run_dir: str | Path, rank: int, header: dict, entries: list[dict],
              asked: bool = True) -> dict:
    """What a rank left behind (one that did not answer, or any rank of a run that ended): its
    ring and any fatal-signal stacks."""
    stacks = flight_dir(run_dir) / f"rank{rank}.stacks.txt"
    text = stacks.read_text(errors="replace") if stacks.is_file() else ""
    return {"rank": rank, "host": header.get("host"), "pid": header.get("pid"),
            "why": "its ring file", "time": None, "step": header.get("step"),
            "answered": False if asked else None, "alive": alive(header.get("host"), header.get("pid", 0)),
            "fatal": next((ln.strip() for ln in text.splitlines()
                           if ln.startswith("Fatal Python error")), None),
            "entries": entries, "stacks": None,
            "blocked_in": blocked_in_fault_dump(text, header.get("main_thread"))}


def collect(run_dir: str | Path, world: int, since: float, wait_s: float) -> dict[int, dict]:
    """Every rank's dump written after ``since``, waiting up to ``wait_s`` for all ``world``
    ranks; a rank that does not answer in time is read from its ring file."""
    d = flight_dir(run_dir)
    deadline = time.time() + wait_s
    dumps: dict[int, dict] = {}
    while True:
        for r in range(world):
            f = d / f"rank{r}.json"
            if r not in dumps and f.is_file():
                try:
                    dump = json.loads(f.read_text())
                except ValueError:
                    continue
                if dump.get("time", 0) >= since - 1:
                    dumps[r] = dump
        if len(dumps) == world or time.time() > deadline:
            break
        time.sleep(POLL_S)
    for r, (header, entries) in rings(run_dir).items():
        if r not in dumps:
            dumps[r] = from_ring(run_dir, r, header, entries)
    return dumps


def postmortem(run_dir: str | Path) -> dict[int, dict]:
    """The records of a run that has ended (every rank from its ring file)."""
    return {r: from_ring(run_dir, r, h, e, asked=False) for r, (h, e) in rings(run_dir).items()}


def _members(group, ranks: dict) -> list[int]:
    if group == "world":
        return sorted(ranks)
    if isinstance(group, list) and group and group[0] == "p2p":
        return group[1:]
    return [m for m in group if isinstance(m, int)] if isinstance(group, list) else list(ranks)


def _signature(e: dict, p2p: bool) -> tuple:
    """What the members must agree on at one sequence number: a send's size is its receive's;
    an all-to-all's input is what its rank sends (uneven: the routing decides), so only its op."""
    if p2p:
        return (e["bytes"],)
    return (e["op"],) if e["op"] == "all_to_all" else (e["op"], e["bytes"])


def _holds_all(entries: list[dict]) -> bool:
    """Whether a rank's record still holds every op it issued (its ring never wrapped)."""
    return {e["n"] for e in entries} == set(range(1, len(entries) + 1))


def desync_report(dumps: dict[int, dict], world: int) -> dict:
    """Who is behind, what each rank is blocked in, who issued a different op at the same place.

    A ring keeps a rank's newest ops only, so a group's older ops may have left some ranks'
    rings: ops are compared where every rank still holds them, and ``wrapped`` says what was
    not. A rank that holds any op of a group holds its last one, so who is behind stays exact;
    a rank whose ring wrapped past every op of a group is not compared in it (``unknown``)."""
    missing = [r for r in range(world) if r not in dumps]
    per_group: dict = collections.defaultdict(dict)  # group -> rank -> {seq: entry}
    for r, d in dumps.items():
        for e in d["entries"]:
            per_group[json.dumps(e["group"])].setdefault(r, {})[e["seq"]] = e
    behind, mismatches, pending, wrapped, unknown = [], [], {}, [], []
    for group, ranks in per_group.items():
        members = json.loads(group)
        expected = [m for m in _members(members, dumps) if m in dumps]
        for r in expected:
            if r in ranks and min(ranks[r]) > 1:
                wrapped.append({"rank": r, "group": members, "first": min(ranks[r]),
                                "last": max(ranks[r])})
            elif r not in ranks and not _holds_all(dumps[r]["entries"]):
                unknown.append({"rank": r, "group": members})
        # a rank that holds no op of the group issued none, unless its ring wrapped
        expected = [r for r in expected if r in ranks or _holds_all(dumps[r]["entries"])]
        last = {r: max(ranks[r]) if r in ranks else 0 for r in expected}
        top = max(last.values(), default=0)
        for r in expected:
            if last[r] < top:
                e = ranks.get(r, {}).get(last[r])
                ahead = next((ranks[o][last[r] + 1] for o in expected
                              if o in ranks and last[r] + 1 in ranks[o]), None)
                behind.append({"rank": r, "group": members, "issued": last[r],
                               "others_issued": top, "last_op": e and e["op"],
                               "step": e and e["step"], "site": e and e["site"],
                               "waited_for": ahead and {"op": ahead["op"], "seq": ahead["seq"],
                                                        "step": ahead["step"]}})
        holders = [r for r in expected if r in ranks]
        common = set.intersection(*(set(ranks[r]) for r in holders)) if len(holders) > 1 \
            else set()
        p2p = isinstance(members, list) and members[:1] == ["p2p"]
        for seq in sorted(common):
            key = {r: _signature(ranks[r][seq], p2p) for r in holders}
            # the same collective from different lines: the ranks run different code (a
            # collective inside `if rank == 0:`); sends and receives differ by nature
            sites = {ranks[r][seq]["site"] for r in holders}
            if len(set(key.values())) > 1 or (not p2p and len(sites) > 1 and "?" not in sites):
                mismatches.append({"group": members, "seq": seq,
                                   "kind": "op" if len(set(key.values())) > 1 else "line",
                                   "ops": {
                    r: {k: ranks[r][seq][k] for k in ("op", "bytes", "dtype", "step", "site")}
                    for r in holders}})
                break  # the first divergence explains the rest
        for r in expected:  # ops issued and not returned: where each rank waits
            for e in ranks.get(r, {}).values():
                if e["returned"] is None:
                    pending.setdefault(r, []).append(e)
    pending = {r: sorted(v, key=lambda e: e["n"])[-1] for r, v in pending.items()}
    last = {r: d["entries"][-1] for r, d in dumps.items() if d["entries"]}
    # Where each rank is stuck: the op it waits in; for a rank that gave up in an op whose call
    # had returned (async: queued, then waited on elsewhere, as DDP's buckets), its last op.
    stuck = {}
    for r, d in dumps.items():
        gave_up = (d.get("blocked_in") or {}).get("op") or ""
        if r in pending:
            stuck[r] = pending[r]
        elif r in last and gave_up.split(" ")[:1] == [last[r]["op"]]:
            stuck[r] = last[r]
    same = {(e["op"], e["seq"], json.dumps(e["group"])) for e in stuck.values()}
    same_op = None
    if not (missing or behind or mismatches) and len(dumps) > 1 and len(stuck) == len(dumps) \
            and len(same) == 1:
        e = next(iter(stuck.values()))
        same_op = {k: e[k] for k in ("op", "seq", "group", "step", "site")}
    # A rank behind that is itself inside its last op waits for data the others already sent:
    # they finished that op, it never got their part (a link or a peer host failed under it).
    for b in behind:
        e = stuck.get(b["rank"])
        b["in_op"] = bool(e and json.dumps(e["group"]) == json.dumps(b["group"])
                          and e["seq"] == b["issued"])
    transport = bool(same_op) or bool(behind and not (missing or mismatches)
                                      and all(b["in_op"] for b in behind))
    return {"missing": missing, "behind": behind, "mismatches": mismatches,
            "pending": pending, "last": last, "same_op": same_op,
            "transport_failed": transport, "wrapped": wrapped, "unknown": unknown,
            "ranks": {r: {k: d.get(k) for k in ("host", "pid", "answered", "alive", "fatal",
                                                 "blocked_in", "step")}
                      for r, d in sorted(dumps.items())}}


def describe_report(rep: dict) -> list[str]:
    """The report in sentences: the finding first, then where each rank is."""
    lines = []
    for m in rep["mismatches"]:
        what = "; ".join(f"rank {r} {o['op']} of {o['bytes']} B {o['dtype']} at step "
                         f"{o['step']} ({o['site']})" for r, o in m["ops"].items())
        if m.get("kind") == "line":
            lines.append(f"op #{m['seq']} of group {_g(m['group'])} was issued from different "
                         f"lines, so the ranks run different code there: {what}")
        else:
            lines.append(f"collective mismatch at op #{m['seq']} of group {_g(m['group'])}: "
                         f"{what}")
    for b in rep["behind"]:
        w = b["waited_for"]
        if b.get("in_op"):
            lines.append(f"rank {b['rank']} is stuck inside {b['last_op']} #{b['issued']} of "
                         f"group {_g(b['group'])} (step {b['step']}, {b['site']}), which the "
                         f"others completed: their data never reached it, so the transport "
                         "under it failed (a link, a peer host), not the program")
            continue
        lines.append(f"rank {b['rank']} is behind in group {_g(b['group'])}: it issued "
                     f"{b['issued']} op(s), the others {b['others_issued']}; its last was "
                     f"{b['last_op']} at step {b['step']} ({b['site']}); "
                     + (f"they wait in {w['op']} #{w['seq']} of step {w['step']}" if w else
                        f"the op after it, #{b['issued'] + 1}, has left the others' rings"))
    for r in rep["missing"]:
        lines.append(f"rank {r} left no record: it never reached the training loop")
    for r, info in rep["ranks"].items():
        state = info.get("blocked_in") or {}
        where = f"in {state['op']} ({state.get('site') or '?'})" if state.get("op") else None
        if state.get("failed"):
            lines.append(f"rank {r} on {info['host']} failed in {state['op']} "
                         f"({state.get('site') or '?'}): {state['failed']}")
            continue
        p = rep["pending"].get(r)
        if p and not where:
            where = f"in {p['op']} #{p['seq']} ({p['site']})"
        if info.get("fatal"):
            lines.append(f"rank {r} on {info['host']} died: {info['fatal']}"
                         + (f" {where}" if where else ""))
        elif info.get("answered") is False:
            gone = {False: "its process is gone", True: "its process is alive but did not "
                    "answer", None: "on another machine"}[info.get("alive")]
            lines.append(f"rank {r} on {info['host']} did not answer ({gone}); its last ops "
                         "are from its ring file" + (f"; it was {where}" if where else ""))
        elif info.get("answered") is None:  # a run that ended: only its rings are left
            last = rep["last"].get(r)
            lines.append(f"rank {r} on {info['host']} ended; its last op was "
                         + (f"{last['op']} #{last['seq']} at step {last['step']} "
                            f"({last['site']})" if last else "none"))
        elif where:
            verb = "is at" if where.startswith("in `") else "is blocked"
            lines.append(f"rank {r} on {info['host']} {verb} {where.replace('in `', '`', 1)}")
    same = rep.get("same_op")
    if same:
        lines.insert(0, f"no rank is behind and no collective differs: every rank waits in the "
                     f"same op ({same['op']} #{same['seq']} of group {_g(same['group'])}, step "
                     f"{same['step']}), so the transport under it failed (a link, a peer host), "
                     "not the program")
    if not lines:
        lines.append("no rank is behind and no collective differs: the ranks agree")
    return lines + _ring_notes(rep)


def _ranks_hold(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}'s ring holds"
    return f"the rings of ranks {', '.join(map(str, ranks[:-1]))} and {ranks[-1]} hold"


def _ring_notes(rep: dict) -> list[str]:
    """What the comparison left out: the ops that had left some rings (one line per group and
    window)."""
    spans: dict = collections.defaultdict(list)
    for w in rep.get("wrapped", []):
        spans[(_g(w["group"]), w["first"], w["last"])].append(w["rank"])
    lines = [f"{_ranks_hold(rs)} only ops {a}-{b} of group {g}; older ops are not compared"
             for (g, a, b), rs in spans.items()]
    none: dict = collections.defaultdict(list)
    for u in rep.get("unknown", []):
        none[_g(u["group"])].append(u["rank"])
    lines += [f"{_ranks_hold(rs)} no op of group {g} and wrapped: what "
              f"{'it' if len(rs) == 1 else 'they'} issued in that group is not known and not "
              "compared" for g, rs in none.items()]
    return lines


def _g(group) -> str:
    if group == "world":
        return "world"
    if isinstance(group, list) and group[:1] == ["p2p"]:
        return f"p2p {group[1]}<->{group[2]}"
    return "[" + ",".join(map(str, group)) + "]"
