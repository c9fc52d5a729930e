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


CHECKS: dict[str, Callable] = {"ring_allreduce": check_ring_allreduce,
                               "loss_scaler": check_loss_scaler,
                               "tensor_parallel": check_tensor_parallel, "1f1b": check_1f1b,
                               "zero1": check_zero1, "ring_attention": check_ring_attention,
                               "rank_grid": check_rank_grid, "gpipe": check_gpipe,
                               "expert_dispatch": check_expert_dispatch,
                               "ddp_buckets": check_ddp_buckets}

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
