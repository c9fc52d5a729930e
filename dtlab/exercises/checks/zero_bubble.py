"""The check of the zero_bubble exercise: the ZB-H1 schedule with B and W apart."""
from __future__ import annotations

from dtlab.exercises.checks.common import _quiet, _first_difference, _action_diff


def reference_zbh1(p: int, m: int, s: int) -> list[tuple[str, int]]:
    from labs.pipeline import zbh1_schedule
    return zbh1_schedule(p, m, s)


B_W_FUSED = ("no W in the list: B and W fused (one whole backward, as 1F1B runs it); ZB-H1 "
             "splits each backward into B, the input's gradient that the stage before waits "
             "for, and W, the weights' gradient that nobody waits for, so that W can be put off")
W_ON_CRITICAL_PATH = ("W on the critical path: the stage before waits for this stage's B's (and "
                      "the next for its F's) while it runs a W; ZB-H1 defers stage s's W's by s "
                      "micro-batches (W of micro-batch i - s right after B of i, the last s W's "
                      "at the end), so they fill the cool-down where 1F1B idles")


def check(mod, rank: int, world: int, note=_quiet) -> list[str]:
    from dtlab.costmodel.shapes import bubble
    for p in range(1, 7):
        for m in range(1, 9):
            for s in range(p):
                where = f"P={p}, M={m}, stage {s}"
                got = [tuple(a) for a in mod.zbh1(p, m, s)]
                want = reference_zbh1(p, m, s)
                if got == want:
                    continue
                if not any(a[0] == "W" for a in got):
                    return [f"{where}: {B_W_FUSED}; got {got}"]
                for op in "FBW":
                    if sorted(a[1] for a in got if a[0] == op) != list(range(m)) or \
                            any(len(a) != 2 for a in got):
                        return [f"{where}: every micro-batch needs exactly one F, one B and one "
                                f"W, each an (op, micro-batch) pair; got {got}"]
                at = {a: n for n, a in enumerate(got)}
                for i in range(m):
                    if at[("W", i)] < at[("B", i)]:
                        return [f"{where}: W{i} runs before B{i}: the weights' gradient "
                                f"x^T dL/dy needs dL/dy, which this stage has only once B{i} "
                                f"ran (it arrives from the next stage); W{i} goes after B{i}; "
                                f"got {got}"]
                    if at[("B", i)] < at[("F", i)]:
                        return [f"{where}: B{i} runs before F{i}; got {got}"]
                i = _first_difference(got, want)
                if i < min(len(got), len(want)) and got[i][0] == "W" and want[i][0] != "W":
                    return [_action_diff(where, got, want, W_ON_CRITICAL_PATH)]
                return [_action_diff(where, got, want)]
    for p in range(1, 9):
        for m in range(p, 17):
            want = bubble(p, m, "zbh1")
            got = float(mod.bubble_fraction(p, m))
            if abs(got - want) <= 1e-12:
                continue
            hint = ""
            if abs(got - (p - 1) / (m + p - 1)) < 1e-12:
                hint = ("; that is 1F1B's bubble (P-1)/(M+P-1): with F, B and W one slot each a "
                        "stage's step is 3M busy slots and P - 1 idle")
            elif abs(got - (p - 1) / (3 * m)) < 1e-12:
                hint = "; (P-1)/(3M) divides by the busy slots only: divide by all 3M + P - 1"
            return [f"bubble_fraction(P={p}, M={m}): expected {want:.6g} = (P-1)/(3M+P-1), got "
                    f"{got:.6g}{hint}"]
    return []
