"""Reference solution: nn.DataParallel written out on one process, the devices simulated by a
list of replicas (labs/dataparallel.py's OwnDataParallel)."""
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
        return list(x.chunk(len(self.replicas)))  # ceil(B/R) rows each, the last may be smaller

    def replicate(self) -> None:
        with torch.no_grad():
            for r in self.replicas[1:]:
                for mine, master in zip(r.parameters(), self.module.parameters()):
                    mine.copy_(master)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.replicate()
        outs = [r(chunk) for r, chunk in zip(self.replicas, self.scatter(x))]
        return torch.cat(outs)  # in chunk order; backward hands each replica its rows

    def reduce_grads(self) -> None:
        with torch.no_grad():
            for master, *copies in zip(*(r.parameters() for r in self.replicas)):
                grads = [p.grad for p in (master, *copies) if p.grad is not None]
                master.grad = torch.stack(grads).sum(0)  # each replica's share of the mean
