"""The figures and tables of docs/ that come from lab runs: the reference tour, the lab runs
beyond it and the collective benchmark (docs/reference/tour.json, labs.json, comm.json, and the
schedule record's bubbles). What ``dtlab docs refresh`` writes between ``<!-- ref:NAME -->``
markers and into ``<!--fig:NAME-->`` spans, one function each, so a figure quoted on several
pages is the same number from the same run everywhere. The records of the cluster, the doctor,
the hang detector, the checkpoints and the planner are docsops.py's."""
from __future__ import annotations

import json
from pathlib import Path

from dtlab.costmodel.shapes import ring_factor
from dtlab.report.tables import REPORT_COLUMNS, exposed_share, human_bytes, profile_shares, report_row

PAGES = ("tour.md", "profiling.md", "ring-allreduce.md", "ddp.md", "pipeline.md", "gpu.md",
         "tensor-parallel.md", "dataparallel.md", "baseline.md", "zero.md", "deepspeed.md",
         "amp.md")


def load(ref_dir: Path, name: str) -> dict:
    """One record of docs/reference/."""
    return json.loads((Path(ref_dir) / name).read_text())


def find(runs: list[dict], lab: str, variant: str = "", world: int | None = None) -> dict:
    """The tour run of ``lab`` whose variant starts with ``variant``."""
    for s in runs:
        if s["lab"] == lab and s["variant"].startswith(variant) and \
                (world is None or s["world_size"] == world):
            return s
    raise KeyError(f"the tour record has no run {lab} {variant} (docs/reference/tour.json)")


def _ms(s: dict) -> str:
    return f"{s['time']['step_s_median'] * 1e3:.1f} ms"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _span(xs: list[float], unit: str = "") -> str:
    return f"{min(xs):.2f}-{max(xs):.2f}{unit}"


def _sci(s: dict) -> str:
    """A run's largest relative loss difference from the baseline."""
    x = s["baseline"].get("max_rel_loss_diff")
    return "-" if x is None else f"{x:.1e}"


def _param(s: dict) -> str:
    """A run's largest absolute parameter difference from the baseline."""
    x = s["baseline"].get("max_abs_param_diff")
    return "-" if x is None else f"{x:.1e}"


def _dp_formula(s: dict) -> float:
    """What a data-parallel rank sends a step for the run's parameters: 2(W-1)/W x 4P."""
    return ring_factor("all_reduce", s["world_size"]) * 4 * s["n_params"]


def _peak_mib(s: dict) -> str:
    return human_bytes(max(m["peak"] for m in s["memory"]["per_rank"]))


def first_page_figures(ref_dir: Path) -> dict[str, str]:
    """README's "before you start": how long the whole reference run took here (every distinct
    command of machine.json once; two records share one command), and how many layouts the
    planner's validation ran."""
    seconds = {r["command"]: r["seconds"] for r in load(ref_dir, "machine.json")["records"].values()
               if isinstance(r.get("seconds"), (int, float))}
    return {"refresh.minutes": f"{sum(seconds.values()) / 60:.0f}",
            "plan.validate.runs": str(len(load(ref_dir, "plan-validate.json")["layouts"]))}


def answer_figures(ref_dir: Path) -> dict[str, str]:
    """Figures of answers 1-33 of docs/questions.md that the keys above do not give: the
    ``dtlab memory`` estimate and the equal-cores speed-up (answers-q1-33.json), the long-sequence
    activations (long-sequences.json), what nn.DataParallel's replicas hold and its save/load
    check, ZeRO-3 offload's device bytes (tour.json) and the doctor's messages
    (doctor-collective.json)."""
    out = {}
    if (Path(ref_dir) / "answers-q1-33.json").is_file():
        rec = load(ref_dir, "answers-q1-33.json")["runs"]
        rows = {(r["stage"], r["offload"]): r for r in rec["memory-1.3b"]["rows"]}
        z0, z3 = rows[(0, "none")], rows[(3, "param")]
        out["q8.memory.z0"] = (f"weights {z0['gpu']['params'] / 1e9:.2f} + gradients "
                               f"{z0['gpu']['grads'] / 1e9:.2f} + optimizer "
                               f"{z0['gpu']['optimizer'] / 1e9:.2f} = {z0['gpu']['total'] / 1e9:.2f} GB")
        out["q8.memory.z3param"] = (f"{z3['gpu']['total'] / 1e9:.2f} GB on the GPU, "
                                    f"{z3['cpu_per_node']['total'] / 1e9:.2f} GB in CPU memory")
        out["q8.memory.inference"] = next(ln.split(":", 1)[1].split("(")[0].strip()
                                          for ln in rec["memory-1.3b"]["text"].splitlines()
                                          if ln.startswith("inference"))
        one, two = rec["one-process"], rec["two-ranks"]
        out["q9.one.step_ms"] = f"{one['step_s_median'] * 1e3:.1f} ms"
        out["q9.two.step_ms"] = f"{two['step_s_median'] * 1e3:.1f} ms"
        out["q9.speedup"] = f"{one['step_s_median'] / two['step_s_median']:.2f}x"
        out["q9.two.rel"] = _sci(two["repeats"][0])
        out["q9.repeats"] = str(len(one["repeats"]))
        loads = [x["load_average_before"] for r in (one, two) for x in r["repeats"]]
        out["q9.load"] = f"{min(loads):.0f}-{max(loads):.0f}"
    longseq = load(ref_dir, "long-sequences.json")
    seq = max(r["seq"] for r in longseq["recompute"])
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    for r in longseq["recompute"]:
        if r["seq"] == seq:
            out[f"longseq.recompute.{r['recompute']}"] = mib(r["measured"])
            if r["recompute_peak"]:
                out["longseq.recompute.peak"] = mib(r["recompute_peak"])
    for r in longseq["sequence_parallel"]:
        if r["seq"] == seq:
            out[f"longseq.tp{r['tp']}{'.sp' if r['sp'] else ''}"] = mib(r["measured"])
    for r in longseq["context_parallel"]:
        if r["seq"] == seq:
            out[f"longseq.cp{r['cp']}.{r['layout']}"] = mib(r["measured"])
            out[f"longseq.cp{r['cp']}.{r['layout']}.imbalance"] = f"{r['imbalance']:.2f}"
    out["longseq.seq"] = str(seq)
    cont = max((r for r in longseq["context_parallel"] if r["layout"] == "contiguous"),
               key=lambda r: (r["seq"], r["cp"]))
    out[f"longseq.cp{cont['cp']}.contiguous.imbalance"] = f"{cont['imbalance']:.2f}"
    out["longseq.contiguous.seq"] = str(cont["seq"])
    tour = load(ref_dir, "tour.json")["runs"]
    dp = find(tour, "dataparallel", "own")["extra"]
    for r in dp["replica_bytes"]:
        out[f"dp.replica{r['replica']}.bytes"] = f"{r['total']:,} B"
    out["dp.first_key"] = dp["save_load"]["load_prefixed_into_plain"]["first_key"]
    m = find(tour, "zero", "own-stage3-offload-param")["memory"]["per_rank"][0]
    out["zero.offload.device"] = f"{m['params'] + m['grads'] + m['optimizer']:,} bytes"
    out["zero.offload.cpu"] = f"{sum(v for k, v in m['offload'].items() if k != 'device'):,} bytes"
    best = load(ref_dir, "plan-validate.json")["summary"]["best_within_5pct"].split("/")
    out["plan.best_within_5pct"] = f"{best[0]} of {best[1]}"
    doc = load(ref_dir, "doctor-collective.json")["cases"]
    for name, c in doc.items():
        slug = "-".join(w for w in name.replace("(", "").replace(")", "").split())
        errors = [f["message"] for f in c["findings"] if f["severity"] == "error"]
        if errors:
            out[f"doctor.{slug}.error"] = errors[0]
        coll = c.get("collective") or {}
        if coll.get("ok") and coll.get("busbw_GBps") is not None:
            out[f"doctor.{slug}.busbw"] = f"{coll['busbw_GBps']:.4f} GB/s"
            out[f"doctor.{slug}.seconds"] = f"{coll['seconds']:g} s"
    return out


