"""``dtlab plan --gpu`` (dtlab/plan/gpu_search.py): the layout search on the GPU step model.
The Megatron-LM paper's 1T model on 384 x 8 A100 gets a ranked, feasible list; the pruning
changes no ranking; the parts add up; the features the search added to gpu_step.py (the
interleaved bubble, recomputation) move time and memory the right way; bad input is one line.
No timed assertions (``dtlab bench plan`` times the search)."""
import json
from dataclasses import replace

import pytest

from dtlab.bench.plan import ARCH_1T, BATCH_1T, cluster_1t
from dtlab.cli import main as cli_main
from dtlab.costmodel import gpu_step as gs
from dtlab.costmodel.gpus import GB, gpu
from dtlab.costmodel.step_time import PlanError
from dtlab.plan import gpu_search

ARGS_1T = ["plan", "--gpu", "a100", "--arch", "gpt", "--layers", "128", "--d-model", "25600",
           "--heads", "160", "--seq", "2048", "--vocab", "51200", "--batch", "3072",
           "--nodes", "384", "--devices-per-node", "8"]


@pytest.fixture(scope="module")
def res_1t():
    return gpu_search.plan_gpu(ARCH_1T, BATCH_1T, cluster_1t(), keep=8)


def test_the_1t_search_ranks_feasible_layouts(res_1t):
    ranked = res_1t["ranked"]
    assert len(ranked) == 8 and res_1t["counts"]["costed"] >= len(ranked)
    best = ranked[0]["layout"]
    assert best["tp"] <= 8 and best["dp"] * best["tp"] * best["pp"] == 384 * 8
    assert best["dp"] * best["mbs"] * best["grad_acc"] == BATCH_1T
    for r in ranked:
        assert r["fits"] and r["memory"]["total"] <= 80 * GB
        assert 0 < r["mfu"] <= r["hfu"] < 1


def test_the_ranking_is_consistent(res_1t):
    times = [r["time"]["total"] for r in res_1t["ranked"]]
    assert times == sorted(times)
    for r in res_1t["ranked"]:
        t = r["time"]
        assert sum(t[p] for p in gpu_search.PARTS) == pytest.approx(t["total"], rel=1e-9)
        assert all(t[p] >= 0 for p in gpu_search.PARTS)
        m = r["memory"]
        assert sum(m[p] for p in gpu_search.MEMORY_PARTS) == pytest.approx(m["total"],
                                                                           rel=1e-9)
    assert res_1t["ranked"][0].get("why_not_best") is None
    assert all(r["why_not_best"] for r in res_1t["ranked"][1:])


@pytest.mark.parametrize("case", ["1t", "8b"])
def test_pruning_changes_no_ranking(case):
    """The time bound only skips groups that cannot enter the top: the same list as costing
    every layout that fits."""
    k, _ = gpu_search.constants()
    if case == "1t":
        a, batch, c = ARCH_1T, BATCH_1T, cluster_1t()
    else:
        a = gs.Arch(32, 4096, 32, 14336, 128256, 4096, kv_heads=8, style="llama")
        batch, c = 256, gs.GpuCluster(gpu("H100"), nodes=4, per_node=8)
    pruned = gpu_search.search(a, batch, c, k, keep=10)
    full = gpu_search.search(a, batch, c, k, keep=10, exhaustive=True)
    assert [r["label"] for r in pruned["ranked"]] == [r["label"] for r in full["ranked"]]
    assert [r["time"]["total"] for r in pruned["ranked"]] == \
        [r["time"]["total"] for r in full["ranked"]]
    assert pruned["counts"]["costed"] <= full["counts"]["costed"]


def test_the_bound_is_below_every_layouts_time():
    k, _ = gpu_search.constants()
    a = gs.Arch(8, 1024, 16, 4096, 32000, 2048, style="llama")
    c = gs.GpuCluster(gpu("H100"), nodes=2, per_node=8)
    s = gpu_search.GpuSearch()
    batch = 64
    checked = 0
    for tp in (1, 2, 4, 8):
        for pp in (1, 2, 4, 8):
            dp = 16 // (tp * pp)
            if dp < 1 or 16 % (tp * pp):
                continue
            for mbs in (1, 2, 4):
                m = batch // (dp * mbs)
                if m < 1 or batch % (dp * mbs):
                    continue
                vs = list(gpu_search._variants(a, tp, pp, m, s))
                lb = gpu_search.lower_bound(a, tp, pp, dp, mbs, m, max(v[-1] for v in vs),
                                            max(v[0] for v in vs), c, k)
                for zero, rc, sp, v in vs:
                    lay = gs.GpuLayout(dp=dp, tp=tp, pp=pp, mbs=mbs, grad_acc=m, zero=zero,
                                       sp=sp, recompute=rc, interleave=v)
                    arch = a.untied() if pp > 1 else a
                    assert lb <= gs.step_seconds(arch, lay, c, k)["total"] * (1 + 1e-12)
                    checked += 1
    assert checked > 100


