"""The check of the sequence_parallel exercise: sequence parallelism's autograd collectives."""
from __future__ import annotations

import contextlib

from dtlab.exercises.checks.common import _quiet


SP_TOL = 1e-12    # float64; the sum of two ranks' values is the same whichever adds first
SP_CASES = ((2, 3, 4), (3, 1, 5))   # (batch, tokens a rank holds, hidden)
SP_DIMS = ("batch", "sequence", "hidden")
SP_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                  "reduce_scatter_tensor", "broadcast", "all_to_all_single")
SP_ALL_REDUCE = ("dist.all_reduce sums the gradient but leaves every rank all the tokens; the "
                 "backward of an all-gather is a reduce-scatter along the sequence: the sum over "
                 "the ranks, of this rank's tokens only")
SP_ALL_REDUCE_AFTER_SCATTER = ("dist.all_reduce leaves this rank its own tokens only; the "
                               "backward of a reduce-scatter is an all-gather along the "
                               "sequence")


@contextlib.contextmanager
def _recorded(calls: list, phase: str):
    """The library's collectives, each call noted as (phase, name) while the learner runs."""
    import torch.distributed as dist
    real = {op: getattr(dist, op) for op in SP_COLLECTIVES}

    def noting(op):
        def call(*a, **k):
            calls.append((phase, op))
            return real[op](*a, **k)
        return call
    for op in SP_COLLECTIVES:
        setattr(dist, op, noting(op))
    try:
        yield
    finally:
        for op, fn in real.items():
            setattr(dist, op, fn)


def _sp_diff(got, want, what: str) -> str:
    err = (got - want).abs()
    i = tuple((err == err.max()).nonzero()[0].tolist())
    return f"{what} differs from the lab's (labs/tensor_parallel.py) by up to " \
           f"{err.max().item():.3g} (tolerance {SP_TOL:g}), at index {i} (batch, sequence, " \
           f"hidden): expected {want[i].item():.6g}, got {got[i].item():.6g}"


def _close(a, b) -> bool:
    return tuple(a.shape) == tuple(b.shape) and \
        (a.numel() == 0 or bool((a - b).abs().max() <= SP_TOL))


def _sp_output_hint(y, xs, rank: int, world: int, gather: bool) -> str:
    import torch
    if gather:
        variants = [(torch.cat(xs, 0).reshape(y.shape), "the pieces were joined along dimension "
                     "0 (the batch) and reshaped: gather along dimension 1, the sequence"),
                    (torch.cat(xs, 2).reshape(y.shape), "the pieces were joined along dimension "
                     "2 (the hidden) and reshaped: gather along dimension 1, the sequence")]
    else:
        total = sum(xs)
        variants = [(total.reshape(-1).chunk(world)[rank].reshape(y.shape),
                     "the sum was cut along dimension 0 (the batch) and reshaped: scatter along "
                     "dimension 1, the sequence"),
                    (xs[rank].chunk(world, dim=1)[rank], "this rank's own tokens, not summed "
                     "over the ranks: the forward is a reduce-scatter of every rank's partial "
                     "sums")]
    return next((text for t, text in variants if t.shape == y.shape and _close(y, t)), "")


def _sp_grad_hint(got, want, dys, calls: list, rank: int, world: int, gather: bool) -> str:
    said = []
    if _close(got, want * world):
        said.append(f"the gradient is {world} (W) times too large")
    elif _close(got, want / world):
        said.append(f"the gradient is {world} (W) times too small: sum over the ranks, do not "
                    "average")
    elif gather and _close(got, dys[rank].chunk(world, dim=1)[rank]):
        said.append("only this rank's own gradient: every rank's next layer used all the "
                    "tokens, so the gradient of this rank's tokens is the sum of every rank's "
                    "(a reduce-scatter)")
    if gather and ("backward", "all_reduce") in calls:
        said.append(SP_ALL_REDUCE)
    return "; ".join(said)


