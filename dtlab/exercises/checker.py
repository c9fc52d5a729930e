"""Exercises: skeletons with TODOs that a learner fills, and the checker that grades them.

    dtlab exercise ring_allreduce --dest my/       # writes my/ring_allreduce.py
    dtlab check ring_allreduce --impl my/ring_allreduce.py

Each check runs the learner's file through the verification its lab uses: real process groups
(gloo, on this machine) where the algorithm is distributed, a library or reference result to
compare against, and a report of what differed (rank, size, position, expected vs got). Reference
solutions live in ``dtlab/exercises/solutions/``; the tests prove that every one passes, that
every untouched skeleton fails with its TODO message, and that a subtly wrong one is caught.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import random
import socket
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dtlab.errors import UsageError

HERE = Path(__file__).resolve().parent
PG_TIMEOUT_S = 20      # a learner's deadlock ends as a timeout, not a hang
JOIN_TIMEOUT_S = 120


@dataclass(frozen=True)
class Exercise:
    name: str
    file: str          # skeleton and solution file name
    summary: str
    worlds: tuple[int, ...] = ()   # process counts to check on; () = one process, no group


EXERCISES = {e.name: e for e in [
    Exercise("ring_allreduce", "ring_allreduce.py", "ring all-reduce from isend/irecv",
             worlds=(2, 3)),
    Exercise("loss_scaler", "loss_scaler.py", "dynamic loss scaling with GradScaler's rules"),
    Exercise("tensor_parallel", "tensor_parallel.py",
             "column- and row-parallel linear layers", worlds=(2, 4)),
    Exercise("1f1b", "one_f_one_b.py", "the 1F1B pipeline schedule of one stage"),
    Exercise("zero1", "zero1.py", "a ZeRO-1 AdamW: optimizer state sharded", worlds=(2, 3)),
    Exercise("ring_attention", "ring_attention.py", "the online-softmax merge of ring attention"),
    Exercise("rank_grid", "rank_grid.py", "the coordinates and groups of a 3D grid of ranks"),
    Exercise("gpipe", "gpipe.py", "the GPipe pipeline schedule and its bubble"),
    Exercise("expert_dispatch", "expert_dispatch.py",
             "tokens to their expert's rank and back with uneven all-to-alls", worlds=(2, 3)),
    Exercise("ddp_buckets", "ddp_buckets.py",
             "DDP's gradient buckets, all-reduced while backward runs", worlds=(2,)),
    Exercise("interleaved_1f1b", "interleaved_1f1b.py",
             "the interleaved 1F1B schedule (V model chunks a stage) and its bubble"),
    Exercise("zero_bubble", "zero_bubble.py",
             "the ZB-H1 schedule, backward split into B and W, and its bubble"),
    Exercise("checkpoint_reshard", "checkpoint_reshard.py",
             "a checkpoint saved as W even chunks, read back for W' ranks"),
    Exercise("sequence_parallel", "sequence_parallel.py",
             "sequence parallelism's all-gather / reduce-scatter autograd pair",
             worlds=(2,)),
]}


class ExerciseError(UsageError):
    """Bad input to `dtlab exercise/check`; one line."""


def get(name: str) -> Exercise:
    if name not in EXERCISES:
        raise ExerciseError(f"unknown exercise {name!r}; choose from {', '.join(EXERCISES)}")
    return EXERCISES[name]


def write_skeleton(name: str, dest: str | Path, force: bool = False) -> Path:
    ex = get(name)
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise ExerciseError(f"--dest {dest} is a file; give a folder")
    target = dest / ex.file
    if target.exists() and not force:
        raise ExerciseError(f"{target} exists (your work?); remove it or pass --force")
    dest.mkdir(parents=True, exist_ok=True)
    target.write_text((HERE / "skeletons" / ex.file).read_text())
    return target


def load(path: str | Path):
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"learner_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _where(e: BaseException, path: str, code: bool = True) -> str:
    """The innermost line of the learner's file in the traceback."""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if Path(f.filename).resolve() == Path(path).resolve()]
    if not frames:
        return ""
    return f" (your file, line {frames[-1].lineno}" + (f": {frames[-1].line})" if code else ")")


def _describe(e: BaseException, path: str) -> str:
    if isinstance(e, NotImplementedError):
        return f"not done yet: {e}{_where(e, path, code=False)}"
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}" \
           f"{_where(e, path)}"


# --------------------------------------------------------------------------- the checks
# Each returns a list of failure lines (empty: passed). Distributed ones run on every rank.

def _first_diff(got, expected) -> str:
    import torch
    bad = (got != expected).nonzero()
    i = tuple(bad[0].tolist()) if len(bad) else ()
    i = i[0] if len(i) == 1 else i
    return f"{len(bad)} element(s) differ, first at index {i}: expected {expected[i].item():g}, " \
           f"got {got[i].item():g}"


def _quiet(text: str) -> None:
    """The default ``note``: where a check would say which case it is in (a distributed worker
    writes it to a file, so a crash report can name the case)."""


def check_ring_allreduce(mod, rank: int, world: int, note=_quiet) -> list[str]:
    import torch
    out = []
    for n in (1, 2, 3, 7, 64, 1001):
        note(f"size {n}")
        x = (torch.arange(n) % 13 + 100 * rank).float()
        expected = (torch.arange(n) % 13).float() * world + 100 * sum(range(world))
        res = mod.ring_all_reduce(x)
        got = x if res is None else res
        if got.shape != expected.shape:
            out.append(f"rank {rank}, world {world}, size {n}: returned shape "
                       f"{tuple(got.shape)}, expected {tuple(expected.shape)}")
        elif not torch.equal(got, expected):
            out.append(f"rank {rank}, world {world}, size {n}: {_first_diff(got, expected)}")
        if out:
            break
    return out


def check_loss_scaler(mod, rank: int, world: int, note=_quiet) -> list[str]:
    import torch
    rng = random.Random(0)
    patterns = [[False] * 7, [True] * 4, [False, False, True, False, False, False, False, True]]
    patterns += [[rng.random() < 0.3 for _ in range(40)] for _ in range(5)]
    for k, pattern in enumerate(patterns):
        interval = 3
        s = mod.DynamicLossScaler(init_scale=1024.0, growth_factor=2.0, backoff_factor=0.5,
                                  growth_interval=interval)
        scale = torch.tensor([1024.0])
        tracker = torch.tensor([0], dtype=torch.int32)
        for step, overflow in enumerate(pattern):
            taken = s.update(overflow)
            torch._amp_update_scale_(scale, tracker, torch.tensor([float(overflow)]), 2.0, 0.5,
                                     interval)
            if float(s.scale) != scale.item():
                history = "".join("X" if o else "." for o in pattern[:step + 1])
                return [f"pattern {k} (growth_interval {interval}), step {step} "
                        f"(overflow={overflow}, history {history}): "
                        f"expected scale {scale.item():g}, got {float(s.scale):g}"]
            if taken is not None and bool(taken) == overflow:
                return [f"pattern {k}, step {step}: update returned {taken!r}; an overflowed step "
                        "must be skipped (False), a clean one taken (True)"]
    return []


