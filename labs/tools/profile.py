"""``dtlab profile LAB``: where a step's time goes on every rank: computation, communication,
their overlap, and the rest; plus a TensorBoard trace per rank.

Any lab runs under ``torch.profiler`` with a wait / warm-up / active schedule when the
environment variable DTLAB_PROFILE_DIR is set (``dtlab profile`` sets it); each rank writes its
trace with ``tensorboard_trace_handler`` into ``DIR/tb`` (``tensorboard --logdir DIR/tb`` with
torch-tb-profiler shows it, distributed view included) and summarises its own active steps:

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

import os
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
    """Wraps the training loop of one rank; ``step()`` after every step."""

    def __init__(self, out_dir: str | Path, rank: int, steps: int, device_type: str = "cpu"):
        from torch.profiler import (ProfilerActivity, profile, schedule,
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


def maybe_profiler(rank: int, steps: int, device_type: str):
    """A StepProfiler when DTLAB_PROFILE_DIR is set, else None."""
    out = os.environ.get("DTLAB_PROFILE_DIR")
    return StepProfiler(out, rank, steps, device_type) if out else None


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    rows = summary["extra"].get("profile") or []
    from rich.markup import escape
    t = Table(title=escape(f"dtlab profile: {summary['lab']} [{summary['variant']}], ")
                + f"{summary['world_size']} rank(s), per step (ms and share of the step)")
    for c in ("rank", "step", "computation", "communication", "overlap", "exposed comm",
              "other"):
        t.add_column(c, justify="right")
    for rank, r in enumerate(rows):
        if r is None:
            continue
        us, sh = r["us_per_step"], r["share_of_step"]
        cell = lambda k: f"{us[k] / 1e3:.2f} ({sh[k]:.0%})"  # noqa: E731
        t.add_row(str(rank), f"{us['step'] / 1e3:.2f}", cell("computation"),
                  cell("communication"), cell("overlap"), cell("exposed_communication"),
                  cell("other"))
    console = Console() if Console().is_terminal else Console(width=160)
    console.print(t)


PROFILE_COMPARE = [  # (name, lab, flags): the strategies whose time split is compared
    ("ddp torch", "ddp", ["--impl", "torch"]),
    ("ddp own (ring, 20 KiB buckets)", "ddp", ["--impl", "own", "--bucket-mb", "0.02"]),
    ("zero stage 1", "zero", ["--stage", "1"]),
    ("zero stage 2", "zero", ["--stage", "2"]),
    ("zero stage 3", "zero", ["--stage", "3"]),
    ("fsdp2", "zero", ["--impl", "fsdp2"]),
    ("tensor parallel", "tensor_parallel", []),
    ("pipeline 1f1b", "pipeline", ["--schedule", "1f1b"]),
]


def compare(args, lab_args: list[str], profile_one) -> int:
    """``dtlab profile compare``: every strategy of PROFILE_COMPARE profiled alike (with
    ``profile_one``, the CLI's single-lab command); one table of shares, mean over ranks."""
    import argparse
    import json
    import sys

    from labs.cli import _opt_value
    out = Path(_opt_value(lab_args, "--out") or "runs/profile")
    extra = [a for a in lab_args]
    if "--out" in extra:
        i = extra.index("--out")
        del extra[i:i + 2]
    rows = []
    for name, lab, flags in PROFILE_COMPARE:
        run_dir = out / name.split(" (")[0].replace(" ", "-")
        ns = argparse.Namespace(lab=lab, nproc=args.nproc or 2)
        with open(os.devnull, "w") as quiet:
            old = sys.stdout
            sys.stdout = quiet
            try:
                rc = profile_one(ns, [*flags, *extra, "--out", str(run_dir)])
            finally:
                sys.stdout = old
        f = run_dir / "summary.json"
        if rc != 0 or not f.is_file():
            print(f"dtlab: profiling {name} failed (exit {rc})", file=sys.stderr)
            return rc or 1
        s = json.loads(f.read_text())
        shares = [r["share_of_step"] for r in s["extra"]["profile"]]
        mean = {k: sum(x[k] for x in shares) / len(shares) for k in shares[0]}
        rows.append({"strategy": name, "world_size": s["world_size"],
                     "step_ms": s["extra"]["profile"][0]["us_per_step"]["step"] / 1e3,
                     "comm_bytes_per_step": s["comm"]["bytes_per_step"], **mean})
        print(f"  {name:<32} ok  comm {mean['communication']:.0%}  exposed "
              f"{mean['exposed_communication']:.0%}", flush=True)
    from labs.core.record import atomic_write_text
    from labs.tools.report import human_bytes
    atomic_write_text(out / "compare.json", json.dumps({"rows": rows}, indent=1) + "\n")
    head = ("strategy", "ranks", "step ms", "comm/step/rank", "computation", "communication",
            "overlap", "exposed comm", "other")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["strategy"], str(r["world_size"]), f"{r['step_ms']:.1f}",
            human_bytes(r["comm_bytes_per_step"])] + [f"{r[k]:.0%}" for k in (
                "computation", "communication", "overlap", "exposed_communication", "other")])
            + " |")
    atomic_write_text(out / "compare.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"(shares of a profiled step, mean over ranks; {out / 'compare.json'})")
    return 0