def _sp_case(mod, lab, counter, rank: int, world: int, k_case: int, shape: tuple, name: str,
             gather: bool, note) -> list[str]:
    """One function on one case: its output and its input's gradient against the lab's."""
    import re

    import torch
    b, t, h = shape
    big = (b, t * world, h)
    shape_in, shape_out = ((b, t, h), big) if gather else (big, (b, t, h))
    xs, dys = [], []
    for r in range(world):  # every rank's input and output gradient, all known here
        g = torch.Generator().manual_seed(1000 * k_case + 10 * r + int(gather))
        xs.append(torch.randn(shape_in, generator=g, dtype=torch.float64))
        dys.append(torch.randn(shape_out, generator=g, dtype=torch.float64))
    where = f"rank {rank}, world {world}, {name}, x of shape {shape_in}"
    note(where)
    ref_x = xs[rank].clone().requires_grad_(True)
    ref_y = getattr(lab, name).apply(ref_x, None, counter)
    ref_y.backward(dys[rank])
    x = xs[rank].clone().requires_grad_(True)
    calls: list = []
    with _recorded(calls, "forward"):
        y = getattr(mod, name).apply(x)
    if not isinstance(y, torch.Tensor):
        return [f"{where}: {name}.apply returned a {type(y).__name__}; return a tensor"]
    if tuple(y.shape) != shape_out:
        hint = ""
        for d in (0, 2):
            wrong = list(shape_in)
            wrong[d] = wrong[d] * world if gather else wrong[d] // world
            if tuple(y.shape) == tuple(wrong) and (gather or shape_in[d] % world == 0):
                hint = (f": {'gathered' if gather else 'scattered'} along dimension {d} (the "
                        f"{SP_DIMS[d]}) instead of 1 (the sequence); all_gather_into_tensor and "
                        "reduce_scatter_tensor work along dimension 0, so put the sequence "
                        "there first (x.transpose(0, 1).contiguous()), or torch.cat / chunk "
                        "with dim=1")
        return [f"{where}: the output has shape {tuple(y.shape)}, expected {shape_out}{hint}"]
    if not _close(y.detach(), ref_y.detach()):
        hint = _sp_output_hint(y.detach(), xs, rank, world, gather)
        return [f"{where}: {_sp_diff(y.detach(), ref_y.detach(), 'the output')}"
                + (f"; {hint}" if hint else "")]
    with _recorded(calls, "backward"):
        try:
            y.backward(dys[rank])
        except RuntimeError as e:
            found = re.search(r"got \[([\d, ]*)\] but expected shape compatible with", str(e))
            if not found:
                raise
            returned = tuple(int(n) for n in found.group(1).split(",") if n.strip())
            hint = ""
            if ("backward", "all_reduce") in calls:
                hint = SP_ALL_REDUCE if gather else SP_ALL_REDUCE_AFTER_SCATTER
            return [f"{where}: the backward returned a gradient of shape {returned} for an "
                    f"input of shape {shape_in}" + (f"; {hint}" if hint else "")]
    if x.grad is None:
        return [f"{where}: x.grad is None after backward: the output is not connected to x "
                "(return the result of the collective from forward, do not detach it)"]
    if not _close(x.grad, ref_x.grad):
        hint = _sp_grad_hint(x.grad, ref_x.grad, dys, calls, rank, world, gather)
        return [f"{where}: {_sp_diff(x.grad, ref_x.grad, 'the gradient of x')}"
                + (f"; {hint}" if hint else "")]
    return []


def check(mod, rank: int, world: int, note=_quiet) -> list[str]:
    import torch.distributed as dist
    from dtlab.measure.comm_counter import CommCounter
    from labs import tensor_parallel as lab
    counter = CommCounter(world)
    for k_case, shape in enumerate(SP_CASES):
        for name, gather in (("GatherFromSP", True), ("ReduceScatterToSP", False)):
            failures = _sp_case(mod, lab, counter, rank, world, k_case, shape, name, gather,
                                note)
            verdicts = [None] * world  # the ranks agree to stop together: none waits alone
            dist.all_gather_object(verdicts, bool(failures))
            if any(verdicts):
                return failures
    return []
