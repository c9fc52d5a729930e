"""The check of the one_f_one_b exercise: the 1F1B schedule of one stage against the lab's."""
from __future__ import annotations

from dtlab.exercises.checks.common import _quiet


def reference_1f1b(p: int, m: int, s: int) -> list[tuple[str, int]]:
    from labs.pipeline import one_f_one_b_schedule
    return one_f_one_b_schedule(p, m, s)


def check(mod, rank: int, world: int, note=_quiet) -> list[str]:
    for p in range(1, 7):
        for m in range(1, 9):
            for s in range(p):
                got = [tuple(a) for a in mod.one_f_one_b(p, m, s)]
                want = reference_1f1b(p, m, s)
                fs = [i for k, i in got if k == "F"]
                bs = [i for k, i in got if k == "B"]
                if sorted(fs) != list(range(m)) or sorted(bs) != list(range(m)):
                    return [f"P={p}, M={m}, stage {s}: every micro-batch needs exactly one F and "
                            f"one B; got {got}"]
                if got != want:
                    i = next(i for i, (a, b) in enumerate(zip(got + [None] * len(want), want))
                             if a != b)
                    return [f"P={p}, M={m}, stage {s}: action {i} should be {want[i]}, got "
                            f"{got[i] if i < len(got) else 'nothing'}; expected {want}"]
    return []
