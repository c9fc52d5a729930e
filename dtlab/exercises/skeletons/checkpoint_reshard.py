"""Exercise: resharding a checkpoint for another world size (docs/reliability.md,
dtlab/reliability/checkpoint.py).

dtlab saves a layout-free checkpoint: every tensor flattened and cut into W even chunks, rank r
writing chunk r, so all ranks write at once. "Even" means each chunk is

    size = ceil(numel / W)        elements: rank r holds [r size, (r + 1) size), clipped to numel

so the last chunk is the short one (with numel < W, some last chunks are empty): it would be
padded with zeros up to ``size`` when the ranks all-gather equal pieces, and the padding is never
saved. With numel = 10 and W = 4: sizes 3, 3, 3, 1; with numel = 2 and W = 4: 1, 1, 0, 0.

A run on W' ranks resumes from it by reading, for its own new chunk, the pieces of the saved
chunks that overlap it (what torch.distributed.checkpoint does on load): a checkpoint written by 2
ranks resumes on 3.

Write ``merge(chunks, numel)``: the whole flat tensor from the W saved chunks (``chunks[r]``
is rank r's, W = len(chunks)); and ``reshard(chunks, numel, new_world, rank)``: the chunk that
rank ``rank`` of ``new_world`` ranks owns under the same rule, a 1-D tensor of the chunks' dtype.

    dtlab check checkpoint_reshard --impl checkpoint_reshard.py

The checker cuts tensors of 1 to 101 elements with dtlab's own rule for every W from 1 to 6, and
compares your merge with the tensor and your reshard with dtlab's cut for every W' from 1 to 6 and
every new rank: numels that W' does not divide and numels smaller than W' included. Element i of
its tensors holds i + 1, so a wrong answer is reported as the element range you returned.

Hints
- Round the chunk size UP (-(-numel // world)); numel // world loses the remainder.
- The new chunk size comes from the new world, W'; where each saved chunk starts comes from the
  old one, W = len(chunks).
- [lo, hi): lo included, hi excluded (hi is the next rank's first element); clip both to numel.
- Only the saved chunks that overlap [lo, hi) are needed; a piece of chunk c is
  chunks[c][a - start:b - start] for the overlap [a, b) of [start, start + len(chunks[c])).
"""
import torch


def merge(chunks: list[torch.Tensor], numel: int) -> torch.Tensor:
    # TODO: the saved chunks back into one flat tensor of numel elements
    raise NotImplementedError("TODO: merge (the W saved chunks into the flat tensor)")


def reshard(chunks: list[torch.Tensor], numel: int, new_world: int, rank: int) -> torch.Tensor:
    # TODO 1: [lo, hi) of this rank's new chunk (size from new_world, rounded up, clipped)
    # TODO 2: the overlapping pieces of the saved chunks, in order, joined
    raise NotImplementedError("TODO: reshard (this rank's [lo, hi) for the new world, read "
                              "from the saved chunks)")
