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

The passes are separated by barriers through shared memory too: each rank writes a sequence
number into its own flag (one cache line) after its data and reads the others' flags until they
show it, spinning first and then yielding the core. That costs a few microseconds where a gloo
barrier (a message round through the loopback) costs tens to hundreds, so small messages are
not slower than gloo's all-reduce either. DeepSpeed's CPU backend (``shm_comm``, used by
``deepspeed.comm.inference_all_reduce``) uses the same idea in C++.

Every function takes an optional process ``group`` (ranks of one node inside a larger job:
dtlab/collectives/hier.py); ranks and the slices are then the group's.
"""
from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dtlab.errors import UsageError

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
                 shm_dir: str | Path | None = None, timeout_s: float = 60.0, group=None):
        root = Path(shm_dir or SHM_DIR)
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        folder = None
        if rank == 0:
            folder = root / f"dtlab-{os.getuid()}-{secrets.token_hex(8)}"
            try:
                os.mkdir(folder, 0o700)
            except OSError as e:
                folder = f"error: cannot create a folder in {root} ({e.strerror})"
        try:
            self._map(folder, rank, world, numel, nbytes, dtype, root, group)
        finally:  # also when a peer died half-way and a collective here raised
            if rank == 0 and isinstance(folder, Path):
                shutil.rmtree(folder, ignore_errors=True)
        self.numel, self.rank, self.world = numel, rank, world
        self.global_ranks = [dist.get_global_rank(group, r) if group is not None else r
                             for r in range(world)]
        self.seq = 0
        self.timeout_s = timeout_s
        bounds = [numel * r // world for r in range(world + 1)]
        self.slices = [slice(bounds[r], bounds[r + 1]) for r in range(world)]

    def _map(self, folder, rank, world, numel, nbytes, dtype, root, group) -> None:
        """Every rank learns the folder, makes its two files, and maps everyone's; its own names
        are unlinked on the way out, whatever happened (rank 0 removes the folder)."""
        box = [str(folder)]
        dist.broadcast_object_list(box, group=group, group_src=0)  # a private folder a group
        if box[0].startswith("error: "):
            raise SharedMemoryError(box[0][len("error: "):])
        folder = Path(box[0])
        names = [folder / f"rank{r}" for r in range(world)]
        flag_names = [folder / f"flag{r}" for r in range(world)]
        problem = ""
        try:
            for name, size in ((names[rank], nbytes), (flag_names[rank], FLAG_BYTES)):
                fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                try:
                    os.posix_fallocate(fd, 0, max(1, size))
                finally:
                    os.close(fd)
        except OSError as e:
            problem = e.strerror or str(e)
        problems = [None] * world
        dist.all_gather_object(problems, problem, group=group)  # all learn if all succeeded
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
            self.flags = [torch.from_file(str(n), shared=True, size=FLAG_BYTES // 8,
                                          dtype=torch.int64) for n in flag_names]
            dist.barrier(group=group)  # every rank has mapped every file: names can go
        finally:
            names[rank].unlink(missing_ok=True)
            flag_names[rank].unlink(missing_ok=True)

    def barrier(self) -> None:
        """Wait until every rank has reached this point, through the flags in shared memory:
        rank r writes the call's sequence number into its own flag (after its data: x86 keeps
        stores in order), then reads the others' until each shows the number. A few
        microseconds where gloo's barrier costs tens; spins first, then yields the core, and
        gives up after ``timeout_s`` naming the rank that never came."""
        self.seq += 1
        seq, me = self.seq, self.rank
        self.flags[me][0] = seq
        deadline, spins = None, 0
        # spinning only pays when every rank has a core; oversubscribed, yield at once. The
        # whole job counts: the nodes of the namespace cluster share this machine's cores.
        spin = SPIN if dist.get_world_size() <= (os.cpu_count() or 1) else 0
        for r, flag in enumerate(self.flags):
            while r != me and int(flag[0]) < seq:
                spins += 1
                if spins > spin:
                    if deadline is None:
                        deadline = time.monotonic() + self.timeout_s
                    elif time.monotonic() > deadline:
                        raise RuntimeError(
                            f"shared-memory barrier {seq}: rank {self.global_ranks[r]} did not "
                            f"arrive within "
                            f"{self.timeout_s:g} s (it stopped or is in another collective)")
                    time.sleep(0 if spins < 4 * spin + 100 else 50e-6)


FLAG_BYTES = 64   # one cache line per rank's flag: no two ranks write the same line
SPIN = 20000      # busy reads (about a microsecond each) before yielding the core


# Buffers are set up once per (size, type, folder) and reused: creating and mapping them costs
# more than a small all-reduce. A cache of resources, not state a run depends on.
_CACHE: dict[tuple, SharedBuffers] = {}


def _buffers(numel: int, dtype: torch.dtype, shm_dir=None, name=None,
             group=None) -> SharedBuffers:
    key = (numel, dtype, str(shm_dir or SHM_DIR), name, id(group))
    if key not in _CACHE:
        _CACHE[key] = SharedBuffers(numel, dtype, shm_dir, group=group)
    return _CACHE[key]


def shm_tensor(numel: int, dtype: torch.dtype = torch.float32, shm_dir=None,
               name=None, group=None) -> torch.Tensor:
    """This rank's shared buffer as an ordinary tensor. Compute into it (as DDP computes
    gradients into its buckets) and ``shm_all_reduce`` skips the publish pass: the peers read
    it where it is. ``name`` tells apart buffers of the same size (DDP's buckets). Collective:
    every rank must call it with the same size and name."""
    sb = _buffers(numel, dtype, shm_dir, name, group)
    return sb.buffers[sb.rank]


def buffers_for(flat: torch.Tensor, shm_dir=None, group=None) -> SharedBuffers:
    """The buffers ``flat`` is this rank's buffer of (made by ``shm_tensor``), or else the
    group's buffers for its size and type."""
    for sb in _CACHE.values():
        if sb.buffers[sb.rank].data_ptr() == flat.data_ptr() and sb.numel == flat.numel():
            return sb
    return _buffers(flat.numel(), flat.dtype, shm_dir, group=group)


def shm_all_reduce(x: torch.Tensor, counter=None, shm_dir=None, group=None) -> torch.Tensor:
    """Sum ``x`` over the group's ranks in place (all on this host, x on the CPU)."""
    if x.device.type != "cpu":
        raise ValueError("shm_all_reduce works on CPU tensors of ranks on one host")
    flat = x.view(-1)
    sb = buffers_for(flat, shm_dir, group)
    mine, own = sb.buffers[sb.rank], sb.slices[sb.rank]
    if flat.data_ptr() == mine.data_ptr():
        # x already lives in my shared buffer (shm_tensor): reduce in place, two passes
        sb.barrier()                                 # every rank has written its tensor
        for r, b in enumerate(sb.buffers):
            if r != sb.rank:
                mine[own].add_(b[own])
        sb.barrier()
        for r, b in enumerate(sb.buffers):
            if r != sb.rank:
                mine[sb.slices[r]].copy_(b[sb.slices[r]])
        sb.barrier()
        if counter is not None:
            counter.record("all_reduce", x, sent_bytes=0)
        return x
    mine.copy_(flat)                                   # 1. publish my tensor
    sb.barrier()
    acc = flat[own]                                    # 2. reduce my slice, in my own tensor,
    for r, b in enumerate(sb.buffers):                 #    and publish the result
        if r != sb.rank:
            acc.add_(b[own])
    mine[own].copy_(acc)
    sb.barrier()
    for r, b in enumerate(sb.buffers):                 # 3. fetch every other reduced slice
        if r != sb.rank:
            flat[sb.slices[r]].copy_(b[sb.slices[r]])
    sb.barrier()
    if counter is not None:  # bytes this rank reads from the other ranks' buffers
        counter.record("all_reduce", x, sent_bytes=0)
    return x


