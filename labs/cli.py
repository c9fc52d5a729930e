"""``dtlab``: list, run and tour the labs.

    dtlab list
    dtlab run LAB [--nproc N] [--steps S] [--preset P] [--out DIR] [lab flags...]
    dtlab tour [--nproc N] [--out DIR] [--only a,b] [--skip c]
    dtlab bench comm [--nproc 2,4] [--ops ...] [--impl library,ring,...] [--sizes ...] [--json F]
    dtlab bench ddp [--nproc 2] [--preset small] [--steps 30] [--repeats 3]
    dtlab profile LAB [--nproc N] [--steps S] [--out DIR] [lab flags...]
    dtlab doctor [--hostfile F] [--include S | --exclude S] [--master-addr A] [--json]
    dtlab memory --params 7e9 [--nodes N --gpus-per-node G] [--zero 0|1|2|3] [--offload ...]

``run`` checks the request before starting anything (unknown lab or preset, a world size the lab
does not support, a batch that does not split), then starts torchrun on a free port, streams
rank 0's output, prints the result table and exits non-zero when the lab is outside tolerance.
Bad input is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from typing import NoReturn
import time
from pathlib import Path

from labs import registry


def fail(msg: str) -> NoReturn:
    print(f"dtlab: error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _opt_value(args: list[str], flag: str) -> str | None:
    """The value of ``--flag V`` or ``--flag=V`` in a forwarded argument list."""
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def validate(lab: registry.Lab, nproc: int, lab_args: list[str]) -> None:
    """Everything that can be checked before processes start; exits 2 on bad input."""
    if nproc < 1:
        fail(f"--nproc must be >= 1, got {nproc}")
    if (msg := lab.check_world(nproc)):
        fail(f"{msg}; use --nproc {lab.min_world}" if lab.max_world == lab.min_world
             else f"{msg}; choose --nproc in {lab.world_text()}")
    if lab.gpu_only:
        import torch
        if not torch.cuda.is_available():
            fail(f"lab {lab.name!r} needs CUDA: {lab.gpu_only}")
    if (missing := lab.missing()):
        fail(f"lab {lab.name!r} needs {', '.join(missing)}; install it with "
             f"pip install -c constraints.txt -e '.[{lab.extra or 'all'}]'")
    from labs.core.data import DataError, check_divisible
    from labs.core.checkpoint import CheckpointError
    from labs.core.train import UsageError, settings_from_args
    mod = importlib.import_module(lab.module)
    args = mod.make_parser().parse_args(lab_args)  # argparse prints usage and exits 2 itself
    try:
        settings = settings_from_args(args)
        if lab.data_parallel:
            check_divisible(settings.batch_size, nproc)
        if hasattr(mod, "check_args"):
            mod.check_args(args, settings, nproc)
        check_checkpoint_dir(lab, nproc, settings, args)
    except (UsageError, DataError, CheckpointError) as e:
        fail(str(e))


def check_checkpoint_dir(lab: registry.Lab, nproc: int, settings, args) -> None:
    """The reliability flags, and a --ckpt-dir that holds another run's checkpoint, before any
    process starts (the lab checks again when it loads)."""
    from labs.core import checkpoint as ckpt
    from labs.core.checkpoint import checkpoint_identity
    from labs.core.train import lab_flags, plans_from_args
    plan, _ = plans_from_args(args, settings, nproc, lab.name)
    if plan.ckpt_dir is None:
        return
    found = ckpt.latest(Path(plan.ckpt_dir))
    if found is not None:
        folder, manifest = found
        flags = lab_flags(args)
        ckpt.check_compatible(manifest, folder,
                              checkpoint_identity(lab.name, nproc, settings, flags), flags,
                              settings.steps)


def launch(lab: registry.Lab, nproc: int, lab_args: list[str], log: Path | None = None,
           max_restarts: int = 0, env: dict | None = None) -> int:
    """torchrun on a free port (``--standalone``); returns its exit status. With
    ``max_restarts`` torchrun restarts every rank when one dies (the lab resumes from its
    newest checkpoint when given --ckpt-dir)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}", "-m", lab.module,
           *lab_args]
    env = dict(os.environ, **(env or {}))
    # Oversubscribing a small machine with torch's default thread pools makes every rank slower.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    if log is None:
        return subprocess.call(cmd, env=env)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        return subprocess.call(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)


