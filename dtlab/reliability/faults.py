"""Injected faults and the diagnosis of a failed collective.

Faults (for learning what a job does when a rank goes wrong, and for the tests that prove it):

- ``--fail-at-step K --fail-rank R``: rank R kills itself with SIGKILL at the start of step K
  (``--fail-in checkpoint``: in the middle of writing the checkpoint due after step K, with its
  shard on disk under the temporary name). Only on the first attempt (torchrun's
  TORCHELASTIC_RESTART_COUNT is 0), so a job started with ``--max-restarts 1`` comes back, resumes
  from the last complete checkpoint and finishes.
- ``--stall-at-step K --stall-rank R``: rank R stops (sleeps) at the start of step K. The others
  wait in their next collective until the process-group timeout (``--timeout``) and the job ends
  with an error naming the silent rank and the operation.

Naming the rank: every rank writes a heartbeat (its step and the time) into the job's key-value
store at the start of every step. A rank whose collective fails writes which operation failed and
waits a moment for the others to do the same; the ranks that wrote nothing are the ones that
stopped. The store is torchrun's (it lives in the launcher, not in a rank), so it still answers
when a rank is stuck.
"""
from __future__ import annotations

import linecache
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from dtlab.reliability import flight
from dtlab.measure import run_record as record

# Text of the exceptions gloo and NCCL raise when a peer is silent or gone.
COMM_FAILURE_MARKERS = ("Timed out", "timed out", "Connection closed", "Connection reset",
                        "Broken pipe", "NCCL communicator was aborted", "DistBackendError")
REPORT_WAIT_S = 1.0  # how long a failed rank waits for the others to report their own failure
DUMP_WAIT_S = 3.0    # and for every rank's flight record (dtlab/reliability/flight.py)
STORE_WAIT_S = 5.0   # the most the store may take to answer those questions


@dataclass
class FaultPlan:
    fail_at_step: int | None = None
    fail_rank: int = 0
    fail_in: str = "step"  # step | checkpoint
    stall_at_step: int | None = None
    stall_rank: int = 0
    mismatch_at_step: int | None = None
    mismatch_rank: int = 0

    def check(self, world: int, steps: int, ckpt_dir: str | None) -> str | None:
        """An error message for impossible settings, or None."""
        for flag, step, rank in (("--fail", self.fail_at_step, self.fail_rank),
                                 ("--stall", self.stall_at_step, self.stall_rank),
                                 ("--mismatch", self.mismatch_at_step, self.mismatch_rank)):
            if step is None:
                continue
            if not 0 <= step < steps:
                return f"{flag}-at-step must be in 0..{steps - 1} (--steps is {steps}), got {step}"
            if not 0 <= rank < world:
                return f"{flag}-rank must be in 0..{world - 1} for {world} process(es), got {rank}"
        if self.fail_in == "checkpoint" and self.fail_at_step is not None and not ckpt_dir:
            return "--fail-in checkpoint needs --ckpt-dir (there is no checkpoint to interrupt)"
        return None

    def before_step(self, rt, step: int) -> None:
        """At the start of every step: the heartbeat, and the injected fault if it is due."""
        heartbeat(rt.rank, step)
        if self.fail_at_step == step and self.fail_in == "step" and rt.rank == self.fail_rank \
                and first_attempt():
            die(rt.rank, f"--fail-at-step {step}")
        if self.stall_at_step == step and rt.rank == self.stall_rank:
            stall(rt.rank, step, rt.timeout_s)
        if self.mismatch_at_step == step and rt.rank == self.mismatch_rank and rt.distributed:
            mismatch(rt.rank, step)


def first_attempt() -> bool:
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"


