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


CHECKS: dict[str, Callable] = {"ring_allreduce": check_ring_allreduce,
                               "loss_scaler": check_loss_scaler,
                               "tensor_parallel": check_tensor_parallel, "1f1b": check_1f1b,
                               "zero1": check_zero1, "ring_attention": check_ring_attention}

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
    ctx = mp.get_context("spawn")
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