def machine_line(m: dict, date: str) -> str:
    return (f"{m['cores']} CPU cores ({m['cpu']}), {m['memory_gib']:g} GiB, torch {m['torch']}, "
            f"DeepSpeed {m['deepspeed']}, Python {m['python']}, {date}")


def figures(ref_dir: Path) -> dict[str, str]:
    tour = load(ref_dir, "tour.json")
    runs = tour["runs"]
    base, ddp = find(runs, "baseline"), find(runs, "ddp", "torch")
    own = find(runs, "ddp", "own")
    f = ddp["flops"]
    bad = len(tour["failed"])
    comm = load(ref_dir, "comm.json")["rows"]
    shm = load(ref_dir, "faster-collectives.json")["host"]["rows"]

    def lib64(rows):
        return next(r["busbw_GBps"] for r in rows if r["impl"] == "library" and
                    r["world_size"] == 2 and r["bytes"] == 64 * 2**20 and r["op"] == "all_reduce")
    per_run = {}  # run.LAB.VARIANT.{rel,param,step_ms,exposed} for every run of the tour
    for s in runs:
        key = f"run.{s['lab']}.{s['variant']}"
        per_run.update({f"{key}.rel": _sci(s), f"{key}.param": _param(s),
                        f"{key}.step_ms": _ms(s), f"{key}.exposed": _pct(exposed_share(s))})

    shares = [exposed_share(s) for s in runs if s["world_size"] > 1 and exposed_share(s)]

    def ring64(rows):
        return next(r["busbw_vs_library"] for r in rows if r["impl"] == "ring" and
                    r["world_size"] == 2 and r["bytes"] == 64 * 2**20)
    return {
        **per_run, **lab_figures(ref_dir),
        **amp_figures(ref_dir),
        **zero_figures(ref_dir),
        **question_figures(ref_dir),
        **first_page_figures(ref_dir),
        **answer_figures(ref_dir),
        **lesson_figures(ref_dir),
        **gpu_figures(load(ref_dir, "gpu.json")),
        **shm_figures(shm),
        **accum_figures(load(ref_dir, "labs.json")["runs"]["accelerate-accum2"]),
        **formula_figures(f, load(ref_dir, "gpu.json")["runs"]["baseline-small"]["flops"]),
        "tour.head": f"{len(runs)} runs in {tour['wall_s']:.0f} s, "
                     + ("all within tolerance, exit status 0" if not bad else
                        f"{bad} NOT OK, exit status 1"),
        "tour.machine": machine_line(tour["machine"], tour["date"]),
        "baseline.step_ms": _ms(base),
        "baseline.tokens_per_s": f"{base['time']['tokens_per_s']:,.0f}",
        "baseline.resident": _peak_mib(base),
        "baseline.steps": str(base["steps"]),
        "ddp.step_ms": _ms(ddp),
        "ddp-own.step_ms": _ms(own),
        "ddp.exposed": _pct(exposed_share(ddp)),
        "ddp-own.exposed": _pct(exposed_share(own)),
        "ddp.sent": human_bytes(ddp["comm"]["bytes_per_step"]),
        "amp-fp16.step_ms": _ms(find(runs, "amp", "fp16")),
        "amp-bf16.step_ms": _ms(find(runs, "amp", "bf16")),
        "amp.bf16.rel": _sci(find(runs, "amp", "bf16")),
        "dataparallel.step_ms": _ms(find(runs, "dataparallel", "own")),
        "dataparallel.rel": _sci(find(runs, "dataparallel", "own")),
        "mp.rel": _sci(find(runs, "torch_multiprocessing", "sync")),
        "tour.runs": str(len(runs)),
        "tour.exposed_range": f"{min(shares):.0%}-{max(shares):.0%}",
        "tour.minutes": f"{tour['wall_s'] / 60:.1f}",
        "comm.ring64": f"{ring64(comm):.2f}x",
        "zero3.exposed": _pct(exposed_share(find(runs, "zero", "own-stage3"))),
        "tp.exposed": _pct(exposed_share(find(runs, "tensor_parallel", "own"))),
        "pp.exposed": _pct(exposed_share(find(runs, "pipeline", "own-1f1b"))),
        "mfu.flops": f"{f['model_flops_per_step']:,}",
        "mfu.achieved": f"{f['achieved_flops_per_s'] / 1e9:.2f} GFLOP/s",
        "mfu.peak": f"{f['peak_flops_per_s_per_device'] / 1e9:.1f} GFLOP/s",
        "mfu.shapes": str(len(f["matmul_sweep"])),
        "mfu.mfu": f"{f['mfu']:.1%}",
        "mfu.of_matmul": f"{f['of_matmul_peak']:.1%}",
        "mfu.sweep": ", ".join(f"{r['m']}x{r['k']}x{r['n']} {r['flops_per_s'] / 1e9:.0f}"
                               for r in f["matmul_sweep"]) + " GFLOP/s",
        "comm.lib64": f"{lib64(comm):.3f}",
        "comm.ring_large": _span([r["busbw_vs_library"] for r in comm if r["impl"] == "ring"
                                  and r["bytes"] >= 16 * 2**20], "x"),
        "comm.copies64": _span([r["busbw_vs_library"] for r in comm if r["impl"] in
                                ("naive", "tree") and r["bytes"] == 64 * 2**20], "x"),
        "commexp.lib64": f"{lib64(shm):.3f}",
    }