def die(rank: int, why: str) -> None:
    print(f"[rank {rank}] injected failure: {why}; SIGKILL", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no process group, or a torch without this private accessor
        return None


def heartbeat(rank: int, step: int) -> None:
    store = _store()
    if store is not None:
        store.set(f"dtlab/hb/{rank}", f"{step} {time.time():.3f}")


def stall(rank: int, step: int, timeout_s: float) -> None:
    """Stop answering; give up after long enough that the others must have noticed."""
    print(f"[rank {rank}] injected stall at step {step}: not answering any collective",
          file=sys.stderr, flush=True)
    time.sleep(3 * timeout_s + 10)
    print(f"[rank {rank}] injected stall: nobody ended the job, leaving", file=sys.stderr,
          flush=True)
    os._exit(4)


def mismatch(rank: int, step: int) -> None:
    """Issue a collective no other rank issues (an all-reduce of 7 floats): from here on this
    rank's sequence of collectives differs from the others', as when one rank takes another
    branch of the code. The next collective of the others pairs with this one."""
    import torch
    print(f"[rank {rank}] injected mismatch at step {step}: an extra all_reduce of 7 floats",
          file=sys.stderr, flush=True)
    dist.all_reduce(torch.zeros(7))


def is_comm_failure(e: BaseException) -> bool:
    text = f"{type(e).__name__}: {e}"
    return isinstance(e, RuntimeError) and any(m in text for m in COMM_FAILURE_MARKERS)


def failed_op(e: BaseException) -> tuple[str, str]:
    """(collective, call site): the innermost torch.distributed function in the traceback and
    the innermost frame of our own code that called into torch."""
    op, site = "a collective", "?"
    for frame, lineno in traceback.walk_tb(e.__traceback__):
        path = frame.f_code.co_filename
        if path.endswith("distributed_c10d.py"):
            op = frame.f_code.co_name
        elif (at := max(path.rfind("/labs/"), path.rfind("/dtlab/"))) >= 0 and \
                not path.endswith(("reliability/faults.py", "reliability/flight.py")):
            code = linecache.getline(path, lineno).strip()
            site = f"{path[at + 1:]}:{lineno}" + (f" `{code}`" if code else "")
    if op == "a collective" and "running the callback" in str(e):
        op = "all_reduce of a DDP gradient bucket (torch DDP's reducer, in backward)"
    return op, site


def diagnose(e: BaseException, rank: int, world: int, step: int | None,
             timeout_s: float) -> dict:
    """What failed, where, and which ranks stopped (those that did not report a failure)."""
    op, site = failed_op(e)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    kind = "timeout" if "imed out" in first else "peer lost"
    info = {"kind": kind, "op": op, "site": site, "step": step, "rank": rank,
            "timeout_s": timeout_s, "error": first[:300], "silent_ranks": [], "last_seen": {}}
    store = _store()
    if store is None:
        return info
    now = time.time()

    def ask() -> dict:
        silent, seen = [], {}
        store.set(f"dtlab/failed/{rank}", op)
        time.sleep(REPORT_WAIT_S)
        for r in range(world):
            if not store.check([f"dtlab/failed/{r}"]):
                silent.append(r)
            if store.check([f"dtlab/hb/{r}"]):
                s, t = store.get(f"dtlab/hb/{r}").decode().split()
                seen[r] = {"step": int(s), "seconds_ago": round(now - float(t), 2)}
        return {"silent_ranks": silent, "last_seen": seen}

    # In a thread with a deadline: across a dead link the store's socket blocks in recv for as
    # long as TCP retransmits (many minutes), and this rank must still end.
    box: dict = {}

    def run() -> None:
        try:
            box["answer"] = ask()
        except Exception:  # the store itself is gone (the launcher is tearing the job down)
            pass

    asker = threading.Thread(target=run, daemon=True)
    asker.start()
    asker.join(REPORT_WAIT_S + STORE_WAIT_S)
    if "answer" in box:
        info.update(box["answer"])
    elif asker.is_alive():
        info["store_unreachable"] = True
    return info


def describe(info: dict) -> str:
    silent = info["silent_ranks"]
    who = (f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} stopped "
           f"responding" if silent else "a peer failed")
    seen = "; ".join(f"rank {r} last started step {v['step']} {v['seconds_ago']:.1f} s ago"
                     for r, v in info["last_seen"].items() if r in silent)
    how = (f"gave up after the {info['timeout_s']:g} s timeout" if info["kind"] == "timeout"
           else "lost its connection")
    return (f"{who}: rank {info['rank']} {how} in {info['op']} ({info['site']}) at step "
            f"{info['step']} ({info['error']})"
            + (f"; {seen}" if seen else "") +
            ". Look at that rank's log; raise --timeout if its step is legitimately slow")


def report_failure(strategy, lab: str, e: BaseException) -> int:
    """A collective failed (a silent or dead rank): say which rank and which operation, record
    the failure in the run record, exit status 3."""
    rt, out = strategy.rt, strategy.settings.out
    since = time.time()
    if strategy.flight is not None:  # this rank's record, and a request to every other rank's
        op, site = failed_op(e)
        kind = "timed out" if "imed out" in str(e) else "lost its peer"
        flight.write_dump(strategy.flight, out, f"failed: {type(e).__name__}",
                          {"op": op, "site": site.split(" `")[0], "failed": kind})
        flight.request_dumps(out)
    info = diagnose(e, rt.rank, rt.world_size, strategy.current_step, rt.timeout_s)
    reporters = [r for r in range(rt.world_size) if r not in info["silent_ranks"]]
    if rt.rank == (reporters[0] if reporters else 0):
        print(f"dtlab: error: {describe(info)}", file=sys.stderr, flush=True)
        if strategy.flight is not None:
            dumps = flight.collect(out, rt.world_size, since, DUMP_WAIT_S)
            info["desync"] = flight.desync_report(dumps, rt.world_size)
            for line in flight.describe_report(info["desync"]):
                print(f"dtlab:   {line}", file=sys.stderr, flush=True)
            print(f"dtlab:   flight records and stacks: {flight.flight_dir(out)}",
                  file=sys.stderr, flush=True)
        losses, steps = strategy.trajectory
        strategy.lab = lab
        summary = record.build_summary(
            strategy, losses, {"ok": None, "note": "the run failed before the comparison"},
            failure=info, ok=False)
        record.write_record(Path(strategy.settings.out), summary, steps)
    return 3
