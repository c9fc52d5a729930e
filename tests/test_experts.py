"""Mixture of experts: the shared model's MoE layer, and expert parallelism (labs/expert_parallel.py)
equal to the one-process baseline, its all-to-all bytes equal to the routing's formula, its
capacity cut reported as not equivalent."""
from dataclasses import replace

import pytest
import torch

from conftest import run_lab
from dtlab.train.model import MoE, ToyGPT, config_from_preset, loss_fn
from dtlab.costmodel.experts import all_to_all_bytes

MOE = ("--moe-experts", "4", "--moe-top-k", "2")
STEPS = 3


def test_moe_layer_routes_weights_and_balances():
    """Every token's output is the router-probability-weighted sum of its top-k experts; the
    load-balancing loss reaches the router through the backward without changing the loss."""
    cfg = replace(config_from_preset("tiny", 13), moe_experts=4, moe_top_k=2)
    moe = MoE(cfg)
    x = torch.randn(3, 5, cfg.d_model, requires_grad=True)
    y = moe(x)
    h = x.reshape(-1, cfg.d_model)
    probs = torch.softmax(moe.router(h), -1)
    gate, idx = probs.topk(2, -1)
    want = torch.stack([sum(gate[t, j] * moe.experts[idx[t, j]](h[t]) for j in range(2))
                        for t in range(h.shape[0])])
    assert torch.allclose(y.reshape(-1, cfg.d_model), want, atol=1e-6)
    assert moe.last_counts.sum() == 15 * 2
    # with the main loss's gradient switched off, only the balancing loss moves the router
    y.sum().mul(0).backward()
    assert moe.router.weight.grad.abs().sum() > 0
    # the FLOP counter's meta forward works with experts
    with torch.device("meta"):
        ToyGPT(cfg)(torch.zeros(2, cfg.seq_len, dtype=torch.long))


@pytest.mark.parametrize("nproc, grid", [(2, ()), (4, ("--ep", "2", "--dp", "2"))])
def test_expert_parallel_equals_baseline(nproc, grid, tmp_path):
    p, s = run_lab("expert_parallel", nproc, tmp_path, "--steps", STEPS, *MOE, *grid)
    assert p.returncode == 0, p.stderr[-3000:]
    b = s["baseline"]
    assert b["ok"] is True and b["max_rel_loss_diff"] <= 1e-5 and b["max_abs_param_diff"] <= 1e-4
    cfg = config_from_preset("tiny", 13)
    ep = 2
    # every assignment of the global batch (16 x 32 tokens, 2 experts each) is counted once
    for step in s["extra"]["tokens_per_expert"]:
        assert [sum(layer) for layer in step] == [16 * 32 * 2] * cfg.n_layer
    # rank 0's all-to-all bytes: counts, then its rows to the other rank's experts and back,
    # forward and backward, from the rows the routing sent
    rows = s["memory"]["per_rank"][0]["rows_per_layer_step"]  # rank 0 is EP rank 0
    want = sum(all_to_all_bytes(sum(sent[1:]), sum(got[1:]), cfg.d_model, ep, 4 // ep)
               for layer in rows for sent, got in layer)
    assert s["comm"]["by_op"]["all_to_all"]["sent_bytes"] == pytest.approx(want)
    assert (tmp_path / "experts.png").stat().st_size > 10_000


def test_capacity_factor_drops_and_says_so(tmp_path):
    p, s = run_lab("expert_parallel", 2, tmp_path, "--steps", STEPS, "--moe-experts", "4",
                   "--capacity-factor", "1.0")
    assert p.returncode == 0, p.stderr[-3000:]
    dropped = s["extra"]["dropped_assignments"]
    assert dropped > 0 and s["baseline"]["ok"] is None and s["ok"] is True
    assert f"capacity factor 1 dropped {dropped} token assignments" in s["baseline"]["note"]


def test_moe_bad_input(tmp_path):
    for lab, n, args, says in [
            ("expert_parallel", 2, (), "expert_parallel needs the mixture-of-experts model"),
            ("expert_parallel", 2, ("--moe-experts", "3"),
             "--moe-experts 3 must divide over the 2 expert-parallel ranks"),
            ("ddp", 2, MOE, "--moe-experts: lab 'ddp' does not run the mixture-of-experts")]:
        p, s = run_lab(lab, n, tmp_path, *args)
        assert p.returncode == 2 and s is None and says in p.stderr, (lab, p.stderr)


def test_moe_flags_checked():
    import argparse

    from dtlab.errors import UsageError
    from dtlab.train.settings import add_common_args, settings_from_args
    parser = add_common_args(argparse.ArgumentParser())
    with pytest.raises(UsageError, match="--moe-top-k 3 must be between 1 and --moe-experts 2"):
        settings_from_args(parser.parse_args(["--moe-experts", "2", "--moe-top-k", "3"]))
    s = settings_from_args(parser.parse_args(["--moe-experts", "4", "--moe-top-k", "2"]))
    assert (s.model.moe_experts, s.model.moe_top_k) == (4, 2)


def test_moe_loss_is_the_lm_loss():
    """The reported loss stays the language-model loss: the balancing term only adds gradient."""
    cfg = replace(config_from_preset("tiny", 13), moe_experts=4, moe_top_k=1)
    x = torch.randint(0, 13, (2, cfg.seq_len))
    logits = ToyGPT(cfg)(x)
    assert torch.isfinite(loss_fn(logits, x))


def test_a_rank_that_sends_no_rows_trains_and_equals_the_baseline(tmp_path):
    """3 experts over 3 ranks with top-1 routing: at seed 36 no token of step 2 chooses expert 1
    in the second MoE layer, so rank 1 receives no rows and sends none back (an empty
    all-to-all), as routing may."""
    p, s = run_lab("expert_parallel", 3, tmp_path, "--moe-experts", "3", "--moe-top-k", "1",
                   "--batch-size", "12", "--steps", "3", "--seed", "36")
    assert p.returncode == 0, p.stderr[-3000:]
    assert s["extra"]["tokens_per_expert"][2][1][1] == 0
    assert s["memory"]["per_rank"][1]["rows_per_layer_step"][1][2][1] == [0, 0, 0]
    b = s["baseline"]
    assert b["ok"] is True and b["max_rel_loss_diff"] <= 1e-5 and b["max_abs_param_diff"] <= 1e-4
