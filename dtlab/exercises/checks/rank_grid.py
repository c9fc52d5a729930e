"""The check of the rank_grid exercise: a grid of ranks' coordinates and groups against dtlab's Grid."""
from __future__ import annotations

from dtlab.exercises.checks.common import _quiet


TP_FASTEST = "tp must vary fastest: ranks 0..tp-1 share a tp group (rank = (d * pp + p) * tp + t)"


def reference_grid(dp: int, pp: int, tp: int) -> tuple[list, dict]:
    """Every rank's (d, p, t) and the tp, pp and dp groups, from dtlab's own Grid."""
    from dtlab.train.grid import Grid
    g = Grid(dp=dp, pp=pp, tp=tp)
    coords = [g.at(r).coords for r in range(g.world)]
    return coords, {"tp": [g.tp_ranks(d, p) for d in range(dp) for p in range(pp)],
                    "pp": [[g.rank_of(d, p, t) for p in range(pp)] for d in range(dp)
                           for t in range(tp)],
                    "dp": [g.dp_ranks(p, t) for p in range(pp) for t in range(tp)]}


def _grid_hint(dp: int, pp: int, tp: int, got_coords) -> str:
    """What ordering the learner's coordinates follow, if a known wrong one."""
    if tp > 1 and any(got_coords[r][2] != r for r in range(tp)):
        return TP_FASTEST
    if pp > 1 and dp > 1 and all(c == (r // tp % dp, r // (tp * dp), r % tp)
                                 for r, c in enumerate(got_coords)):
        return "pp is the outermost dimension here; in dtlab's grid dp is: the ranks of one " \
               "pipeline (d fixed) are neighbours, rank = (d * pp + p) * tp + t"
    return ""


def check(mod, rank: int, world: int, note=_quiet) -> list[str]:
    import itertools
    for dp, pp, tp in itertools.product(range(1, 5), repeat=3):
        shape = f"dp={dp}, pp={pp}, tp={tp}"
        w = dp * pp * tp
        want_coords, want_groups = reference_grid(dp, pp, tp)
        got_coords = [tuple(mod.coords(r, dp=dp, pp=pp, tp=tp)) for r in range(w)]
        for r in range(w):
            if got_coords[r] != tuple(want_coords[r]):
                hint = _grid_hint(dp, pp, tp, got_coords)
                return [f"{shape}: coords of rank {r} should be (d, p, t) = "
                        f"{tuple(want_coords[r])}, got {got_coords[r]}"] + ([hint] if hint else [])
        got = mod.groups(dp=dp, pp=pp, tp=tp)
        for kind, size in (("tp", tp), ("pp", pp), ("dp", dp)):
            if kind not in got:
                return [f"{shape}: groups returned no {kind!r} entry (keys {sorted(got)})"]
            mine = [sorted(int(x) for x in grp) for grp in got[kind]]
            seen = [x for grp in mine for x in grp]
            missing = sorted(set(range(w)) - set(seen))
            twice = sorted({x for x in seen if seen.count(x) > 1})
            if missing:
                return [f"{shape}: the {kind} groups miss rank(s) {missing}; every rank is in "
                        f"exactly one {kind} group (got {mine})"]
            if twice:
                return [f"{shape}: the {kind} groups overlap: rank(s) {twice} are in more than "
                        f"one {kind} group; every rank is in exactly one (got {mine})"]
            if set(seen) - set(range(w)):
                return [f"{shape}: the {kind} groups hold rank(s) "
                        f"{sorted(set(seen) - set(range(w)))}, outside 0..{w - 1}"]
            if any(len(grp) != size for grp in mine):
                return [f"{shape}: a {kind} group holds {kind}={size} ranks; got sizes "
                        f"{[len(grp) for grp in mine]}"]
            want = sorted(sorted(grp) for grp in want_groups[kind])
            if sorted(mine) != want:
                wrong = next(grp for grp in sorted(mine) if grp not in want)
                hint = [TP_FASTEST] if kind == "tp" and tp > 1 and list(range(tp)) not in mine \
                    else []
                return [f"{shape}: {wrong} is not a {kind} group; expected {want}"] + hint
    return []
