"""Where a step's time goes on one rank: computation, communication, their overlap, the rest.

With ``--profile-dir DIR`` (``dtlab profile`` passes it) the loop runs under ``torch.profiler``
with a wait / warm-up / active schedule; each rank writes its trace with
``tensorboard_trace_handler`` into ``DIR/tb`` and summarises its own active steps:

    computation     time covered by aten operators (any thread)
    communication   time covered by collective and point-to-point operations: the gloo:* work
                    items, c10d::* calls (and NCCL kernels on CUDA)
    overlap         time covered by both
    other           step time covered by neither (Python, waiting, the optimizer's glue)
    exposed comm    communication - overlap: what the step would lose if the network were slow

These are the definitions of torch-tb-profiler's distributed view, but every communication
operation counts here: that view recognises only broadcast, reduce, all_reduce, all_gather and
reduce_scatter by name, so the _allgather_base / _reduce_scatter_base of FSDP and ZeRO and the
send/recv of pipelines and of our ring go uncounted there.
"""
from __future__ import annotations

from pathlib import Path

COMM_PREFIXES = ("gloo:", "c10d::", "nccl:", "ncclKernel", "ncclDevKernel")


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def _intersect(xs, ys) -> list[tuple[float, float]]:
    out, i, j = [], 0, 0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if a < b:
            out.append((a, b))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return out


def _clip(intervals, lo, hi):
    return [(max(a, lo), min(b, hi)) for a, b in intervals if b > lo and a < hi]


def summarize(events) -> dict:
    """Per-step averages (microseconds and shares of the step) over the profiled steps."""
    steps = [(e.time_range.start, e.time_range.end) for e in events
             if e.name.startswith("ProfilerStep")]
    comm = _union([(e.time_range.start, e.time_range.end) for e in events
                   if e.name.startswith(COMM_PREFIXES)])
    comp = _union([(e.time_range.start, e.time_range.end) for e in events
                   if e.name.startswith("aten::")])
    totals = {"step": 0.0, "computation": 0.0, "communication": 0.0, "overlap": 0.0,
              "other": 0.0}
    for lo, hi in steps:
        c, m = _clip(comp, lo, hi), _clip(comm, lo, hi)
        both = _length(_intersect(c, m))
        busy = _length(c) + _length(m) - both
        totals["step"] += hi - lo
        totals["computation"] += _length(c)
        totals["communication"] += _length(m)
        totals["overlap"] += both
        totals["other"] += (hi - lo) - busy
    n = max(1, len(steps))
    per_step = {k: v / n for k, v in totals.items()}
    per_step["exposed_communication"] = per_step["communication"] - per_step["overlap"]
    step = per_step["step"] or 1.0
    return {"steps_profiled": len(steps),
            "us_per_step": {k: round(v, 1) for k, v in per_step.items()},
            "share_of_step": {k: round(v / step, 4) for k, v in per_step.items() if k != "step"}}


class StepProfiler:
    """Profiles the training loop of one rank: a step hook of the loop (``begin``, then
    ``after_step`` after every step, ``end``), or a context with ``step()`` after every step."""

    def __init__(self, out_dir: str | Path, rank: int, steps: int, device_type: str = "cpu"):
        from torch.profiler import (ProfilerActivity, profile, schedule,  # optional: slow import
                                    tensorboard_trace_handler)
        active = max(1, min(5, steps - 2))
        wait, warmup = (1, 1) if steps >= 3 else (0, 0)
        self.dir = Path(out_dir) / "tb"
        self.summary: dict | None = None
        trace = tensorboard_trace_handler(str(self.dir), worker_name=f"rank{rank}")

        def ready(p):
            trace(p)
            self.summary = summarize(p.events())

        activities = [ProfilerActivity.CPU] + \
            ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
        self.prof = profile(activities=activities, on_trace_ready=ready,
                            schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1))

    def __enter__(self):
        self.prof.__enter__()
        return self

    def step(self):
        self.prof.step()

    def __exit__(self, *exc):
        return self.prof.__exit__(*exc)

    # as a step hook of the loop (dtlab.train.loop.StepHook)
    def begin(self, strategy) -> int:
        self.__enter__()
        return 0

    def before_step(self, strategy, step: int) -> None:
        pass

    def after_step(self, strategy, step: int, row: dict) -> None:
        self.step()

    def end(self, strategy) -> None:
        self.__exit__(None, None, None)
        strategy.extra["profile"] = self.summary