def test_a_model_that_fits_nowhere_says_so(capsys):
    a = replace(ARCH_1T, layers=1024)          # 8T parameters on 64 GPUs
    with pytest.raises(PlanError, match=r"the model fits nowhere: the leanest layout \(.+\) "
                                        r"needs [\d.]+ GB a GPU, the A100 SXM 80GB has 80.0 GB"):
        gpu_search.plan_gpu(a, 64, gs.GpuCluster(gpu("A100"), nodes=8, per_node=8))
    with pytest.raises(SystemExit) as e:
        cli_main(["plan", "--gpu", "A100", "--layers", "1024", "--d-model", "25600", "--heads",
                  "160", "--batch", "64", "--nodes", "8", "--devices-per-node", "8"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dtlab: error: the model fits nowhere") and "\n" not in err


def test_an_unknown_gpu_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["plan", "--gpu", "V100", "--layers", "2", "--d-model", "64", "--heads", "4"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "dtlab: error: --gpu 'V100': unknown GPU; known: H100, A100, H200\n"


def test_the_cli_names_its_model_and_defines_mfu(capsys, tmp_path):
    out_json = tmp_path / "plan.json"
    assert cli_main(ARGS_1T + ["--top", "3", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("GPU model (dtlab/costmodel/gpu_step.py), constants fitted on the "
                          "Playbook's H100 sweep")
    assert gpu_search.MFU_DEFINITION in out
    assert "layouts costed" in out and "dp12 tp8" in out
    rec = json.loads(out_json.read_text())
    assert rec["model_used"] == gpu_search.HEADER and len(rec["ranked"]) == 3
    assert rec["cluster"]["memory_bytes"] == 80 * GB


def test_datasheet_figures_give_way_to_flags():
    from dtlab.plan.search import add_arguments, gpu_cluster_from_args
    import argparse
    a = add_arguments(argparse.ArgumentParser()).parse_args(
        ["--gpu", "h100", "--device-memory", "40GB", "--intra", "3,200", "--inter", "10,400",
         "--nodes", "2", "--devices-per-node", "8"])
    c = gpu_cluster_from_args(a)
    assert c.gpu.memory == 40e9 and c.intra_bw == 200e9 and c.inter_bw == 50e9
    assert c.gpu.peak["bf16"] == gpu("H100").peak["bf16"]
    assert gpu_search.constants()[0] == gpu_search.FITTED      # the record's fit_all_rows


def test_the_interleaved_bubble_is_v_times_smaller():
    a, c = ARCH_1T, cluster_1t()
    k = gpu_search.FITTED
    base = gs.GpuLayout(dp=12, tp=8, pp=32, mbs=1, grad_acc=256, zero=1, sp=True)
    plain = gs.step_seconds(a, base, c, k)["bubble"]
    for v in (2, 4):
        inter = gs.step_seconds(a, replace(base, interleave=v), c, k)["bubble"]
        assert inter == pytest.approx(plain / v, rel=1e-9)


def test_full_recomputation_costs_time_and_saves_activations():
    a, c = ARCH_1T, cluster_1t()
    k = gpu_search.FITTED
    base = gs.GpuLayout(dp=6, tp=8, pp=64, mbs=1, grad_acc=512, zero=1, sp=True)
    full = replace(base, recompute="full")
    t0, t1 = gs.step_seconds(a, base, c, k), gs.step_seconds(a, full, c, k)
    m0, m1 = gs.memory_bytes(a, base, c, k), gs.memory_bytes(a, full, c, k)
    assert t1["total"] > t0["total"] and t1["recompute"] > 0 == t0["recompute"]
    assert m1["activations"] < m0["activations"]
    assert gs.hardware_flops_per_token(a, "full") > gs.hardware_flops_per_token(a, "none")


def test_zero2_reduce_scatters_every_micro_batch():
    """ZeRO-2/3 keep a shard of the gradients: with gradient accumulation each micro-batch's
    backward reduce-scatters (an addition; one micro-batch is what the measured sweep's ZeRO-1
    path gives)."""
    a = gs.Arch(16, 2048, 32, 8192, 131072, 4096, tied=True)
    c = gs.GpuCluster(gpu("H100"), nodes=2, per_node=8)
    k = gpu_search.FITTED
    one = gs.GpuLayout(dp=16, mbs=1, grad_acc=1, zero=2)
    assert gs.features(a, one, c)["dp"] == gs.features(a, replace(one, zero=1), c)["dp"]
    many = replace(one, grad_acc=8)
    assert gs.step_seconds(a, many, c, k)["dp"] > gs.step_seconds(a, replace(many, zero=1), c,
                                                                  k)["dp"]
