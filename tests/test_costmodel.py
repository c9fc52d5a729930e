"""Model states per rank from the shapes (dtlab/costmodel/shapes.py) against real models: the
pipeline cut equals the model's, and the weights, gradients and AdamW state are the bytes the
tensors hold (the 3D lab test checks every rank of a TP x PP x DP run the same way); the GPU
model's pieces (dtlab/costmodel/gpu_step.py) against the measured sweep's own columns."""
import csv
from pathlib import Path

import pytest
import torch

from dtlab.costmodel import fitting, gpu_step, gpus
from dtlab.errors import UsageError
from dtlab.costmodel.shapes import Shape, model_states, stage_layers, total_params
from dtlab.train.model import ModelConfig, build_model, stage_bounds


def test_stage_cut_is_the_models():
    for layers in range(1, 9):
        for stages in range(1, layers + 1):
            assert [stage_layers(layers, stages, s) for s in range(stages)] == \
                stage_bounds(layers, stages)


@pytest.mark.parametrize("shape", [(2, 32, 2, 128, 13, 32), (4, 128, 4, 512, 65, 64),
                                   (3, 48, 4, 100, 7, 17)])
def test_model_states_are_the_tensors_bytes(shape):
    m = Shape(*shape)
    cfg = ModelConfig(vocab_size=m.vocab, seq_len=m.seq, n_layer=m.n_layer, n_head=m.n_head,
                      d_model=m.d_model, d_ff=m.d_ff)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, m.seq, dtype=torch.long)).sum().backward()
    opt.step()
    states = [v for s in opt.state.values() for v in s.values()]
    want = {"params": sum(p.numel() * 4 for p in model.parameters()),
            "grads": sum(p.grad.numel() * 4 for p in model.parameters()),
            "optimizer": sum(v.numel() * v.element_size() for v in states)}
    got = model_states(m)
    assert {k: got[k] for k in want} == want
    assert total_params(m) == sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------- the GPU model's pieces
MEASURED = Path(__file__).resolve().parents[1] / "docs" / "reference" / "measured"
SWEEP_ARCH = {"1B": gpu_step.Arch(16, 2048, 32, 8192, 131072, 4096, tied=True),
              "3B": gpu_step.Arch(28, 3072, 32, 8192, 131072, 4096, tied=True),
              "8B": gpu_step.Arch(32, 4096, 32, 14336, 131072, 4096)}


def test_gpu_model_counts_the_sweeps_parameters_and_its_mfu():
    """The shapes give the parameter counts the sweep's MFU column implies (1B 1.342e9 tied,
    8B 8.86e9), and the MFU definition reproduces every row's mfu_pct within 0.3% of itself
    (its printed digit, and the 8B rows read 0.2% above ours): with pp > 1 the tied models
    count a head of their own, as a pipeline holds one (1B's pipelined rows read 16.7% above
    the tied count, which is exactly 1.610e9 / 1.342e9 in the 6 N term)."""
    assert round(SWEEP_ARCH["1B"].params() / 1e6) == 1342
    assert round(SWEEP_ARCH["8B"].params() / 1e7) == 886
    rows = list(csv.DictReader(open(MEASURED / "playbook-h100-sweep-subset.csv")))
    assert len(rows) == 661
    h100 = gpus.gpu("H100")
    def ours(r):
        return 100 * gpu_step.mfu(SWEEP_ARCH[r["model"]], float(r["tok_s_gpu"]), h100,
                                  pp=int(r["pp"]))
    worst = max(abs(ours(r) - float(r["mfu_pct"])) - 0.003 * float(r["mfu_pct"]) for r in rows)
    assert worst <= 0.05, worst


def test_gemm_time_rounds_up_to_whole_waves_and_thin_gemms_are_bandwidth_bound():
    g = gpus.gpu("h100")
    m, n = g.sms // 4 * gpu_step.TILE, 4 * gpu_step.TILE   # exactly one wave of tiles
    one = gpu_step.gemm_seconds(m, n, 8192, g)
    assert one == pytest.approx(2 * m * n * 8192 / g.mamf)
    assert gpu_step.gemm_seconds(m + 1, n, 8192, g) == pytest.approx(2 * one)
    thin = gpu_step.gemm_seconds(65536, 8, 8192, g)  # almost a matrix-vector product
    assert thin == pytest.approx(2 * (65536 * 8192 + 8192 * 8 + 65536 * 8) / g.hbm_bytes_per_s)


