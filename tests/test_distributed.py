"""Real process groups (gloo on CPU): weights agree across ranks, DDP equals the baseline with the
bytes the ring all-reduce predicts, and a rank that never joins ends the run with a clear error."""
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ROOT, free_port, run_lab
from dtlab.train.model import ModelConfig, ToyGPT, config_from_preset

TINY_PARAMS = ToyGPT.count_params(config_from_preset("tiny", vocab_size=13))


def _weights_worker(rank, world, port, q):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.manual_seed(1000 + rank)  # different global RNG state on every rank
    flat = torch.cat([p.detach().flatten() for p in ToyGPT(ModelConfig()).parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        q.put([torch.equal(gathered[0], g) for g in gathered])
    dist.destroy_process_group()


def test_same_seed_gives_same_weights_on_every_rank():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mp.start_processes(_weights_worker, args=(3, free_port(), q), nprocs=3, join=True,
                       start_method="spawn")
    assert q.get(timeout=10) == [True, True, True]


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_equals_baseline_and_sends_ring_bytes(world, shared_run):
    if world == 2:  # the plain 2-rank run test_cli.py and test_flops.py read too
        steps = 3
        p, s, _ = shared_run("ddp", world, "--steps", steps)
    else:  # in small buckets, which the next test reads
        steps = 5
        p, s, _ = shared_run("ddp", world, "--steps", steps, "--bucket-mb", 0.02)
    assert p.returncode == 0, p.stdout + p.stderr
    assert s["world_size"] == world and s["steps"] == steps and len(s["losses"]) == steps
    b = s["baseline"]
    assert b["ok"] is True
    assert b["max_abs_loss_diff"] <= 1e-5
    assert b["max_abs_param_diff"] <= 1e-4
    # DDP all-reduces every gradient once per step, in buckets that together hold all of them:
    # payload G = 4 bytes * P parameters. A ring all-reduce of G bytes over W ranks sends
    # reduce-scatter (W-1)/W * G plus all-gather (W-1)/W * G from every rank:
    #     bytes_per_step = 2 (W-1)/W * 4 P
    assert s["n_params"] == TINY_PARAMS
    grad_bytes = 4 * TINY_PARAMS
    assert s["comm"]["by_op"]["all_reduce"]["bytes"] == steps * grad_bytes
    assert s["comm"]["bytes_per_step"] == pytest.approx(2 * (world - 1) / world * grad_bytes)
    assert s["comm"]["per_rank"] == [s["comm"]["bytes_per_step"]] * world


def test_small_buckets_split_the_same_bytes_into_more_calls(shared_run):
    """The 4-rank run above, in 0.02 MiB buckets: every gradient byte once a step, in several
    calls (the ring's bytes above hold for it too)."""
    p, s, _ = shared_run("ddp", 4, "--steps", 5, "--bucket-mb", 0.02)
    assert p.returncode == 0, p.stderr
    assert s["baseline"]["ok"] is True
    assert s["comm"]["calls_per_step"] > 1
    assert s["comm"]["by_op"]["all_reduce"]["bytes"] == 5 * 4 * TINY_PARAMS


def test_baseline_learns(tmp_path):
    p, s = run_lab("baseline", 1, tmp_path, "--steps", 100)  # 2.56 -> 1.17 (0.46 x)
    assert p.returncode == 0, p.stderr
    assert s["losses"][-1] <= 0.5 * s["losses"][0], (s["losses"][0], s["losses"][-1])
    assert s["comm"]["bytes_per_step"] == 0


# each lab module once; labs.ddp under plain torchrun is launchers/multi_gpu.sh's run below
@pytest.mark.parametrize("lab, nproc, flags", [
    ("ring_allreduce", 2, []),
    ("dataparallel", 1, ["--replicas", "2"]), ("torch_multiprocessing", 1, ["--workers", "2"]),
])
def test_torchrun_by_hand(lab, nproc, flags, tmp_path):
    """Labs also run as plain torchrun modules, which is how the docs show them."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={nproc}", "-m", f"labs.{lab}", *flags, "--steps", "4",
                        "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    assert "-> OK" in p.stdout
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "steps.jsonl").is_file()


def test_multi_gpu_launcher_runs_on_cpu(tmp_path):
    """launchers/multi_gpu.sh is `python -m torch.distributed.run --standalone
    --nproc_per_node=2 -m labs.ddp`: the ddp lab as a plain torchrun module, as above."""
    env = dict(os.environ, NPROC="2")
    p = subprocess.run(["bash", "launchers/multi_gpu.sh", "ddp", "--steps", "3", "--out",
                        str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, p.stderr
    assert "-> OK" in p.stdout
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "steps.jsonl").is_file()


def test_single_gpu_launcher_runs_on_cpu(tmp_path):
    p = subprocess.run(["bash", "launchers/single_gpu.sh", "baseline", "--steps", "3", "--out",
                        str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "summary.json").is_file()


def test_rank_that_never_joins_ends_with_clear_error(tmp_path):
    """Rank 0 of a 2-rank job is started and rank 1 never is: the run must end by itself
    within the configured timeout (plus start-up) with a message that says what happened."""
    timeout_s = 4
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "labs.ddp", "--timeout", str(timeout_s),
                        "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert p.returncode == 3
    assert "Traceback" not in p.stderr
    err = p.stderr.strip().splitlines()
    assert len(err) == 1
    assert "did not form within 4 s" in err[0] and "1/2 clients joined" in err[0]
    assert "--timeout" in err[0]
    assert elapsed < timeout_s + 30  # start-up (importing torch) plus a margin, not a hang


@pytest.mark.gpu
def test_ddp_on_cuda_with_nccl(tmp_path):
    """Where a GPU is lent: the same lab on NCCL + CUDA still equals the (CUDA) baseline."""
    n = torch.cuda.device_count()
    p, s = run_lab("ddp", n, tmp_path, "--steps", 10, "--batch-size", 16 * n)
    assert p.returncode == 0, p.stderr
    assert s["device"].startswith("cuda") and s["baseline"]["ok"] is True
    if n > 1:
        assert s["backend"] == "nccl"