def check_tensor_parallel(mod, rank: int, world: int, note=_quiet) -> list[str]:
    import torch
    import torch.distributed as dist
    g = torch.Generator().manual_seed(0)
    hidden, batch = 8, 5
    x = torch.randn(batch, hidden, generator=g)
    w1, b1 = torch.randn(4 * hidden, hidden, generator=g), torch.randn(4 * hidden, generator=g)
    w2, b2 = torch.randn(hidden, 4 * hidden, generator=g), torch.randn(hidden, generator=g)
    h_full = x @ w1.T + b1
    per = 4 * hidden // world
    h = mod.column_parallel_forward(x, w1, b1, rank, world)
    expected_h = h_full[:, rank * per:(rank + 1) * per]
    if tuple(h.shape) != tuple(expected_h.shape):
        return [f"rank {rank}, world {world}: column_parallel_forward returned shape "
                f"{tuple(h.shape)}, expected {tuple(expected_h.shape)} (this rank's {per} of "
                f"{4 * hidden} output features)"]
    if not torch.allclose(h, expected_h, atol=1e-5):
        return [f"rank {rank}, world {world}: column_parallel_forward differs from columns "
                f"{rank * per}..{(rank + 1) * per - 1} of the full layer's output: "
                f"{_first_diff(h, expected_h)}"]
    act = torch.nn.functional.gelu(expected_h)
    calls = []
    real = dist.all_reduce

    def counting(t, *a, **k):
        calls.append(t.numel())
        return real(t, *a, **k)
    dist.all_reduce = counting
    try:
        y = mod.row_parallel_forward(act, w2, b2, rank, world)
    finally:
        dist.all_reduce = real
    expected_y = torch.nn.functional.gelu(h_full) @ w2.T + b2
    if tuple(y.shape) != tuple(expected_y.shape):
        return [f"rank {rank}, world {world}: row_parallel_forward returned shape "
                f"{tuple(y.shape)}, expected {tuple(expected_y.shape)}"]
    if not torch.allclose(y, expected_y, atol=1e-4):
        return [f"rank {rank}, world {world}: row_parallel_forward differs from the full MLP: "
                f"{_first_diff(y, expected_y)}"]
    if len(calls) != 1:
        return [f"rank {rank}: row_parallel_forward made {len(calls)} all-reduces; one is "
                "enough (of the partial products)"]
    return []


def reference_1f1b(p: int, m: int, s: int) -> list[tuple[str, int]]:
    from labs.pipeline import one_f_one_b_schedule
    return one_f_one_b_schedule(p, m, s)


def check_1f1b(mod, rank: int, world: int, note=_quiet) -> list[str]:
    for p in range(1, 7):
        for m in range(1, 9):
            for s in range(p):
                got = [tuple(a) for a in mod.one_f_one_b(p, m, s)]
                want = reference_1f1b(p, m, s)
                fs = [i for k, i in got if k == "F"]
                bs = [i for k, i in got if k == "B"]
                if sorted(fs) != list(range(m)) or sorted(bs) != list(range(m)):
                    return [f"P={p}, M={m}, stage {s}: every micro-batch needs exactly one F and "
                            f"one B; got {got}"]
                if got != want:
                    i = next(i for i, (a, b) in enumerate(zip(got + [None] * len(want), want))
                             if a != b)
                    return [f"P={p}, M={m}, stage {s}: action {i} should be {want[i]}, got "
                            f"{got[i] if i < len(got) else 'nothing'}; expected {want}"]
    return []


def check_zero1(mod, rank: int, world: int, note=_quiet) -> list[str]:
    import torch
    shapes = [(5, 3), (7,), (4, 4)]
    g = torch.Generator().manual_seed(1)
    init = [torch.randn(s, generator=g) for s in shapes]
    mine = [t.clone() for t in init]
    ref = [t.clone().requires_grad_(True) for t in init]
    # A large eps: Adam divides by sqrt(v) + eps, so with a tiny eps a gradient summed instead
    # of averaged over ranks gives almost the same step; with eps ~ |g| it does not.
    opt = mod.ZeRO1AdamW(mine, lr=0.05, betas=(0.9, 0.95), eps=0.5)
    ref_opt = torch.optim.AdamW(ref, lr=0.05, betas=(0.9, 0.95), eps=0.5, weight_decay=0.0)
    for step in range(3):
        grads = [[torch.randn(s, generator=torch.Generator().manual_seed(100 * step + r + 7 * i))
                  for i, s in enumerate(shapes)] for r in range(world)]
        for p, gr in zip(mine, grads[rank]):
            p.grad = gr.clone()
        for i, p in enumerate(ref):
            p.grad = sum(grads[r][i] for r in range(world)) / world
        opt.step()
        ref_opt.step()
        for i, (a, b) in enumerate(zip(mine, ref)):
            if not torch.allclose(a, b.detach(), atol=1e-6, rtol=1e-5):
                return [f"rank {rank}, world {world}, step {step}, parameter {i} (shape "
                        f"{shapes[i]}): {_first_diff(a.reshape(-1), b.detach().reshape(-1))} "
                        "(torch AdamW on one process, averaged gradients)"]
    total = sum(math.prod(s) for s in shapes)
    inner = getattr(opt, "inner", None)
    held = sum(t.numel() for st in (inner.state.values() if inner else [])
               for k, t in st.items() if k in ("exp_avg", "exp_avg_sq"))
    if held > 2 * (math.ceil(total / world) + world):
        return [f"rank {rank}: self.inner holds Adam state for {held // 2} elements; ZeRO-1 "
                f"keeps about P/W = {total / world:.1f} (the optimizer state is not sharded)"]
    return []


RING_ATTENTION_TOL = 1e-10   # float64 throughout: a right merge is off by ~1e-15
NO_RESCALE = ("the running output was not rescaled when the running maximum changed: out_a must "
              "be multiplied by exp(lse_a - lse) (and out_b by exp(lse_b - lse), lse the merged "
              "log-sum-exp)")
INF_NAN = ("-inf rows give NaN: guard exp(-inf - -inf) (a row with no visible key in either "
           "block merges to out 0, lse -inf)")


def _block_attention(q, k, v, visible):
    """(out, lse) of the queries against one key/value block; rows that see no key of the block
    get out 0 and lse -inf, as a ring step hands them to the merge."""
    import torch
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    shift = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return torch.exp(scores - shift[..., None]) @ v, lse


def _merge_bug(mod) -> str:
    """Which known wrong merge the learner's matches, on one pair where lse_b is far above lse_a
    (so the running maximum changes and rescaling matters); "" if none."""
    import torch
    g = torch.Generator().manual_seed(5)
    out_a, out_b = (torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) for _ in "ab")
    lse_a = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    lse_b = lse_a + 2 + torch.rand(2, 3, 5, generator=g, dtype=torch.float64)
    m = torch.maximum(lse_a, lse_b)
    lse = torch.logaddexp(lse_a, lse_b)
    w = lambda x: torch.exp(x - lse)[..., None]  # noqa: E731
    wrong_lse = [(m, "the merged lse is max(lse_a, lse_b), the running maximum; it must be the "
                     "log of the running sum: m + log(exp(lse_a - m) + exp(lse_b - m))"),
                 (lse_a + lse_b, "the merged lse is lse_a + lse_b; log-sum-exps combine as "
                                 "log(exp(lse_a) + exp(lse_b)), not by adding")]
    wrong_out = [(out_a + w(lse_b) * out_b, NO_RESCALE),
                 (out_a + torch.exp(lse_b - lse_a)[..., None] * out_b, NO_RESCALE),
                 (out_a + out_b, NO_RESCALE),
                 (w(lse_a) * out_a + out_b, "the new block's output was not weighted: out_b "
                                            "must be multiplied by exp(lse_b - lse)"),
                 (torch.exp(lse_a - m)[..., None] * out_a + torch.exp(lse_b - m)[..., None] * out_b,
                  "out was rescaled to the running maximum but not divided by the running sum: "
                  "the weights are exp(lse_a - lse) and exp(lse_b - lse), lse the merged "
                  "log-sum-exp")]
    try:
        got_out, got_lse = mod.merge(out_a.clone(), lse_a.clone(), out_b.clone(), lse_b.clone())
        said = [s for t, s in wrong_lse if got_lse.shape == t.shape and torch.allclose(got_lse, t)]
        if not said:
            said = [s for t, s in wrong_out
                    if got_out.shape == t.shape and torch.allclose(got_out, t)][:1]
        return "; ".join(said)
    except Exception:
        return ""