def cmd_list(_args) -> int:
    from rich.console import Console
    from rich.table import Table
    t = Table(title="dtlab labs")
    for c in ("lab", "what it shows", "processes", "status"):
        t.add_column(c)
    for lab in registry.LABS.values():
        missing = lab.missing()
        if missing:
            status = f"needs {', '.join(missing)} (extra '{lab.extra}')"
        elif lab.gpu_only:
            status = f"GPU only: {lab.gpu_only}"
        else:
            status = "ready"
        t.add_row(lab.name, lab.summary, lab.world_text(), status)
    Console().print(t)
    return 0


def cmd_run(args, lab_args: list[str]) -> int:
    try:
        lab = registry.get(args.lab)
    except KeyError as e:
        fail(e.args[0])
    if _opt_value(lab_args, "--out") is None:
        lab_args = [*lab_args, "--out", f"runs/{lab.name}-n{args.nproc}"]
    validate(lab, args.nproc, lab_args)
    out = Path(_opt_value(lab_args, "--out"))
    (out / "summary.json").unlink(missing_ok=True)
    restarts = getattr(args, "max_restarts", 0)  # `dtlab profile` comes through here too
    if restarts < 0:
        fail(f"--max-restarts must be >= 0, got {restarts}")
    rc = launch(lab, args.nproc, lab_args, max_restarts=restarts)
    if not (out / "summary.json").is_file():
        print(f"dtlab: {lab.name} ended with exit status {rc} and wrote no run record "
              f"(see the output above)", file=sys.stderr)
        return rc or 1
    from labs.core.record import read_summary
    from labs.tools.report import print_table
    summary = read_summary(out)
    if "failure" in summary:  # the lab said what failed on stderr; the record keeps it
        print(f"dtlab: {lab.name} failed at step {summary['failure']['step']} "
              f"({summary['failure']['kind']} in {summary['failure']['op']}); "
              f"record: {out / 'summary.json'}", file=sys.stderr)
        return rc or 3
    print_table([summary])
    if not summary["ok"]:
        why = ("OUTSIDE its tolerance " + str(summary["baseline"]["tolerance"])
               if summary["baseline"]["ok"] is False else "failing its own checks (see extra)")
        print(f"dtlab: {lab.name} is {why}", file=sys.stderr)
        return 1
    return rc


def cmd_profile(args, lab_args: list[str]) -> int:
    """``dtlab run`` under the profiler: traces in OUT/tb, the summary table per rank."""
    import shutil
    if args.lab == "compare":
        from labs.tools.profile import compare
        return compare(args, lab_args, cmd_profile)
    out = Path(_opt_value(lab_args, "--out") or f"runs/profile/{args.lab}-n{args.nproc}")
    if _opt_value(lab_args, "--out") is None:
        lab_args = [*lab_args, "--out", str(out)]
    if _opt_value(lab_args, "--steps") is None:
        lab_args = [*lab_args, "--steps", "8"]
    shutil.rmtree(out / "tb", ignore_errors=True)
    os.environ["DTLAB_PROFILE_DIR"] = str(out)
    rc = cmd_run(args, lab_args)
    summary_file = out / "summary.json"
    if summary_file.is_file():
        from labs.core.record import read_summary
        from labs.tools.profile import print_summary
        print_summary(read_summary(out))
        print(f"traces: {out / 'tb'}  (tensorboard --logdir {out / 'tb'}, with torch-tb-profiler)")
    return rc


