"""Exercise: DDP's gradient buckets, all-reduced while backward runs (docs/ddp.md, labs/ddp.py).

Data parallelism averages every gradient over the ranks after backward. Waiting for backward to
end and then all-reducing wastes the time backward takes: the last layers' gradients are ready
first, so DDP packs gradients into buckets in reverse parameter order and launches each bucket's
all-reduce (asynchronously) as soon as its last gradient is ready, while backward goes on with
the earlier layers. Before the optimizer step it waits for every bucket and divides by the world
size. With gradient accumulation, the backwards of all but the last micro-batch run under
``no_sync()``: they only add into .grad, and the last backward communicates the sum.

Write ``BucketedDDP``: ``__init__`` builds the buckets and registers a hook on every parameter,
``_ready(p)`` (the hook) launches full buckets, ``finish()`` waits and writes the averages back
into .grad. ``no_sync()`` is given.

    dtlab check ddp_buckets --impl ddp_buckets.py

The checker runs a small MLP on 2 processes (gloo): one step, then one of 3 micro-batches (the
first two under no_sync), and compares every .grad with a reference (the same backward, then an
all-reduce of each .grad divided by 2). It records when your hooks launch and wait relative to
backward: a bucket must leave before backward ends, nothing may be waited on before it ends, and
a backward under no_sync must not communicate.

Hints
- The buckets: walk self.params from the LAST to the first, add each to the current bucket, and
  close the bucket once it holds >= bucket_numel elements (the last one may be smaller), as
  labs/ddp.py does.
- p.register_post_accumulate_grad_hook(self._ready) calls self._ready(p) once p.grad holds its
  new value (after accumulating into it).
- In _ready: count p in its bucket; when every parameter of the bucket is ready, flatten their
  .grad (torch.cat of reshape(-1)) and dist.all_reduce(flat, async_op=True). Keep the Work and
  the flat tensor; do not wait here (waiting in the hook stops backward: no overlap).
- In finish: wait on each Work, divide by the world size (all_reduce sums), copy back into .grad,
  and reset what you counted.
"""
import contextlib

import torch
import torch.distributed as dist


class BucketedDDP:
    def __init__(self, model: torch.nn.Module, bucket_numel: int):
        self.model, self.bucket_numel = model, bucket_numel
        self.world = dist.get_world_size()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.syncing = True   # False inside no_sync()
        self.pending = []     # launched buckets not yet waited on
        # TODO 1: self.buckets, lists of parameters in reverse order (>= bucket_numel elements)
        # TODO 2: a post-accumulate-grad hook on every parameter: self._ready
        raise NotImplementedError("TODO: BucketedDDP.__init__ (buckets in reverse parameter "
                                  "order, a hook per parameter)")

    @contextlib.contextmanager
    def no_sync(self):
        """Backwards inside only accumulate into .grad; the next one outside communicates."""
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True

    def _ready(self, p: torch.nn.Parameter) -> None:
        # TODO 3: unless in no_sync: count p; a full bucket: flatten, all_reduce(async_op=True)
        raise NotImplementedError("TODO: BucketedDDP._ready (launch a full bucket, async)")

    def finish(self) -> None:
        """Before the optimizer step: every gradient averaged over the ranks."""
        # TODO 4: wait on every launched bucket, divide by the world size, copy into .grad
        raise NotImplementedError("TODO: BucketedDDP.finish (wait, average, copy back)")
