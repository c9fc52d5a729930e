"""The check of the checkpoint_reshard exercise: a checkpoint's even chunks read back for another world."""
from __future__ import annotations

from dtlab.exercises.checks.common import _quiet


RESHARD_NUMELS = (1, 2, 3, 4, 5, 7, 10, 13, 64, 101)
RESHARD_WORLDS = range(1, 7)


def reference_chunk(numel: int, world: int, rank: int) -> tuple[int, int]:
    """[lo, hi) of rank's chunk in dtlab's checkpoint layout."""
    from dtlab.reliability.checkpoint import _chunk
    return _chunk(numel, world, rank)


def _elements(t) -> str:
    """What a tensor of the checker's values holds (element i holds i + 1, padding 0)."""
    vals = [int(x) for x in t.reshape(-1).tolist()]
    pad = 0
    while vals and vals[-1] == 0:
        vals.pop()
        pad += 1
    if not vals:
        text = "no elements"
    elif vals[0] > 0 and vals == list(range(vals[0], vals[0] + len(vals))):
        text = f"elements [{vals[0] - 1}, {vals[-1]})"
    else:
        text = f"elements {[x - 1 for x in vals[:8]]}{' ...' if len(vals) > 8 else ''}"
    return text + (f" then {pad} padding zero(s)" if pad else "")


def _reshard_hint(flat, n: int, w: int, w2: int, r: int, got) -> str:
    """Which classic mistake gives ``got`` for rank r of w2 (a tensor saved by w ranks)."""
    import torch
    size, floor, old = -(-n // w2), n // w2, -(-n // w)
    lo, hi = reference_chunk(n, w2, r)

    def same(t):
        return tuple(got.shape) == tuple(t.shape) and torch.equal(got, t)
    if hi - lo < size and same(torch.cat([flat[lo:hi], flat.new_zeros(size - (hi - lo))])):
        return (f"the padding was left in: a chunk is ceil(numel / W') = {size} elements long "
                f"but the last one(s) hold only what is left ({hi - lo} here); the zeros that "
                "would fill it up are not part of the tensor")
    for a, b in ((min(r * floor, n), min((r + 1) * floor, n)),
                 (r * floor, n if r == w2 - 1 else (r + 1) * floor)):
        if same(flat[a:b]):
            return (f"the chunk size rounds up: ceil(numel / W') = {size}, the last chunk the "
                    "short one (the padding fills it up when the ranks all-gather); "
                    f"numel // W' = {floor} rounds down and moves every boundary")
    if w != w2 and same(flat[min(r * old, n):min((r + 1) * old, n)]):
        return (f"the chunk size came from the old world, ceil(numel / W) = {old}; the new "
                f"chunks are ceil(numel / W') = {size} long (W' = {w2} ranks)")
    for a, b in ((lo, hi + 1), (lo, hi - 1), (lo + 1, hi + 1), (lo - 1, hi - 1), (lo + 1, hi),
                 (lo - 1, hi)):
        a, b = max(a, 0), min(b, n)
        if a <= b and (a, b) != (lo, hi) and same(flat[a:b]):
            return (f"off by one at a boundary: rank {r}'s chunk is [{lo}, {hi}) = "
                    f"[{r} * {size}, {r + 1} * {size}) clipped to numel, lo included and hi "
                    "excluded (hi is the next rank's first element)")
    return ""


def check(mod, rank: int, world: int, note=_quiet) -> list[str]:
    import torch
    for n in RESHARD_NUMELS:
        flat = torch.arange(1, n + 1, dtype=torch.float32)
        for w in RESHARD_WORLDS:
            chunks = [flat[slice(*reference_chunk(n, w, r))].clone() for r in range(w)]
            saved = f"numel {n} saved by W={w} (chunks of {[len(c) for c in chunks]})"
            got = mod.merge([c.clone() for c in chunks], n)
            if not isinstance(got, torch.Tensor):
                return [f"{saved}: merge returned a {type(got).__name__}; return a 1-D tensor"]
            if not (tuple(got.shape) == (n,) and torch.equal(got, flat)):
                hint = ""
                if got.numel() > n and torch.equal(got.reshape(-1)[:n], flat):
                    hint = f"; the padding was not cut off: keep the first numel = {n}"
                return [f"{saved}: merge returned {_elements(got)} (shape {tuple(got.shape)}), "
                        f"expected elements [0, {n}){hint}"]
            for w2 in RESHARD_WORLDS:
                for r in range(w2):
                    lo, hi = reference_chunk(n, w2, r)
                    want = flat[lo:hi]
                    got = mod.reshard([c.clone() for c in chunks], n, w2, r)
                    where = f"{saved}, resharded to W'={w2}, rank {r}"
                    if not isinstance(got, torch.Tensor):
                        return [f"{where}: reshard returned a {type(got).__name__}; return a "
                                "1-D tensor"]
                    if got.dtype != want.dtype:
                        return [f"{where}: reshard returned {got.dtype}; keep the chunks' dtype "
                                f"({want.dtype})"]
                    if tuple(got.shape) == tuple(want.shape) and torch.equal(got, want):
                        continue
                    hint = _reshard_hint(flat, n, w, w2, r, got)
                    return [f"{where}: expected elements [{lo}, {hi}) ({hi - lo} of them), got "
                            f"{_elements(got)}" + (f"; {hint}" if hint else "")]
    return []