def _inf_bug(mod) -> str:
    """The -inf rows: both sides -inf must merge to out 0, lse -inf; one side -inf to the other
    side. "" if the learner's merge gets them right."""
    import torch
    inf = float("-inf")
    g = torch.Generator().manual_seed(6)
    out_a, out_b = (torch.randn(1, 3, 4, generator=g, dtype=torch.float64) for _ in "ab")
    out_a[0, :2] = 0  # rows: both -inf; a -inf, b 0.5; a 0.5, b -inf
    out_b[0, ::2] = 0
    lse_a = torch.tensor([[inf, inf, 0.5]], dtype=torch.float64)
    lse_b = torch.tensor([[inf, 0.5, inf]], dtype=torch.float64)
    try:
        out, lse = mod.merge(out_a.clone(), lse_a.clone(), out_b.clone(), lse_b.clone())
        nan = out.isnan().any(-1) | lse.isnan()
        if nan[0, 1:].any():
            return ("-inf rows give NaN: a row with lse -inf on one side only (no visible key in "
                    "that block) must merge to the other side's out and lse; exp(lse_b - lse_a) "
                    "is exp(+inf) there, so weight each side by exp(lse_x - lse), lse the merged "
                    "log-sum-exp")
        if nan[0, 0]:
            return INF_NAN
        if not (lse[0, 0] == inf and (out[0, 0] == 0).all()):
            return (f"a row with lse -inf on both sides must merge to out 0, lse -inf; got out "
                    f"{out[0, 0].tolist()}, lse {lse[0, 0].item():g}")
    except Exception:
        pass
    return ""


def check_ring_attention(mod, rank: int, world: int, note=_quiet) -> list[str]:
    import torch
    # (what, queries, block sizes, the order the blocks are merged in, causal, block 1's keys x)
    cases = [("2 blocks", 6, (4, 6), (0, 1), False, 1.0),
             ("2 blocks, block 1's scores far larger (the running maximum changes)", 6, (5, 5),
              (0, 1), False, 6.0),
             ("3 blocks of sizes 1, 5, 2, merged as rank 1 receives them", 7, (1, 5, 2),
              (1, 0, 2), False, 1.0),
             ("causal, 4 blocks, merged as rank 3 receives them", 12, (2, 4, 3, 3),
              (3, 2, 1, 0), True, 1.0),
             ("causal, 4 blocks, merged as rank 1 receives them", 12, (2, 4, 3, 3),
              (1, 0, 3, 2), True, 1.0)]
    for k_case, (what, t, sizes, order, causal, boost) in enumerate(cases):
        note(what)
        g = torch.Generator().manual_seed(10 + k_case)
        s = sum(sizes)
        q = torch.randn(2, 3, t, 8, generator=g, dtype=torch.float64)
        k = torch.randn(2, 3, s, 8, generator=g, dtype=torch.float64)
        v = torch.randn(2, 3, s, 8, generator=g, dtype=torch.float64)
        bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        k[..., bounds[1]:bounds[2], :] *= boost
        visible = torch.ones(t, s, dtype=torch.bool)
        if causal:  # query i sees keys 0..i
            visible = torch.arange(s)[None, :] <= torch.arange(t)[:, None]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
        scores = scores.masked_fill(~visible, float("-inf"))
        want_out = torch.softmax(scores, dim=-1) @ v
        want_lse = torch.logsumexp(scores, dim=-1)
        blocks = [_block_attention(q, k[..., lo:hi, :], v[..., lo:hi, :], visible[:, lo:hi])
                  for lo, hi in zip(bounds, bounds[1:])]
        out, lse = blocks[order[0]]
        for b in order[1:]:
            res = mod.merge(out, lse, *blocks[b])
            if not (isinstance(res, (tuple, list)) and len(res) == 2):
                got = f"a {type(res).__name__} of {len(res)}" if isinstance(res, (tuple, list)) \
                    else type(res).__name__
                return [f"{what}: merge returned {got}; it must return (out, lse)"]
            out, lse = res
        where = f"{what} (merge order {', '.join(map(str, order))})"
        for name, got, want in (("out", out, want_out), ("lse", lse, want_lse)):
            if tuple(got.shape) != tuple(want.shape):
                return [f"{where}: {name} has shape {tuple(got.shape)}, expected "
                        f"{tuple(want.shape)}"]
            if got.dtype != want.dtype:
                return [f"{where}: {name} is {got.dtype}; keep the inputs' dtype ({want.dtype})"]
        for name, got, want, dims, ref in (
                ("out", out, want_out, "batch, head, query, feature",
                 "softmax attention over all keys"),
                ("lse", lse, want_lse, "batch, head, query", "the log-sum-exp of all scores")):
            if got.isnan().any():
                i = tuple(got.isnan().nonzero()[0].tolist())
                hint = _inf_bug(mod) or _merge_bug(mod)
                return [f"{where}: {name} is NaN at index {i} ({dims})"] + ([hint] if hint else [])
            err = (got - want).abs()
            if err.max() > RING_ATTENTION_TOL:
                i = tuple(torch.nonzero(err == err.max())[0].tolist())
                hint = _merge_bug(mod) or _inf_bug(mod)
                return [f"{where}: {name} differs from {ref} by up to "
                        f"{err.max().item():.3g} (tolerance {RING_ATTENTION_TOL:g}), at index {i} "
                        f"({dims}): expected {want[i].item():.6g}, got {got[i].item():.6g}"] \
                    + ([hint] if hint else [])
    return []


TP_FASTEST = "tp must vary fastest: ranks 0..tp-1 share a tp group (rank = (d * pp + p) * tp + t)"


def reference_grid(dp: int, pp: int, tp: int) -> tuple[list, dict]:
    """Every rank's (d, p, t) and the tp, pp and dp groups, from dtlab's own Grid."""
    from dtlab.train.grid import Grid
    g = Grid(dp=dp, pp=pp, tp=tp)
    coords = [g.at(r).coords for r in range(g.world)]
    return coords, {"tp": [g.tp_ranks(d, p) for d in range(dp) for p in range(pp)],
                    "pp": [[g.rank_of(d, p, t) for p in range(pp)] for d in range(dp)
                           for t in range(tp)],
                    "dp": [g.dp_ranks(p, t) for p in range(pp) for t in range(tp)]}


