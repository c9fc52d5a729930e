"""Exercise: nn.DataParallel written out (docs/dataparallel.md, labs/dataparallel.py).

One process drives R devices (here R replicas of the model on the CPU). Every step:
  1. scatter:   cut the batch into chunks along dimension 0, one per replica;
  2. replicate: copy the master's parameters into every other replica (only the master is
                stepped by the optimizer, so this happens before every forward);
  3. forward:   each replica runs its chunk;
  4. gather:    the outputs joined back in chunk order (the loss is taken on them);
  5. backward:  gradients flow back through the gather into each replica;
  6. reduce:    every replica's gradients added into the master's .grad.

Write ``scatter``, ``replicate``, ``forward`` and ``reduce_grads``. ``__init__`` and
``zero_grad`` are given.

    dtlab check dataparallel --impl dataparallel.py

The checker trains a small MLP (float64) for 2 steps with 1, 2, 3 and 4 replicas on a batch of
7 rows (which 2, 3 and 4 do not divide) and compares the output, the loss and every gradient of
the master with the same module run on the whole batch (relative tolerance 1e-9).

Hints
- ``x.chunk(R)`` cuts like nn.DataParallel: chunks of ceil(B/R) rows, the last one smaller (with
  B=7, R=4: 2, 2, 2, 1). Every row must land in some chunk.
- ``torch.cat(outputs)`` gathers, and its backward hands each replica the gradient of its rows.
  Keep the outputs in chunk order (zip the replicas with the chunks).
- The loss is a mean over the whole gathered batch, so each replica's gradient is already its
  share: SUM them into the master (do not average). Copy the parameters with torch.no_grad().
- A replica that got no chunk (more replicas than rows) has .grad None: skip it.
"""
import copy

import torch


class DataParallel:
    def __init__(self, module: torch.nn.Module, replicas: int):
        self.module = module  # replica 0 is the master: the one the optimizer steps
        self.replicas = [module] + [copy.deepcopy(module) for _ in range(replicas - 1)]

    def zero_grad(self) -> None:
        for r in self.replicas:
            r.zero_grad(set_to_none=True)

    def scatter(self, x: torch.Tensor) -> list:
        # TODO 1: the batch cut into chunks along dimension 0, one per replica
        raise NotImplementedError("TODO: DataParallel.scatter (chunks along dimension 0)")

    def replicate(self) -> None:
        # TODO 2: copy the master's parameters into replicas[1:]
        raise NotImplementedError("TODO: DataParallel.replicate (master -> every replica)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # TODO 3: replicate, scatter, run replica i on chunk i, gather the outputs in order
        raise NotImplementedError("TODO: DataParallel.forward (replicate, scatter, apply, "
                                  "gather)")

    def reduce_grads(self) -> None:
        # TODO 4: add every other replica's .grad into the master's (sum, not average)
        raise NotImplementedError("TODO: DataParallel.reduce_grads (sum into the master)")
