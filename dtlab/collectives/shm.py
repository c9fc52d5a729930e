"""All-reduce through shared memory, for ranks on one host: bounded by memory bandwidth, not by
a TCP loopback.

gloo moves data between processes on one machine through sockets: every byte is copied into the
kernel and out again, and the ring sends 2(W-1)/W of the tensor per rank. Processes on one host
can instead map the same pages. Each rank gets one buffer that every rank maps (a file in
/dev/shm, ``torch.from_file(shared=True)``), and the all-reduce becomes three memory passes:

    1. publish:  rank r copies its tensor into its own buffer B[r]                (S bytes)
    2. reduce:   rank r adds slice r of every other buffer into slice r of its own tensor,
                 then copies that reduced slice into B[r][r] for the others      (S + 2S/W)
    3. fetch:    rank r copies slice j from B[j][j], for every j != r           (S (W-1)/W)

with a barrier between the passes (a rank may only read what the others have finished writing)
and one after the last (so no rank overwrites its buffer for the next call while another still
reads it). Every rank reads and writes about 3S bytes whatever W is, against 2(W-1)/W * S sent
and received through the kernel for a gloo ring. The result is exactly gloo's for integers and
equal up to summation order otherwise (slice r starts from rank r's values).

When the tensor already lives in this rank's shared buffer (``shm_tensor``, the way DDP computes
gradients straight into its buckets), pass 1 disappears and pass 2 reduces in place: about 2.5S
bytes of memory traffic per rank instead of 5.5S, the least an all-reduce can do (every rank
writes S result bytes and reads the peers' halves); docs/communication.md has what that is worth
against gloo, measured.

The barriers are gloo's (a few tens of microseconds), so for small messages the library is as
fast; the gain is in bandwidth. DeepSpeed's CPU backend (``shm_comm``, used by
``deepspeed.comm.inference_all_reduce``) uses the same idea in C++ with spin-wait flags.
"""
from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from dtlab.core.errors import UsageError

SHM_DIR = Path("/dev/shm")


class SharedMemoryError(UsageError):
    """Not enough shared memory (or none usable) for the buffers; the message names the size
    needed and the fix."""