def _grid_hint(dp: int, pp: int, tp: int, got_coords) -> str:
    """What ordering the learner's coordinates follow, if a known wrong one."""
    if tp > 1 and any(got_coords[r][2] != r for r in range(tp)):
        return TP_FASTEST
    if pp > 1 and dp > 1 and all(c == (r // tp % dp, r // (tp * dp), r % tp)
                                 for r, c in enumerate(got_coords)):
        return "pp is the outermost dimension here; in dtlab's grid dp is: the ranks of one " \
               "pipeline (d fixed) are neighbours, rank = (d * pp + p) * tp + t"
    return ""


def check_rank_grid(mod, rank: int, world: int, note=_quiet) -> list[str]:
    import itertools
    for dp, pp, tp in itertools.product(range(1, 5), repeat=3):
        shape = f"dp={dp}, pp={pp}, tp={tp}"
        w = dp * pp * tp
        want_coords, want_groups = reference_grid(dp, pp, tp)
        got_coords = [tuple(mod.coords(r, dp=dp, pp=pp, tp=tp)) for r in range(w)]
        for r in range(w):
            if got_coords[r] != tuple(want_coords[r]):
                hint = _grid_hint(dp, pp, tp, got_coords)
                return [f"{shape}: coords of rank {r} should be (d, p, t) = "
                        f"{tuple(want_coords[r])}, got {got_coords[r]}"] + ([hint] if hint else [])
        got = mod.groups(dp=dp, pp=pp, tp=tp)
        for kind, size in (("tp", tp), ("pp", pp), ("dp", dp)):
            if kind not in got:
                return [f"{shape}: groups returned no {kind!r} entry (keys {sorted(got)})"]
            mine = [sorted(int(x) for x in grp) for grp in got[kind]]
            seen = [x for grp in mine for x in grp]
            missing = sorted(set(range(w)) - set(seen))
            twice = sorted({x for x in seen if seen.count(x) > 1})
            if missing:
                return [f"{shape}: the {kind} groups miss rank(s) {missing}; every rank is in "
                        f"exactly one {kind} group (got {mine})"]
            if twice:
                return [f"{shape}: the {kind} groups overlap: rank(s) {twice} are in more than "
                        f"one {kind} group; every rank is in exactly one (got {mine})"]
            if set(seen) - set(range(w)):
                return [f"{shape}: the {kind} groups hold rank(s) "
                        f"{sorted(set(seen) - set(range(w)))}, outside 0..{w - 1}"]
            if any(len(grp) != size for grp in mine):
                return [f"{shape}: a {kind} group holds {kind}={size} ranks; got sizes "
                        f"{[len(grp) for grp in mine]}"]
            want = sorted(sorted(grp) for grp in want_groups[kind])
            if sorted(mine) != want:
                wrong = next(grp for grp in sorted(mine) if grp not in want)
                hint = [TP_FASTEST] if kind == "tp" and tp > 1 and list(range(tp)) not in mine \
                    else []
                return [f"{shape}: {wrong} is not a {kind} group; expected {want}"] + hint
    return []


def reference_gpipe(p: int, m: int, s: int) -> list[tuple[str, int]]:
    from labs.pipeline import gpipe_schedule
    return gpipe_schedule(p, m, s)


def check_gpipe(mod, rank: int, world: int, note=_quiet) -> list[str]:
    from dtlab.costmodel.shapes import bubble
    for p in range(1, 7):
        for m in range(1, 9):
            for s in range(p):
                got = [tuple(a) for a in mod.gpipe(p, m, s)]
                want = reference_gpipe(p, m, s)
                if got == want:
                    continue
                fs = [i for k, i in got if k == "F"]
                bs = [i for k, i in got if k == "B"]
                where = f"P={p}, M={m}, stage {s}"
                if sorted(fs) != list(range(m)) or sorted(bs) != list(range(m)):
                    return [f"{where}: every micro-batch needs exactly one F and one B; got {got}"]
                if got == want[:m] + want[m:][::-1]:
                    return [f"{where}: the backwards run last-first (B{m - 1} ... B0); this lab "
                            f"runs them in micro-batch order B0 ... B{m - 1} on every stage "
                            "(labs/pipeline.py's run_schedule, docs/pipeline.md)"]
                if got == reference_1f1b(p, m, s):
                    return [f"{where}: that is the 1F1B schedule (backwards start before the "
                            "last forward); GPipe runs every forward first"]
                i = next(i for i, (a, b) in enumerate(zip(got + [None] * len(want), want))
                         if a != b)
                return [f"{where}: action {i} should be {want[i]}, got "
                        f"{got[i] if i < len(got) else 'nothing'}; expected {want}"]
    for p in range(1, 9):
        for m in range(1, 17):
            want = bubble(p, m, "gpipe")
            got = float(mod.bubble_fraction(p, m))
            if abs(got - want) > 1e-12:
                hint = ""
                if p > 1 and abs(got - (p - 1) / m) < 1e-12:
                    hint = ("; (P-1)/M divides by the busy slots only: a stage's step is M + P - 1 "
                            "slots (M busy, P - 1 idle), so the bubble is (P-1)/(M+P-1)")
                return [f"bubble_fraction(P={p}, M={m}): expected {want:.6g} = (P-1)/(M+P-1), "
                        f"got {got:.6g}{hint}"]
    return []


# rows each source rank sends each destination, [source][destination]; every rank's sends
# differ from its receives, so swapped splits never happen to be right
DISPATCH_CASES = {
    2: [("uneven splits", [[1, 3], [4, 0]]), ("rank 1 has no rows", [[2, 3], [0, 0]])],
    3: [("uneven splits", [[2, 0, 3], [1, 1, 0], [4, 2, 1]]),
        ("rank 1 has no rows", [[1, 2, 2], [0, 0, 0], [3, 1, 0]])],
}
SPLITS_SWAPPED = ("splits are swapped: all_to_all_single(output, input, output_split_sizes, "
                  "input_split_sizes) takes what this rank receives from each rank first, then "
                  "what it sends")


def _dispatch_rows(counts, src: int, case: int):
    """(x, dest) of rank ``src``: rows [src, i, noise], destinations shuffled."""
    import torch
    g = torch.Generator().manual_seed(1000 * case + src)
    dest = torch.tensor([j for j, c in enumerate(counts[src]) for _ in range(c)],
                        dtype=torch.int64)
    dest = dest[torch.randperm(len(dest), generator=g)]
    if len(set(dest.tolist())) > 1 and bool((dest[1:] >= dest[:-1]).all()):
        dest = dest.flip(0)  # never already sorted: the order of the way back must matter
    n = len(dest)
    x = torch.stack([torch.full((n,), float(src), dtype=torch.float64),
                     torch.arange(n, dtype=torch.float64),
                     torch.rand(n, generator=g, dtype=torch.float64)], dim=1) if n else \
        torch.empty(0, 3, dtype=torch.float64)
    return x, dest


def check_expert_dispatch(mod, rank: int, world: int, note=_quiet) -> list[str]:
    import torch
    import torch.distributed as dist
    real = dist.all_to_all_single
    phase = {"now": "", "splits": None}

    def checked(output, input, output_split_sizes=None, input_split_sizes=None, *a, **k):
        """Refuse swapped splits on every rank at once (the ranks agree first), instead of a
        size error on some ranks and a hang on the others."""
        said = ""
        if output_split_sizes is not None and phase["splits"] is not None:
            right = phase["splits"]
            given = (list(map(int, output_split_sizes)), list(map(int, input_split_sizes or [])))
            if given == right[::-1] and right[0] != right[1]:
                said = f"in {phase['now']}: {SPLITS_SWAPPED} (this rank receives " \
                       f"{right[0]} and sends {right[1]}; you passed output_split_sizes=" \
                       f"{given[0]}, input_split_sizes={given[1]})"
        verdicts = [None] * world
        dist.all_gather_object(verdicts, said)
        if any(verdicts):
            raise ValueError(said or next(v for v in verdicts if v))
        return real(output, input, output_split_sizes, input_split_sizes, *a, **k)

    dist.all_to_all_single = checked
    try:
        for k_case, (what, counts) in enumerate(DISPATCH_CASES[world]):
            note(what)
            where = f"rank {rank}, world {world}, {what}"
            x, dest = _dispatch_rows(counts, rank, k_case)
            send = counts[rank]
            recv = [counts[s][rank] for s in range(world)]
            sources = [_dispatch_rows(counts, s, k_case) for s in range(world)]
            want = torch.cat([xs[ds == rank] for xs, ds in sources])
            phase.update(now="dispatch", splits=(recv, send))
            try:
                res = mod.dispatch(x.clone(), dest.clone())
            except Exception as e:
                if len(x) == 0 and isinstance(e, IndexError):
                    return [f"{where}: {_describe(e, mod.__file__)}",
                            f"rank {rank} has no rows (x has shape {tuple(x.shape)}): there is "
                            "no x[0]; take the row shape from x.shape[1:]"]
                raise
            if not (isinstance(res, (tuple, list)) and len(res) == 2):
                return [f"{where}: dispatch returned {type(res).__name__}; it must return "
                        "(received, plan)"]
            received, plan = res
            if tuple(received.shape) != tuple(want.shape):
                return [f"{where}: received has shape {tuple(received.shape)}, expected "
                        f"{tuple(want.shape)} ({sum(recv)} rows arrive here: {recv} from ranks "
                        f"{list(range(world))})"]
            if not torch.equal(received, want):
                same_rows = sorted(map(tuple, received.tolist())) == \
                    sorted(map(tuple, want.tolist()))
                hint = " (the right rows, in another order: group them by source rank, each " \
                       "source's in its own order; sort by destination with stable=True)" \
                    if same_rows else ""
                return [f"{where}: received differs from the rows sent here (columns: source "
                        f"rank, row index there, value): {_first_diff(received, want)}{hint}"]
            phase.update(now="combine", splits=(send, recv))
            y = received * 10 + rank  # the "experts" of this rank
            out = mod.combine(y, plan)
            expect = x * 10 + dest[:, None].to(x.dtype)
            if tuple(out.shape) != tuple(expect.shape):
                return [f"{where}: combine returned shape {tuple(out.shape)}, expected "
                        f"{tuple(expect.shape)} (one row per row of x)"]
            if not torch.equal(out, expect):
                order = torch.argsort(dest, stable=True)
                if torch.equal(out, expect[order]):
                    return [f"{where}: the return trip did not restore the original order: the "
                            "rows came back grouped by destination rank; put each where it was "
                            "(out[order] = what came back, order the sort of dispatch)"]
                return [f"{where}: combine's row i is not the output for row i of x: "
                        f"{_first_diff(out, expect)}"]
    finally:
        dist.all_to_all_single = real
    return []


DDP_BUCKET_NUMEL = 60
NO_OVERLAP = ("waiting on each bucket right after launching it blocks backward until its "
              "all-reduce is done, so nothing overlaps: keep the Work and wait for every bucket "
              "in finish()")


def _ddp_model():
    import torch
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16),
                               torch.nn.Tanh(), torch.nn.Linear(16, 12), torch.nn.Tanh(),
                               torch.nn.Linear(12, 4))


