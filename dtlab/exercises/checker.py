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
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dtlab.errors import UsageError
from dtlab.exercises.checks.common import _describe

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
    Exercise("dataparallel", "dataparallel.py",
             "nn.DataParallel written out: scatter, replicate, gather, gradients summed"),
    Exercise("shm_averaging", "shm_averaging.py",
             "gradients averaged in shared memory by torch.multiprocessing workers"),
    Exercise("zero2", "zero2.py",
             "ZeRO-2: gradients reduce-scattered during backward, a shard kept", worlds=(2, 3)),
    Exercise("zero3", "zero3.py",
             "ZeRO-3: each layer's parameters gathered before use and freed after",
             worlds=(2, 3)),
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


LIBRARY_COLLECTIVES = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor",
                       "all_gather", "reduce", "reduce_scatter", "broadcast")


# --------------------------------------------------------------------------- running a check

def check_function(name: str) -> Callable:
    """The check of one exercise: ``checks/<its file's stem>.py``'s ``check(mod, rank, world,
    note)``, which returns a list of failure lines (empty: passed); a distributed one runs on
    every rank."""
    return importlib.import_module(f"dtlab.exercises.checks.{Path(get(name).file).stem}").check


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
        result["failures"] = check_function(name)(mod, rank, world, progress.write_text)
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
            failures = check_function(name)(load(path), 0, 1)
        except Exception as e:
            failures = [_describe(e, str(path))]
        lines.append(f"{'FAIL' if failures else 'ok  '} {name}")
    return not failures, lines + [f"  {f}" for f in failures]
