"""Data: the global batch of step k is a pure function of (seed, k).

Default corpus: synthetic character-level addition, ``"7+5=12\\n"`` problems written one after
another. Nothing is downloaded, every process can produce any step's batch on its own, and the
loss visibly falls (the layout of each line is learned within a few dozen steps; the sums take
longer). ``--data PATH`` swaps in any UTF-8 text file, read character by character.

Data parallelism never changes *what* is trained on: a rank r of W takes rows
[r*B/W, (r+1)*B/W) of the same global batch, so a W-rank run sees exactly the baseline's data.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from dtlab.errors import UsageError

ARITH_VOCAB = "0123456789+=\n"


class DataError(UsageError):
    """Bad data settings; the message names the input and the fix."""


class Corpus:
    """Produces ``global_batch(step) -> (x, y)``, LongTensors of shape [batch_size, seq_len],
    with y the next-token targets of x."""

    def __init__(self, batch_size: int, seq_len: int, seed: int = 0, path: str | None = None,
                 max_operand: int = 9):
        if batch_size < 1:
            raise DataError(f"--batch-size must be >= 1, got {batch_size}")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.path, self.max_operand = path, max_operand
        if path is None:
            self.vocab = ARITH_VOCAB
            self._text = None
        else:
            p = Path(path)
            if not p.is_file():
                raise DataError(f"--data {path}: no such file; give a UTF-8 text file")
            try:
                raw = p.read_bytes()
                text = raw.decode("utf-8")
            except OSError as e:
                raise DataError(f"--data {path}: cannot be read ({e.strerror})") from None
            except UnicodeDecodeError as e:
                raise DataError(f"--data {path}: not UTF-8 text ({e.reason} at byte {e.start})"
                                ) from None
            # identified by its content, so an edited file is a different run (cache, resume)
            self.content_id = f"sha256={hashlib.sha256(raw).hexdigest()}:bytes={len(raw)}"
            if len(text) < seq_len + 1:
                raise DataError(f"--data {path}: {len(text)} characters, but one sample needs "
                                f"seq_len+1 = {seq_len + 1}; give a longer file or a smaller preset")
            self.vocab = "".join(sorted(set(text)))
            stoi = {c: i for i, c in enumerate(self.vocab)}
            self._text = np.array([stoi[c] for c in text], dtype=np.int64)
        self._lut = np.zeros(128, dtype=np.int64)
        for i, c in enumerate(ARITH_VOCAB):
            self._lut[ord(c)] = i

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def describe(self) -> str:
        return f"text:{self.content_id}" if self.path else f"arith(max={self.max_operand})"

    def _rng(self, step: int) -> np.random.Generator:
        # SeedSequence mixes (seed, step) into independent streams; no state carries over.
        return np.random.default_rng([self.seed, step, 0xD71AB])

    def global_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = self._rng(step)
        n = self.seq_len + 1
        if self._text is not None:
            starts = rng.integers(0, len(self._text) - n + 1, size=self.batch_size)
            rows = np.stack([self._text[s:s + n] for s in starts])
        else:
            rows = np.stack([self._arith_row(rng, n) for _ in range(self.batch_size)])
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def _arith_row(self, rng: np.random.Generator, n: int) -> np.ndarray:
        # Enough problems to fill n characters, each at most len("99+99=198\n") = 10 long.
        k = n // 4 + 2
        a = rng.integers(0, self.max_operand + 1, size=k)
        b = rng.integers(0, self.max_operand + 1, size=k)
        text = "".join(f"{x}+{y}={x + y}\n" for x, y in zip(a.tolist(), b.tolist()))
        # Start at a random offset so every position sees every kind of character.
        off = int(rng.integers(0, 10))
        chars = np.frombuffer(text[off:off + n].encode("ascii"), dtype=np.uint8)
        return self._lut[chars]

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in ids)


def check_divisible(batch_size: int, world: int, what: str = "data-parallel world size") -> int:
    """Rows per rank; a clear error when the global batch does not split evenly."""
    if world < 1:
        raise DataError(f"{what} must be >= 1, got {world}")
    if batch_size % world:
        lo = batch_size - batch_size % world
        raise DataError(f"--batch-size {batch_size} is not divisible by the {what} {world}; "
                        f"use a multiple of {world} (e.g. {lo or world} or {lo + world})")
    return batch_size // world


def rank_slice(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous share of a global batch (rows along dim 0)."""
    per = check_divisible(batch.shape[0], world)
    return batch[rank * per:(rank + 1) * per]