def _bucket_numels(params, limit: int, reverse: bool = True) -> list[int]:
    out, size = [], 0
    for p in (reversed(params) if reverse else params):
        size += p.numel()
        if size >= limit:
            out.append(size)
            size = 0
    return out + ([size] if size else [])


class _Work:
    """A Work that says when it is waited on."""

    def __init__(self, work, log, k):
        self._work, self._log, self._k = work, log, k

    def wait(self, *a, **k):
        self._log.append(("wait", self._k))
        return self._work.wait(*a, **k)

    def __getattr__(self, name):
        return getattr(self._work, name)


def check_ddp_buckets(mod, rank: int, world: int, note=_quiet) -> list[str]:
    import copy

    import torch
    import torch.distributed as dist
    model = _ddp_model()
    ref = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    log: list[tuple] = []
    real = dist.all_reduce

    def recording(t, *a, async_op=False, **k):
        k_launch = sum(1 for e in log if e[0] == "launch")
        log.append(("launch", t.numel(), bool(async_op)))
        work = real(t, *a, async_op=async_op, **k)
        return _Work(work, log, k_launch) if async_op else work

    def batch(step, micro):
        g = torch.Generator().manual_seed(100 * step + 10 * micro + rank)
        return torch.randn(6, 8, generator=g), torch.randn(6, 4, generator=g)

    dist.all_reduce = recording
    try:
        ddp = mod.BucketedDDP(model, DDP_BUCKET_NUMEL)
        for i, p in enumerate(params):  # after the learner's hooks: fires once theirs returned
            p.register_post_accumulate_grad_hook(lambda p, i=i: log.append(("grad", i)))
        for step, micro in ((0, 1), (1, 3)):
            what = "one step" if micro == 1 else \
                f"{micro} micro-batches, the first {micro - 1} under no_sync()"
            note(what)
            where = f"rank {rank}, world {world}, {what}"
            model.zero_grad(set_to_none=True)
            ref.zero_grad(set_to_none=True)
            log.clear()
            for k in range(micro):
                x, y = batch(step, k)
                last = k == micro - 1
                with contextlib.nullcontext() if last else ddp.no_sync():
                    torch.nn.functional.mse_loss(model(x), y).backward()
                log.append(("backward done", k))
                torch.nn.functional.mse_loss(ref(x), y).backward()
                if not last and any(e[0] == "launch" for e in log):
                    n = sum(1 for e in log if e[0] == "launch")
                    return [f"{where}: {n} all-reduce(s) during backward {k} under no_sync(); "
                            "there gradients only accumulate in .grad, the last micro-batch's "
                            "backward communicates their sum"]
            ddp.finish()
            for p in ref.parameters():
                real(p.grad)
                p.grad /= world
            for n, p, q in zip(names, params, ref.parameters()):
                if p.grad is None:
                    return [f"{where}: {n}.grad is None after finish()"]
                if not torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5):
                    hint = []
                    if torch.allclose(p.grad, q.grad * world, atol=1e-6, rtol=1e-5):
                        hint = [f"the gradients are {world} times too large: all_reduce sums, "
                                f"divide by the world size ({world}) to average"]
                    return [f"{where}: {n}.grad differs from the all-reduced average: "
                            f"{_first_diff(p.grad.reshape(-1), q.grad.reshape(-1))}"] + hint
            launches = [e for e in log if e[0] == "launch"]
            done = log.index(("backward done", micro - 1))
            if not launches:
                return [f"{where}: no dist.all_reduce was called; launch one per bucket"]
            if not all(e[2] for e in launches):
                return [f"{where}: dist.all_reduce was called without async_op=True: it blocks "
                        "until the bucket is summed; " + NO_OVERLAP]
            early = [e for e in log[:done] if e[0] == "wait"]
            if early:
                return [f"{where}: bucket {early[0][1]} was waited on before backward ended; "
                        + NO_OVERLAP]
            got = [e[1] for e in launches]
            want = _bucket_numels(params, DDP_BUCKET_NUMEL)
            if got != want:
                hint = ""
                if sorted(got) == sorted(_bucket_numels(params, DDP_BUCKET_NUMEL, reverse=False)):
                    hint = ("; the buckets were filled in forward parameter order: launched "
                            "in bucket order, the first (the first layer, whose gradients come "
                            "last in backward) holds back every other until backward ends; walk "
                            "the parameters from the last to the first, the order backward "
                            "produces their gradients")
                return [f"{where}: launched buckets of {got} elements, expected {want} "
                        f"(parameters from the last to the first, a bucket closed at >= "
                        f"{DDP_BUCKET_NUMEL} elements){hint}"]
            last_grad = max(i for i, e in enumerate(log) if e[0] == "grad")
            first_launch = log.index(launches[0])
            if first_launch > last_grad:
                return [f"{where}: no bucket left before backward ended (first launch after "
                        "the last gradient); launch each bucket from the hook as soon as its "
                        "last gradient is ready"]
            if not all(e[0] == "wait" for e in log[done + 1:]) or \
                    len([e for e in log if e[0] == "wait"]) != len(launches):
                return [f"{where}: finish() must wait on every launched bucket once (waited "
                        f"{len([e for e in log if e[0] == 'wait'])} times for "
                        f"{len(launches)} launches)"]
    finally:
        dist.all_reduce = real
    return []


def _first_difference(got: list, want: list) -> int:
    """Index of the first action where two lists differ (one may be longer)."""
    n = max(len(got), len(want))
    return next(i for i in range(n) if (got[i] if i < len(got) else None) !=
                (want[i] if i < len(want) else None))


def _action_diff(where: str, got: list, want: list, hint: str = "") -> str:
    i = _first_difference(got, want)
    line = f"{where}: action {i} should be {want[i] if i < len(want) else 'nothing'}, got " \
           f"{got[i] if i < len(got) else 'nothing'}"
    if hint:
        return f"{line}: {hint}"
    return line + (f"; expected {want}" if len(want) <= 24 else "")


def reference_interleaved(p: int, m: int, s: int, v: int) -> list[tuple[str, int, int]]:
    from labs.pipeline import interleaved_schedule
    return interleaved_schedule(p, m, s, v)


INTERLEAVED_RULE = ("the k-th forward of a stage is micro-batch (k // (P V)) P + k % P on chunk "
                    "(k // P) % V, the k-th backward the same micro-batch on chunk "
                    "V - 1 - (k // P) % V")


