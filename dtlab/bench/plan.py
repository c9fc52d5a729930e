"""``dtlab bench plan``: how long ``dtlab plan --gpu`` takes to rank the layouts of the
Megatron-LM paper's 1T model (Narayanan et al., 2021: 128 layers, d_model 25600, 160 heads,
sequence 2048, vocabulary 51200, GPT-style, global batch 3072) on 384 nodes x 8 A100 80GB.

    dtlab bench plan --json docs/reference/plan-search-1t.json [--repeats 3]

The search (dtlab/plan/gpu_search.py) runs ``--repeats`` times in this process; the record
keeps each run's wall time, the layouts named, costed and pruned, and the best layouts; one
more run without the time bound (every group that fits costed) checks that the bound changes
nothing and shows what it saves. A benchmark, not a test: the tests assert no time.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from dtlab.costmodel import gpu_step as gs
from dtlab.costmodel.gpus import gpu as gpu_named
from dtlab.errors import UsageError
from dtlab.report import records

ARCH_1T = gs.Arch(layers=128, hidden=25600, heads=160, ffn=4 * 25600, vocab=51200, seq=2048,
                  style="gpt")
BATCH_1T = 3072
NODES_1T, PER_NODE_1T = 384, 8
COMMAND_1T = ("dtlab plan --gpu A100 --arch gpt --layers 128 --d-model 25600 --heads 160 "
              "--seq 2048 --vocab 51200 --batch 3072 --nodes 384 --devices-per-node 8")


def cluster_1t() -> gs.GpuCluster:
    return gs.GpuCluster(gpu_named("A100"), nodes=NODES_1T, per_node=PER_NODE_1T)


def run(json_path: str, repeats: int = 3, top: int = 5) -> int:
    from dtlab.measure.run_record import atomic_write_text  # torch: only when writing
    from dtlab.plan import gpu_search
    if repeats < 1 or top < 1:
        raise UsageError("--repeats and --top must be >= 1")
    c = cluster_1t()
    runs = []
    res = None
    for i in range(repeats):
        t0 = time.perf_counter()
        res = gpu_search.plan_gpu(ARCH_1T, BATCH_1T, c, keep=top)
        wall = time.perf_counter() - t0
        runs.append({"wall_s": wall, "search_wall_s": res["wall_s"], **res["counts"]})
        print(f"[{i + 1}/{repeats}] {res['counts']['costed']} layouts costed in {wall:.3f} s")
    k, _ = gpu_search.constants()
    t0 = time.perf_counter()
    full = gpu_search.search(ARCH_1T, BATCH_1T, c, k, keep=top, exhaustive=True)
    full_wall = time.perf_counter() - t0
    same = [r["label"] for r in full["ranked"]] == [r["label"] for r in res["ranked"]]
    walls = sorted(r["wall_s"] for r in runs)
    record = {
        "what": "dtlab plan --gpu's search on the Megatron-LM paper's 1T model, 384 x 8 A100 "
                "80GB (dtlab bench plan)",
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": records.machine(),
        "command": f"dtlab bench plan --json {json_path} --repeats {repeats}",
        "equivalent_plan_command": COMMAND_1T,
        "model_used": res["model_used"], "constants_source": res["constants_source"],
        "constants": res["constants"], "mfu_definition": res["mfu_definition"],
        "model": res["model"], "batch": BATCH_1T, "cluster": res["cluster"],
        "runs": runs, "wall_s_median": walls[len(walls) // 2], "wall_s_max": walls[-1],
        "layouts_named": runs[-1]["layouts"], "layouts_costed": runs[-1]["costed"],
        "without_time_bound": {"wall_s": full_wall, **full["counts"],
                               "same_ranking": same},
        "best": res["ranked"][0]["label"],
        "ranked": res["ranked"],
    }
    atomic_write_text(Path(json_path), json.dumps(record, indent=1) + "\n")
    b = res["ranked"][0]
    print(f"1T on {NODES_1T} x {PER_NODE_1T} A100: {record['layouts_named']} layouts named, "
          f"{record['layouts_costed']} costed; wall median {record['wall_s_median']:.3f} s, "
          f"max {record['wall_s_max']:.3f} s; without the time bound {full['counts']['costed']} "
          f"costed in {full_wall:.3f} s, same ranking: {same}")
    print(f"best: {b['label']}: {b['time']['total']:.2f} s a step, MFU {b['mfu']:.1%}, "
          f"{b['memory']['total'] / 1e9:.1f} GB a GPU")
    print(f"record: {json_path}")
    return 0
