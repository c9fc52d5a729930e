"""Running one lab the way ``dtlab run`` does: check the request before any process starts, start
torchrun on a free port, read the run record, print the result table.

Labs are reached through the registry only: ``Lab.module`` names the module whose parser and
checks validate the flags, and torchrun runs it (``-m labs.<name>``).
"""
from __future__ import annotations

import importlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dtlab import registry
from dtlab.cluster.netns import Cluster, node_argv
from dtlab.launch import sessions
from dtlab.plan.memory_estimate import Arch, Setup, activation_bytes
from dtlab.reliability import flight
from dtlab.reliability import checkpoint as ckpt
from dtlab.train.data import check_divisible
from dtlab.errors import UsageError
from dtlab.measure.run_record import atomic_write_text, describe_nonfinite, read_summary
from dtlab.reliability.options import lab_flags, plans_from_args
from dtlab.train.settings import settings_from_args
from dtlab.train.model import ToyGPT
from dtlab.report.pictures import draw_run_pictures
from dtlab.report.tables import print_table


def opt_value(args: list[str], flag: str) -> str | None:
    """The value of ``--flag V`` or ``--flag=V`` in a forwarded argument list."""
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def without_opt(args: list[str], flag: str) -> list[str]:
    """``args`` minus ``--flag V`` / ``--flag=V``."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def get_lab(name: str) -> registry.Lab:
    try:
        return registry.get(name)
    except KeyError as e:
        raise UsageError(e.args[0]) from None


def validate(lab: registry.Lab, nproc: int, lab_args: list[str]) -> None:
    """Everything that can be checked before processes start; raises UsageError."""
    if nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {nproc}")
    if (msg := lab.check_world(nproc)):
        raise UsageError(f"{msg}; use --nproc {lab.min_world}" if lab.max_world == lab.min_world
                         else f"{msg}; choose --nproc in {lab.world_text()}")
    if lab.gpu_only:
        if not torch.cuda.is_available():
            raise UsageError(f"lab {lab.name!r} needs CUDA: {lab.gpu_only}")
    if (missing := lab.missing()):
        raise UsageError(f"lab {lab.name!r} needs {', '.join(missing)}; install it with "
                         f"pip install -c constraints.txt -e '.[{lab.extra or 'all'}]'")
    mod = importlib.import_module(lab.module)
    args = mod.make_parser().parse_args(lab_args)  # argparse prints usage and exits 2 itself
    settings = settings_from_args(args)
    if lab.data_parallel:
        check_divisible(settings.batch_size, nproc)
    if hasattr(mod, "check_args"):
        mod.check_args(args, settings, nproc)
    check_checkpoint_dir(lab, nproc, settings, args)
    check_memory(lab, nproc, settings, args)


PROCESS_BYTES = 400 * 2**20  # what a rank holds before any tensor: torch, its libraries, Python


def available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(lab: registry.Lab, nproc: int, settings, args) -> None:
    """A run whose ranks cannot fit in this machine's memory is refused before it starts (the
    kernel's OOM killer would otherwise end it, with no word of why). Counted with dtlab
    memory's estimate: every rank's activations for its rows, its model states (16 bytes a
    parameter with AdamW in fp32) and the process itself; on the CPU only (a GPU's memory is
    the device's)."""
    if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        return
    have = available_bytes()
    if have is None:
        return
    cfg = settings.model
    rows = settings.batch_size // nproc if lab.data_parallel else settings.batch_size
    params = ToyGPT.count_params(cfg)
    acts = activation_bytes(Setup(params=params, precision="fp32", batch=max(1, rows),
                                  seq_len=cfg.seq_len, arch=Arch(cfg.n_layer, cfg.d_model,
                                  cfg.n_head, cfg.d_ff, cfg.vocab_size, cfg.seq_len)), False)
    per_rank = acts + 16 * params + PROCESS_BYTES
    if nproc * per_rank > have:
        gib = 2**30
        raise UsageError(
            f"--batch-size {settings.batch_size} (preset {settings.preset}) needs about "
            f"{nproc * per_rank / gib:.1f} GiB: {nproc} rank(s) x ({acts / gib:.2f} GiB of "
            f"activations + {16 * params / gib:.2f} GiB of model states + "
            f"{PROCESS_BYTES / gib:.1f} GiB for the process), and this machine has "
            f"{have / gib:.1f} GiB available; use a smaller --batch-size or --preset, or "
            "fewer processes")


def check_checkpoint_dir(lab: registry.Lab, nproc: int, settings, args) -> None:
    """The reliability flags, and a --ckpt-dir that holds another run's checkpoint, before any
    process starts (the lab checks again when it loads)."""
    plan, _ = plans_from_args(args, settings, nproc, lab.name, lab.no_checkpoint)
    if plan.ckpt_dir is None:
        return
    found = ckpt.latest(Path(plan.ckpt_dir))
    if found is not None:  # the lab checks again when it loads, and says how it reshards
        folder, manifest = found
        ckpt.check_compatible(manifest, folder, ckpt.checkpoint_identity(
            lab.name, "", nproc, settings, lab_flags(args)), settings.steps)


@dataclass(frozen=True)
class Placement:
    """Where a job's processes run: ``nproc`` per node on this machine (``nnodes`` 1), or on
    ``nnodes`` nodes of the namespace cluster ``cluster`` (dtlab cluster up)."""
    nproc: int = 1
    nnodes: int = 1
    cluster: str = "main"

    @property
    def world(self) -> int:
        return self.nproc * self.nnodes


def torchrun(module: str, module_args: list[str], where: Placement, log: Path | None = None,
             max_restarts: int = 0, env: dict | None = None,
             run_timeout: float | None = None, in_process: bool = False) -> int:
    """torchrun for ``python -m module``: one agent on a free local port (``--standalone``),
    or one agent inside each cluster node meeting at a c10d rendezvous on the first node.
    Returns the exit status (the first failing node's; 124 past ``run_timeout`` seconds).

    A wait that does not end with the job (its deadline, Ctrl-C, SIGTERM, an error here) ends
    every process the job started: the agents and their ranks, each in a session of its own,
    are found by the job's variable (``sessions.Job``) and stopped.

    ``in_process`` (one node, no deadline: ``dtlab run``, the tour) runs the agent in this
    process instead of a new Python, which would import torch again (about 2 s of every run
    here)."""
    job = sessions.Job()
    env = job.env(dict(os.environ, **(env or {})))
    # Oversubscribing a small machine with torch's default thread pools makes every rank slower
    # (and stalls whole steps for a second when a spinning thread holds a core another rank's
    # collective waits on): the ranks share this machine's cores, or their node's when pinned.
    cores = (os.cpu_count() or 1) // where.nnodes
    nodes = []
    if where.nnodes > 1:
        c = Cluster.load(where.cluster)
        if c.nodes < where.nnodes:
            raise UsageError(f"--nnodes {where.nnodes}: cluster {c.name!r} has {c.nodes} "
                             "nodes; bring up more with dtlab cluster up --nodes N")
        nodes = c.all_nodes()[:where.nnodes]
        cores = c.cores_per_node or max(1, cores)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // where.nproc)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    base = [sys.executable, "-m", "dtlab.launch.torchrun", f"--nproc_per_node={where.nproc}",
            f"--max-restarts={max_restarts}"]
    tail = ["-m", module, *module_args]
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "w") if log is not None else None
    deadline = None if run_timeout is None else time.monotonic() + run_timeout
    procs: list[subprocess.Popen] = []
    ended = False
    try:
        with sessions.terminate_raises():
            if not nodes and in_process and deadline is None:
                rc = _agent_here([*base[3:], "--standalone", *tail], env, out)
                ended = True
                return rc
            if not nodes:  # in this terminal's process group: Ctrl-C reaches the agent too
                procs.append(subprocess.Popen([*base, "--standalone", *tail], env=env,
                                              stdout=out, stderr=subprocess.STDOUT if out else None))
                codes = wait_nodes(procs, ["this machine"], deadline=deadline)
            else:
                port = 20000 + secrets.randbelow(20000)  # inside the first node's namespace: free
                rdzv = [f"--nnodes={len(nodes)}", "--rdzv-backend=c10d",
                        f"--rdzv-endpoint={nodes[0].name}:{port}",
                        f"--rdzv-id={secrets.token_hex(4)}"]
                for n in nodes:
                    procs.append(subprocess.Popen(node_argv(c, n, [*base, *rdzv, *tail]),
                                                  env=env, stdout=out, start_new_session=True,
                                                  stderr=subprocess.STDOUT if out else None))
                codes = wait_nodes(procs, [n.name for n in nodes], deadline=deadline)
        if codes is None:
            print(f"dtlab: the run did not end within --run-timeout {run_timeout:g} s; stopped it",
                  file=sys.stderr, flush=True)
            return 124
        ended = True
        return next((rc for rc in codes if rc), 0)
    finally:
        # Past the deadline, interrupted or failed here: nothing of the job outlives this call.
        # A job that ended by itself is left to finish its own clean-up (torch's shared-memory
        # manager outlives the ranks for a moment and removes their /dev/shm files; killed, it
        # would leave them).
        if not ended:
            job.stop()
        for p in procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if out is not None:
            out.close()