def lab_figures(ref_dir: Path) -> dict[str, str]:
    """Figures of docs/reference/labs.json (python -m dtlab.docsgen.records.lab_runs) and of the schedule
    record: bubbles, overlap, the small preset."""
    runs = load(ref_dir, "labs.json")["runs"]
    out = {}
    for name, s in runs.items():
        x = s["extra"]
        if s["lab"] == "pipeline":
            p, m = x["stages"], x["microbatches"]
            out[f"bubble.{x['schedule']}.p{p}.m{m}"] = f"{x['bubble_measured']:.3f}"
            out[f"bubble.theory.p{p}.m{m}"] = f"{x['bubble_theory']:.3f}"
            out[f"bubble.{x['schedule']}.p{p}.m{m}.mb"] = " / ".join(
                f"{b / 1e6:.2f}" for b in x["peak_live_activation_bytes"]) + " MB"
        if "overlap_timing" in x and name.startswith("ddp-overlap"):
            key = name.removeprefix("ddp-overlap-")
            out[f"overlap.{key}.wait_ms"] = \
                f"{x['overlap_timing']['wait_after_backward_s_median'] * 1e3:.1f} ms"
    pipes = [s["extra"] for s in runs.values() if s["lab"] == "pipeline"]
    gap = max(abs(x["bubble_measured"] - x["bubble_theory"]) for x in pipes)
    out["bubble.max_gap"] = f"{gap:.3f}"
    small, base = runs["ddp-torch-small"], runs["baseline-small"]
    out.update({"small.ddp.step_ms": _ms(small), "small.baseline.step_ms": _ms(base),
                "small.ddp.rel": _sci(small),
                "small.ddp.sent": f"{small['comm']['bytes_per_step']:,.0f}",
                "small.baseline.activations":
                    f"{base['memory']['per_rank'][0]['activations_peak'] / 1e6:.1f} MB",
                "ddp.w4.sent": f"{runs['ddp-torch-w4']['comm']['bytes_per_step']:,.0f} B",
                "ddp.w4.step_ms": _ms(runs["ddp-torch-w4"]),
                "ddp.w4.rel": _sci(runs["ddp-torch-w4"]),
                "ddp.batch24.rel": _sci(runs["ddp-torch-w2-batch24"]),
                "ddp.batch24.param": _param(runs["ddp-torch-w2-batch24"])})
    for name in ("mp-w4", "dp-r4", "accelerate-bf16", "accelerate-fp16", "accelerate-accum2"):
        out[f"{name}.rel"] = _sci(runs[name])
        out[f"{name}.param"] = _param(runs[name])
    zero = [s for n, s in runs.items() if n.startswith("zero-small-")]
    out["zero-small.rel"] = f"{max(s['baseline']['max_rel_loss_diff'] for s in zero):.1e}"
    out["zero-small.param"] = f"{max(s['baseline']['max_abs_param_diff'] for s in zero):.1e}"
    for r in load(ref_dir, "long-sequences.json")["recompute_step_time"]:
        out[f"recompute.{r['recompute']}.ratio"] = f"{r['ratio']:.2f}x"
    for r in load(ref_dir, "schedules-experts.json")["pipelines"]:
        key = f"sched.{r['schedule']}.p{r['P']}.v{r['V']}.m{r['M']}"
        out[key] = f"{r['bubble_measured']:.3f}"
        out[f"{key}.theory"] = f"{r['bubble_theory']:.3f}"
    return out


# the GPU record's equality runs, as tests/gpu/check.sh runs them (it keeps no command)
GPU_RUNS = {"ddp-nccl": "dtlab run ddp --nproc 1 --backend nccl --steps 10",
            "dataparallel-cuda": "dtlab run dataparallel --impl torch --replicas 1 --steps 5",
            "amp-fp16-torch": "dtlab run amp --nproc 1 --dtype fp16 --scaler torch --steps 20",
            "amp-fp16-own": "dtlab run amp --nproc 1 --dtype fp16 --steps 20",
            "amp-bf16": "dtlab run amp --nproc 1 --dtype bf16 --steps 20"}


def gpu_table(rec: dict) -> str:
    """docs/reference/gpu.json's runs that have a CUDA baseline: step time and distance."""
    rows = ["| run | variant | step (ms) | max rel loss diff | max abs param diff | verdict |",
            "|---|---|---|---|---|---|"]
    for name, cmd in GPU_RUNS.items():
        s = rec["runs"][name]
        rows.append(f"| `{cmd}` | {s['variant']} | {s['step_s_median'] * 1e3:.1f} | {_sci(s)} | "
                    f"{_param(s)} | {'ok' if s['baseline']['ok'] else 'NOT OK'} |")
    return "\n".join(rows)


def gpu_figures(rec: dict) -> dict[str, str]:
    """docs/gpu.md's prose: the machine, the pytest run, the gpt2-124m MFU runs."""
    import re
    name, mem, driver = (x.strip() for x in rec["gpu"].split(","))
    py = rec["pytest_gpu"]["result"]
    count = {w: int(n) for n, w in re.findall(r"(\d+) (passed|failed)", py)}
    base, rc = rec["runs"]["baseline-gpt2"], rec["runs"]["baseline-gpt2-recompute"]
    f = base["flops"]
    plugins = [v for k, v in rec["after_fix"].items() if k != "what"]
    return {"gpu.date": rec["date"],
            "gpu.machine": f"{name}, {mem}, driver {driver}",
            "gpu.pytest": f"{count.get('passed', 0)} passed, {count.get('failed', 0)} failed, in "
                          f"{float(re.search(r'in ([0-9.]+)s', py).group(1)):.0f} s",
            "gpu.plugin.rel": re.search(r"rel loss ([0-9.e+-]+)",
                                        rec["pytest_gpu"]["failed"][0]).group(1),
            "gpu.after.rel": f"{max(v['max_rel_loss_diff'] for v in plugins):.1f}",
            "gpu.gpt2.step_ms": f"{base['step_s_median'] * 1e3:.0f} ms",
            "gpu.gpt2.achieved": f"{f['achieved_flops_per_s'] / 1e12:.1f} TFLOP/s",
            "gpu.gpt2.matmul": f"{f['peak_flops_per_s_per_device'] / 1e12:.1f} TFLOP/s",
            "gpu.gpt2.mfu": f"{f['mfu']:.2f}",
            "gpu.gpt2.mfu_published": f"{base['mfu_published_peak']:.2f}",
            "gpu.gpt2.recompute.step_ms": f"{rc['step_s_median'] * 1e3:.0f} ms",
            "gpu.gpt2.recompute.ratio": f"{rc['step_s_median'] / base['step_s_median']:.2f}x"}