def cmd_tour(args) -> int:
    """Every lab and variant this machine can run, each against the baseline, profiled; a
    running table, then report.md / report.html and the pictures in --out."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from labs.core.record import read_summary
    from labs.tools.report import print_table, report_row, run_label, write_report
    console = Console() if sys.stdout.isatty() else Console(width=200)
    names = list(registry.LABS)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        for n in wanted:
            if n not in registry.LABS:
                fail(f"--only: unknown lab {n!r}; labs: {', '.join(registry.LABS)}")
        names = wanted
    skip = {n.strip() for n in (args.skip or "").split(",") if n.strip()}
    for n in skip:
        if n not in registry.LABS:
            fail(f"--skip: unknown lab {n!r}; labs: {', '.join(registry.LABS)}")
    if args.steps < 3:
        fail(f"--steps must be >= 3 for the tour (each run is profiled), got {args.steps}")
    out = Path(args.out)
    plan, skipped = [], []
    for name in (n for n in names if n not in skip):
        lab = registry.LABS[name]
        if lab.missing():
            skipped.append((name, f"needs {', '.join(lab.missing())} (extra '{lab.extra}')"))
            continue
        if lab.gpu_only:
            import torch
            if not torch.cuda.is_available():
                skipped.append((name, f"needs CUDA: {lab.gpu_only}"))
                continue
        nproc = lab.tour_nproc if lab.max_world == lab.min_world else (args.nproc or lab.tour_nproc)
        variants = [lab.tour_args, *lab.tour_more]
        if lab.tour_gpu:
            import torch
            for gpu_args, why in lab.tour_gpu:
                if torch.cuda.is_available():
                    variants.append(gpu_args)
                else:
                    skipped.append((f"{name} {' '.join(gpu_args)}", f"needs CUDA: {why}"))
        for k, variant in enumerate(variants):
            run_out = out / (f"{name}-n{nproc}" + (f"-{k}" if k else ""))
            lab_args = ["--steps", str(args.steps), "--out", str(run_out), *variant]
            validate(lab, nproc, lab_args)
            plan.append((lab, nproc, variant, run_out, lab_args))
    summaries, failed, runs = [], [], {}
    t_tour = time.perf_counter()
    cols = ("lab", "variant", "world", "max rel loss diff", "max abs param diff", "ok", "step ms",
            "tokens/s", "comm/step/rank", "exposed comm", "peak mem/rank")
    console.print("  ".join(f"{c:>{w}}" for c, w in zip(cols, (22, 22, 5, 17, 18, 6, 8, 9, 14,
                                                                 12, 13))))
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                  "{task.total}"), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("tour", total=len(plan))
        for lab, nproc, variant, run_out, lab_args in plan:
            progress.update(task, description=f"{lab.name} {' '.join(variant)} x{nproc}")
            (run_out / "summary.json").unlink(missing_ok=True)
            env_profile = {"DTLAB_PROFILE_DIR": str(run_out / "profile")}
            rc = launch(lab, nproc, lab_args, log=run_out / "run.log", env=env_profile)
            if (run_out / "summary.json").is_file():
                s = read_summary(run_out)
                summaries.append(s)
                runs[run_label(s)] = run_out
                r = report_row(s)
                style = "" if s["ok"] else "[bold red]"
                progress.console.print(style + "  ".join(f"{c:>{w}}" for c, w in zip(
                    r, (22, 22, 5, 17, 18, 6, 8, 9, 14, 12, 13))), markup=bool(style))
                if not s["ok"]:
                    failed.append((lab.name, f"{' '.join(variant)}: outside tolerance or failed "
                                             f"checks; log {run_out / 'run.log'}"))
            else:
                failed.append((lab.name, f"{' '.join(variant)}: exit {rc}, no record; log "
                                         f"{run_out / 'run.log'}"))
                progress.console.print(f"[bold red]  {lab.name} {' '.join(variant)} FAILED "
                                       f"(exit {rc}); log: {run_out / 'run.log'}")
            progress.advance(task)
    wall = time.perf_counter() - t_tour
    print_table(summaries, title="dtlab tour: every lab against the single-process baseline")
    for name, why in skipped:
        console.print(f"  skipped {name}: {why}")
    report = write_report(out, summaries, skipped, failed, wall, runs)
    console.print(f"{len(summaries)} runs in {wall:.0f} s; report: {report} and "
                  f"{out / 'report.html'} (opens without a server)")
    return 1 if failed else 0


def _nprocs(text: str) -> list[int]:
    try:
        ns = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        fail(f"--nproc: {text!r} is not a list of integers; e.g. --nproc 2 or --nproc 2,4")
    if not ns or min(ns) < 1:
        fail(f"--nproc must be >= 1, got {text!r}")
    return ns


def cmd_bench_comm(args, rest: list[str]) -> int:
    """One torchrun per world size; rows merged into one JSON; ring vs library printed."""
    import json
    from labs.tools import commbench
    try:
        bench_args = commbench.make_parser().parse_args(rest)
        commbench.validate(bench_args)
    except commbench.BenchError as e:
        fail(str(e))
    out = Path(args.json)
    rows = []
    for n in _nprocs(args.nproc):
        part = out.with_name(f".{out.stem}-n{n}.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={n}", "-m", "labs.tools.commbench", *rest, "--json", str(part)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        rc = subprocess.call(cmd, env=env)
        if rc != 0 or not part.is_file():
            print(f"dtlab: bench comm on {n} processes failed (exit {rc})", file=sys.stderr)
            return rc or 1
        rows += json.loads(part.read_text())["rows"]
        part.unlink()
    lib = {(r["op"], r["world_size"], r["bytes"]): r["busbw_GBps"] for r in rows
           if r["impl"] == "library"}
    for r in rows:
        base = lib.get((r["op"], r["world_size"], r["bytes"]))
        r["busbw_vs_library"] = r["busbw_GBps"] / base if base else None
    from labs.core.record import atomic_write_text
    fits = commbench.fit_alpha_beta(rows)
    png = commbench.plot_busbw(rows, out.with_suffix(".png"))
    atomic_write_text(out, json.dumps({"rows": rows, "alpha_beta": fits, "plot": str(png)},
                                      indent=1) + "\n")
    from rich.console import Console
    from rich.table import Table
    from labs.tools.report import human_bytes
    t = Table(title="dtlab bench comm (busbw = algbw x nccl-tests factor)")
    for c in ("op", "impl", "world", "size", "time ms (median)", "spread ms", "algbw GB/s",
              "busbw GB/s", "vs library", "ok"):
        t.add_column(c, justify="left" if c in ("op", "impl") else "right")
    for r in rows:
        ratio = r["busbw_vs_library"]
        t.add_row(r["op"], r["impl"], str(r["world_size"]), human_bytes(r["bytes"]),
                  f"{r['time_s_median'] * 1e3:.3f}",
                  f"{r['time_s_min'] * 1e3:.2f}-{r['time_s_max'] * 1e3:.2f}",
                  f"{r['algbw_GBps']:.3f}", f"{r['busbw_GBps']:.3f}",
                  "-" if ratio is None else f"{ratio:.2f}x", "ok" if r["ok"] else "WRONG")
    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(t)
    f = Table(title="alpha-beta model: time = alpha + bytes / beta (least squares over sizes)")
    for c in ("op", "impl", "world", "alpha us", "beta GB/s", "busbw limit GB/s", "max rel err"):
        f.add_column(c, justify="left" if c in ("op", "impl") else "right")
    for r in fits:
        f.add_row(r["op"], r["impl"], str(r["world_size"]), f"{r['alpha_s'] * 1e6:.1f}",
                  "-" if r["beta_GBps"] is None else f"{r['beta_GBps']:.3f}",
                  "-" if r["busbw_limit_GBps"] is None else f"{r['busbw_limit_GBps']:.3f}",
                  f"{r['max_rel_error']:.0%}")
    console.print(f)
    console.print("ring model: t = 2(p-1) alpha + 2(p-1)/p * S/B; bus bandwidth divides out the "
                  "2(p-1)/p, so it compares across world sizes; across nodes B is the network's "
                  "(a few GB/s to 50 GB/s) instead of memory or loopback.")
    console.print(f"rows: {out}   picture: {png}")
    return 0 if all(r["ok"] for r in rows) else 1


def cmd_bench_ddp(args) -> int:
    """Our DDP against torch's, same settings, runs interleaved so drift in machine load hits
    both alike; the figure is the ratio of median step times."""
    import json
    import statistics
    from labs.core.record import atomic_write_text, read_summary
    lab = registry.get("ddp")
    variants = {"torch": ["--impl", "torch"],
                "own-ring": ["--impl", "own", "--allreduce", "ring"],
                "own-library": ["--impl", "own", "--allreduce", "library"]}
    common = ["--preset", args.preset, "--steps", str(args.steps), "--no-baseline"]
    out = Path(args.out)
    runs = {v: [] for v in variants}
    for i in range(args.repeats):
        for v, flags in variants.items():
            run_out = out / f"{v}-{i}"
            lab_args = [*flags, *common, "--out", str(run_out)]
            validate(lab, args.nproc, lab_args)
            print(f"[{i + 1}/{args.repeats}] ddp {v} on {args.nproc} processes ...", flush=True)
            rc = launch(lab, args.nproc, lab_args, log=run_out / "run.log")
            if rc != 0:
                fail(f"ddp {v} failed (exit {rc}); see {run_out / 'run.log'}")
            runs[v].append(read_summary(run_out)["time"]["step_s_median"])
    med = {v: statistics.median(ts) for v, ts in runs.items()}
    result = {"preset": args.preset, "nproc": args.nproc, "steps": args.steps,
              "repeats": args.repeats, "step_s_median": med, "step_s_runs": runs,
              "ratio_vs_torch": {v: med[v] / med["torch"] for v in variants}}
    atomic_write_text(out / "summary.json", json.dumps(result, indent=1) + "\n")
    for v in variants:
        print(f"  ddp {v:<12} median step {med[v] * 1e3:8.2f} ms   "
              f"{result['ratio_vs_torch'][v]:.2f}x torch DDP")
    print(f"record: {out / 'summary.json'}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dtlab", description="Distributed-training lab.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every lab, one line, and whether it can run here")
    r = sub.add_parser("run", allow_abbrev=False, help="run one lab under torchrun and compare it with the baseline",
                       description="Flags other than --nproc go to the lab "
                                   "(python -m labs.LAB --help lists them).")
    r.add_argument("lab")
    r.add_argument("--nproc", type=int, default=None,
                   help="processes (default: the lab's tour size)")
    r.add_argument("--max-restarts", type=int, default=0,
                   help="torchrun restarts after a rank dies (use with the lab's --ckpt-dir)")
    t = sub.add_parser("tour", help="run every lab and variant this machine can, verified; "
                       "report.md, report.html and pictures in --out")
    t.add_argument("--nproc", type=int, default=None, help="processes for multi-process labs")
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--out", default="runs/tour")
    t.add_argument("--only", default=None, help="comma-separated labs to run")
    t.add_argument("--skip", default=None, help="comma-separated labs to leave out")
    b = sub.add_parser("bench", help="benchmarks: comm (collectives), ddp (ours vs torch's)")
    bsub = b.add_subparsers(dest="bench", required=True)
    bc = bsub.add_parser("comm", help="time collectives, library vs ours, over message sizes",
                         description="Other flags go to labs.tools.commbench: --ops, --impl, "
                                     "--sizes, --iters, --warmup.")
    bc.add_argument("--nproc", default="2", help="world sizes, e.g. 2 or 2,4 (default 2)")
    bc.add_argument("--json", default="runs/bench/comm.json", help="where the rows go")
    bd = bsub.add_parser("ddp", help="median step time of our DDP vs torch DDP")
    bd.add_argument("--nproc", type=int, default=2)
    bd.add_argument("--preset", default="small")
    bd.add_argument("--steps", type=int, default=30)
    bd.add_argument("--repeats", type=int, default=3)
    bd.add_argument("--out", default="runs/bench/ddp")
    pr = sub.add_parser("profile", allow_abbrev=False,
                        help="run a lab under torch.profiler: computation, communication, "
                             "overlap per rank, TensorBoard traces",
                        description="Flags other than --nproc go to the lab; --out DIR gets "
                                    "the run record and DIR/tb the traces (default 8 steps).")
    pr.add_argument("lab", help="a lab, or `compare`: DDP (torch, ours), ZeRO 1-3, FSDP2, TP "
                    "and PP profiled alike, one table")
    pr.add_argument("--nproc", type=int, default=None, help="processes (default: tour size)")
    from labs.tools import doctor, estimate
    doctor.add_arguments(sub.add_parser(
        "doctor", help="check a DeepSpeed hostfile and a multi-node setup before launch",
        description=doctor.__doc__.split("\n\n")[0]))
    estimate.add_arguments(sub.add_parser(
        "memory", help="estimate GPU and CPU memory per ZeRO stage, offload and precision",
        description=estimate.__doc__.split("\n\n")[0]))
    ex = sub.add_parser("exercise", help="write an exercise skeleton (TODOs and hints) to fill in")
    ex.add_argument("name", help="ring_allreduce, loss_scaler, tensor_parallel, 1f1b or zero1")
    ex.add_argument("--dest", default=".", help="folder to write it into (default: here)")
    ex.add_argument("--force", action="store_true", help="overwrite an existing file")
    ck = sub.add_parser("check", help="grade an exercise: run it through its lab's verification")
    ck.add_argument("name", help="the exercise (see dtlab exercise)")
    ck.add_argument("--impl", default=None, help="your file (default: ./<exercise file>)")
    return p


def cmd_exercise(args) -> int:
    from labs import exercises
    try:
        if args.command == "exercise":
            path = exercises.write_skeleton(args.name, args.dest, args.force)
            print(f"wrote {path}: fill in the TODOs, then run\n"
                  f"  dtlab check {args.name} --impl {path}")
            return 0
        impl = args.impl or exercises.get(args.name).file
        print(f"checking {impl} ({exercises.get(args.name).summary}) ...", flush=True)
        passed, lines = exercises.check(args.name, impl)
    except exercises.ExerciseError as e:
        fail(str(e))
    print("\n".join(lines))
    print("PASS" if passed else "FAIL: see above for what differed")
    return 0 if passed else 1


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = make_parser().parse_known_args(argv)
    if args.command == "profile" and args.lab == "compare":
        from labs.tools.profile import compare
        return compare(args, rest, cmd_profile)
    if args.command in ("run", "profile"):
        if args.nproc is None:
            args.nproc = registry.LABS[args.lab].tour_nproc if args.lab in registry.LABS else 1
        return (cmd_run if args.command == "run" else cmd_profile)(args, rest)
    if args.command == "bench" and args.bench == "comm":
        return cmd_bench_comm(args, rest)
    if rest:
        fail(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "bench":
        if args.repeats < 1 or args.steps < 1:
            fail("--repeats and --steps must be >= 1")
        return cmd_bench_ddp(args)
    if args.command == "list":
        return cmd_list(args)
    if args.command == "doctor":
        from labs.tools import doctor
        return doctor.run(args)
    if args.command == "memory":
        from labs.tools import estimate
        return estimate.run(args)
    if args.command in ("exercise", "check"):
        return cmd_exercise(args)
    if args.nproc is not None and args.nproc < 1:
        fail(f"--nproc must be >= 1, got {args.nproc}")
    return cmd_tour(args)


if __name__ == "__main__":
    sys.exit(main())
