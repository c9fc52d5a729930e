"""The check of the ring_attention exercise: the online-softmax merge of ring attention."""
from __future__ import annotations

import math

from dtlab.exercises.checks.common import _quiet


RING_ATTENTION_TOL = 1e-10   # float64 throughout: a right merge is off by ~1e-15
NO_RESCALE = ("the running output was not rescaled when the running maximum changed: out_a must "
              "be multiplied by exp(lse_a - lse) (and out_b by exp(lse_b - lse), lse the merged "
              "log-sum-exp)")
INF_NAN = ("-inf rows give NaN: guard exp(-inf - -inf) (a row with no visible key in either "
           "block merges to out 0, lse -inf)")


def _block_attention(q, k, v, visible):
    """(out, lse) of the queries against one key/value block; rows that see no key of the block
    get out 0 and lse -inf, as a ring step hands them to the merge."""
    import torch
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    shift = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return torch.exp(scores - shift[..., None]) @ v, lse


def _merge_bug(mod) -> str:
    """Which known wrong merge the learner's matches, on one pair where lse_b is far above lse_a
    (so the running maximum changes and rescaling matters); "" if none."""
    import torch
    g = torch.Generator().manual_seed(5)
    out_a, out_b = (torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) for _ in "ab")
    lse_a = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    lse_b = lse_a + 2 + torch.rand(2, 3, 5, generator=g, dtype=torch.float64)
    m = torch.maximum(lse_a, lse_b)
    lse = torch.logaddexp(lse_a, lse_b)
    w = lambda x: torch.exp(x - lse)[..., None]  # noqa: E731
    wrong_lse = [(m, "the merged lse is max(lse_a, lse_b), the running maximum; it must be the "
                     "log of the running sum: m + log(exp(lse_a - m) + exp(lse_b - m))"),
                 (lse_a + lse_b, "the merged lse is lse_a + lse_b; log-sum-exps combine as "
                                 "log(exp(lse_a) + exp(lse_b)), not by adding")]
    wrong_out = [(out_a + w(lse_b) * out_b, NO_RESCALE),
                 (out_a + torch.exp(lse_b - lse_a)[..., None] * out_b, NO_RESCALE),
                 (out_a + out_b, NO_RESCALE),
                 (w(lse_a) * out_a + out_b, "the new block's output was not weighted: out_b "
                                            "must be multiplied by exp(lse_b - lse)"),
                 (torch.exp(lse_a - m)[..., None] * out_a + torch.exp(lse_b - m)[..., None] * out_b,
                  "out was rescaled to the running maximum but not divided by the running sum: "
                  "the weights are exp(lse_a - lse) and exp(lse_b - lse), lse the merged "
                  "log-sum-exp")]
    try:
        got_out, got_lse = mod.merge(out_a.clone(), lse_a.clone(), out_b.clone(), lse_b.clone())
        said = [s for t, s in wrong_lse if got_lse.shape == t.shape and torch.allclose(got_lse, t)]
        if not said:
            said = [s for t, s in wrong_out
                    if got_out.shape == t.shape and torch.allclose(got_out, t)][:1]
        return "; ".join(said)
    except Exception:
        return ""


def _inf_bug(mod) -> str:
    """The -inf rows: both sides -inf must merge to out 0, lse -inf; one side -inf to the other
    side. "" if the learner's merge gets them right."""
    import torch
    inf = float("-inf")
    g = torch.Generator().manual_seed(6)
    out_a, out_b = (torch.randn(1, 3, 4, generator=g, dtype=torch.float64) for _ in "ab")
    out_a[0, :2] = 0  # rows: both -inf; a -inf, b 0.5; a 0.5, b -inf
    out_b[0, ::2] = 0
    lse_a = torch.tensor([[inf, inf, 0.5]], dtype=torch.float64)
    lse_b = torch.tensor([[inf, 0.5, inf]], dtype=torch.float64)
    try:
        out, lse = mod.merge(out_a.clone(), lse_a.clone(), out_b.clone(), lse_b.clone())
        nan = out.isnan().any(-1) | lse.isnan()
        if nan[0, 1:].any():
            return ("-inf rows give NaN: a row with lse -inf on one side only (no visible key in "
                    "that block) must merge to the other side's out and lse; exp(lse_b - lse_a) "
                    "is exp(+inf) there, so weight each side by exp(lse_x - lse), lse the merged "
                    "log-sum-exp")
        if nan[0, 0]:
            return INF_NAN
        if not (lse[0, 0] == inf and (out[0, 0] == 0).all()):
            return (f"a row with lse -inf on both sides must merge to out 0, lse -inf; got out "
                    f"{out[0, 0].tolist()}, lse {lse[0, 0].item():g}")
    except Exception:
        pass
    return ""


