"""Reference solution: the ZB-H1 schedule of one stage (B and W split), and its bubble."""


def zbh1(stages: int, microbatches: int, stage: int) -> list[tuple[str, int]]:
    actions = []

    def backward(i):
        actions.append(("B", i))
        if i >= stage:  # the weight gradient runs `stage` micro-batches behind
            actions.append(("W", i - stage))

    warmup = min(stages - 1 - stage, microbatches)
    actions += [("F", i) for i in range(warmup)]
    for i in range(warmup, microbatches):
        actions.append(("F", i))
        backward(i - warmup)
    for i in range(microbatches - warmup, microbatches):
        backward(i)
    return actions + [("W", i) for i in range(max(microbatches - stage, 0), microbatches)]


def bubble_fraction(stages: int, microbatches: int) -> float:
    return (stages - 1) / (3 * microbatches + stages - 1)
