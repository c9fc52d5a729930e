"""Reference solution: gradient buckets in reverse parameter order, each all-reduced
asynchronously from the hooks while backward runs, waited on and averaged before the step."""
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
        self.buckets, current, size = [], [], 0
        for p in reversed(self.params):  # backward produces the last layers' gradients first
            current.append(p)
            size += p.numel()
            if size >= bucket_numel:
                self.buckets.append(current)
                current, size = [], 0
        if current:
            self.buckets.append(current)
        self.bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self.ready = [0] * len(self.buckets)
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._ready)

    @contextlib.contextmanager
    def no_sync(self):
        """Backwards inside only accumulate into .grad; the next one outside communicates."""
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True

    def _ready(self, p: torch.nn.Parameter) -> None:
        if not self.syncing:
            return
        i = self.bucket_of[id(p)]
        self.ready[i] += 1
        if self.ready[i] == len(self.buckets[i]):  # the bucket is full: send it now
            flat = torch.cat([q.grad.reshape(-1) for q in self.buckets[i]])
            self.pending.append((dist.all_reduce(flat, async_op=True), flat, self.buckets[i]))

    def finish(self) -> None:
        """Before the optimizer step: every gradient averaged over the ranks."""
        for work, flat, bucket in self.pending:
            work.wait()
            flat /= self.world
            offset = 0
            for q in bucket:
                q.grad.copy_(flat[offset:offset + q.numel()].view_as(q))
                offset += q.numel()
        self.pending = []
        self.ready = [0] * len(self.buckets)
