"""The check of the interleaved_1f1b exercise: the interleaved 1F1B schedule and its bubble."""
from __future__ import annotations

from dtlab.exercises.checks.common import _quiet, _first_difference, _action_diff


def reference_interleaved(p: int, m: int, s: int, v: int) -> list[tuple[str, int, int]]:
    from labs.pipeline import interleaved_schedule
    return interleaved_schedule(p, m, s, v)


INTERLEAVED_RULE = ("the k-th forward of a stage is micro-batch (k // (P V)) P + k % P on chunk "
                    "(k // P) % V, the k-th backward the same micro-batch on chunk "
                    "V - 1 - (k // P) % V")


def _interleaved_chunk_hint(p: int, v: int, want: list, i: int, got_chunk: int) -> str:
    """Why action i ran the right micro-batch on the wrong chunk."""
    op = want[i][0]
    k = sum(1 for a in want[:i] if a[0] == op)  # action i is the stage's k-th F (or B)
    c = (k // p) % v
    if op == "B" and got_chunk == c != v - 1 - c:
        return ("the backwards walk the chunks the other way (the last chunk's gradient comes "
                f"first): {INTERLEAVED_RULE}")
    what = "forward" if op == "F" else "backward"
    if k >= p * v:
        return (f"the wrong chunk after a wrap-around: this is {what} {k} of the stage (from 0), "
                f"past the P V = {p * v} of the first group of P micro-batches, so the chunks "
                f"have come round again; {INTERLEAVED_RULE}")
    return f"the wrong chunk for {what} {k} of the stage (from 0): {INTERLEAVED_RULE}"


def check(mod, rank: int, world: int, note=_quiet) -> list[str]:
    from dtlab.costmodel.shapes import bubble
    for p in (2, 3, 4):
        for v in (2, 3):
            for m in (p, 2 * p, 3 * p):
                for s in range(p):
                    where = f"P={p}, V={v}, M={m}, stage {s}"
                    got = [tuple(a) for a in mod.interleaved_1f1b(p, m, s, v)]
                    want = reference_interleaved(p, m, s, v)
                    if got == want:
                        continue
                    short = [i for i, a in enumerate(got) if len(a) != 3]
                    if short:
                        return [f"{where}: action {short[0]} is {got[short[0]]}; each action is "
                                "(op, micro-batch, chunk)"]
                    outside = [i for i, a in enumerate(got) if a[2] not in range(v)]
                    if outside:
                        i = outside[0]
                        return [f"{where}: action {i} is {got[i]}, but a stage holds chunks "
                                f"0..{v - 1}: the wrong chunk after a wrap-around (after P V = "
                                f"{p * v} forwards the next P micro-batches start again on "
                                "chunk 0: the k-th forward runs chunk (k // P) % V)"]
                    i = _first_difference(got, want)
                    if i < min(len(got), len(want)) and got[i][:2] == want[i][:2]:
                        return [_action_diff(where, got, want, _interleaved_chunk_hint(
                            p, v, want, i, got[i][2]))]
                    pairs = sorted((j, c) for j in range(m) for c in range(v))
                    if sorted(a[1:] for a in got if a[0] == "F") != pairs or \
                            sorted(a[1:] for a in got if a[0] == "B") != pairs:
                        return [f"{where}: every micro-batch needs exactly one F and one B on "
                                f"each of the {v} chunks; got {got}"]
                    return [_action_diff(where, got, want)]
    for p, m, v in ((2, 3, 2), (4, 6, 2), (3, 4, 3)):
        try:
            got = mod.interleaved_1f1b(p, m, 0, v)
        except ValueError:
            continue
        return [f"P={p}, V={v}, M={m}: interleaved_1f1b returned a schedule; the lab runs "
                "micro-batches in groups of P (each group through chunk 0, then chunk 1, ...), "
                f"so it refuses an M that is not a multiple of P (labs/pipeline.py: "
                f"--microbatches {m} must be a multiple of {p}): raise ValueError"]
    for p in range(2, 9):
        for v in (2, 3, 4):
            for m in range(p, 4 * p + 1, p):
                want = bubble(p, m, "interleaved", v)
                got = float(mod.bubble_fraction(p, m, v))
                if abs(got - want) <= 1e-12:
                    continue
                hint = ""
                if abs(got - (p - 1) / (m + p - 1)) < 1e-12:
                    hint = ("; the bubble was not divided by V: that is 1F1B's (P-1)/(M+P-1); "
                            "with V chunks a stage's ramps are made of chunk slots, 1/V of a "
                            "stage's work, so the P - 1 idle slots weigh (P-1)/V against M busy")
                elif abs(got - (p - 1) / (v * m)) < 1e-12:
                    hint = ("; (P-1)/(V M) divides by the busy time only (Megatron's paper "
                            "states it so); this lab's bubble is over the whole step, idle and "
                            "busy, as for GPipe and 1F1B (dtlab/costmodel/shapes.py)")
                return [f"bubble_fraction(P={p}, M={m}, V={v}): expected {want:.6g} = "
                        f"(P-1)/(V M + P-1), got {got:.6g}{hint}"]
    return []
