"""The check of the ddp_buckets exercise: DDP's gradient buckets all-reduced while backward runs."""
from __future__ import annotations

import contextlib

from dtlab.exercises.checks.common import _first_diff, _quiet


DDP_BUCKET_NUMEL = 60
NO_OVERLAP = ("waiting on each bucket right after launching it blocks backward until its "
              "all-reduce is done, so nothing overlaps: keep the Work and wait for every bucket "
              "in finish()")


def _ddp_model():
    import torch
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16),
                               torch.nn.Tanh(), torch.nn.Linear(16, 12), torch.nn.Tanh(),
                               torch.nn.Linear(12, 4))


def _bucket_numels(params, limit: int, reverse: bool = True) -> list[int]:
    out, size = [], 0
    for p in (reversed(params) if reverse else params):
        size += p.numel()
        if size >= limit:
            out.append(size)
            size = 0
    return out + ([size] if size else [])


class _Work:
    """A Work that says when it is waited on."""

    def __init__(self, work, log, k):
        self._work, self._log, self._k = work, log, k

    def wait(self, *a, **k):
        self._log.append(("wait", self._k))
        return self._work.wait(*a, **k)

    def __getattr__(self, name):
        return getattr(self._work, name)


def check(mod, rank: int, world: int, note=_quiet) -> list[str]:
    import copy

    import torch
    import torch.distributed as dist
    model = _ddp_model()
    ref = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    log: list[tuple] = []
    real = dist.all_reduce

    def recording(t, *a, async_op=False, **k):
        k_launch = sum(1 for e in log if e[0] == "launch")
        log.append(("launch", t.numel(), bool(async_op)))
        work = real(t, *a, async_op=async_op, **k)
        return _Work(work, log, k_launch) if async_op else work

    def batch(step, micro):
        g = torch.Generator().manual_seed(100 * step + 10 * micro + rank)
        return torch.randn(6, 8, generator=g), torch.randn(6, 4, generator=g)

    dist.all_reduce = recording
    try:
        ddp = mod.BucketedDDP(model, DDP_BUCKET_NUMEL)
        for i, p in enumerate(params):  # after the learner's hooks: fires once theirs returned
            p.register_post_accumulate_grad_hook(lambda p, i=i: log.append(("grad", i)))
        for step, micro in ((0, 1), (1, 3)):
            what = "one step" if micro == 1 else \
                f"{micro} micro-batches, the first {micro - 1} under no_sync()"
            note(what)
            where = f"rank {rank}, world {world}, {what}"
            model.zero_grad(set_to_none=True)
            ref.zero_grad(set_to_none=True)
            log.clear()
            for k in range(micro):
                x, y = batch(step, k)
                last = k == micro - 1
                with contextlib.nullcontext() if last else ddp.no_sync():
                    torch.nn.functional.mse_loss(model(x), y).backward()
                log.append(("backward done", k))
                torch.nn.functional.mse_loss(ref(x), y).backward()
                if not last and any(e[0] == "launch" for e in log):
                    n = sum(1 for e in log if e[0] == "launch")
                    return [f"{where}: {n} all-reduce(s) during backward {k} under no_sync(); "
                            "there gradients only accumulate in .grad, the last micro-batch's "
                            "backward communicates their sum"]
            ddp.finish()
            for p in ref.parameters():
                real(p.grad)
                p.grad /= world
            for n, p, q in zip(names, params, ref.parameters()):
                if p.grad is None:
                    return [f"{where}: {n}.grad is None after finish()"]
                if not torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5):
                    hint = []
                    if torch.allclose(p.grad, q.grad * world, atol=1e-6, rtol=1e-5):
                        hint = [f"the gradients are {world} times too large: all_reduce sums, "
                                f"divide by the world size ({world}) to average"]
                    return [f"{where}: {n}.grad differs from the all-reduced average: "
                            f"{_first_diff(p.grad.reshape(-1), q.grad.reshape(-1))}"] + hint
            launches = [e for e in log if e[0] == "launch"]
            done = log.index(("backward done", micro - 1))
            if not launches:
                return [f"{where}: no dist.all_reduce was called; launch one per bucket"]
            if not all(e[2] for e in launches):
                return [f"{where}: dist.all_reduce was called without async_op=True: it blocks "
                        "until the bucket is summed; " + NO_OVERLAP]
            early = [e for e in log[:done] if e[0] == "wait"]
            if early:
                return [f"{where}: bucket {early[0][1]} was waited on before backward ended; "
                        + NO_OVERLAP]
            got = [e[1] for e in launches]
            want = _bucket_numels(params, DDP_BUCKET_NUMEL)
            if got != want:
                hint = ""
                if sorted(got) == sorted(_bucket_numels(params, DDP_BUCKET_NUMEL, reverse=False)):
                    hint = ("; the buckets were filled in forward parameter order: launched "
                            "in bucket order, the first (the first layer, whose gradients come "
                            "last in backward) holds back every other until backward ends; walk "
                            "the parameters from the last to the first, the order backward "
                            "produces their gradients")
                return [f"{where}: launched buckets of {got} elements, expected {want} "
                        f"(parameters from the last to the first, a bucket closed at >= "
                        f"{DDP_BUCKET_NUMEL} elements){hint}"]
            last_grad = max(i for i, e in enumerate(log) if e[0] == "grad")
            first_launch = log.index(launches[0])
            if first_launch > last_grad:
                return [f"{where}: no bucket left before backward ended (first launch after "
                        "the last gradient); launch each bucket from the hook as soon as its "
                        "last gradient is ready"]
            if not all(e[0] == "wait" for e in log[done + 1:]) or \
                    len([e for e in log if e[0] == "wait"]) != len(launches):
                return [f"{where}: finish() must wait on every launched bucket once (waited "
                        f"{len([e for e in log if e[0] == 'wait'])} times for "
                        f"{len(launches)} launches)"]
    finally:
        dist.all_reduce = real
    return []
