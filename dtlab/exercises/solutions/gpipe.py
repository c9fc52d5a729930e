"""Reference solution: the GPipe schedule of one stage, and its bubble."""


def gpipe(stages: int, microbatches: int, stage: int) -> list[tuple[str, int]]:
    return [("F", i) for i in range(microbatches)] + [("B", i) for i in range(microbatches)]


def bubble_fraction(stages: int, microbatches: int) -> float:
    return (stages - 1) / (microbatches + stages - 1)
