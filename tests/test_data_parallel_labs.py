"""The data-parallel labs from the inside: ring all-reduce, our DDP, DataParallel written out,
torch.multiprocessing. Each is a real multi-process (or multi-thread) run compared with the
single-process baseline."""

import pytest

from conftest import run_lab
from dtlab.train.model import ToyGPT, config_from_preset
from dtlab.collectives.ring import chunk_sizes
from labs.ring_allreduce import parse_lengths

TINY_PARAMS = ToyGPT.count_params(config_from_preset("tiny", vocab_size=13))


def test_chunk_sizes_cover_the_tensor():
    for n in (0, 1, 2, 7, 1000003):
        for w in (1, 2, 3, 4):
            sizes = chunk_sizes(n, w)
            assert len(sizes) == w and sum(sizes) == n and max(sizes) - min(sizes) <= 1


def test_parse_lengths():
    assert parse_lengths("1,7,W-1,1000003", 2) == [1, 7, 1000003]  # W-1 = 1 is a duplicate
    assert parse_lengths("1,7,W-1,1000003", 4) == [1, 7, 3, 1000003]
    assert parse_lengths("W+2, W", 3) == [5, 3]


# 2 ranks, and 3: uneven chunks for the ring, a tree round with a rank missing its partner
# (rank 2 of 3) and two tree rounds; 4 ranks run the same lines again. The same runs train with
# the naive and the tree all-reduce (the ring's training: tests/test_distributed.py's torchrun
# run of labs.ring_allreduce, and our DDP below)
@pytest.mark.parametrize("world, algo", [(2, "naive"), (3, "tree")])
def test_ring_naive_tree_equal_library_with_counted_bytes(world, algo, tmp_path):
    p, s = run_lab("ring_allreduce", world, tmp_path, "--steps", 4, "--batch-size", 12,
                   "--algo", algo)
    assert p.returncode == 0, p.stderr
    assert s["ok"] is True and s["baseline"]["ok"] is True and s["variant"] == algo
    checks = s["extra"]["checks"]
    lengths = sorted({c["length"] for c in checks})
    assert lengths == sorted({1, 7, world - 1, 1000003})
    assert {c["algo"] for c in checks} == {"ring", "naive", "tree"}
    for c in checks:
        assert c["ok"], c
        assert c["max_abs_err"] <= 1e-4
    for c in (c for c in checks if c["algo"] == "ring"):
        n, sent = c["length"], c["sent_bytes_per_rank"]
        # counted bytes: every rank sends 2(W-1)/W of the tensor, exactly when the chunks are
        # even; with uneven chunks, rank r skips chunks r+1 and r+2, so it is within 2
        # elements of it, and the ranks together send exactly 2(W-1) copies of the tensor.
        assert sum(sent) == 2 * (world - 1) * 4 * n
        for b in sent:
            assert abs(b - 2 * (world - 1) / world * 4 * n) <= 2 * 4
        if n % world == 0:
            assert sent == [2 * (world - 1) // world * 4 * n] * world or \
                all(b == 2 * (world - 1) * 4 * n / world for b in sent)
    # the naive algorithm makes rank 0 send W-1 full copies, the others one each
    naive = next(c for c in checks if c["algo"] == "naive" and c["length"] == 1000003)
    assert naive["sent_bytes_per_rank"] == [(world - 1) * 4000012] + [4000012] * (world - 1)
    # training with the naive or the tree all-reduce: one all-reduce of all gradients a step
    assert s["comm"]["by_op"]["all_reduce"]["bytes"] == 4 * 4 * TINY_PARAMS


# each all-reduce at 2 and 3 ranks, with and without micro-batches; shm is the in-place
# shared-memory one (gradients are views of the shared buckets). 3 ranks reach what 4 would:
# uneven ring chunks, and more ranks than this 2-core machine's cores (shm's barrier yields
# instead of spinning)
@pytest.mark.parametrize("allreduce,world,accum", [
    ("ring", 2, 1), ("ring", 3, 2),
    ("library", 2, 2), ("library", 3, 1),
    ("shm", 2, 1), ("shm", 3, 2)])
def test_own_ddp_equals_baseline(world, allreduce, accum, tmp_path):
    steps = 5
    p, s = run_lab("ddp", world, tmp_path, "--impl", "own", "--allreduce", allreduce,
                   "--accum", accum, "--batch-size", 24, "--steps", steps, "--bucket-mb", 0.02)
    assert p.returncode == 0, p.stderr
    b = s["baseline"]
    assert b["ok"] is True and b["max_rel_loss_diff"] <= 1e-5 and b["max_abs_param_diff"] <= 1e-4
    # several buckets of at most ~0.02 MiB, together every parameter exactly once
    buckets = s["extra"]["buckets"]
    assert len(buckets) > 1 and sum(buckets) == TINY_PARAMS
    # one all-reduce per bucket per step, however many micro-batches (no_sync): the payload
    # per step is all gradient bytes once, and the ring sends 2(W-1)/W of it per rank
    ar = s["comm"]["by_op"]["all_reduce"]
    assert ar["calls"] == steps * len(buckets)
    assert ar["bytes"] == steps * 4 * TINY_PARAMS
    # (shared memory: nothing goes through the kernel, the peers read the buckets in place)
    expected = 0 if allreduce == "shm" else 2 * (world - 1) / world * 4 * TINY_PARAMS
    assert s["comm"]["bytes_per_step"] == pytest.approx(expected, abs=8 * len(buckets))
    assert s["variant"].startswith(f"own-{allreduce}")
    # what each rank holds, from the shapes alone (dtlab/costmodel/shapes.py), to the byte
    from dtlab.costmodel.shapes import Shape, activations, model_states, sent_bytes
    m = Shape(2, 32, 2, 128, 13, 32)  # the tiny preset on the default text (13 symbols)
    assert sent_bytes(m, 24, dp=world)["dp"] == 2 * (world - 1) / world * 4 * TINY_PARAMS
    want = {**model_states(m), "activations_peak": activations(m, 24, dp=world,
                                                               microbatches=accum)}
    for mem in s["memory"]["per_rank"]:
        assert {k: mem[k] for k in want if k != "numel"} == \
            {k: v for k, v in want.items() if k != "numel"}
    assert s["extra"]["overlap_timing"]["backward_s_median"] > 0


def test_own_ddp_without_overlap_and_default_buckets(tmp_path):
    p, s = run_lab("ddp", 2, tmp_path, "--impl", "own", "--no-overlap", "--steps", 4)
    assert p.returncode == 0, p.stderr
    assert s["baseline"]["ok"] is True and s["variant"] == "own-ring-nooverlap"
    assert s["extra"]["buckets"] == [TINY_PARAMS]  # 25 MiB holds the whole tiny model


def test_own_ddp_bad_accum_is_one_line(tmp_path):
    p, s = run_lab("ddp", 2, tmp_path, "--impl", "own", "--accum", 3)
    assert p.returncode == 2 and s is None
    assert "not divisible by the world size x --accum (2 x 3)" in p.stderr


# 1 replica (nothing to scatter), 2 (equal slices), 3 (16 rows in slices of 6, 6, 4)
@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_dataparallel_own_equals_baseline_and_measures_device0(replicas, tmp_path):
    p, s = run_lab("dataparallel", 1, tmp_path, "--replicas", replicas, "--steps", 5)
    assert p.returncode == 0, p.stderr
    assert s["ok"] is True and s["baseline"]["ok"] is True and s["variant"] == "own"
    rb = s["extra"]["replica_bytes"]
    assert len(rb) == replicas
    for r in rb:
        assert r["params"] == 4 * TINY_PARAMS and r["activations"] > 0
    # rank 0's memory row is device 0's: its replica's activations, not the idle default meter
    assert s["memory"]["per_rank"][0]["activations_peak"] == rb[0]["activations"]
    if replicas > 1:
        # device 0 also holds the optimizer state and the gathered outputs and their gradient
        assert rb[0]["optimizer"] >= 8 * TINY_PARAMS and rb[0]["gathered_outputs"] > 0
        assert all(r["optimizer"] == 0 and r["gathered_outputs"] == 0 for r in rb[1:])
        assert s["extra"]["replica0_over_others"] > 1
        if 16 % replicas == 0:  # equal slices: the difference is exactly device 0's extra work
            assert rb[0]["total"] == rb[1]["total"] + rb[0]["optimizer"] + \
                rb[0]["gathered_outputs"]
    sl = s["extra"]["save_load"]
    assert sl["load_prefixed_into_plain"]["first_key"] == "module.layers.0.tok.weight"
    assert "Missing key(s)" in sl["load_prefixed_into_plain"]["error"]
    assert sl["strip_prefix_then_load"]["ok"] and sl["save_inner_module"]["ok"]


def test_dataparallel_torch_falls_back_on_cpu_with_a_message(tmp_path):
    import torch
    if torch.cuda.device_count() >= 2:
        pytest.skip("has GPUs: the torch variant really runs (see the gpu test)")
    p, s = run_lab("dataparallel", 1, tmp_path, "--impl", "torch", "--steps", 2)
    assert p.returncode == 0
    assert "nn.DataParallel needs 2 CUDA devices" in p.stdout and s["variant"] == "own"


@pytest.mark.gpu
def test_dataparallel_torch_on_cuda(tmp_path):
    import torch
    n = torch.cuda.device_count()
    p, s = run_lab("dataparallel", 1, tmp_path, "--impl", "torch", "--replicas", n,
                   "--steps", 5)
    assert p.returncode == 0, p.stderr
    assert s["variant"] == "torch" and s["baseline"]["ok"] is True


@pytest.mark.parametrize("workers, strategy", [(2, "file_descriptor"), (3, "file_system")])
def test_multiprocessing_sync_equals_baseline(workers, strategy, tmp_path):
    p, s = run_lab("torch_multiprocessing", 1, tmp_path, "--workers", workers, "--batch-size",
                   24, "--sharing-strategy", strategy, "--steps", 5)
    assert p.returncode == 0, p.stderr
    assert s["world_size"] == workers and s["baseline"]["ok"] is True
    sh = s["extra"]["sharing"]
    assert sh["strategy"] == strategy
    # file_system leaves named files in /dev/shm; file_descriptor passes descriptors instead
    if strategy == "file_system":
        assert sh["torch_files_in_dev_shm"] >= 2
    else:
        assert sh["torch_files_in_dev_shm"] == 0
    assert s["comm"]["by_op"]["shared_memory_write"]["bytes"] == 5 * 4 * TINY_PARAMS


def test_hogwild_is_reported_not_equivalent(tmp_path):
    p, s = run_lab("torch_multiprocessing", 1, tmp_path, "--workers", 2, "--mode", "hogwild",
                   "--steps", 10)
    assert p.returncode == 0, p.stderr
    b = s["baseline"]
    assert b["ok"] is None and b["note"] == "Hogwild: unsynchronised updates"
    assert b["max_abs_param_diff"] > 1e-3  # it really drifted
    assert s["ok"] is True and s["comm"]["bytes_per_step"] == 0
