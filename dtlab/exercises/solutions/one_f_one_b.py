"""Reference solution: the 1F1B pipeline schedule of one stage."""


def one_f_one_b(stages: int, microbatches: int, stage: int) -> list[tuple[str, int]]:
    warmup = min(stages - 1 - stage, microbatches)
    actions = [("F", i) for i in range(warmup)]
    f, b = warmup, 0
    while f < microbatches:
        actions += [("F", f), ("B", b)]
        f, b = f + 1, b + 1
    return actions + [("B", i) for i in range(b, microbatches)]