def lesson_figures(ref_dir: Path) -> dict[str, str]:
    """Figures of the lesson pages (3d-parallel, pipeline, tensor-parallel, ddp, ring-allreduce,
    dataparallel, multiprocessing, baseline, tour, profiling) that the keys above do not give:
    bytes sent per run, the memory of the replicated states, the TP and pipeline traffic of the
    small preset (tour.json, labs.json, cluster.json, comm.json)."""
    tour = load(ref_dir, "tour.json")["runs"]
    labs = load(ref_dir, "labs.json")["runs"]
    cluster = load(ref_dir, "cluster.json")
    out = {f"run.{s['lab']}.{s['variant']}.sent": human_bytes(s["comm"]["bytes_per_step"])
           for s in tour}
    base, ddp = find(tour, "baseline"), find(tour, "ddp", "torch")
    mem = ddp["memory"]["per_rank"][0]
    out["ddp.sent.bytes"] = f"{ddp['comm']['bytes_per_step']:,.0f} bytes"
    out["ddp.states"] = f"{mem['params']:,} + {mem['grads']:,} + {mem['optimizer']:,} bytes"
    for key, s in (("w1", base), ("w2", ddp), ("w4", labs["ddp-torch-w4"])):
        out[f"act.tiny.{key}"] = f"{s['memory']['per_rank'][0]['activations_peak'] / 1e6:.2f} MB"
    mp = find(tour, "torch_multiprocessing", "sync")
    written = mp["comm"]["by_op"]["shared_memory_write"]["bytes"] / mp["steps"]
    out["mp.write"] = f"{written:,.0f} bytes"
    # tensor parallelism: the small preset's TP 2 run on one node of the cluster record
    tp_small = next(r for r in cluster["strategies"]
                    if r["strategy"] == "tensor parallel" and r["where"] == "1 node")
    ddp_small = labs["ddp-torch-small"]["comm"]["bytes_per_step"]
    out["tp.small.sent"] = f"{tp_small['comm_bytes_per_step']:,.0f}"
    out["tp.small.mb"] = f"{tp_small['comm_bytes_per_step'] / 1e6:.1f} MB"
    out["tp.small.vs_ddp"] = f"{tp_small['comm_bytes_per_step'] / ddp_small:.1f}x"
    out["small.ddp.mb"] = f"{ddp_small / 1e6:.1f} MB"
    out["small.params.mb"] = \
        f"{labs['baseline-small']['memory']['per_rank'][0]['params'] / 1e6:.1f} MB"
    for impl in ("own", "torch"):  # the tour's TP 2 runs, tiny preset: collectives per step
        s = find(tour, "tensor_parallel", impl)
        for op, c in s["comm"]["by_op"].items():
            out[f"tp.{impl}.{op}.calls"] = f"{c['calls'] / s['steps']:.0f}"
            out[f"tp.{impl}.{op}.bytes"] = f"{c['bytes'] / s['steps']:,.0f}"
    # the pipeline at P = 4, small preset: bytes each rank sends, distance from the baseline
    p4 = labs["pipeline-1f1b-p4-m8"]["comm"]["per_rank"]
    out["pp.p4.per_rank"] = "[" + ", ".join(f"{b:,.0f}" for b in p4) + "]"
    out["pp.p4.mb"] = f"{min(p4) / 1e6:.2f}-{max(p4) / 1e6:.2f} MB"
    p4_rel = max(s["baseline"]["max_rel_loss_diff"] for s in labs.values()
                 if s["lab"] == "pipeline" and s["world_size"] == 4)
    out["pp.p4.rel"] = f"{p4_rel:.1e}"
    out["cluster.3d.sent"] = " and ".join(sorted({human_bytes(r["comm_bytes_per_step"]) for x in
                                                 cluster["parallel3d"] for r in x["rows"].values()}))
    # the ring lab's checks (the tour's 3-rank run) and the comm benchmark's small-message cost
    ring = find(tour, "ring_allreduce", "ring")
    out["ring.check_err"] = f"{max(c['max_abs_err'] for c in ring['extra']['checks']):.1e}"
    steps = {"ring": 2, "naive": 2, "tree": 2}  # at W = 2: 2(W-1), 2, 2 ceil(log2 W)
    per_step = [r["time_s_median"] / steps[r["impl"]] for r in load(ref_dir, "comm.json")["rows"]
                if r["world_size"] == 2 and r["bytes"] == 1024 and r["impl"] in steps]
    out["comm.step_latency"] = f"{min(per_step) * 1e3:.2f}-{max(per_step) * 1e3:.2f} ms"
    # nn.DataParallel: what replica 0 holds against the others
    out["dp.r2.over"] = f"{find(tour, 'dataparallel', 'own')['extra']['replica0_over_others']:.2f}x"
    out["dp.r4.over"] = f"{labs['dp-r4']['extra']['replica0_over_others']:.2f}x"
    bm = base["memory"]["per_rank"][0]
    out["baseline.act_over_params"] = f"{bm['activations_peak'] / bm['params']:.0f}x"
    # expert parallelism: how unevenly block 0's experts were chosen in the last step (EP 2)
    ep2 = next(r for r in load(ref_dir, "schedules-experts.json")["experts"]
               if r["ep"] == 2 and r["dp"] == 1 and r["capacity_factor"] is None)
    block0 = ep2["tokens_last_step"][0]
    out["experts.block0.range"] = f"{min(block0):.0f} to {max(block0):.0f}"
    out["experts.block0.total"] = f"{sum(block0):,.0f}"
    return out


MEMORY_COLS = ("params", "grads", "optimizer", "activations_peak")


def tp_table(tour: list[dict]) -> str:
    """The tour's tensor-parallel runs against its baseline: distance, bytes a rank holds."""
    rows = ["| TP | impl | max rel loss diff | max abs param diff | params / rank (bytes) | "
            "optimizer / rank | activations / rank |", "|---|---|---|---|---|---|---|"]
    for label, impl, s in (("1 (baseline)", "-", find(tour, "baseline")),
                           ("2", "own", find(tour, "tensor_parallel", "own")),
                           ("2", "torch", find(tour, "tensor_parallel", "torch"))):
        m = s["memory"]["per_rank"][0]
        rows.append(f"| {label} | {impl} | {_sci(s)} | {_param(s)} | {m['params']:,} | "
                    f"{m['optimizer']:,} | {m['activations_peak']:,} |")
    return "\n".join(rows)


def ring_bytes_table(tour: list[dict]) -> str:
    """The ring lab's checks (the tour's 3-rank run): bytes each rank sent, by algorithm."""
    checks = find(tour, "ring_allreduce", "ring")["extra"]["checks"]
    w = len(checks[0]["sent_bytes_per_rank"])
    rows = ["| W | length | ring, per rank | 2(W−1)/W · 4n | naive, per rank | tree, per rank |",
            "|---|---|---|---|---|---|"]
    for n in sorted({c["length"] for c in checks}):
        by = {c["algo"]: c for c in checks if c["length"] == n}
        cells = [" / ".join(f"{b:,}" for b in by[a]["sent_bytes_per_rank"]) for a in
                 ("ring", "naive", "tree")]
        theory = _count(round(by["ring"]["ring_theory_bytes"], 1))
        rows.append(f"| {w} | {n:,} | {cells[0]} | {theory} | {cells[1]} | {cells[2]} |")
    return "\n".join(rows)


def replicas_table(tour: list[dict], labs: dict) -> str:
    """nn.DataParallel's bytes per replica, 2 replicas (the tour) and 4 (labs.json)."""
    cols = ("params", "grads", "activations", "outputs", "optimizer", "gathered_outputs", "total")
    rows = ["| replicas | replica | params | grads | activations | outputs | optimizer | "
            "gathered outputs | total |", "|---|---|---|---|---|---|---|---|---|"]
    for s in (find(tour, "dataparallel", "own"), labs["dp-r4"]):
        reps = s["extra"]["replica_bytes"]
        groups = [(str(reps[0]["replica"]), reps[0])]
        rest = reps[1:]
        if rest and all({c: r[c] for c in cols} == {c: rest[0][c] for c in cols} for r in rest):
            name = str(rest[0]["replica"]) if len(rest) == 1 else \
                f"{rest[0]['replica']}-{rest[-1]['replica']}"
            groups.append((name, rest[0]))
        else:
            groups += [(str(r["replica"]), r) for r in rest]
        for name, r in groups:
            rows.append(f"| {len(reps)} | {name} | " + " | ".join(f"{r[c]:,}" for c in cols) + " |")
    return "\n".join(rows)


def baseline_memory_table(tour: list[dict]) -> str:
    """The baseline's bytes by category (the tour's run), with the counts behind them."""
    s = find(tour, "baseline")
    m, n = s["memory"]["per_rank"][0], s["n_params"]
    return "\n".join([
        "| params | grads | optimizer (AdamW) | activations (peak, saved for backward) |",
        "|---|---|---|---|",
        f"| {m['params']:,} (= 4 × {n:,}) | {m['grads']:,} | {m['optimizer']:,} (= 2 × 4 × {n:,} "
        f"+ the `step` scalars) | {m['activations_peak']:,} |"])


def _size(n: int) -> str:
    return f"{n // 2**20} MiB" if n >= 2**20 else f"{n // 2**10} KiB"


def shm_figures(host: list[dict]) -> dict[str, str]:
    """docs/communication.md's reading of the shared-memory record's host rows: the sizes it
    covers, and up to which size DeepSpeed's op at 4 ranks stays behind gloo."""
    sizes = sorted({r["bytes"] for r in host})
    ds4 = sorted((r["bytes"], r["busbw_vs_library"]) for r in host
                 if r["impl"] == "deepspeed-shm" and r["world_size"] == 4)
    behind = [n for n, x in ds4 if x < 1]
    upto = max(n for n in behind if all(x < 1 for m, x in ds4 if m <= n)) if behind else None
    return {"commexp.sizes": f"{_size(sizes[0])} to {_size(sizes[-1])}",
            "commexp.ds4.behind": _size(upto) if upto else "-"}


