"""The check of the zero3 exercise: ZeRO-3's gather/free hooks against the unsharded model, with
the full parameters alive counted while forward runs and after it."""
from __future__ import annotations

from dtlab.exercises.checks.common import _first_diff, _quiet

Z3_RTOL, Z3_ATOL = 1e-9, 1e-12   # float64
NOT_REGATHERED = ("a layer's parameters were freed after forward and not gathered again before "
                  "its backward: in the forward hook, register a hook on the layer's output "
                  "(out.register_hook) that gathers them")


class _Stop(Exception):
    """Raised from the checker's own hook to end a forward that already failed."""


def _z3_model():
    import torch
    torch.manual_seed(0)  # layers of 25, 36 and 14 numbers
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 6),
                               torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()


def _close(a, b) -> bool:
    import torch
    return tuple(a.shape) == tuple(b.shape) and torch.allclose(a, b, rtol=Z3_RTOL, atol=Z3_ATOL)


def _alive(u) -> int:
    """Elements of full parameters that have memory now: the flat vector and the parameters'
    storages (one counted once)."""
    storages = {}
    for t in [u.full, *u.params]:
        s = t.untyped_storage()
        if s.nbytes():
            storages[s.data_ptr()] = s.nbytes() // t.element_size()
    return sum(storages.values())


def _kept_hint(u) -> str:
    if u.full.untyped_storage().nbytes() == 0 and _alive(u):
        return ("; u.full has no memory but the parameters still hold theirs: a new tensor "
                "assigned to u.full frees nothing the layer holds, resize the storage in place")
    return ""


def _flat(params, padded: int):
    import torch
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    return torch.cat([flat, flat.new_zeros(padded - flat.numel())])


def _gathered_problem(u, want, world: int) -> str:
    if _alive(u) == 0 or u.full.untyped_storage().nbytes() == 0:
        return "was not gathered when it ran (its parameters have no memory): the forward " \
               "pre-hook must gather it"
    got = u.full.detach()
    if _close(got, want):
        return ""
    slots = list(got.chunk(world))
    shards = list(want.chunk(world))
    who = [next((r for r in range(world) if _close(g, shards[r])), None) for g in slots]
    if None not in who:
        s = next(s for s, r in enumerate(who) if s != r)
        return (f"was gathered in the wrong rank order: slice {s} of the gathered vector holds "
                f"rank {who[s]}'s shard; slice r must hold rank r's "
                "(dist.all_gather_into_tensor puts them in rank order)")
    return f"was gathered with values that differ from the unsharded model's: " \
           f"{_first_diff(got, want)}"


def check(mod, rank: int, world: int, note=_quiet) -> list[str]:
    import copy

    import torch
    import torch.nn.functional as F
    model = _z3_model()
    ref = copy.deepcopy(model)
    layers = [(k, m) for k, m in enumerate(model) if list(m.parameters())]
    ref_layers = [ref[k] for k, _ in layers]
    z = mod.ZeRO3(model)
    units = z.units
    label = [f"unit {i} (layer {k}: " + ", ".join(f"{k}.{n}" for n, _ in m.named_parameters())
             + ")" for i, (k, m) in enumerate(layers)]
    problems: list[str] = []

    def running(i):
        def hook(module, args):  # registered after the learner's: runs once theirs returned
            want = _flat(ref_layers[i].parameters(), units[i].full.numel())
            problem = _gathered_problem(units[i], want, world)
            if problem:
                problems.append(f"{label[i]} {problem}")
            late = [j for j, u in enumerate(units) if j != i and _alive(u)]
            if late and not problem:
                problems.append(f"{label[late[0]]} was still gathered when layer {layers[i][0]} "
                                "ran: the forward hook must free each layer right after it has "
                                f"run{_kept_hint(units[late[0]])}")
            if problems:
                raise _Stop
        return hook
    for i, (_, m) in enumerate(layers):
        m.register_forward_pre_hook(running(i))
    for rnd in range(2):
        where = f"rank {rank}, world {world}, round {rnd}"
        note(f"round {rnd}")
        g = torch.Generator().manual_seed(100 * rnd + rank)
        x = torch.randn(3, 4, generator=g, dtype=torch.float64)
        y = torch.randn(3, 2, generator=g, dtype=torch.float64)
        try:
            out = model(x)
        except _Stop:
            return [f"{where}, forward: {problems[0]}"]
        alive = [(i, _alive(u)) for i, u in enumerate(units) if _alive(u)]
        if alive:
            i, n = alive[0]
            return [f"{where}: after forward, {label[i]} is still gathered ({n} elements of "
                    f"full parameters alive, expected 0): the forward hook must free it once "
                    f"the layer has run{_kept_hint(units[i])}"]
        want = ref(x)
        if not _close(out.detach(), want.detach()):
            return [f"{where}: the output differs from the unsharded model's: "
                    f"{_first_diff(out.detach().reshape(-1), want.detach().reshape(-1))}"]
        try:
            F.mse_loss(out, y).backward()
        except RuntimeError as e:
            if "storage of size 0" not in str(e) and "out of bounds for storage" not in str(e):
                raise
            return [f"{where}: backward failed ({str(e).splitlines()[0]}): {NOT_REGATHERED}"]
        ref.zero_grad(set_to_none=True)
        for r in range(world):
            gr = torch.Generator().manual_seed(100 * rnd + r)
            xr = torch.randn(3, 4, generator=gr, dtype=torch.float64)
            yr = torch.randn(3, 2, generator=gr, dtype=torch.float64)
            F.mse_loss(ref(xr), yr).div(world).backward()
        for i, u in enumerate(units):
            avg = _flat([p.grad for p in ref_layers[i].parameters()], u.full.numel())
            mine = avg.chunk(world)[rank]
            if u.grad is None or not _close(u.grad, mine):
                got = "none" if u.grad is None else _first_diff(u.grad.reshape(-1), mine)
                return [f"{where}: {label[i]}: this rank's shard of the averaged gradient "
                        f"differs from the unsharded model's: {got}"]
            if _alive(u):
                return [f"{where}: after backward, {label[i]} is still gathered ({_alive(u)} "
                        "elements alive, expected 0)"]
    return []