def _interleaved_chunk_hint(p: int, v: int, want: list, i: int, got_chunk: int) -> str:
    """Why action i ran the right micro-batch on the wrong chunk."""
    op = want[i][0]
    k = sum(1 for a in want[:i] if a[0] == op)  # action i is the stage's k-th F (or B)
    c = (k // p) % v
    if op == "B" and got_chunk == c != v - 1 - c:
        return ("the backwards walk the chunks the other way (the last chunk's gradient comes "
                f"first): {INTERLEAVED_RULE}")
    what = "forward" if op == "F" else "backward"
    if k >= p * v:
        return (f"the wrong chunk after a wrap-around: this is {what} {k} of the stage (from 0), "
                f"past the P V = {p * v} of the first group of P micro-batches, so the chunks "
                f"have come round again; {INTERLEAVED_RULE}")
    return f"the wrong chunk for {what} {k} of the stage (from 0): {INTERLEAVED_RULE}"


def check_interleaved_1f1b(mod, rank: int, world: int, note=_quiet) -> list[str]:
    from dtlab.costmodel.shapes import bubble
    for p in (2, 3, 4):
        for v in (2, 3):
            for m in (p, 2 * p, 3 * p):
                for s in range(p):
                    where = f"P={p}, V={v}, M={m}, stage {s}"
                    got = [tuple(a) for a in mod.interleaved_1f1b(p, m, s, v)]
                    want = reference_interleaved(p, m, s, v)
                    if got == want:
                        continue
                    short = [i for i, a in enumerate(got) if len(a) != 3]
                    if short:
                        return [f"{where}: action {short[0]} is {got[short[0]]}; each action is "
                                "(op, micro-batch, chunk)"]
                    outside = [i for i, a in enumerate(got) if a[2] not in range(v)]
                    if outside:
                        i = outside[0]
                        return [f"{where}: action {i} is {got[i]}, but a stage holds chunks "
                                f"0..{v - 1}: the wrong chunk after a wrap-around (after P V = "
                                f"{p * v} forwards the next P micro-batches start again on "
                                "chunk 0: the k-th forward runs chunk (k // P) % V)"]
                    i = _first_difference(got, want)
                    if i < min(len(got), len(want)) and got[i][:2] == want[i][:2]:
                        return [_action_diff(where, got, want, _interleaved_chunk_hint(
                            p, v, want, i, got[i][2]))]
                    pairs = sorted((j, c) for j in range(m) for c in range(v))
                    if sorted(a[1:] for a in got if a[0] == "F") != pairs or \
                            sorted(a[1:] for a in got if a[0] == "B") != pairs:
                        return [f"{where}: every micro-batch needs exactly one F and one B on "
                                f"each of the {v} chunks; got {got}"]
                    return [_action_diff(where, got, want)]
    for p, m, v in ((2, 3, 2), (4, 6, 2), (3, 4, 3)):
        try:
            got = mod.interleaved_1f1b(p, m, 0, v)
        except ValueError:
            continue
        return [f"P={p}, V={v}, M={m}: interleaved_1f1b returned a schedule; the lab runs "
                "micro-batches in groups of P (each group through chunk 0, then chunk 1, ...), "
                f"so it refuses an M that is not a multiple of P (labs/pipeline.py: "
                f"--microbatches {m} must be a multiple of {p}): raise ValueError"]
    for p in range(2, 9):
        for v in (2, 3, 4):
            for m in range(p, 4 * p + 1, p):
                want = bubble(p, m, "interleaved", v)
                got = float(mod.bubble_fraction(p, m, v))
                if abs(got - want) <= 1e-12:
                    continue
                hint = ""
                if abs(got - (p - 1) / (m + p - 1)) < 1e-12:
                    hint = ("; the bubble was not divided by V: that is 1F1B's (P-1)/(M+P-1); "
                            "with V chunks a stage's ramps are made of chunk slots, 1/V of a "
                            "stage's work, so the P - 1 idle slots weigh (P-1)/V against M busy")
                elif abs(got - (p - 1) / (v * m)) < 1e-12:
                    hint = ("; (P-1)/(V M) divides by the busy time only (Megatron's paper "
                            "states it so); this lab's bubble is over the whole step, idle and "
                            "busy, as for GPipe and 1F1B (dtlab/costmodel/shapes.py)")
                return [f"bubble_fraction(P={p}, M={m}, V={v}): expected {want:.6g} = "
                        f"(P-1)/(V M + P-1), got {got:.6g}{hint}"]
    return []


def reference_zbh1(p: int, m: int, s: int) -> list[tuple[str, int]]:
    from labs.pipeline import zbh1_schedule
    return zbh1_schedule(p, m, s)


B_W_FUSED = ("no W in the list: B and W fused (one whole backward, as 1F1B runs it); ZB-H1 "
             "splits each backward into B, the input's gradient that the stage before waits "
             "for, and W, the weights' gradient that nobody waits for, so that W can be put off")
W_ON_CRITICAL_PATH = ("W on the critical path: the stage before waits for this stage's B's (and "
                      "the next for its F's) while it runs a W; ZB-H1 defers stage s's W's by s "
                      "micro-batches (W of micro-batch i - s right after B of i, the last s W's "
                      "at the end), so they fill the cool-down where 1F1B idles")


def check_zero_bubble(mod, rank: int, world: int, note=_quiet) -> list[str]:
    from dtlab.costmodel.shapes import bubble
    for p in range(1, 7):
        for m in range(1, 9):
            for s in range(p):
                where = f"P={p}, M={m}, stage {s}"
                got = [tuple(a) for a in mod.zbh1(p, m, s)]
                want = reference_zbh1(p, m, s)
                if got == want:
                    continue
                if not any(a[0] == "W" for a in got):
                    return [f"{where}: {B_W_FUSED}; got {got}"]
                for op in "FBW":
                    if sorted(a[1] for a in got if a[0] == op) != list(range(m)) or \
                            any(len(a) != 2 for a in got):
                        return [f"{where}: every micro-batch needs exactly one F, one B and one "
                                f"W, each an (op, micro-batch) pair; got {got}"]
                at = {a: n for n, a in enumerate(got)}
                for i in range(m):
                    if at[("W", i)] < at[("B", i)]:
                        return [f"{where}: W{i} runs before B{i}: the weights' gradient "
                                f"x^T dL/dy needs dL/dy, which this stage has only once B{i} "
                                f"ran (it arrives from the next stage); W{i} goes after B{i}; "
                                f"got {got}"]
                    if at[("B", i)] < at[("F", i)]:
                        return [f"{where}: B{i} runs before F{i}; got {got}"]
                i = _first_difference(got, want)
                if i < min(len(got), len(want)) and got[i][0] == "W" and want[i][0] != "W":
                    return [_action_diff(where, got, want, W_ON_CRITICAL_PATH)]
                return [_action_diff(where, got, want)]
    for p in range(1, 9):
        for m in range(p, 17):
            want = bubble(p, m, "zbh1")
            got = float(mod.bubble_fraction(p, m))
            if abs(got - want) <= 1e-12:
                continue
            hint = ""
            if abs(got - (p - 1) / (m + p - 1)) < 1e-12:
                hint = ("; that is 1F1B's bubble (P-1)/(M+P-1): with F, B and W one slot each a "
                        "stage's step is 3M busy slots and P - 1 idle")
            elif abs(got - (p - 1) / (3 * m)) < 1e-12:
                hint = "; (P-1)/(3M) divides by the busy slots only: divide by all 3M + P - 1"
            return [f"bubble_fraction(P={p}, M={m}): expected {want:.6g} = (P-1)/(3M+P-1), got "
                    f"{got:.6g}{hint}"]
    return []


RESHARD_NUMELS = (1, 2, 3, 4, 5, 7, 10, 13, 64, 101)
RESHARD_WORLDS = range(1, 7)


def reference_chunk(numel: int, world: int, rank: int) -> tuple[int, int]:
    """[lo, hi) of rank's chunk in dtlab's checkpoint layout."""
    from dtlab.reliability.checkpoint import _chunk
    return _chunk(numel, world, rank)


def _elements(t) -> str:
    """What a tensor of the checker's values holds (element i holds i + 1, padding 0)."""
    vals = [int(x) for x in t.reshape(-1).tolist()]
    pad = 0
    while vals and vals[-1] == 0:
        vals.pop()
        pad += 1
    if not vals:
        text = "no elements"
    elif vals[0] > 0 and vals == list(range(vals[0], vals[0] + len(vals))):
        text = f"elements [{vals[0] - 1}, {vals[-1]})"
    else:
        text = f"elements {[x - 1 for x in vals[:8]]}{' ...' if len(vals) > 8 else ''}"
    return text + (f" then {pad} padding zero(s)" if pad else "")


def _reshard_hint(flat, n: int, w: int, w2: int, r: int, got) -> str:
    """Which classic mistake gives ``got`` for rank r of w2 (a tensor saved by w ranks)."""
    import torch
    size, floor, old = -(-n // w2), n // w2, -(-n // w)
    lo, hi = reference_chunk(n, w2, r)

    def same(t):
        return tuple(got.shape) == tuple(t.shape) and torch.equal(got, t)
    if hi - lo < size and same(torch.cat([flat[lo:hi], flat.new_zeros(size - (hi - lo))])):
        return (f"the padding was left in: a chunk is ceil(numel / W') = {size} elements long "
                f"but the last one(s) hold only what is left ({hi - lo} here); the zeros that "
                "would fill it up are not part of the tensor")
    for a, b in ((min(r * floor, n), min((r + 1) * floor, n)),
                 (r * floor, n if r == w2 - 1 else (r + 1) * floor)):
        if same(flat[a:b]):
            return (f"the chunk size rounds up: ceil(numel / W') = {size}, the last chunk the "
                    "short one (the padding fills it up when the ranks all-gather); "
                    f"numel // W' = {floor} rounds down and moves every boundary")
    if w != w2 and same(flat[min(r * old, n):min((r + 1) * old, n)]):
        return (f"the chunk size came from the old world, ceil(numel / W) = {old}; the new "
                f"chunks are ceil(numel / W') = {size} long (W' = {w2} ranks)")
    for a, b in ((lo, hi + 1), (lo, hi - 1), (lo + 1, hi + 1), (lo - 1, hi - 1), (lo + 1, hi),
                 (lo - 1, hi)):
        a, b = max(a, 0), min(b, n)
        if a <= b and (a, b) != (lo, hi) and same(flat[a:b]):
            return (f"off by one at a boundary: rank {r}'s chunk is [{lo}, {hi}) = "
                    f"[{r} * {size}, {r + 1} * {size}) clipped to numel, lo included and hi "
                    "excluded (hi is the next rank's first element)")
    return ""


def check_checkpoint_reshard(mod, rank: int, world: int, note=_quiet) -> list[str]:
    import torch
    for n in RESHARD_NUMELS:
        flat = torch.arange(1, n + 1, dtype=torch.float32)
        for w in RESHARD_WORLDS:
            chunks = [flat[slice(*reference_chunk(n, w, r))].clone() for r in range(w)]
            saved = f"numel {n} saved by W={w} (chunks of {[len(c) for c in chunks]})"
            got = mod.merge([c.clone() for c in chunks], n)
            if not isinstance(got, torch.Tensor):
                return [f"{saved}: merge returned a {type(got).__name__}; return a 1-D tensor"]
            if not (tuple(got.shape) == (n,) and torch.equal(got, flat)):
                hint = ""
                if got.numel() > n and torch.equal(got.reshape(-1)[:n], flat):
                    hint = f"; the padding was not cut off: keep the first numel = {n}"
                return [f"{saved}: merge returned {_elements(got)} (shape {tuple(got.shape)}), "
                        f"expected elements [0, {n}){hint}"]
            for w2 in RESHARD_WORLDS:
                for r in range(w2):
                    lo, hi = reference_chunk(n, w2, r)
                    want = flat[lo:hi]
                    got = mod.reshard([c.clone() for c in chunks], n, w2, r)
                    where = f"{saved}, resharded to W'={w2}, rank {r}"
                    if not isinstance(got, torch.Tensor):
                        return [f"{where}: reshard returned a {type(got).__name__}; return a "
                                "1-D tensor"]
                    if got.dtype != want.dtype:
                        return [f"{where}: reshard returned {got.dtype}; keep the chunks' dtype "
                                f"({want.dtype})"]
                    if tuple(got.shape) == tuple(want.shape) and torch.equal(got, want):
                        continue
                    hint = _reshard_hint(flat, n, w, w2, r, got)
                    return [f"{where}: expected elements [{lo}, {hi}) ({hi - lo} of them), got "
                            f"{_elements(got)}" + (f"; {hint}" if hint else "")]
    return []


SP_TOL = 1e-12    # float64; the sum of two ranks' values is the same whichever adds first
SP_CASES = ((2, 3, 4), (3, 1, 5))   # (batch, tokens a rank holds, hidden)
SP_DIMS = ("batch", "sequence", "hidden")
SP_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                  "reduce_scatter_tensor", "broadcast", "all_to_all_single")
SP_ALL_REDUCE = ("dist.all_reduce sums the gradient but leaves every rank all the tokens; the "
                 "backward of an all-gather is a reduce-scatter along the sequence: the sum over "
                 "the ranks, of this rank's tokens only")
SP_ALL_REDUCE_AFTER_SCATTER = ("dist.all_reduce leaves this rank its own tokens only; the "
                               "backward of a reduce-scatter is an all-gather along the "
                               "sequence")


@contextlib.contextmanager
def _recorded(calls: list, phase: str):
    """The library's collectives, each call noted as (phase, name) while the learner runs."""
    import torch.distributed as dist
    real = {op: getattr(dist, op) for op in SP_COLLECTIVES}

    def noting(op):
        def call(*a, **k):
            calls.append((phase, op))
            return real[op](*a, **k)
        return call
    for op in SP_COLLECTIVES:
        setattr(dist, op, noting(op))
    try:
        yield
    finally:
        for op, fn in real.items():
            setattr(dist, op, fn)


def _sp_diff(got, want, what: str) -> str:
    err = (got - want).abs()
    i = tuple((err == err.max()).nonzero()[0].tolist())
    return f"{what} differs from the lab's (labs/tensor_parallel.py) by up to " \
           f"{err.max().item():.3g} (tolerance {SP_TOL:g}), at index {i} (batch, sequence, " \
           f"hidden): expected {want[i].item():.6g}, got {got[i].item():.6g}"


def _close(a, b) -> bool:
    return tuple(a.shape) == tuple(b.shape) and \
        (a.numel() == 0 or bool((a - b).abs().max() <= SP_TOL))


def _sp_output_hint(y, xs, rank: int, world: int, gather: bool) -> str:
    import torch
    if gather:
        variants = [(torch.cat(xs, 0).reshape(y.shape), "the pieces were joined along dimension "
                     "0 (the batch) and reshaped: gather along dimension 1, the sequence"),
                    (torch.cat(xs, 2).reshape(y.shape), "the pieces were joined along dimension "
                     "2 (the hidden) and reshaped: gather along dimension 1, the sequence")]
    else:
        total = sum(xs)
        variants = [(total.reshape(-1).chunk(world)[rank].reshape(y.shape),
                     "the sum was cut along dimension 0 (the batch) and reshaped: scatter along "
                     "dimension 1, the sequence"),
                    (xs[rank].chunk(world, dim=1)[rank], "this rank's own tokens, not summed "
                     "over the ranks: the forward is a reduce-scatter of every rank's partial "
                     "sums")]
    return next((text for t, text in variants if t.shape == y.shape and _close(y, t)), "")


def _sp_grad_hint(got, want, dys, calls: list, rank: int, world: int, gather: bool) -> str:
    said = []
    if _close(got, want * world):
        said.append(f"the gradient is {world} (W) times too large")
    elif _close(got, want / world):
        said.append(f"the gradient is {world} (W) times too small: sum over the ranks, do not "
                    "average")
    elif gather and _close(got, dys[rank].chunk(world, dim=1)[rank]):
        said.append("only this rank's own gradient: every rank's next layer used all the "
                    "tokens, so the gradient of this rank's tokens is the sum of every rank's "
                    "(a reduce-scatter)")
    if gather and ("backward", "all_reduce") in calls:
        said.append(SP_ALL_REDUCE)
    return "; ".join(said)


def _sp_case(mod, lab, counter, rank: int, world: int, k_case: int, shape: tuple, name: str,
             gather: bool, note) -> list[str]:
    """One function on one case: its output and its input's gradient against the lab's."""
    import re

    import torch
    b, t, h = shape
    big = (b, t * world, h)
    shape_in, shape_out = ((b, t, h), big) if gather else (big, (b, t, h))
    xs, dys = [], []
    for r in range(world):  # every rank's input and output gradient, all known here
        g = torch.Generator().manual_seed(1000 * k_case + 10 * r + int(gather))
        xs.append(torch.randn(shape_in, generator=g, dtype=torch.float64))
        dys.append(torch.randn(shape_out, generator=g, dtype=torch.float64))
    where = f"rank {rank}, world {world}, {name}, x of shape {shape_in}"
    note(where)
    ref_x = xs[rank].clone().requires_grad_(True)
    ref_y = getattr(lab, name).apply(ref_x, None, counter)
    ref_y.backward(dys[rank])
    x = xs[rank].clone().requires_grad_(True)
    calls: list = []
    with _recorded(calls, "forward"):
        y = getattr(mod, name).apply(x)
    if not isinstance(y, torch.Tensor):
        return [f"{where}: {name}.apply returned a {type(y).__name__}; return a tensor"]
    if tuple(y.shape) != shape_out:
        hint = ""
        for d in (0, 2):
            wrong = list(shape_in)
            wrong[d] = wrong[d] * world if gather else wrong[d] // world
            if tuple(y.shape) == tuple(wrong) and (gather or shape_in[d] % world == 0):
                hint = (f": {'gathered' if gather else 'scattered'} along dimension {d} (the "
                        f"{SP_DIMS[d]}) instead of 1 (the sequence); all_gather_into_tensor and "
                        "reduce_scatter_tensor work along dimension 0, so put the sequence "
                        "there first (x.transpose(0, 1).contiguous()), or torch.cat / chunk "
                        "with dim=1")
        return [f"{where}: the output has shape {tuple(y.shape)}, expected {shape_out}{hint}"]
    if not _close(y.detach(), ref_y.detach()):
        hint = _sp_output_hint(y.detach(), xs, rank, world, gather)
        return [f"{where}: {_sp_diff(y.detach(), ref_y.detach(), 'the output')}"
                + (f"; {hint}" if hint else "")]
    with _recorded(calls, "backward"):
        try:
            y.backward(dys[rank])
        except RuntimeError as e:
            found = re.search(r"got \[([\d, ]*)\] but expected shape compatible with", str(e))
            if not found:
                raise
            returned = tuple(int(n) for n in found.group(1).split(",") if n.strip())
            hint = ""
            if ("backward", "all_reduce") in calls:
                hint = SP_ALL_REDUCE if gather else SP_ALL_REDUCE_AFTER_SCATTER
            return [f"{where}: the backward returned a gradient of shape {returned} for an "
                    f"input of shape {shape_in}" + (f"; {hint}" if hint else "")]
    if x.grad is None:
        return [f"{where}: x.grad is None after backward: the output is not connected to x "
                "(return the result of the collective from forward, do not detach it)"]
    if not _close(x.grad, ref_x.grad):
        hint = _sp_grad_hint(x.grad, ref_x.grad, dys, calls, rank, world, gather)
        return [f"{where}: {_sp_diff(x.grad, ref_x.grad, 'the gradient of x')}"
                + (f"; {hint}" if hint else "")]
    return []


def check_sequence_parallel(mod, rank: int, world: int, note=_quiet) -> list[str]:
    import torch.distributed as dist
    from dtlab.measure.comm_counter import CommCounter
    from labs import tensor_parallel as lab
    counter = CommCounter(world)
    for k_case, shape in enumerate(SP_CASES):
        for name, gather in (("GatherFromSP", True), ("ReduceScatterToSP", False)):
            failures = _sp_case(mod, lab, counter, rank, world, k_case, shape, name, gather,
                                note)
            verdicts = [None] * world  # the ranks agree to stop together: none waits alone
            dist.all_gather_object(verdicts, bool(failures))
            if any(verdicts):
                return failures
    return []


CHECKS: dict[str, Callable] = {"ring_allreduce": check_ring_allreduce,
                               "loss_scaler": check_loss_scaler,
                               "tensor_parallel": check_tensor_parallel, "1f1b": check_1f1b,
                               "zero1": check_zero1, "ring_attention": check_ring_attention,
                               "rank_grid": check_rank_grid, "gpipe": check_gpipe,
                               "expert_dispatch": check_expert_dispatch,
                               "ddp_buckets": check_ddp_buckets,
                               "interleaved_1f1b": check_interleaved_1f1b,
                               "zero_bubble": check_zero_bubble,
                               "checkpoint_reshard": check_checkpoint_reshard,
                               "sequence_parallel": check_sequence_parallel}

LIBRARY_COLLECTIVES = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor",
                       "all_gather", "reduce", "reduce_scatter", "broadcast")