def formula_figures(tiny: dict, small: dict) -> dict[str, str]:
    """How far 6N + attention lies above the counted FLOPs: the tour's tiny DDP run and the GPU
    record's small baseline (FLOPs do not depend on the device)."""
    return {"mfu.formula_over": f"{tiny['formula_over_counted'] - 1:.1%}",
            "mfu.formula_gap": f"{tiny['formula_flops_per_step'] - tiny['model_flops_per_step']:,}",
            "mfu.formula_over.small": f"{small['formula_over_counted'] - 1:.1%}"}


def accum_figures(s: dict) -> dict[str, str]:
    """docs/launch.md: what the accelerate run with gradient accumulation all-reduced."""
    a = s["comm"]["by_op"]["all_reduce"]
    return {"accelerate-accum2.allreduce": f"{a['calls']} all-reduces, {a['bytes']:,} bytes",
            "accelerate-accum2.steps": str(s["steps"]),
            "accelerate-accum2.params": f"{s['n_params']:,}"}


def bubble_table(runs: dict) -> str:
    rows = ["| P | M | theory | GPipe measured | 1F1B measured | GPipe live micro-batches | "
            "1F1B live micro-batches |", "|---|---|---|---|---|---|---|"]
    for p in (2, 4):
        for m in (1, 2, 4, 8):
            g, f = (runs[f"pipeline-{s}-p{p}-m{m}"]["extra"] for s in ("gpipe", "1f1b"))
            rows.append(f"| {p} | {m} | {g['bubble_theory']:.3f} | {g['bubble_measured']:.3f} | "
                        f"{f['bubble_measured']:.3f} | {g['peak_live_microbatches']} | "
                        f"{f['peak_live_microbatches']} |")
    return "\n".join(rows)


def overlap_table(runs: dict) -> str:
    rows = ["| all-reduce | overlap | backward ms | wait after backward ms | step ms |",
            "|---|---|---|---|---|"]
    for a in ("ring", "library"):
        for o in ("yes", "no"):
            s = runs[f"ddp-overlap-{a}-{o}"]
            t = s["extra"]["overlap_timing"]
            rows.append(f"| {a} | {o if o == 'yes' else 'no (`--no-overlap`)'} | "
                        f"{t['backward_s_median'] * 1e3:.1f} | "
                        f"{t['wait_after_backward_s_median'] * 1e3:.1f} | "
                        f"{s['time']['step_s_median'] * 1e3:.1f} |")
    return "\n".join(rows)


def _count(x: float) -> str:
    """Bytes: whole numbers as such, a fraction (a modelled share) to one decimal."""
    return f"{x:,.0f}" if x == int(x) else f"{x:,.1f}"


def own_ddp_table(runs: dict) -> str:
    rows = ["| W | all-reduce | max rel loss diff | max abs param diff | sent / rank / step | "
            "2(W-1)/W x 4P |", "|---|---|---|---|---|---|"]
    for w in (2, 3, 4):
        for a in ("ring", "library"):
            s = runs[f"ddp-own-w{w}-{a}"]
            rows.append(f"| {w} | {a} | {_sci(s)} | {_param(s)} | "
                        f"{_count(s['comm']['bytes_per_step'])} | {_count(_dp_formula(s))} |")
    return "\n".join(rows)


def tour_table(tour: dict) -> str:
    rows = ["| " + " | ".join(REPORT_COLUMNS) + " |", "|" + "---|" * len(REPORT_COLUMNS)]
    rows += ["| " + " | ".join(report_row(s)) + " |" for s in tour["runs"]]
    rows.append("")
    rows += [f"- skipped {n}: {why}" for n, why in tour["skipped"]]
    rows += [f"- FAILED {n}: {why}" for n, why in tour["failed"]]
    return "\n".join(rows)


def profile_table(tour: dict) -> str:
    """The time split of every profiled multi-rank run of the tour, mean over ranks."""
    cols = ("computation", "communication", "overlap", "exposed_communication", "other")
    rows = ["| run | ranks | step ms | comm/step/rank | computation | communication | overlap "
            "| exposed comm | other |", "|---|---|---|---|---|---|---|---|---|"]
    for s in tour["runs"]:
        share = profile_shares(s)
        if s["world_size"] < 2 or share is None:
            continue
        rows.append(f"| {s['lab']} {s['variant']} | {s['world_size']} | "
                    f"{s['time']['step_s_median'] * 1e3:.1f} | "
                    f"{human_bytes(s['comm']['bytes_per_step'])} | "
                    + " | ".join(_pct(share[c]) for c in cols) + " |")
    return "\n".join(rows)


def dp_table(tour: dict) -> str:
    """The data-parallel runs of the tour: distance from the baseline, bytes counted against
    2(W-1)/W x 4P, step time."""
    rows = ["| run | world | max rel loss diff | max abs param diff | sent / rank / step | "
            "2(W-1)/W x 4P | step ms |", "|---|---|---|---|---|---|---|"]
    picks = [("baseline", ""), ("torch_multiprocessing", ""), ("ddp", "torch"), ("ddp", "own"),
             ("ring_allreduce", "ring"), ("ring_allreduce", "tree")]
    for lab, variant in picks:
        try:
            s = find(tour["runs"], lab, variant)
        except KeyError:
            continue
        rows.append(f"| {lab} {s['variant']} | {s['world_size']} | {_sci(s)} | {_param(s)} | "
                    f"{s['comm']['bytes_per_step']:,.0f} B | {_dp_formula(s):,.0f} B | "
                    f"{s['time']['step_s_median'] * 1e3:.1f} |")
    return "\n".join(rows)


