"""Process-group setup and teardown, backend and device choice, seeding, rank-0 logging.

A lab calls :func:`init` once. Under torchrun (or srun/deepspeed, which export the same
variables) it reads RANK, WORLD_SIZE and LOCAL_RANK and joins the process group; without them it
is a plain single process. The backend is NCCL with ``cuda:LOCAL_RANK`` when CUDA is present,
gloo on the CPU otherwise; ``--backend``/``--device`` (or DTLAB_BACKEND/DTLAB_DEVICE) override.
Every process group gets a finite timeout, so a rank that never arrives ends the run with an
error instead of a hang.
"""
from __future__ import annotations

import datetime as _dt
import os
import random
import sys
from typing import NoReturn
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from dtlab.errors import UsageError

DEFAULT_TIMEOUT_S = 60.0


class RuntimeSetupError(RuntimeError):
    """The process group could not be formed; the message says why and what to check."""


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "none"
    device: torch.device = torch.device("cpu")
    timeout_s: float = DEFAULT_TIMEOUT_S

    distributed: bool = False  # True once this process has joined a process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, *msg, all_ranks: bool = False) -> None:
        """Print on rank 0 (or on every rank, prefixed with the rank)."""
        if all_ranks:
            print(f"[rank {self.rank}]", *msg, flush=True)
        elif self.rank == 0:
            print(*msg, flush=True)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def choose_backend_device(backend: str | None, device: str | None,
                          local_rank: int) -> tuple[str, torch.device]:
    backend = backend or os.environ.get("DTLAB_BACKEND") or None
    device = device or os.environ.get("DTLAB_DEVICE") or None
    if device is None:
        if backend == "gloo" or not torch.cuda.is_available():
            device = "cpu"
        else:
            device = f"cuda:{local_rank % torch.cuda.device_count()}"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available here; use --device cpu")
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise UsageError("--backend nccl needs CUDA devices; use --backend gloo on the CPU")
    return backend, dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init(backend: str | None = None, device: str | None = None,
         timeout_s: float = DEFAULT_TIMEOUT_S, seed: int = 0) -> Runtime:
    """Join the process group described by the environment (or stay a single process)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    be, dev = choose_backend_device(backend, device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    seed_everything(seed)
    rt = Runtime(rank=rank, world_size=world, local_rank=local_rank, backend="none",
                 device=dev, timeout_s=timeout_s)
    if "WORLD_SIZE" not in env:
        return rt
    if timeout_s <= 0:
        raise RuntimeSetupError(f"--timeout must be > 0 seconds, got {timeout_s}")
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in env:
            raise RuntimeSetupError(f"{var} is not set; start the lab with torchrun (or set "
                                    "MASTER_ADDR and MASTER_PORT for every rank)")
    try:
        timeout = _dt.timedelta(seconds=timeout_s)
        attempt = env.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is None:
            dist.init_process_group(be, rank=rank, world_size=world, timeout=timeout)
        else:
            # Under torchrun the key-value store is the launcher's and outlives a restart. gloo
            # publishes each rank's address in it under fixed keys, so a restarted rank could
            # read its peer's address from the failed attempt and connect to a dead port. A
            # prefix per attempt keeps every attempt's keys apart.
            store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
            store = dist.PrefixStore(f"dtlab/attempt-{attempt}", store)
            dist.init_process_group(be, store=store, rank=rank, world_size=world,
                                    timeout=timeout)
        # A first collective proves every rank is here; with gloo this also bounds the wait.
        dist.barrier()
    except Exception as e:  # the torch error text is long; keep its first line as the cause
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeSetupError(
            f"rank {rank}: the process group of {world} ranks did not form within "
            f"{timeout_s:g} s (backend {be}, master {env['MASTER_ADDR']}:{env['MASTER_PORT']}): "
            f"{first[:200].rstrip('.')}. Check that every rank was started and can reach the master, or "
            f"raise --timeout") from None
    rt.backend, rt.distributed = be, True
    return rt


def shutdown(rt: Runtime) -> None:
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # teardown after an error must not mask that error
            pass
    release_deepspeed_shm(rt.rank)
    rt.distributed = False


def release_deepspeed_shm(rank: int) -> None:
    """Remove this rank's buffer of DeepSpeed's CPU all-reduce (its ``shm_comm`` op, set up by
    ``deepspeed.init_distributed`` when every rank is on one host). DeepSpeed creates one 66 MiB
    file a rank in /dev/shm and never unlinks it: every run on a CPU would leave them behind
    until the machine restarts. At shutdown every peer mapped it long ago (they all do so while
    initialising), so the name can go; the memory goes with the last process that maps it."""
    if "deepspeed" not in sys.modules:
        return
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except OSError:
        pass


def exit_now(code: int) -> NoReturn:
    """Leave a launched rank without the interpreter's teardown, once everything is written and
    the group destroyed: C++ objects that libraries keep in Python globals (gloo contexts, device
    meshes, DeepSpeed's communication backend) can abort the process from their destructors
    ("terminate called without an active exception"), turning a correct run into a failed one."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