def _agent_here(argv: list[str], env: dict, out) -> int:
    """torchrun's agent in this process, with ``env`` as the environment its workers inherit;
    with ``out`` (a file) the agent's and the workers' output go there (file descriptors 1 and
    2 point to it meanwhile)."""
    from dtlab.launch import torchrun as agent
    saved, fds = dict(os.environ), None
    sys.stdout.flush()
    sys.stderr.flush()
    if out is not None:
        fds = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    os.environ.clear()
    os.environ.update(env)
    try:
        return agent.main(argv)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        if fds is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, target in zip(fds, (1, 2)):
                os.dup2(fd, target)
                os.close(fd)


NODE_GRACE_S = 20.0        # after one node's agent ended well, how long the others get to end
NODE_GRACE_FAILED_S = 8.0  # ... after it failed: the others' ranks see the failure at once
TERM_WAIT_S = 5.0          # SIGTERM, then SIGKILL this much later


def wait_nodes(procs: list[subprocess.Popen], names: list[str], grace: float = NODE_GRACE_S,
               deadline: float | None = None,
               grace_failed: float = NODE_GRACE_FAILED_S) -> list[int] | None:
    """Wait for every node's agent. Once one has ended, the others get ``grace`` seconds (their
    ranks finish: rank 0's node, comparing with the baseline, often ends last), or
    ``grace_failed`` when the first one failed (the others' ranks lost a peer and report at
    once: their flight records are written by then); an agent still alive then is cut off from
    the first node (a pulled link, a dead peer: torchrun's agent waits on the rendezvous store
    for many minutes, even after its ranks succeeded, and ignores SIGTERM while it does), so its
    whole session is stopped: SIGTERM, then SIGKILL TERM_WAIT_S later. None when ``deadline``
    (time.monotonic) passes first."""
    ended_at = None
    while any(p.poll() is None for p in procs):
        if deadline is not None and time.monotonic() > deadline:
            return None
        if ended_at is None and any(p.returncode is not None for p in procs):
            ended_at = time.monotonic()
            if any(p.returncode not in (None, 0) for p in procs):
                grace = min(grace, grace_failed)
        if ended_at is not None and time.monotonic() - ended_at > grace:
            first = next(n for p, n in zip(procs, names) if p.returncode is not None)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for p, n in zip(procs, names):
                    if p.poll() is None:
                        if sig == signal.SIGTERM:
                            print(f"dtlab: the agent on {n} was still running {grace:g} s after "
                                  f"the one on {first} ended (a link down or a hung peer); "
                                  "stopping it", file=sys.stderr, flush=True)
                        try:
                            os.killpg(p.pid, sig)
                        except ProcessLookupError:
                            pass
                try:
                    for p in procs:
                        p.wait(timeout=TERM_WAIT_S)
                    break
                except subprocess.TimeoutExpired:
                    continue
            break
        time.sleep(0.2)
    return [p.returncode if p.poll() is not None else -signal.SIGKILL for p in procs]


