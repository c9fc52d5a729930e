"""The check of the dataparallel exercise: nn.DataParallel written out, against the same module on
the whole batch."""
from __future__ import annotations

from dtlab.exercises.checks.common import _first_diff, _quiet

DP_BATCH = 7                 # 2, 3 and 4 replicas do not divide it
DP_REPLICAS = (1, 2, 3, 4)
DP_RTOL, DP_ATOL = 1e-9, 1e-12   # float64


def _model():
    import torch
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 3)).double()


def _close(a, b) -> bool:
    import torch
    return tuple(a.shape) == tuple(b.shape) and torch.allclose(a, b, rtol=DP_RTOL, atol=DP_ATOL)


def _output_problem(out, want, x, n: int, master, stale) -> str:
    import torch
    rows, batch = out.shape[0] if out.dim() else 0, want.shape[0]
    if rows < batch:
        sizes = [len(c) for c in x.chunk(n)]
        return (f"the gathered output has {rows} rows for a batch of {batch}: the rows of the "
                f"last, smaller chunk were dropped (x.chunk({n}) gives chunks of {sizes}; every "
                "row must reach a replica)")
    if tuple(out.shape) != tuple(want.shape):
        return f"the gathered output has shape {tuple(out.shape)}, expected {tuple(want.shape)}"
    where = [next((j for j in range(batch) if _close(out[i], want[j])), None)
             for i in range(batch)]
    if None not in where and where != list(range(batch)):
        i = next(i for i, j in enumerate(where) if i != j)
        return (f"the outputs were gathered out of order: row {i} of the output is row "
                f"{where[i]} of the batch; join the replicas' outputs in chunk order "
                "(replica i's output holds chunk i's rows)")
    with torch.no_grad():
        chunks = x.chunk(n)
        old = torch.cat([master(chunks[0])] + [stale(c) for c in chunks[1:]])
    if n > 1 and _close(out, old):
        return ("the replicas ran with the previous step's parameters: replicate() must copy "
                "the master's parameters into every replica before each forward")
    return f"the gathered output differs from the module's on the whole batch: " \
           f"{_first_diff(out.reshape(-1), want.reshape(-1))}"


def check(mod, rank: int, world: int, note=_quiet) -> list[str]:
    import copy

    import torch
    import torch.nn.functional as F
    for n in DP_REPLICAS:
        master = _model()
        ref, stale = copy.deepcopy(master), copy.deepcopy(master)
        names = [name for name, _ in master.named_parameters()]
        dp = mod.DataParallel(master, n)
        g = torch.Generator().manual_seed(n)
        for step in range(2):
            where = f"{n} replica(s), batch {DP_BATCH}, step {step}"
            x = torch.randn(DP_BATCH, 5, generator=g, dtype=torch.float64)
            y = torch.randn(DP_BATCH, 3, generator=g, dtype=torch.float64)
            dp.zero_grad()
            ref.zero_grad(set_to_none=True)
            out = dp.forward(x)
            want = ref(x)
            if not _close(out, want.detach()):
                return [f"{where}: {_output_problem(out, want.detach(), x, n, master, stale)}"]
            loss, ref_loss = F.mse_loss(out, y), F.mse_loss(want, y)
            if not _close(loss.detach(), ref_loss.detach()):
                return [f"{where}: the loss differs: expected {ref_loss.item():.10g}, got "
                        f"{loss.item():.10g}"]
            loss.backward()
            dp.reduce_grads()
            ref_loss.backward()
            rows0 = len(x.chunk(n)[0])
            part = copy.deepcopy(ref)
            part.zero_grad(set_to_none=True)
            ((part(x[:rows0]) - y[:rows0]) ** 2).sum().div(y.numel()).backward()
            for name, p, q, q0 in zip(names, master.parameters(), ref.parameters(),
                                      part.parameters()):
                if p.grad is None:
                    return [f"{where}: the master's {name}.grad is None after reduce_grads()"]
                if _close(p.grad, q.grad):
                    continue
                hint = ""
                if n > 1 and _close(p.grad, q.grad / n):
                    hint = (f"; the gradients are {n} (R) times too small: they were averaged, "
                            "not summed (the loss is already a mean over the whole batch, so "
                            "each replica's gradient is its share: add them up)")
                elif n > 1 and _close(p.grad, q0.grad):
                    hint = ("; the master's gradient holds replica 0's rows only: the other "
                            "replicas' gradients were not added into the master's .grad")
                return [f"{where}: the master's {name}.grad differs from the whole batch's: "
                        f"{_first_diff(p.grad.reshape(-1), q.grad.reshape(-1))}{hint}"]
            if n > 1 and all(p.grad is None for p in dp.replicas[1].parameters()):
                return [f"{where}: replica 1 has no gradient: each replica must run its own "
                        "chunk (replica i on chunk i), not the master all of them"]
            with torch.no_grad():  # the optimizer steps the master only
                stale.load_state_dict(master.state_dict())
                for p, q in zip(master.parameters(), ref.parameters()):
                    p -= 0.5 * p.grad
                    q -= 0.5 * q.grad
    return []
