"""Exercise: gradients averaged in shared memory (docs/multiprocessing.md,
labs/torch_multiprocessing.py).

No process group, no network: W worker processes started with torch.multiprocessing share a
[W, P] table of float64 made with ``share_memory_()`` (passed to a process, a shared tensor
arrives as a handle to the same memory, not a copy). After its backward, worker ``rank`` holds
its flattened gradient ``grad`` (P numbers) and calls ``average_gradients``, which must return
the mean of every worker's gradient, the same in every worker.

Write ``average_gradients``. ``barrier`` is a multiprocessing Barrier for the W workers:
``barrier.wait()`` returns once all W have called it.

    dtlab check shm_averaging --impl shm_averaging.py

The checker starts 2, then 3 real worker processes that share one table and a barrier, and runs
3 rounds with fresh gradients; in every round worker r starts r x 0.2 s after worker 0, so a
worker that reads too early sees rows not written yet. It compares every worker's result with
the mean (tolerance 1e-12), checks that each worker's row holds its own gradient, and counts the
barrier waits. A barrier that is never reached times out after 20 s: an error, not a hang.

Hints
- Write your row only: ``table[rank].copy_(grad)``.
- Wait until every row is written before reading any of them.
- Sum the rows and divide by the world size (a sum is W times too large).
- Wait once more after reading: a fast worker's next round must not overwrite its row while a
  slow one still reads this round's.
"""
import torch


def average_gradients(grad: torch.Tensor, table: torch.Tensor, rank: int, world: int,
                      barrier) -> torch.Tensor:
    # TODO 1: write grad into this worker's row of the shared table
    # TODO 2: wait at the barrier (every row written), then average the rows
    # TODO 3: wait again (every row read) and return the average
    raise NotImplementedError("TODO: average_gradients (write my row, barrier, average, "
                              "barrier)")
