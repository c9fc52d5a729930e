"""The one place matplotlib is set up: pyplot on the file-only Agg backend, imported on first use
(slow to import, and nothing that runs without pictures should pay for it). Standard library
only at import, so every layer may draw through it; the labs draw nothing (their pictures are
drawn from their records by dtlab/report/pictures.py)."""
from __future__ import annotations


def plt_agg():
    """matplotlib.pyplot on the file-only Agg backend (imported on first use: slow to import,
    and the CLI must build without it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