def busbw_table(comm: list[dict]) -> str:
    impls = ("library", "ring", "naive", "tree")
    rows = ["| W | size | library (gloo) | ring (ours) | naive | tree |",
            "|---|---|---|---|---|---|"]
    keys = sorted({(r["world_size"], r["bytes"]) for r in comm if r["op"] == "all_reduce"})
    for w, n in keys:
        by = {r["impl"]: r for r in comm if (r["world_size"], r["bytes"]) == (w, n)
              and r["op"] == "all_reduce"}
        cells = []
        for impl in impls:
            r = by.get(impl)
            if r is None:
                cells.append("-")
            elif impl == "library":
                cells.append(f"{r['busbw_GBps']:.3f}")
            else:
                cells.append(f"{r['busbw_GBps']:.3f} ({r['busbw_vs_library']:.2f}x)")
        size = f"{n // 2**20} MiB" if n >= 2**20 else f"{n // 2**10} KiB"
        rows.append(f"| {w} | {size} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


AMP_ROWS = (("amp-fp16-own", "`--dtype fp16 --scaler own` (autocast)"),
            ("amp-fp16-none", "`--dtype fp16 --scaler none` (autocast, no scaling)"),
            ("amp-bf16-none", "`--dtype bf16 --scaler none` (autocast)"),
            ("amp-fp16-master", "`--dtype fp16 --master-weights` (pure fp16)"))


def _amp_within(s: dict) -> str:
    """The tolerance and whether the run is inside it (by its figures: a run with a skipped
    step records ``baseline.ok: null``, not numerically equivalent by design)."""
    b, tol = s["baseline"], s["baseline"]["tolerance"]
    inside = b["max_rel_loss_diff"] <= tol["loss_rel"] and \
        b["max_abs_param_diff"] <= tol["param_abs"]
    return f"{tol['loss_rel']:g} / {tol['param_abs']:g}: " + ("within" if inside else
                                                              "**outside**")


def amp_table(runs: dict) -> str:
    """docs/amp.md: each precision's largest distance from the fp32 baseline over 50 steps
    (docs/reference/amp.json) against the tolerance the lab states for it."""
    rows = ["| run | max relative loss difference | max parameter difference | "
            "stated tolerance (loss / parameters) | skipped steps |", "|---|---|---|---|---|"]
    for name, label in AMP_ROWS:
        s = runs[name]
        skipped = ", ".join(str(x) for x in s["extra"].get("skipped_steps", [])) or "none"
        rows.append(f"| {label} | {_sci(s)} | {_param(s)} | {_amp_within(s)} | {skipped} |")
    s = runs[AMP_ROWS[0][0]]
    rows += ["", f"`dtlab run amp --nproc 1 ... --steps {s['steps']}`, tiny preset, one "
                 f"process; record `docs/reference/amp.json` (`python -m "
                 f"dtlab.docsgen.records.amp_runs`)."]
    return "\n".join(rows)


def amp_figures(ref_dir: Path) -> dict[str, str]:
    """docs/amp.md's prose: saved activations and parameter bytes by precision, the fp16
    underflow count, the drift ratios (docs/reference/amp.json; the fp32 activations and the
    2-rank run's skipped step from the tour)."""
    runs = load(ref_dir, "amp.json")["runs"]
    tour = load(ref_dir, "tour.json")["runs"]
    own, none, bf16, pure = (runs[n] for n, _ in AMP_ROWS)
    base = find(tour, "baseline")
    fp16_tour = find(tour, "amp", "fp16")

    def act(s):
        return f"{s['memory']['per_rank'][0]['activations_peak'] / 1e6:.2f} MB"

    def share(x):
        return "none" if not x else f"{x * 100:.2g}%" if x < 0.01 else f"{x:.1%}"
    u, ut = own["extra"]["fp16_underflow"], fp16_tour["extra"]["fp16_underflow"]
    rel = {n: s["baseline"]["max_rel_loss_diff"] for n, s in runs.items()}
    losses = own["baseline"]["losses"]
    return {"amp.act.fp32": act(base), "amp.act.fp16": act(own), "amp.act.bf16": act(bf16),
            "amp.act.pure": act(pure),
            "amp.params.pure": f"{pure['memory']['per_rank'][0]['params']:,} bytes",
            "amp.params.fp32": f"{own['memory']['per_rank'][0]['params']:,}",
            "amp.steps": str(own["steps"]),
            "amp.under.grads": f"{u['nonzero_gradients']:,}",
            "amp.under.median": f"{u['median_abs']:.1e}",
            "amp.under.subnormal": share(u["subnormal_in_fp16"]),
            "amp.under.zero": share(u["zero_in_fp16"]),
            "amp.tour.under.median": f"{ut['median_abs']:.1e}",
            "amp.tour.under.subnormal": share(ut["subnormal_in_fp16"]),
            "amp.tour.under.zero": share(ut["zero_in_fp16"]),
            "amp.tour.skipped": ", ".join(str(x) for x in fp16_tour["extra"]["skipped_steps"]),
            "amp.pure.skipped": ", ".join(str(x) for x in pure["extra"]["skipped_steps"]),
            "amp.loss.first": f"{losses[0]:.2f}", "amp.loss.last": f"{losses[-1]:.2f}",
            "amp.ratio.bf16": f"{rel['amp-bf16-none'] / rel['amp-fp16-own']:.1f}x",
            "amp.ratio.scaling": f"{rel['amp-fp16-none'] / rel['amp-fp16-own']:.1f}x"}


def tables(ref_dir: Path) -> dict[str, str]:
    tour = load(ref_dir, "tour.json")
    return {"tour": tour_table(tour), "profile": profile_table(tour), "dp": dp_table(tour),
            "busbw": busbw_table(load(ref_dir, "comm.json")["rows"]),
            "tp": tp_table(tour["runs"]), "ringbytes": ring_bytes_table(tour["runs"]),
            "replicas": replicas_table(tour["runs"], load(ref_dir, "labs.json")["runs"]),
            "basemem": baseline_memory_table(tour["runs"]),
            "gpu": gpu_table(load(ref_dir, "gpu.json")),
            "amptol": amp_table(load(ref_dir, "amp.json")["runs"]),
            **zero_tables(ref_dir),
            **{k: f(load(ref_dir, "labs.json")["runs"]) for k, f in
               (("bubble", bubble_table), ("overlap", overlap_table), ("owndp", own_ddp_table))}}


def question_figures(ref_dir: Path) -> dict[str, str]:
    """Figures of docs/questions.md answers 34-67 that no other page quotes: q.KEY, each from the
    record of the command the answer's ``Try:`` line gives (tour.json, labs.json, questions.json,
    cluster.json, gpu.json)."""
    tour = load(ref_dir, "tour.json")["runs"]
    labs = load(ref_dir, "labs.json")["runs"]
    qr = load(ref_dir, "questions.json")["runs"]
    out: dict[str, str] = {}
    gb = lambda b: f"{b / 1e9:,.2f} GB"  # noqa: E731  (dtlab memory prints GB = 10^9 bytes)
    kib = lambda b: f"{b / 1024:,.1f} KiB"  # noqa: E731
    # Q35, Q36: DDP's bytes at W = 2 and 4; ours against torch's on the same settings
    ddp, w4 = find(tour, "ddp", "torch"), labs["ddp-torch-w4"]
    out["q.ddp.w2.sent"] = f"{ddp['comm']['bytes_per_step']:,.0f} B"
    out["q.ddp.w4.sent"] = f"{w4['comm']['bytes_per_step']:,.0f} B"
    out["q.ddp.own.w2b24.rel"] = _sci(labs["ddp-own-w2-ring"])
    # Q40, Q41: torch.multiprocessing's shared memory and its two sharing strategies
    mp = find(tour, "torch_multiprocessing", "sync")
    shm_write = mp["comm"]["by_op"]["shared_memory_write"]["bytes"]
    out["q.mp.write"] = f"{shm_write / mp['steps']:,.0f} B"
    for name in ("file-system", "file-descriptor"):
        sh = qr[f"mp-{name}"]["extra"]["sharing"]
        out[f"q.mp.{name}.files"] = str(sh["torch_files_in_dev_shm"])
        out[f"q.mp.{name}.fds"] = str(sh["open_file_descriptors"])
    # Q42: saved activations per rank, fp32 DDP against bf16 autocast, same 2 ranks and batch
    out["q.act.fp32.w2"] = f"{ddp['memory']['per_rank'][0]['activations_peak'] / 1e6:.2f} MB"
    out["q.act.bf16.w2"] = \
        f"{find(tour, 'amp', 'bf16')['memory']['per_rank'][0]['activations_peak'] / 1e6:.2f} MB"
    # Q44, Q45: the loss scaler
    mw = qr["amp-master-weights"]["extra"]
    out["q.amp.master.skipped"] = ", ".join(str(s) for s in mw["skipped_steps"])
    out["q.amp.master.nskipped"] = str(len(mw["skipped_steps"]))
    out["q.amp.master.scale"] = f"{mw['loss_scale'][0]:.0f} to {mw['loss_scale'][-1]:.0f}"
    own, torch_ = (qr[f"amp-scaler-{k}"]["extra"] for k in ("own", "torch"))
    out["q.amp.scaler.history"] = " ".join(f"{s:.0f}" for s in own["loss_scale"])
    out["q.amp.scaler.same"] = "identical" if (own["loss_scale"], own["skipped_steps"]) == \
        (torch_["loss_scale"], torch_["skipped_steps"]) else "DIFFERENT"
    out["q.amp.scaler.skipped"] = ", ".join(str(s) for s in own["skipped_steps"])
    # Q48, Q49: DeepSpeed ZeRO-3 in the tour
    ds = find(tour, "deepspeed_zero", "stage3")
    for op in ("all_gather", "reduce_scatter"):
        c = ds["comm"]["by_op"][op]
        n = c["calls"] / ds["steps"]
        out[f"q.ds3.{op}"] = f"{c['sent_bytes'] / ds['steps'] / 1024:,.1f} KiB in " \
                             f"{n:.0f} call{'' if n == 1 else 's'}"
    out["q.ds3.sent"] = kib(ds["comm"]["bytes_per_step"])
    out["q.ds3.fp32_diff"] = f"{ds['extra']['checkpoint_to_fp32']['max_abs_diff_vs_gathered']:.1f}"
    # Q51: AdamW state on rank 0, tiny, 2 ranks: ZeRO-1 against no sharding
    for st in ("0", "1"):
        out[f"q.zero.w2.s{st}.optimizer"] = \
            kib(find(tour, "zero", f"own-stage{st}")["memory"]["per_rank"][0]["optimizer"])
    # Q52, Q53, Q54: small, 4 ranks, rank 0
    for st in ("0", "3"):
        s = labs[f"zero-small-s{st}-none"]
        m = s["memory"]["per_rank"][0]
        out[f"q.zero.small.s{st}.states"] = " / ".join(
            f"{m[k] / 1024:,.1f}" for k in ("params", "grads", "optimizer")) + " KiB"
        out[f"q.zero.small.s{st}.sent"] = kib(s["comm"]["bytes_per_step"])
        out[f"q.zero.small.s{st}.opt_extra"] = \
            f"{s['extra']['memory_vs_formula']['device.optimizer']['buffers']:,.0f} B"
        out[f"q.zero.small.s{st}.formula"] = "equal" if all(
            v["ratio"] in (None, 1.0) for v in s["extra"]["memory_vs_formula"].values()) \
            else "NOT equal"
    s0, s3 = (labs[f"zero-small-s{st}-none"]["comm"]["bytes_per_step"] for st in ("0", "3"))
    out["q.zero.small.s3.over_s0"] = f"{s3 / s0:.2f}x"
    off = labs["zero-small-s2-optimizer"]["memory"]["per_rank"][0]
    out["q.zero.small.s2off.cpu"] = kib(off["offload"]["optimizer"])
    out["q.zero.small.s2off.device"] = f"{off['optimizer']:.0f} B"
    # Q55-Q58: dtlab memory's estimates
    m7 = qr["memory-7b"]
    out["q.mem.7b.weights"] = gb(m7["inference_gpu_bytes"])
    out["q.mem.7b.states"] = gb(m7["rows"][0]["gpu"]["total"])
    m65 = qr["memory-65b-v100"]
    fit = next(r for r in m65["rows"] if r["stage"] == 3 and r["offload"] == "param")
    out["q.mem.65b.weights"] = gb(m65["inference_gpu_bytes"])
    out["q.mem.65b.gpu"] = gb(fit["gpu"]["total"])
    out["q.mem.65b.acts_ckpt"] = gb(fit["activations"]["checkpointing"])
    out["q.mem.65b.cpu"] = gb(fit["cpu_per_node"]["total"])
    out["q.mem.65b.fits"] = ", ".join(f"ZeRO-{r['stage']} with offload {r['offload']}"
                                      for r in m65["rows"] if r.get("fits_gpu"))
    out["q.mem.65b.fits_cpu"] = "fits" if fit.get("fits_cpu") else "does not fit"
    m8 = {(r["stage"], r["offload"]): r for r in qr["memory-7b-8gpus"]["rows"]}
    out["q.mem.7b8.z2"] = gb(m8[(2, "none")]["gpu"]["total"])
    out["q.mem.7b8.z3"] = gb(m8[(3, "none")]["gpu"]["total"])
    z3 = qr["memory-7b-z3-offload"]["rows"][0]
    out["q.mem.7b.z3off.gpu"] = gb(z3["gpu"]["params"])
    out["q.mem.7b.z3off.cpu"] = gb(z3["cpu_per_node"]["total"])
    # Q60: the namespace cluster's all-reduce, 8 MiB, one rank a node, gloo
    links = {r["rate"]: r for r in load(ref_dir, "cluster.json")["links"]
             if r["bytes"] == 8 * 2**20 and r["impl"] == "library" and r["ranks_per_node"] == 1}
    for rate in ("100mbit", "1gbit", "10gbit"):
        out[f"q.link.{rate}.busbw"] = f"{links[rate]['busbw_GBps'] * 8:.3f} Gbit/s"
        out[f"q.link.{rate}.share"] = f"{links[rate]['busbw_over_link']:.2f}"
    # Q62: the lent GPU as nvidia-smi named it
    gpu = load(ref_dir, "gpu.json")["gpu"]
    out["q.gpu.name"] = ", ".join(x.strip() for x in gpu.split(",")[:2])
    # Q63: counted FLOPs against the formula
    f = ddp["flops"]
    out["q.flops.formula_off"] = f"{f['formula_over_counted'] - 1:.1%}"
    # Q64: ds_report
    ops = qr["ds-report"]["ops"]
    out["q.ds_report.ops"] = str(len(ops))
    env = qr["ds-report"]["env"]
    out["q.ds_report.deepspeed"] = env["deepspeed info"].split(",")[0]
    out["q.ds_report.torch"] = env["torch version"]
    out["q.ds_report.installed"] = str(sum(o["installed"] for o in ops.values()))
    out["q.ds_report.compatible"] = str(sum(o["compatible"] for o in ops.values()))
    out["q.ds_report.not"] = ", ".join(n for n, o in ops.items() if not o["compatible"]) or "none"
    return out


# --------------------------------------------------------------------------- ZeRO and its libraries
# docs/zero.md and docs/deepspeed.md: our ZeRO lab's runs of labs.json (small preset, 4 ranks) and
# the libraries on the same run (zero-libraries.json, made by
# python -m dtlab.docsgen.records.zero_libraries)

ZERO_RUNS = (("stage 0", "s0-none"), ("stage 1", "s1-none"), ("stage 2", "s2-none"),
             ("stage 3", "s3-none"), ("stage 1, offload optimizer", "s1-optimizer"),
             ("stage 2, offload optimizer", "s2-optimizer"),
             ("stage 3, offload optimizer", "s3-optimizer"), ("stage 3, offload param", "s3-param"))


def _kib(x: float) -> str:
    return "0" if x == 0 else f"{x / 1024:,.1f}"


def _per_step(s: dict, op: str) -> tuple[float, float]:
    """Calls and bytes sent (with the ring factor) of one collective, per step and rank."""
    o = s["comm"]["by_op"].get(op)
    return (0, 0) if o is None else (o["calls"] / s["steps"], o["sent_bytes"] / s["steps"])


def zero_own_table(runs: dict) -> str:
    rows = ["| run | weights | grads | Adam | CPU (slice + grad + Adam) | formula GPU / CPU | "
            "comm KiB/step/rank | expected |", "|---|---|---|---|---|---|---|---|"]
    for label, key in ZERO_RUNS:
        s = runs[f"zero-small-{key}"]
        m, f = s["memory"]["per_rank"][0], s["extra"]["memory_formula"]
        off = m.get("offload")
        cpu = "-" if not off else _kib(off["params"] + off["grads"] + off["optimizer"])
        rows.append(f"| {label} | {_kib(m['params'])} | {_kib(m['grads'])} | "
                    f"{_kib(m['optimizer'])} | {cpu} | {_kib(f['device']['total'])} / "
                    f"{_kib(f['cpu']['total'])} | {_kib(s['comm']['bytes_per_step'])} | "
                    f"{_kib(s['extra']['comm_expected_bytes_per_step'])} |")
    return "\n".join(rows)


ZERO_LIBS = (("FairScale OSS + DDP", "zero-small-fairscale-oss", "stage 1"),
             ("FairScale ShardedDataParallel + OSS", "zero-small-fairscale-sdp", "stage 2"),
             ("torch FSDP2 `fully_shard`", "zero-small-fsdp2", "stage 3"),
             ("DeepSpeed stage 1", "ds-small-zero1", "-"),
             ("DeepSpeed stage 2", "ds-small-zero2", "-"),
             ("DeepSpeed stage 3", "ds-small-zero3", "-"))
OP_NAMES = {"all_reduce": "all-reduce", "reduce": "reduce", "broadcast": "broadcast",
            "all_gather": "all-gather", "reduce_scatter": "reduce-scatter"}


def _sends(s: dict) -> str:
    """The collectives a run issued, with their calls per step."""
    ops = sorted(s["comm"]["by_op"].items(), key=lambda kv: -kv[1]["sent_bytes"])
    return " + ".join(f"{OP_NAMES.get(op, op)} ({o['calls'] / s['steps']:g}/step)" for op, o in ops)


def zero_libs_table(runs: dict, libs: dict) -> str:
    rows = ["| implementation | matches | weights | grads | Adam | comm KiB/step/rank | "
            "what it sends |", "|---|---|---|---|---|---|---|"]
    for label, s, match in (("ours, stage 1", runs["zero-small-s1-none"], "-"),
                            *((lb, libs[k], mt) for lb, k, mt in ZERO_LIBS)):
        m = s["memory"]["per_rank"][0]
        rows.append(f"| {label} | {match} | {_kib(m['params'])} | {_kib(m['grads'])} | "
                    f"{_kib(m['optimizer'])} | {_kib(s['comm']['bytes_per_step'])} | {_sends(s)} |")
    return "\n".join(rows)


def ds_comm_table(libs: dict) -> str:
    ops = ("all_reduce", "reduce", "all_gather", "reduce_scatter", "broadcast")
    rows = ["| config | " + " | ".join(f"{OP_NAMES[o]}: calls, KiB" for o in ops)
            + " | KiB/step/rank |", "|---|---|---|---|---|---|---|"]
    for st in range(4):
        s = libs[f"ds-small-zero{st}"]
        cells = []
        for op in ops:
            calls, sent = _per_step(s, op)
            cells.append("" if not calls else
                         f"{calls:g}, {_kib(sent) if sent >= 1024 else f'{sent:.0f} bytes'}")
        rows.append(f"| ds_zero{st} | " + " | ".join(cells)
                    + f" | {_kib(s['comm']['bytes_per_step'])} |")
    return "\n".join(rows)


def ds_memory_table(libs: dict) -> str:
    rows = ["| config | weights | gradients | Adam moments | fp32 weight partition |",
            "|---|---|---|---|---|"]
    for st in range(4):
        m = libs[f"ds-small-zero{st}"]["memory"]["per_rank"][0]
        rows.append(f"| ds_zero{st} | {_kib(m['params'])} | {_kib(m['grads'])} | "
                    f"{_kib(m['optimizer'])} | {_kib(m.get('fp32_partitions', 0))} |")
    return "\n".join(rows)


def _ds3_gathers(s: dict) -> float:
    """DeepSpeed stage 3's all-gather bytes a step, in full gathers of the fp32 weights."""
    one = ring_factor("all_gather", s["world_size"]) * 4 * s["n_params"]
    return _per_step(s, "all_gather")[1] / one


def zero_figures(ref_dir: Path) -> dict[str, str]:
    """The figures of docs/zero.md and docs/deepspeed.md's prose."""
    runs, libs = load(ref_dir, "labs.json")["runs"], load(ref_dir, "zero-libraries.json")["runs"]
    s0, s1 = runs["zero-small-s0-none"]["extra"], runs["zero-small-s1-none"]["extra"]
    s3 = runs["zero-small-s3-none"]["extra"]
    oss = [m["optimizer"] / 1024 for m in libs["zero-small-fairscale-oss"]["memory"]["per_rank"]]
    ds1 = libs["ds-small-zero1"]["memory"]["per_rank"][0]
    even = runs["zero-small-s1-none"]["memory"]["per_rank"][0]["optimizer"]
    fsdp2 = libs["zero-small-fsdp2"]["memory"]["per_rank"][0]["params"]

    def extra(x, what):  # a buffer the ZeRO formula leaves out (memory_vs_formula)
        return x["memory_vs_formula"][what]["buffers"]
    return {
        "zero-small.s0.counters": f"{extra(s0, 'device.optimizer'):,.0f} bytes",
        "zero-small.s1.counters": f"{extra(s1, 'device.optimizer'):,.0f} bytes",
        "zero-small.s1.slice": f"{extra(s1, 'device.grads') / 1024:,.1f} KiB",
        "zero-small.s1.buffers": f"{s1['buffers_peak'] / 1024:,.1f} KiB",
        "zero-small.s3.buffers": f"{s3['buffers_peak'] / 1024:,.1f} KiB",
        "zero-small.units": str(len(s1["units"])),
        "zero-small.even_adam": f"{even / 1024:,.0f} KiB",
        "zerolib.oss.adam": ", ".join(f"{x:,.0f}" for x in oss[:-1]) + f" and {oss[-1]:,.0f} KiB",
        "zerolib.oss.rel": _sci(libs["zero-small-fairscale-oss"]),
        "zerolib.fsdp2.weights": _kib(fsdp2) + " KiB",
        "zerolib.ds.fp32_partition": _kib(ds1.get("fp32_partitions", 0)) + " KiB",
        "zerolib.ds.tiny.sent": _kib(libs["ds-tiny-zero1"]["comm"]["bytes_per_step"]) + " KiB",
        "zerolib.ds.tiny.bucket_sent":
            _kib(libs["ds-tiny-zero1-bucket-allreduce"]["comm"]["bytes_per_step"]) + " KiB",
        "zerolib.rel": f"{max(s['baseline']['max_rel_loss_diff'] for s in libs.values()):.1e}",
        "zerolib.ds3.gathers": f"{_ds3_gathers(libs['ds-small-zero3']):.1f}",
    }


def zero_tables(ref_dir: Path) -> dict[str, str]:
    runs, libs = load(ref_dir, "labs.json")["runs"], load(ref_dir, "zero-libraries.json")["runs"]
    return {"zeroown": zero_own_table(runs), "zerolibs": zero_libs_table(runs, libs),
            "dscomm": ds_comm_table(libs), "dsmem": ds_memory_table(libs)}