def launch(lab: registry.Lab, nproc: int, lab_args: list[str], log: Path | None = None,
           max_restarts: int = 0, env: dict | None = None, nnodes: int = 1,
           cluster: str = "main", run_timeout: float | None = None) -> int:
    """A lab under torchrun (see ``torchrun``). With ``max_restarts`` torchrun restarts every
    rank when one dies (the lab resumes from its newest checkpoint when given --ckpt-dir)."""
    return torchrun(lab.module, lab_args, Placement(nproc, nnodes, cluster), log, max_restarts,
                    env, run_timeout, in_process=nnodes == 1)


def flight_postmortem(out: Path, world: int) -> None:
    """The desync report of a failed run from what its ranks left in ``out/flight`` (when no
    rank lived to print it: a rank aborted, the launcher stopped the others)."""
    dumps = flight.postmortem(out)
    if not dumps:
        return
    rep = flight.desync_report(dumps, world)
    for line in flight.describe_report(rep):
        print(f"dtlab:   {line}", file=sys.stderr)
    path = flight.flight_dir(out) / "report.json"
    atomic_write_text(path, json.dumps(rep, indent=1, default=str) + "\n")
    print(f"dtlab:   flight records: {flight.flight_dir(out)}", file=sys.stderr, flush=True)


def run_one(name: str, nproc: int | None, lab_args: list[str], max_restarts: int = 0,
            nnodes: int = 1, cluster: str = "main", run_timeout: float | None = None) -> int:
    """``dtlab run``: validate, launch, print the result; the exit status says the verdict
    (0 within tolerance, 1 outside or failing its checks, 2 bad input, 3 a failed collective).
    With ``nnodes`` > 1, ``nproc`` processes on each of that many cluster nodes."""
    lab = get_lab(name)
    if nnodes < 1:
        raise UsageError(f"--nnodes must be >= 1, got {nnodes}")
    nproc = (lab.tour_nproc if nnodes == 1 else 1) if nproc is None else nproc
    world = nproc * nnodes
    if opt_value(lab_args, "--out") is None:
        lab_args = [*lab_args, "--out", f"runs/{lab.name}-n{world}" +
                    (f"-{nnodes}nodes" if nnodes > 1 else "")]
    if max_restarts < 0:
        raise UsageError(f"--max-restarts must be >= 0, got {max_restarts}")
    if run_timeout is not None and not run_timeout > 0:
        raise UsageError(f"--run-timeout must be a number of seconds > 0, got {run_timeout:g}")
    validate(lab, world, lab_args)
    out = Path(opt_value(lab_args, "--out"))
    ckpt.FolderLock(out, "--out").acquire().release()  # refused now if another run holds it
    (out / "summary.json").unlink(missing_ok=True)
    shutil.rmtree(out / "flight", ignore_errors=True)  # the flight records are this run's
    rc = launch(lab, nproc, lab_args, max_restarts=max_restarts, nnodes=nnodes, cluster=cluster,
                run_timeout=run_timeout)
    if not (out / "summary.json").is_file():
        print(f"dtlab: {lab.name} ended with exit status {rc} and wrote no run record "
              f"(see the output above)", file=sys.stderr)
        flight_postmortem(out, world)
        return rc or 1
    summary = read_summary(out)
    if "failure" in summary:  # the lab said what failed on stderr; the record keeps it
        print(f"dtlab: {lab.name} failed at step {summary['failure']['step']} "
              f"({summary['failure']['kind']} in {summary['failure']['op']}); "
              f"record: {out / 'summary.json'}", file=sys.stderr)
        if "desync" not in summary["failure"]:
            flight_postmortem(out, world)
        return rc or 3
    print_table([summary])
    draw_run_pictures(out)  # the lab recorded what it did; its pictures are drawn from that
    if not summary["ok"]:
        if summary.get("nonfinite"):
            why = "diverged: " + describe_nonfinite(summary["nonfinite"])
        elif summary["baseline"]["ok"] is False:
            why = "OUTSIDE its tolerance " + str(summary["baseline"]["tolerance"])
        else:
            why = "failing its own checks (see extra)"
        print(f"dtlab: {lab.name} is {why}", file=sys.stderr)
        return 1
    return rc