def _human(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


class SharedBuffers:
    """W buffers of ``numel`` elements, one per rank, every one mapped by every rank.

    The files live in a private folder (mode 0700, made by rank 0 with a random name) and are
    created exclusively (``O_EXCL | O_NOFOLLOW``, mode 0600), so another local user can neither
    read the data nor plant a file or link in its place. Their blocks are reserved with
    ``posix_fallocate`` before anything is mapped: a sparse file in a full tmpfs (Docker gives
    64 MiB by default) would map fine and then kill the process with SIGBUS at the first write;
    reserved, the shortage is an error that names the size and the fix, agreed by every rank.
    The names are unlinked as soon as every rank has mapped them, and in every failure path:
    nothing stays in /dev/shm, whatever happens after."""

    def __init__(self, numel: int, dtype: torch.dtype = torch.float32,
                 shm_dir: str | Path | None = None):
        root = Path(shm_dir or SHM_DIR)
        rank, world = dist.get_rank(), dist.get_world_size()
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        folder = None
        if rank == 0:
            folder = root / f"dtlab-{os.getuid()}-{secrets.token_hex(8)}"
            try:
                os.mkdir(folder, 0o700)
            except OSError as e:
                folder = f"error: cannot create a folder in {root} ({e.strerror})"
        box = [str(folder)]
        dist.broadcast_object_list(box, src=0)  # one private folder per group
        if box[0].startswith("error: "):
            raise SharedMemoryError(box[0][len("error: "):])
        folder = Path(box[0])
        names = [folder / f"rank{r}" for r in range(world)]
        problem = ""
        try:
            fd = os.open(names[rank], os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.posix_fallocate(fd, 0, max(1, nbytes))
            finally:
                os.close(fd)
        except OSError as e:
            problem = e.strerror or str(e)
        problems = [None] * world
        dist.all_gather_object(problems, problem)  # every rank learns whether all succeeded
        try:
            if any(problems):
                r = next(i for i, p in enumerate(problems) if p)
                free = shutil.disk_usage(root).free
                raise SharedMemoryError(
                    f"the shared-memory all-reduce needs {_human(world * nbytes)} in {root} "
                    f"({world} ranks x {_human(nbytes)}) and rank {r} got '{problems[r]}' "
                    f"({_human(free)} free there); give the container more shared memory "
                    "(docker run --shm-size=1g, or --ipc=host) or use smaller messages")
            self.buffers = [torch.from_file(str(n), shared=True, size=numel, dtype=dtype)
                            for n in names]
            dist.barrier()  # every rank has mapped every file: the names can go
        finally:
            names[rank].unlink(missing_ok=True)
            dist.barrier()
            if rank == 0:
                shutil.rmtree(folder, ignore_errors=True)
        self.numel, self.rank, self.world = numel, rank, world
        bounds = [numel * r // world for r in range(world + 1)]
        self.slices = [slice(bounds[r], bounds[r + 1]) for r in range(world)]


# Buffers are set up once per (size, type, folder) and reused: creating and mapping them costs
# more than a small all-reduce. A cache of resources, not state a run depends on.
_CACHE: dict[tuple, SharedBuffers] = {}


def _buffers(numel: int, dtype: torch.dtype, shm_dir=None) -> SharedBuffers:
    key = (numel, dtype, str(shm_dir or SHM_DIR))
    if key not in _CACHE:
        _CACHE[key] = SharedBuffers(numel, dtype, shm_dir)
    return _CACHE[key]


def shm_tensor(numel: int, dtype: torch.dtype = torch.float32, shm_dir=None) -> torch.Tensor:
    """This rank's shared buffer as an ordinary tensor. Compute into it (as DDP computes
    gradients into its buckets) and ``shm_all_reduce`` skips the publish pass: the peers read
    it where it is. Collective: every rank must call it with the same size."""
    sb = _buffers(numel, dtype, shm_dir)
    return sb.buffers[sb.rank]


def shm_all_reduce(x: torch.Tensor, counter=None, shm_dir=None) -> torch.Tensor:
    """Sum ``x`` over all ranks in place (all ranks must be on this host, x on the CPU)."""
    if x.device.type != "cpu":
        raise ValueError("shm_all_reduce works on CPU tensors of ranks on one host")
    flat = x.view(-1)
    sb = _buffers(flat.numel(), flat.dtype, shm_dir)
    mine, own = sb.buffers[sb.rank], sb.slices[sb.rank]
    if flat.data_ptr() == mine.data_ptr():
        # x already lives in my shared buffer (shm_tensor): reduce in place, two passes
        dist.barrier()                                 # every rank has written its tensor
        for r, b in enumerate(sb.buffers):
            if r != sb.rank:
                mine[own].add_(b[own])
        dist.barrier()
        for r, b in enumerate(sb.buffers):
            if r != sb.rank:
                mine[sb.slices[r]].copy_(b[sb.slices[r]])
        dist.barrier()
        if counter is not None:
            counter.record("all_reduce", x, sent_bytes=0)
        return x
    mine.copy_(flat)                                   # 1. publish my tensor
    dist.barrier()
    acc = flat[own]                                    # 2. reduce my slice, in my own tensor,
    for r, b in enumerate(sb.buffers):                 #    and publish the result
        if r != sb.rank:
            acc.add_(b[own])
    mine[own].copy_(acc)
    dist.barrier()
    for r, b in enumerate(sb.buffers):                 # 3. fetch every other reduced slice
        if r != sb.rank:
            flat[sb.slices[r]].copy_(b[sb.slices[r]])
    dist.barrier()
    if counter is not None:  # bytes this rank reads from the other ranks' buffers
        counter.record("all_reduce", x, sent_bytes=0)
    return x

