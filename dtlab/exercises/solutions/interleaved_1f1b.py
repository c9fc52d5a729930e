"""Reference solution: the interleaved 1F1B schedule of one stage (V chunks), and its bubble."""


def _kth(k: int, stages: int, chunks: int) -> tuple[int, int]:
    """(micro-batch, chunk) of a stage's k-th forward: groups of P micro-batches, each group
    through chunk 0, then chunk 1, ..., then the next group from chunk 0 again."""
    group, within = divmod(k, stages * chunks)
    return group * stages + within % stages, within // stages


def interleaved_1f1b(stages: int, microbatches: int, stage: int,
                     chunks: int) -> list[tuple[str, int, int]]:
    if microbatches % stages:
        raise ValueError(f"{microbatches} micro-batches do not make groups of {stages} stages")
    total = microbatches * chunks
    forwards = [_kth(k, stages, chunks) for k in range(total)]
    backwards = [(i, chunks - 1 - c) for i, c in forwards]  # the chunks the other way
    warmup = min(2 * (stages - 1 - stage) + (chunks - 1) * stages, total)
    actions = [("F", *f) for f in forwards[:warmup]]
    for k in range(warmup, total):
        actions += [("F", *forwards[k]), ("B", *backwards[k - warmup])]
    return actions + [("B", *b) for b in backwards[total - warmup:]]


def bubble_fraction(stages: int, microbatches: int, chunks: int) -> float:
    return (stages - 1) / (chunks * microbatches + stages - 1)
