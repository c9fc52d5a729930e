"""The check of the shm_averaging exercise: W real worker processes averaging their gradients
through one shared table and a barrier, against the mean computed here."""
from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path

from dtlab.exercises.checks.common import _describe, _first_diff, _quiet

SHM_WORLDS = (2, 3)
SHM_ROUNDS = 3
SHM_NUMEL = 10
SHM_SKEW_S = 0.2           # worker r starts each round r x this after worker 0
SHM_TOL = 1e-12            # float64
BARRIER_TIMEOUT_S = 20     # a barrier never reached ends as an error, not a hang
JOIN_TIMEOUT_S = 120


class _CountingBarrier:
    """The learner's barrier: every wait counted, and none waits longer than the deadline."""

    def __init__(self, real):
        self.real, self.waits = real, 0

    def wait(self, timeout=None):
        self.waits += 1
        return self.real.wait(min(timeout or BARRIER_TIMEOUT_S, BARRIER_TIMEOUT_S))

    def __getattr__(self, name):
        return getattr(self.real, name)


def _grad(rnd: int, rank: int):
    import torch
    g = torch.Generator().manual_seed(100 * rnd + rank)
    return torch.randn(SHM_NUMEL, generator=g, dtype=torch.float64)


def _round_problem(got, grads, table_row, rank: int, world: int, rnd: int, waits: int) -> str:
    import torch
    who = [s for s in range(world) if torch.equal(table_row, grads[s])]
    if rank not in who:
        if who:
            return (f"row {rank} of the table (this worker's) holds worker {who[0]}'s gradient, "
                    f"not worker {rank}'s: two workers wrote the same row; each writes its own, "
                    "table[rank]")
        return (f"row {rank} of the table (this worker's) does not hold its gradient: nothing "
                "wrote it this round; each worker writes its gradient into its own row, "
                "table[rank]")
    want = torch.stack(grads).sum(0) / world
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        return f"average_gradients returned {shape}, expected a tensor of shape {tuple(want.shape)}"
    if not torch.allclose(got, want, rtol=0, atol=SHM_TOL):
        diff = _first_diff(got, want)
        if torch.allclose(got, want * world, rtol=0, atol=SHM_TOL):
            return (f"the rows were summed, not averaged: {diff}; divide the sum by the world "
                    f"size W = {world}")
        late = list(range(rank + 1, world))
        seen = [grads[s] if s <= rank else
                (_grad(rnd - 1, s) if rnd else torch.zeros(SHM_NUMEL, dtype=torch.float64))
                for s in range(world)]
        if late and torch.allclose(got, torch.stack(seen).sum(0) / world, rtol=0, atol=SHM_TOL):
            return (f"the table was read before every worker had written its row: {diff} (it "
                    f"matches a table in which worker(s) {late} had not written yet); wait at "
                    "the barrier after writing, then read")
        return f"the average differs from the mean of every worker's gradient: {diff}"
    if waits < 2:
        return (f"barrier.wait() was called {waits} time(s) in one average_gradients; wait after "
                "writing (every row written) and again after reading (every row read), or a "
                "fast worker's next round overwrites its row while a slow one still reads it")
    return ""


def _rounds(mod, rank: int, world: int, table, barrier, ours, failed) -> list[str]:
    for rnd in range(SHM_ROUNDS):
        grads = [_grad(rnd, s) for s in range(world)]
        ours.wait(BARRIER_TIMEOUT_S)      # the round starts together, then worker r waits
        time.sleep(rank * SHM_SKEW_S)
        barrier.waits = 0
        got = mod.average_gradients(grads[rank].clone(), table, rank, world, barrier)
        ours.wait(BARRIER_TIMEOUT_S)      # every worker returned
        problem = _round_problem(got, grads, table[rank].clone(), rank, world, rnd,
                                 barrier.waits)
        failed[rank] = bool(problem)
        ours.wait(BARRIER_TIMEOUT_S)      # every worker looked at its row
        if failed.any():                  # all stop here, together
            return [f"world {world}, worker {rank}, round {rnd}: {problem}"] if problem else []
    return []


def _worker(rank: int, world: int, path: str, table, failed, barrier, ours,
            outdir: str) -> None:
    import torch
    torch.set_num_threads(1)
    result = {"failures": [], "broken": False}
    try:
        from dtlab.exercises.checker import load
        result["failures"] = _rounds(load(path), rank, world, table, _CountingBarrier(barrier),
                                     ours, failed)
    except threading.BrokenBarrierError:
        result["broken"] = True
        result["failures"] = [f"world {world}, worker {rank}: a barrier.wait() timed out after "
                              f"{BARRIER_TIMEOUT_S} s or was broken: not every worker reached "
                              "it (every worker must wait the same number of times)"]
    except Exception as e:  # the learner's code failed: say what and where
        result["failures"] = [f"world {world}, worker {rank}: {_describe(e, path)}"]
        barrier.abort()   # the others stop waiting for this worker
        ours.abort()
    (Path(outdir) / f"worker{rank}.json").write_text(json.dumps(result))
    os._exit(0)


def _run(path: str, world: int) -> list[str]:
    import torch
    import torch.multiprocessing as mp
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "dtlab.exercises.checker",
                                "dtlab.exercises.checks.shm_averaging"])
    table = torch.zeros(world, SHM_NUMEL, dtype=torch.float64).share_memory_()
    failed = torch.zeros(world, dtype=torch.bool).share_memory_()  # a problem, per worker
    barrier, ours = ctx.Barrier(world), ctx.Barrier(world)
    with tempfile.TemporaryDirectory() as outdir:
        procs = [ctx.Process(target=_worker,
                             args=(r, world, path, table, failed, barrier, ours, outdir))
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        own, broken = [], []
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                own.append(f"world {world}, worker {r}: still running after {JOIN_TIMEOUT_S} s; "
                           "killed")
                continue
            f = Path(outdir) / f"worker{r}.json"
            if not f.is_file():
                own.append(f"world {world}, worker {r}: the process died (exit code "
                           f"{p.exitcode}) before reporting")
                continue
            result = json.loads(f.read_text())
            (broken if result["broken"] else own).extend(result["failures"])
        return own or broken  # a barrier broken because another worker failed says nothing new


def check(mod, rank: int, world: int, note=_quiet) -> list[str]:
    for w in SHM_WORLDS:
        note(f"world {w}")
        failures = _run(mod.__file__, w)
        if failures:
            return failures
    return []
