"""The check of the gpipe exercise: the GPipe schedule and its bubble."""
from __future__ import annotations

from dtlab.exercises.checks.one_f_one_b import reference_1f1b
from dtlab.exercises.checks.common import _quiet


def reference_gpipe(p: int, m: int, s: int) -> list[tuple[str, int]]:
    from labs.pipeline import gpipe_schedule
    return gpipe_schedule(p, m, s)


def check(mod, rank: int, world: int, note=_quiet) -> list[str]:
    from dtlab.costmodel.shapes import bubble
    for p in range(1, 7):
        for m in range(1, 9):
            for s in range(p):
                got = [tuple(a) for a in mod.gpipe(p, m, s)]
                want = reference_gpipe(p, m, s)
                if got == want:
                    continue
                fs = [i for k, i in got if k == "F"]
                bs = [i for k, i in got if k == "B"]
                where = f"P={p}, M={m}, stage {s}"
                if sorted(fs) != list(range(m)) or sorted(bs) != list(range(m)):
                    return [f"{where}: every micro-batch needs exactly one F and one B; got {got}"]
                if got == want[:m] + want[m:][::-1]:
                    return [f"{where}: the backwards run last-first (B{m - 1} ... B0); this lab "
                            f"runs them in micro-batch order B0 ... B{m - 1} on every stage "
                            "(labs/pipeline.py's run_schedule, docs/pipeline.md)"]
                if got == reference_1f1b(p, m, s):
                    return [f"{where}: that is the 1F1B schedule (backwards start before the "
                            "last forward); GPipe runs every forward first"]
                i = next(i for i, (a, b) in enumerate(zip(got + [None] * len(want), want))
                         if a != b)
                return [f"{where}: action {i} should be {want[i]}, got "
                        f"{got[i] if i < len(got) else 'nothing'}; expected {want}"]
    for p in range(1, 9):
        for m in range(1, 17):
            want = bubble(p, m, "gpipe")
            got = float(mod.bubble_fraction(p, m))
            if abs(got - want) > 1e-12:
                hint = ""
                if p > 1 and abs(got - (p - 1) / m) < 1e-12:
                    hint = ("; (P-1)/M divides by the busy slots only: a stage's step is M + P - 1 "
                            "slots (M busy, P - 1 idle), so the bubble is (P-1)/(M+P-1)")
                return [f"bubble_fraction(P={p}, M={m}): expected {want:.6g} = (P-1)/(M+P-1), "
                        f"got {got:.6g}{hint}"]
    return []


# rows each source rank sends each destination, [source][destination]; every rank's sends