def test_nnls_recovers_known_constants_and_keeps_them_non_negative():
    import random
    rng = random.Random(3)
    rows = [[rng.uniform(0.1, 2) for _ in range(4)] for _ in range(40)]
    true = [1.3, 0.0, 0.7, 2.0]
    ys = [sum(a * b for a, b in zip(r, true)) for r in rows]
    got = fitting.nnls_relative(rows, ys)
    assert got == pytest.approx(true, abs=1e-9)
    # a target that wants a negative weight on column 1 gets zero there instead
    ys2 = [y - 0.5 * r[1] for y, r in zip(ys, rows)]
    assert min(fitting.nnls_relative(rows, ys2)) >= 0 and fitting.nnls_relative(rows, ys2)[1] == 0


def test_unknown_gpu_names_the_known_ones():
    with pytest.raises(UsageError, match="--gpu 'B300'.*H100, A100, H200"):
        gpus.gpu("B300")


def test_a_micro_batch_lasts_at_least_its_launches():
    """A thin micro-batch (1B, tp8, one sequence) is host-bound: its time is the launches (and
    TP latency), so doubling the GEMMs' constant leaves it unchanged; a fat one is GPU-bound."""
    a, c = SWEEP_ARCH["1B"], gpu_step.GpuCluster(gpus.gpu("H100"))
    k = gpu_step.Constants(compute=1.0, memory_bound=3.0, per_layer=4e-3, comm=2.0)
    thin = gpu_step.GpuLayout(dp=1, tp=8, mbs=1, grad_acc=256, sp=True)
    fat = gpu_step.GpuLayout(dp=1, tp=8, mbs=16, grad_acc=16, sp=True)
    slow = gpu_step.Constants(**{**k.as_dict(), "compute": 2.0})
    t = gpu_step.step_seconds(a, thin, c, k)
    assert t["host_bound"] and t["compute"] == 0.0
    assert gpu_step.step_seconds(a, thin, c, slow)["total"] == pytest.approx(t["total"], rel=1e-3)
    assert not gpu_step.step_seconds(a, fat, c, k)["host_bound"]
    assert gpu_step.step_seconds(a, fat, c, slow)["total"] > 1.3 * \
        gpu_step.step_seconds(a, fat, c, k)["total"]


def test_cross_node_pipeline_sync_only_when_stages_sit_on_different_nodes():
    a = SWEEP_ARCH["1B"].untied()
    one = gpu_step.GpuCluster(gpus.gpu("H100"), nodes=1)
    two = gpu_step.GpuCluster(gpus.gpu("H100"), nodes=2)
    inside = gpu_step.features(a, gpu_step.GpuLayout(dp=1, tp=4, pp=2, grad_acc=8, sp=True), one)
    across = gpu_step.features(a, gpu_step.GpuLayout(dp=1, tp=8, pp=2, grad_acc=8, sp=True), two)
    assert inside["mb_cross"] == 0 and across["mb_cross"] == 8 * 8    # 8 blocks x 8 TP ranks


def test_zero1_shards_the_optimizer_states_not_the_gradients():
    a, c = SWEEP_ARCH["1B"], gpu_step.GpuCluster(gpus.gpu("H100"))
    k = gpu_step.Constants()
    z0 = gpu_step.memory_bytes(a, gpu_step.GpuLayout(dp=8, grad_acc=32), c, k)
    z1 = gpu_step.memory_bytes(a, gpu_step.GpuLayout(dp=8, grad_acc=32, zero=1), c, k)
    p = a.params()
    assert z0["gradients"] == z1["gradients"] == pytest.approx(4 * p)
    assert z0["optimizer"] - z1["optimizer"] == pytest.approx(12 * p * 7 / 8)
    assert z0["weights"] == pytest.approx(2 * p)