# --------------------------------------------------------------------------- running a check

def _worker(rank: int, world: int, port: int, name: str, path: str, outdir: str) -> None:
    import datetime

    import warnings

    import torch
    import torch.distributed as dist
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's renamed collectives
    torch.set_num_threads(1)
    result = {"rank": rank, "failures": []}
    progress = Path(outdir) / f"rank{rank}.progress"
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world,
                                timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
        mod = load(path)
        if name == "ring_allreduce":  # point-to-point only: the library's collectives are off
            def refuse(*a, _op="collective", **k):
                raise RuntimeError(f"dist.{_op} is switched off in this exercise; build the "
                                   "all-reduce from isend/irecv")
            for op in LIBRARY_COLLECTIVES:
                setattr(dist, op, lambda *a, _op=op, **k: refuse(_op=_op))
        result["failures"] = CHECKS[name](mod, rank, world, progress.write_text)
    except Exception as e:  # the learner's code failed: say what and where
        text = _describe(e, path)
        if "imed out" in text:
            text += " -- a send or receive that never found its partner (check which rank " \
                    "each message goes to, and post isend/irecv together)"
        result["failures"] = [f"rank {rank}, world {world}: {text}"]
    (Path(outdir) / f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)  # no teardown: a broken process group must not hang the exit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(name: str, path: str, world: int) -> list[str]:
    import multiprocessing as mp
    # Ranks forked from one server that imported torch once (per checking process), not each
    # importing it afresh: a check of two worlds starts five ranks.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "dtlab.exercises.checker"])
    with tempfile.TemporaryDirectory() as outdir:
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, world, port, name, path, outdir))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(JOIN_TIMEOUT_S)
        failures = []
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                failures.append(f"rank {r}, world {world}: still running after "
                                f"{JOIN_TIMEOUT_S} s; killed")
            f = Path(outdir) / f"rank{r}.json"
            if f.is_file():
                failures += json.loads(f.read_text())["failures"]
            elif not p.is_alive():
                where = Path(outdir) / f"rank{r}.progress"
                case = f", {where.read_text()}" if where.is_file() else ""
                hint = (": a message arrived with a different size than its receive expected "
                        "(gloo aborts the process); check the chunk index each rank sends and "
                        "receives at each step") if p.exitcode == -6 else ""
                failures.append(f"rank {r}, world {world}{case}: the process died (exit code "
                                f"{p.exitcode}) before reporting{hint}")
        return failures


def check(name: str, path: str | Path) -> tuple[bool, list[str]]:
    """(passed, lines to print) for the learner's file at ``path``."""
    ex = get(name)
    path = Path(path)
    if not path.is_file():
        raise ExerciseError(f"--impl {path}: no such file; write one with "
                            f"`dtlab exercise {name}` first")
    lines, failures = [], []
    if ex.worlds:
        for world in ex.worlds:
            f = run_distributed(name, str(path), world)
            lines.append(f"{'FAIL' if f else 'ok  '} {name} on {world} processes")
            failures += f
            if f:
                break
    else:
        try:
            failures = CHECKS[name](load(path), 0, 1)
        except Exception as e:
            failures = [_describe(e, str(path))]
        lines.append(f"{'FAIL' if failures else 'ok  '} {name}")
    return not failures, lines + [f"  {f}" for f in failures]
