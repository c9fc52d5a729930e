"""Step time and memory of one layout, from the shapes alone: the model ``dtlab plan`` ranks
layouts with (dtlab/plan/search.py) and ``dtlab plan validate`` checks against real runs.

- memory per device by category: :mod:`dtlab.costmodel.shapes` (weights, gradients, AdamW state,
  activations of the busiest rank, as the labs count them);
- step time = compute + optimizer + pipeline bubble + communication. Compute comes from a
  calibration of the machine (``dtlab plan calibrate``: the model's pieces timed at the shapes
  needed) or from FLOPs / (peak x efficiency); each collective costs alpha + bytes / beta on the
  link its group crosses (inside a node or between nodes), plus, when calibrated, what a rank
  waits in a real step beyond that. Communication is counted as exposed (not hidden behind
  compute): what the CPU runs here show (docs/ddp.md); on GPUs with overlap it is an upper bound.

CPU honesty: ranks on one machine share its cores. A rank gets cores // ranks-per-node threads
(what the launcher sets); when the ranks on the same cores ask for more threads than there are
cores, every rank's compute is slowed by that ratio (for a pipeline, by the share of its ranks
that compute at once, M / (M + P - 1): the others wait and leave their cores). On the namespace
cluster every node shares this machine's cores (``shared_cores``).

Standard library only, as all of dtlab.costmodel: ``dtlab plan`` for a described model runs
without torch (a preset's shape comes from the model module, in dtlab.plan.search).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from dtlab.costmodel import shapes as cm
from dtlab.errors import UsageError

GiB = 2**30
DDP_FIRST_BUCKET, DDP_BUCKET = 2**20, 25 * 2**20   # torch DDP's default bucket caps


def shape_key(h: int, heads: int, f: int, seq: int, vocab: int) -> str:
    """A calibration's compute key: what the pieces' time depends on (not the layer count)."""
    return f"h{h}-a{heads}-f{f}-s{seq}-v{vocab}"


class PlanError(UsageError):
    """Bad input to the planner: one line, exit status 2."""


@dataclass(frozen=True)
class Layout:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    zero: int = 0
    offload: str = "none"
    recompute: str = "none"
    microbatches: int = 1
    schedule: str = "1f1b"

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    def label(self) -> str:
        parts = [f"dp{self.dp}"] + [f"{k}{v}" for k, v in (("tp", self.tp), ("pp", self.pp),
                                                          ("cp", self.cp)) if v > 1]
        if self.pp > 1:
            parts.append(f"{self.schedule} M{self.microbatches}")
        if self.zero:
            parts.append(f"zero{self.zero}" + ("" if self.offload == "none"
                                              else f"+off-{self.offload}"))
        if self.recompute != "none":
            parts.append(f"rc-{self.recompute}")
        return " ".join(parts)

    def lab_args(self) -> tuple[str, list[str]]:
        """The lab that runs this layout and its flags."""
        rc = [] if self.recompute == "none" else ["--recompute", self.recompute]
        if self.tp == self.pp == self.cp == 1:
            if self.zero:
                off = [] if self.offload == "none" else ["--offload", self.offload]
                return "zero", ["--stage", str(self.zero), *off, *rc]
            return "ddp", rc
        if self.dp == self.cp == 1 and self.pp == 1:
            return "tensor_parallel", rc
        if self.dp == self.cp == self.tp == 1:
            return "pipeline", ["--schedule", self.schedule, "--microbatches",
                                str(self.microbatches), *rc]
        return "parallel3d", ["--dp", str(self.dp), "--pp", str(self.pp), "--tp", str(self.tp),
                              *(["--cp", str(self.cp)] if self.cp > 1 else []),
                              "--schedule", self.schedule, "--microbatches",
                              str(self.microbatches), *rc]


@dataclass(frozen=True)
class Link:
    """Inside a node: one device's link; between nodes: one node's link to the others, shared
    by the groups of its devices that cross it at once."""
    alpha_s: float       # per message step (a ring all-reduce takes 2(W-1) of them)
    bytes_per_s: float   # one direction


@dataclass(frozen=True)
class ClusterSpec:
    nodes: int = 1
    per_node: int = 1                 # devices (ranks) per node
    memory: float = 24 * GiB          # bytes a device may hold for model states and activations
    peak_flops: float | None = None   # FLOP/s a device (datasheet), when not calibrated
    efficiency: float = 0.4           # the share of the peak a step reaches (assumed)
    intra: Link | None = None
    inter: Link | None = None
    cores: int = 0                    # CPU: cores a node's ranks share (0: not a CPU cluster)
    shared_cores: bool = False        # CPU: every node shares the same cores (namespaces)
    pcie: float = 25e9                # bytes/s between a device and its host (offload copies)
    rate: str = "unshaped"            # which inter-node calibration to use

    @property
    def world(self) -> int:
        return self.nodes * self.per_node


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def invalid(m: cm.Shape, batch: int, lay: Layout, c: ClusterSpec) -> str | None:
    """Why the labs cannot run this layout, or None."""
    if lay.world != c.world:
        return f"uses {lay.world} devices, the cluster has {c.world}"
    if m.n_head % lay.tp:
        return f"{m.n_head} heads do not split over tp={lay.tp}"
    if lay.pp > m.n_layer:
        return f"{m.n_layer} layers cannot fill {lay.pp} stages"
    if m.seq % (2 * lay.cp) and lay.cp > 1:
        return f"sequence {m.seq} does not split in 2 x cp={lay.cp} chunks"
    if batch % (lay.dp * lay.microbatches):
        return f"batch {batch} does not split over dp={lay.dp} x {lay.microbatches} micro-batches"
    if lay.zero and lay.world != lay.dp:
        return "ZeRO runs in the data-parallel lab only (tp = pp = cp = 1)"
    if lay.zero and lay.dp < 2:
        return "ZeRO needs 2 or more data-parallel ranks"
    if lay.offload != "none" and not lay.zero:
        return "offload needs ZeRO"
    if lay.offload == "param" and lay.zero != 3:
        return "parameter offload needs ZeRO 3"
    if lay.pp == 1 and lay.microbatches != 1:
        return "micro-batches are for pipelines"
    return None


def memory(m: cm.Shape, batch: int, lay: Layout) -> dict:
    """Bytes on the busiest device, by category."""
    worst = None
    for stage in range(lay.pp):
        if lay.zero:
            st = cm.zero_states(m, lay.dp, lay.zero, lay.offload)
        else:
            st = cm.model_states(m, lay.pp, stage, lay.tp, 0)
        act = cm.activations(m, batch, lay.dp, lay.tp, 0, lay.pp, stage, lay.microbatches,
                             lay.schedule, lay.recompute, 2, False, lay.cp)
        row = {"params": st["params"], "grads": st["grads"], "optimizer": st["optimizer"],
               "activations": act}
        row["total"] = sum(row.values())
        if worst is None or row["total"] > worst["total"]:
            worst = row
    return worst


def _threads(c: ClusterSpec) -> tuple[int, float]:
    """Threads a rank gets (the launcher's rule) and the slow-down of ranks sharing cores."""
    if not c.cores:
        return 1, 1.0
    node_cores = max(1, c.cores // c.nodes) if c.shared_cores else c.cores
    threads = max(1, node_cores // c.per_node)
    sharing = c.world if c.shared_cores else c.per_node
    return threads, max(1.0, sharing * threads / c.cores)


class Compute:
    """Seconds of a piece (block forward+backward, block forward, embedding, head) for ``rows``
    sequences on a tensor-parallel shard: from the calibration's fits, or from FLOPs."""

    def __init__(self, m: cm.Shape, c: ClusterSpec, calib: dict | None):
        self.m, self.c = m, c
        self.threads, self.slowdown = _threads(c)
        self.table = None
        self.source = f"FLOPs / ({c.peak_flops:.3g} FLOP/s x {c.efficiency:g})" \
            if c.peak_flops else ""
        if calib is not None:
            key = shape_key(m.d_model, m.n_head, m.d_ff, m.seq, m.vocab)
            by_threads = calib["compute"].get(key)
            if by_threads is None and c.peak_flops is None:
                raise PlanError(f"calibration {calib['name']!r} has not timed this model's "
                                f"shape ({key}); run dtlab plan calibrate for it, or give "
                                "--peak-flops")
            if by_threads is not None:
                near = min(by_threads, key=lambda t: abs(int(t) - self.threads))
                self.table = by_threads[near]
                self.opt = calib["optimizer"][near]
                self.source = f"calibration {calib['name']} ({near} thread(s) a rank)"

    def flops(self, piece: str, rows: float, tp: int) -> float:
        m, toks = self.m, rows * self.m.seq
        hs, fs = m.d_model / tp, m.d_ff / tp
        if piece.startswith("block"):
            fwd = 2 * toks * (4 * m.d_model * hs + 2 * m.d_model * fs) + 4 * toks * m.seq * hs
            return fwd if piece == "block_f" else 3 * fwd
        if piece == "head_fb":
            return 6 * toks * m.d_model * m.vocab / tp
        return 0.0

    def piece(self, piece: str, rows: float, tp: int) -> float:
        if self.table is not None:
            fit = self.table.get(str(tp))
            if fit is None:
                raise PlanError(f"the calibration has no tp={tp} timings for this shape")
            a, c = fit[piece]
            return (a + c * rows) * self.slowdown
        return self.flops(piece, rows, tp) / (self.c.peak_flops * self.c.efficiency)

    def optimizer(self, tensors: int, numel: int) -> float:
        if self.table is not None:
            a, c = self.opt
            return (a * tensors + c * numel) * self.slowdown
        return 0.0  # on a GPU the step is a few elementwise kernels: left out


class Links:
    """alpha + bytes / beta of a collective on the link its group crosses."""

    def __init__(self, c: ClusterSpec, calib: dict | None):
        self.c = c
        self.fits = {"intra": (calib or {}).get("links", {}).get("host"),
                     "inter": (calib or {}).get("links", {}).get(f"inter@{c.rate}")}
        self.given = {"intra": c.intra, "inter": c.inter}
        self.sync = (calib or {}).get("sync_s", {})

    def time(self, op: str, nbytes: float, world: int, where: str, share: int = 1,
             gap: float = 1e-3) -> float:
        """One call of ``op`` over ``world`` ranks, ``nbytes`` of payload (all-gather: the
        gathered size), ``share`` groups crossing the same links at once, ``gap`` seconds of
        computation since the previous call (a calibration's cost depends on it)."""
        if world < 2 or nbytes <= 0:
            return 0.0
        given = self.given[where]
        if given is not None or self.fits[where] is None:
            link = given or self.given["intra"] or self.given["inter"]
            steps = 2 * (world - 1) if op == "all_reduce" else 1 if op == "p2p" else world - 1
            sent = cm.ring_factor(op, world) * nbytes if op != "p2p" else nbytes
            return steps * link.alpha_s + share * sent / link.bytes_per_s
        table = self.fits[where][op]
        w = str(world)
        if w not in table:
            w = min(table, key=lambda k: abs(int(k) - world))
        wait = 0.0 if op == "p2p" or not self.sync else \
            self.sync.get(w, self.sync[max(self.sync, key=int)])
        return wait + sum(wt * (alpha + share * nbytes / beta)
                          for wt, (alpha, beta) in _between(table[w], gap))


def _between(points: list, gap: float) -> list[tuple[float, tuple[float, float]]]:
    """Weights and (alpha, beta) of the calibrated gaps around ``gap`` (linear in log gap;
    the nearest one outside the calibrated range)."""
    pts = sorted(points)
    if gap <= pts[0][0]:
        return [(1.0, tuple(pts[0][1:]))]
    if gap >= pts[-1][0]:
        return [(1.0, tuple(pts[-1][1:]))]
    for lo, hi in zip(pts, pts[1:]):
        if lo[0] <= gap <= hi[0]:
            w = math.log(gap / lo[0]) / math.log(hi[0] / lo[0])
            return [(1 - w, tuple(lo[1:])), (w, tuple(hi[1:]))]
    return [(1.0, tuple(pts[-1][1:]))]


def _where(lay: Layout, vary: tuple[str, ...], c: ClusterSpec) -> tuple[str, int]:
    """Whether the groups whose ranks differ only in the ``vary`` coordinates of the grid
    (rank = ((d pp + p) cp + c) tp + t, dtlab/train/grid.py) cross nodes, and how many crossing
    groups have ranks on one node (they share its link)."""
    if c.nodes == 1:
        return "intra", 1
    shape = {"dp": lay.dp, "pp": lay.pp, "cp": lay.cp, "tp": lay.tp}
    stride = {"tp": 1, "cp": lay.tp, "pp": lay.tp * lay.cp, "dp": lay.tp * lay.cp * lay.pp}
    groups: dict = {}
    for r in range(lay.world):
        key = tuple((r // stride[k]) % shape[k] for k in shape if k not in vary)
        groups.setdefault(key, set()).add(r // c.per_node)
    crossing = [g for g in groups.values() if len(g) > 1]
    if not crossing:
        return "intra", 1
    return "inter", max(sum(n in g for g in crossing) for n in range(c.nodes))


def step_time(m: cm.Shape, batch: int, lay: Layout, c: ClusterSpec, comp: Compute,
              links: Links) -> dict:
    """Seconds of one step by part: compute, optimizer, bubble, communication by kind."""
    M, P = lay.microbatches, lay.pp
    rows = batch / lay.dp / M / lay.cp            # CP: a rank's tokens as fewer rows
    per_stage = []
    for stage in range(P):
        lo, hi = cm.stage_layers(m.n_layer, P, stage)
        blocks = range(max(lo, 1) - 1, min(hi, m.n_layer + 1) - 1)
        redo = sum(1 for i in blocks if lay.recompute == "full" or    # recomputed blocks
                   (lay.recompute == "selective" and i % 2 == 0))
        t = (len(blocks) * comp.piece("block_fb", rows, lay.tp) +
             redo * comp.piece("block_f", rows, lay.tp))
        if lo == 0:
            t += comp.piece("embed_fb", rows, 1)
        if hi == m.n_layer + 2:
            t += comp.piece("head_fb", rows, lay.tp)
        per_stage.append((t, len(blocks), hi == m.n_layer + 2, redo))
    slot = max(st[0] for st in per_stage)
    if comp.slowdown > 1 and P > 1:
        # ranks that wait (the bubble, a pipeline's messages) leave their cores to the others:
        # on average only M / (M + P - 1) of a pipeline's ranks compute at once
        slot *= max(1.0, comp.slowdown * M / (M + P - 1)) / comp.slowdown
    compute = M * slot
    bubble = (P - 1) * slot
    comm = {"dp": 0.0, "tp": 0.0, "pp": 0.0, "cp": 0.0}
    act = batch / lay.dp / M * m.seq / lay.cp * m.d_model * 4      # a micro-batch's activations
    if lay.tp > 1:
        where, share = _where(lay, ("tp",), c)
        blocks = max(st[1] for st in per_stage)
        redo = max(st[3] for st in per_stage)   # a recomputed block's forward: 2 more
        head = any(st[2] for st in per_stage)
        calls = 4 * blocks + 2 * redo + 4 * head
        gap = slot / calls                        # computation between two of its calls
        per_mb = (4 * blocks + 2 * redo) * links.time("all_reduce", act, lay.tp, where, share,
                                                      gap)
        if head:
            per_mb += links.time("all_reduce", act, lay.tp, where, share, gap)
            per_mb += 3 * links.time("all_reduce", act / m.d_model, lay.tp, where, share, gap)
        comm["tp"] = M * per_mb
    if P > 1:
        where, share = _where(lay, ("pp",), c)
        # p2p: timed with every rank of the job sending at once (world), as a pipeline does
        comm["pp"] = (M + P - 1) * 2 * links.time("p2p", act, c.world, where, share,
                                                       slot)
    if lay.cp > 1:
        where, share = _where(lay, ("cp",), c)
        kv = 2 * act / lay.tp
        blocks = max(st[1] for st in per_stage)
        redo = max(st[3] for st in per_stage)
        # K and V go round the ring W-1 times forward (again for a recomputed block), W-1
        # times backward with their gradients W times (costmodel/ring_attention.py)
        calls = (3 * lay.cp - 2) * blocks + (lay.cp - 1) * redo
        comm["cp"] = M * calls * links.time("p2p", kv, c.world, where, share, slot / calls)
    n_dp = lay.dp * lay.cp if lay.tp * lay.pp * lay.cp > 1 else lay.dp
    if n_dp > 1:
        where, share = _where(lay, ("dp", "cp") if lay.world > lay.dp else ("dp",), c)
        if lay.zero:
            units = cm.zero_units(m, lay.dp)
            gathers = 2 if lay.zero == 3 else 1
            gap = compute / (len(units) * (1 + gathers))
            for n, owned in units:
                full = 4 * owned * lay.dp
                comm["dp"] += links.time("reduce_scatter", full, lay.dp, where, share, gap)
                comm["dp"] += gathers * links.time("all_gather", full, lay.dp, where, share, gap)
        else:
            grads = 4 * max(cm.model_states(m, P, s, lay.tp, 0)["numel"] for s in range(P))
            if lay.world == lay.dp:     # torch DDP's buckets
                first = min(grads, DDP_FIRST_BUCKET)
                sizes = [first] + [DDP_BUCKET] * int((grads - first) // DDP_BUCKET)
                rest = grads - sum(sizes)
                sizes += [rest] if rest > 0 else []
            else:                       # one flat all-reduce (labs/parallel3d.py)
                sizes = [grads]
            gap = compute / len(sizes)
            comm["dp"] = sum(links.time("all_reduce", s, n_dp, where, share, gap) for s in sizes)
    if lay.zero:
        st = cm.zero_states(m, lay.dp, lay.zero, lay.offload)
        opt = comp.optimizer(st["tensors"], st["numel"])
        if lay.offload != "none":   # the owned gradients go to the host, the weights come back
            opt += 8 * st["numel"] / c.pcie
    else:
        opt = max(comp.optimizer(len(cm.rank_tensors(m, P, s, lay.tp, 0)),
                                 cm.model_states(m, P, s, lay.tp, 0)["numel"]) for s in range(P))
    out = {"compute": compute, "optimizer": opt, "bubble": bubble,
           "comm": comm, "comm_total": sum(comm.values())}
    out["total"] = compute + opt + bubble + out["comm_total"]
    return out


def predict(m: cm.Shape, batch: int, lay: Layout, c: ClusterSpec, comp: Compute,
            links: Links) -> dict:
    mem = memory(m, batch, lay)
    t = step_time(m, batch, lay, c, comp, links)
    return {"layout": asdict(lay), "label": lay.label(), "memory": mem, "time": t,
            "fits": mem["total"] <= c.memory}




def load_calibration(path: str | None) -> dict | None:
    if not path:
        return None
    f = Path(path)
    if not f.is_file():
        raise PlanError(f"--calibration {path}: no such file; make one with "
                        "`dtlab plan calibrate --out FILE`")
    try:
        d = json.loads(f.read_text())
        for k in ("name", "compute", "links", "optimizer", "cores"):  # what predictions read
            d[k]  # noqa: B018
    except (ValueError, KeyError, TypeError):
        raise PlanError(f"--calibration {path}: not a calibration written by dtlab plan "
                        "calibrate") from None
    return d
