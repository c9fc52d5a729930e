"""Tensor parallelism: our Megatron-style layers and DTensor's plan equal the baseline, and the
counted communication equals the analytic count."""
import pytest

from conftest import run_lab
from labs.core.model import ToyGPT, config_from_preset


@pytest.mark.parametrize("impl", ["own", "torch"])
@pytest.mark.parametrize("tp, preset", [(2, "tiny"), (4, "small")])
def test_tensor_parallel_equals_baseline(impl, tp, preset, tmp_path):
    steps = 4
    p, s = run_lab("tensor_parallel", tp, tmp_path, "--impl", impl, "--preset", preset,
                   "--steps", steps)
    assert p.returncode == 0, p.stderr[-3000:]
    b = s["baseline"]
    assert b["ok"] is True and b["max_rel_loss_diff"] <= 1e-5 and b["max_abs_param_diff"] <= 1e-4
    cfg = config_from_preset(preset, vocab_size=13)
    n = ToyGPT.count_params(cfg)
    # each rank holds about 1/TP of the sharded matrices: well under the full model
    assert s["memory"]["per_rank"][0]["params"] < 4 * n * (0.5 if tp == 2 else 0.3) + 4 * 50000
    if impl == "own":
        # Per step, with A = B*T*d*4 bytes of activations and N = B*T tokens:
        #   every block: 2 all-reduces forward (after attn.proj and mlp.proj, g) and
        #                2 backward (before q/k/v and before fc, f)          -> 4 L of A
        #   the LM head: f before the vocabulary-parallel head, backward      -> 1 of A
        #   the loss: row max, sum of exponentials, target logit (fp32)       -> 3 of 4N
        B, T, d, L = 16, cfg.seq_len, cfg.d_model, cfg.n_layer
        A, N = B * T * d * 4, B * T
        payload = (4 * L + 1) * A + 3 * 4 * N
        ar = s["comm"]["by_op"]["all_reduce"]
        assert ar["calls"] == steps * (4 * L + 1 + 3)
        assert ar["bytes"] == steps * payload
        assert s["comm"]["bytes_per_step"] == pytest.approx(2 * (tp - 1) / tp * payload)


def test_tensor_parallel_rejects_heads_not_divisible(tmp_path):
    p, s = run_lab("tensor_parallel", 4, tmp_path, "--preset", "tiny")
    assert p.returncode == 2 and s is None
    assert "must divide the 2 attention heads" in p.stderr
