"""Run by tests/test_shm.py under torchrun with 4 ranks on one host. The shared-memory all-reduce
(copy and in place) over groups of 2, 3 and 4 ranks and the hierarchical one over all 4, on
lengths that are odd, prime or smaller than the group, three calls each (buffers and sequence
numbers reused), integer-valued data: every result must equal the exact sum. Then a barrier
that rank 1 never reaches: rank 0 must give up after its timeout, naming rank 1. Each rank
writes rank<r>.json into the folder given as the argument."""
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dtlab.collectives.hier import hier_all_reduce
from dtlab.collectives.shm import SharedBuffers, shm_all_reduce, shm_tensor

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
groups = {k: dist.new_group(list(range(k))) for k in (2, 3, 4)}
LENGTHS = (1, 2, 3, 7, 1023, 4097, 65537)
wrong, checked = [], 0


def check(what, k, fn, x, src):
    global checked
    want = src / (rank + 1) * (k * (k + 1) / 2)
    for call in range(3):
        x.copy_(src)
        fn(x)
        checked += 1
        if not torch.equal(x, want):
            wrong.append(f"{what} k={k} n={x.numel()} call {call}")


for k, g in groups.items():
    if rank >= k:
        continue
    for n in LENGTHS:
        src = (torch.arange(n) % 11).float() * (rank + 1)
        check("copy", k, lambda t: shm_all_reduce(t, group=g), src.clone(), src)
        check("inplace", k, lambda t: shm_all_reduce(t, group=g),
              shm_tensor(n, name=f"n{n}", group=g), src)
for n in LENGTHS:
    src = (torch.arange(n) % 11).float() * (rank + 1)
    check("hier", world, hier_all_reduce, src.clone(), src)

timeout = None
if rank < 2:
    sb = SharedBuffers(8, timeout_s=1.0, group=groups[2])
    if rank == 0:
        t0 = time.monotonic()
        try:
            sb.barrier()
        except RuntimeError as e:
            timeout = {"message": str(e), "after_s": time.monotonic() - t0}
dist.barrier()
Path(sys.argv[1], f"rank{rank}.json").write_text(
    json.dumps({"rank": rank, "checked": checked, "wrong": wrong, "timeout": timeout}))
dist.destroy_process_group()