def check(mod, rank: int, world: int, note=_quiet) -> list[str]:
    import torch
    # (what, queries, block sizes, the order the blocks are merged in, causal, block 1's keys x)
    cases = [("2 blocks", 6, (4, 6), (0, 1), False, 1.0),
             ("2 blocks, block 1's scores far larger (the running maximum changes)", 6, (5, 5),
              (0, 1), False, 6.0),
             ("3 blocks of sizes 1, 5, 2, merged as rank 1 receives them", 7, (1, 5, 2),
              (1, 0, 2), False, 1.0),
             ("causal, 4 blocks, merged as rank 3 receives them", 12, (2, 4, 3, 3),
              (3, 2, 1, 0), True, 1.0),
             ("causal, 4 blocks, merged as rank 1 receives them", 12, (2, 4, 3, 3),
              (1, 0, 3, 2), True, 1.0)]
    for k_case, (what, t, sizes, order, causal, boost) in enumerate(cases):
        note(what)
        g = torch.Generator().manual_seed(10 + k_case)
        s = sum(sizes)
        q = torch.randn(2, 3, t, 8, generator=g, dtype=torch.float64)
        k = torch.randn(2, 3, s, 8, generator=g, dtype=torch.float64)
        v = torch.randn(2, 3, s, 8, generator=g, dtype=torch.float64)
        bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        k[..., bounds[1]:bounds[2], :] *= boost
        visible = torch.ones(t, s, dtype=torch.bool)
        if causal:  # query i sees keys 0..i
            visible = torch.arange(s)[None, :] <= torch.arange(t)[:, None]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
        scores = scores.masked_fill(~visible, float("-inf"))
        want_out = torch.softmax(scores, dim=-1) @ v
        want_lse = torch.logsumexp(scores, dim=-1)
        blocks = [_block_attention(q, k[..., lo:hi, :], v[..., lo:hi, :], visible[:, lo:hi])
                  for lo, hi in zip(bounds, bounds[1:])]
        out, lse = blocks[order[0]]
        for b in order[1:]:
            res = mod.merge(out, lse, *blocks[b])
            if not (isinstance(res, (tuple, list)) and len(res) == 2):
                got = f"a {type(res).__name__} of {len(res)}" if isinstance(res, (tuple, list)) \
                    else type(res).__name__
                return [f"{what}: merge returned {got}; it must return (out, lse)"]
            out, lse = res
        where = f"{what} (merge order {', '.join(map(str, order))})"
        for name, got, want in (("out", out, want_out), ("lse", lse, want_lse)):
            if tuple(got.shape) != tuple(want.shape):
                return [f"{where}: {name} has shape {tuple(got.shape)}, expected "
                        f"{tuple(want.shape)}"]
            if got.dtype != want.dtype:
                return [f"{where}: {name} is {got.dtype}; keep the inputs' dtype ({want.dtype})"]
        for name, got, want, dims, ref in (
                ("out", out, want_out, "batch, head, query, feature",
                 "softmax attention over all keys"),
                ("lse", lse, want_lse, "batch, head, query", "the log-sum-exp of all scores")):
            if got.isnan().any():
                i = tuple(got.isnan().nonzero()[0].tolist())
                hint = _inf_bug(mod) or _merge_bug(mod)
                return [f"{where}: {name} is NaN at index {i} ({dims})"] + ([hint] if hint else [])
            err = (got - want).abs()
            if err.max() > RING_ATTENTION_TOL:
                i = tuple(torch.nonzero(err == err.max())[0].tolist())
                hint = _merge_bug(mod) or _inf_bug(mod)
                return [f"{where}: {name} differs from {ref} by up to "
                        f"{err.max().item():.3g} (tolerance {RING_ATTENTION_TOL:g}), at index {i} "
                        f"({dims}): expected {want[i].item():.6g}, got {got[i].item():.6g}"] \
                    + ([hint] if hint else [])
    return []
