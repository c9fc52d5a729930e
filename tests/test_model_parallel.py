"""Tensor parallelism: our Megatron-style layers and DTensor's plan equal the baseline, and the
counted communication equals the analytic count."""
import re

import pytest

from conftest import run_lab
from dtlab.train.model import ToyGPT, config_from_preset


# both at 2 ranks; ours again at 4 (the small preset's 4 heads), where the counted bytes'
# 2(TP-1)/TP is not 1 (DTensor's plan at 4 ranks runs the library's same code)
@pytest.mark.parametrize("impl, tp, preset", [("own", 2, "tiny"), ("torch", 2, "tiny"),
                                              ("own", 4, "small")])
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
        from dtlab.costmodel.shapes import Shape, sent_bytes
        shape = Shape(L, d, cfg.n_head, cfg.d_ff, 13, T)
        assert sent_bytes(shape, B, tp=tp)["tp"] == pytest.approx(2 * (tp - 1) / tp * payload)


def test_tensor_parallel_rejects_heads_not_divisible(tmp_path):
    p, s = run_lab("tensor_parallel", 4, tmp_path, "--preset", "tiny")
    assert p.returncode == 2 and s is None
    assert "tensor parallel size 4 must divide n_head=2 of preset 'tiny'" in p.stderr


from dtlab.costmodel.shapes import bubble as bubble_theory  # noqa: E402
from dtlab.report import pipeline_schedule  # noqa: E402
from labs.pipeline import SCHEDULES, gpipe_schedule, one_f_one_b_schedule  # noqa: E402


def _recorded_schedule(s: dict, tmp_path, steps: int) -> dict:
    """What a run of our schedules recorded: every rank's action list (the lab's own), a
    timeline a step with one (start, end) per action, one after another; `dtlab run` drew
    schedule.png from that record. Returns the figures the report reads from it."""
    e = s["extra"]
    p, m, v = e["stages"], e["microbatches"], e["virtual_stages"]
    assert e["actions"] == [[list(a) for a in SCHEDULES[e["schedule"]](p, m, r, v)]
                            for r in range(p)]
    assert [len(tl) for tl in e["timelines"]] == [steps] * p
    for tl, acts in zip(e["timelines"], e["actions"]):
        for step in tl:
            assert len(step) == len(acts)
            assert all(a <= b for a, b in step)                              # each action
            assert all(b <= c for (_, b), (c, _) in zip(step, step[1:]))     # one after another
    assert (tmp_path / "schedule.png").stat().st_size > 10_000
    f = pipeline_schedule.figures(e)
    assert 0 <= f["bubble_measured"] < 1  # a rank's actions never overlap: busy <= span
    return f


def test_schedules_as_action_lists():
    assert gpipe_schedule(2, 3, 0) == [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("B", 1), ("B", 2)]
    # 1F1B on 4 stages, 4 micro-batches: rank 0 warms up with 3 forwards, the last with none
    assert one_f_one_b_schedule(4, 4, 0) == [("F", 0), ("F", 1), ("F", 2), ("F", 3), ("B", 0),
                                             ("B", 1), ("B", 2), ("B", 3)]
    assert one_f_one_b_schedule(4, 4, 3) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2),
                                             ("B", 2), ("F", 3), ("B", 3)]
    for p in (2, 4):
        for m in (1, 2, 4, 8):
            for r in range(p):
                acts = one_f_one_b_schedule(p, m, r)
                assert sorted(acts) == sorted(gpipe_schedule(p, m, r))
                live, peak = 0, 0
                for kind, _ in acts:
                    live += 1 if kind == "F" else -1
                    peak = max(peak, live)
                assert peak <= min(p - r, m)
    assert bubble_theory(4, 8) == pytest.approx(3 / 11)


# both at 2 stages; ours again at 4 with 1F1B, whose middle stages receive and send (the same
# for GPipe, which runs at 4 stages in the bubble test below; torch's schedules at 4 stages
# run the library's same code)
@pytest.mark.parametrize("impl, stages, preset, schedule", [
    ("own", 2, "tiny", "gpipe"), ("own", 2, "tiny", "1f1b"), ("torch", 2, "tiny", "gpipe"),
    ("torch", 2, "tiny", "1f1b"), ("own", 4, "small", "1f1b")])
def test_pipeline_equals_baseline(impl, schedule, stages, preset, tmp_path):
    p, s = run_lab("pipeline", stages, tmp_path, "--impl", impl, "--schedule", schedule,
                   "--microbatches", 4, "--preset", preset, "--steps", 3)
    assert p.returncode == 0, p.stderr[-3000:]
    b = s["baseline"]
    assert b["ok"] is True and b["max_rel_loss_diff"] <= 1e-5
    if impl == "own":
        # activations go forward and their gradients back: per step, stage r sends the whole
        # batch's activations (B*T*d fp32, over all micro-batches) to r+1 unless it is last,
        # and their gradients to r-1 unless it is first; counted message by message
        cfg = config_from_preset(preset, vocab_size=13)
        act = 16 * cfg.seq_len * cfg.d_model * 4
        assert s["comm"]["per_rank"] == [act] + [2 * act] * (stages - 2) + [act]
        assert s["comm"]["by_op"]["send"]["calls"] == 3 * 4  # rank 0: one per micro-batch
        f = _recorded_schedule(s, tmp_path, 3)
        assert f["bubble_ideal"] == pytest.approx(f["bubble_theory"])
        assert s["extra"]["peak_live_microbatches"] == f["peak_live_theory"]


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
# more micro-batches than 2 stages, and fewer than 4 (2 micro-batches at 2 stages, or 8 at 4,
# are again M >= P, the case the first one checks)
@pytest.mark.parametrize("stages, preset, m", [(2, "tiny", 8), (4, "small", 2)])
def test_measured_bubble_matches_theory(schedule, stages, preset, m, tmp_path):
    """With a known 20 ms (forward) / 40 ms (backward) busy time per stage, the run records a
    timeline a step for every action; the replay of its action lists has the bubble
    (P-1)/(M+P-1) exactly; 1F1B keeps at most P - r micro-batches alive on rank r, GPipe all M.
    How near the measured bubble comes to the formula depends on the machine's load: that is a
    benchmark's figure (docs/reference/labs.json), not an assertion."""
    p, s = run_lab("pipeline", stages, tmp_path, "--schedule", schedule, "--microbatches", m,
                   "--preset", preset, "--steps", 3, "--stage-compute-ms", 20)
    assert p.returncode == 0, p.stderr[-3000:]
    e = s["extra"]
    f = _recorded_schedule(s, tmp_path, 3)
    assert f["bubble_theory"] == pytest.approx((stages - 1) / (m + stages - 1))
    assert f["bubble_ideal"] == pytest.approx(f["bubble_theory"])
    assert e["peak_live_microbatches"] == f["peak_live_theory"]
    if schedule == "gpipe":
        assert e["peak_live_microbatches"] == [m] * stages
    else:
        assert e["peak_live_microbatches"] == [min(stages - r, m) for r in range(stages)]
        if m >= stages:  # live activation bytes fall from the first stage to the last
            live = e["peak_live_activation_bytes"]
            assert live[0] > live[-1]


from dtlab.errors import UsageError  # noqa: E402
from dtlab.train.grid import Grid  # noqa: E402


def test_grid_layout_tp_fastest_dp_slowest():
    g = Grid(dp=2, pp=2, tp=2)
    coords = [g.at(r).coords for r in range(8)]
    assert coords[:4] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
    assert coords[4] == (1, 0, 0)
    assert all(g.rank_of(*g.at(r).coords) == r for r in range(8))
    # pipeline neighbours sit one stage away at the same (dp, tp); TP and DP groups
    assert (g.at(1).prev_rank, g.at(1).next_rank) == (None, 3)
    assert (g.at(7).prev_rank, g.at(7).next_rank) == (5, None)
    assert g.tp_ranks(1, 0) == [4, 5] and g.dp_ranks(1, 1) == [3, 7]


@pytest.mark.parametrize("grid, world, batch, micro, says", [
    (Grid(2, 2, 2), 4, 16, 1, "world size 4 != dp x pp x tp = 2 x 2 x 2 = 8"),
    (Grid(1, 1, 4), 4, 16, 1, "tensor parallel size 4 must divide n_head=2"),
    (Grid(1, 3, 1), 3, 16, 1, "3 pipeline stages but preset 'tiny' has 2 blocks"),
    (Grid(3, 1, 1), 3, 16, 1, "--batch-size 16 is not divisible by the 3 data-parallel"),
    (Grid(2, 1, 1), 2, 16, 3, "--microbatches 3 must be >= 1 and divide the 8 rows"),
    (Grid(0, 1, 1), 0, 16, 1, "--dp, --pp, --tp and --cp must be >= 1"),
])
def test_grid_validation_names_the_fix(grid, world, batch, micro, says):
    cfg = config_from_preset("tiny", vocab_size=13)
    with pytest.raises(UsageError, match=re.escape(says)):
        grid.validate(world, cfg, batch, micro, "tiny")


@pytest.mark.parametrize("dp, pp, tp", [(1, 2, 2), (2, 2, 1), (2, 1, 2)])
def test_parallel3d_equals_baseline(dp, pp, tp, tmp_path):
    # the tiny preset fits each grid (2 blocks, 2 heads); the small one is the 8-rank test's
    p, s = run_lab("parallel3d", dp * pp * tp, tmp_path, "--dp", dp, "--pp", pp, "--tp", tp,
                   "--preset", "tiny", "--steps", 3)
    assert p.returncode == 0, p.stderr[-3000:]
    b = s["baseline"]
    assert b["ok"] is True and b["max_rel_loss_diff"] <= 1e-5 and b["max_abs_param_diff"] <= 1e-4
    assert s["extra"]["grid"] == {"dp": dp, "pp": pp, "tp": tp, "cp": 1, "order": "tp-inner"}


@pytest.mark.slow
def test_parallel3d_2x2x2_on_8_ranks(tmp_path):
    p, s = run_lab("parallel3d", 8, tmp_path, "--dp", 2, "--pp", 2, "--tp", 2, "--preset",
                   "small", "--steps", 3, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert s["baseline"]["ok"] is True and s["world_size"] == 8
    # model states from the shapes (dtlab/costmodel/shapes.py) are every rank's, to the byte
    # and so are the activations it keeps (two micro-batches, 1F1B) and the bytes it sends
    from dtlab.costmodel.shapes import Shape, activations, model_states, sent_bytes, total_params
    m = Shape(4, 128, 4, 512, 13, 64)  # the small preset on the default text (13 symbols)
    assert total_params(m) == s["n_params"]
    for rank, mem in enumerate(s["memory"]["per_rank"]):
        stage, t = divmod(rank % 4, 2)  # rank = (d PP + p) TP + t
        want = model_states(m, pp=2, stage=stage, tp=2, t=t)
        want["activations_peak"] = activations(m, 16, dp=2, tp=2, t=t, pp=2, stage=stage,
                                               microbatches=2)
        keys = ("params", "grads", "optimizer", "activations_peak")
        assert {k: mem[k] for k in keys} == {k: want[k] for k in keys}, rank
        assert s["comm"]["per_rank"][rank] == pytest.approx(
            sent_bytes(m, 16, dp=2, tp=2, t=t, pp=2, stage=stage)["total"]), rank


def test_parallel3d_bad_grid_is_one_line(tmp_path):
    p, s = run_lab("parallel3d", 4, tmp_path, "--dp", 2, "--pp", 2, "--tp", 2)
    assert p.returncode == 2 and s is None
    assert "world size 4 != dp x pp x tp = 2 x 2 x 2 = 8" in p.stderr


@pytest.mark.parametrize("schedule, v", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2),
                                         ("interleaved", 3), ("zbh1", 1)])
def test_every_schedule_runs_and_meets_its_formula(schedule, v):
    """Replaying each action list with ideal costs (no deadlock, every F/B/W once) gives the
    closed-form bubble: interleaving divides 1F1B's by V, ZB-H1 leaves a third of it."""
    for p in (2, 3, 4):
        for m in (p, 2 * p, 3 * p):
            lists = [SCHEDULES[schedule](p, m, r, v) for r in range(p)]
            for acts in lists:
                kinds = "FBW" if schedule == "zbh1" else "FB"
                want = sorted((k, i, c) for k in kinds for i in range(m) for c in range(v))
                assert sorted((*a, 0)[:3] for a in acts) == want
            got = pipeline_schedule.ideal(lists, v)
            assert got["bubble"] == pytest.approx(bubble_theory(p, m, schedule, v))
            if schedule == "interleaved":  # the warm-up's forwards, plus one
                assert got["peak_live"] == [min(2 * (p - 1 - r) + (v - 1) * p + 1, m * v)
                                            for r in range(p)]
            if schedule == "zbh1":          # as many as 1F1B's rank 0, on every rank
                assert got["peak_live"] == [p] * p
    assert bubble_theory(4, 8, "interleaved", 2) == pytest.approx(
        bubble_theory(4, 16))  # V = 2 is 1F1B with twice the micro-batches
    assert bubble_theory(4, 8, "zbh1") == pytest.approx(3 / 27)


@pytest.mark.parametrize("impl", ["own", "torch"])
@pytest.mark.parametrize("schedule", ["interleaved", "zbh1"])
def test_interleaved_and_zero_bubble_equal_baseline(impl, schedule, tmp_path, shared_run):
    """Interleaved 1F1B (2 ranks x 2 chunks of the small preset's 4 blocks) and ZB-H1 equal the
    baseline; every virtual-stage boundary carries each micro-batch's activation forward and its
    gradient back."""
    if (impl, schedule) == ("own", "interleaved"):  # the next test's run (a sleep added)
        p, s, tmp_path = shared_run("pipeline", 2, *INTERLEAVED_TIMED)
    else:
        p, s = run_lab("pipeline", 2, tmp_path, "--impl", impl, "--schedule", schedule,
                       "--microbatches", 4, "--preset", "small", "--steps", 3)
    assert p.returncode == 0, p.stderr[-3000:]
    b = s["baseline"]
    assert b["ok"] is True and b["max_rel_loss_diff"] <= 1e-5 and b["max_abs_param_diff"] <= 1e-4
    if impl == "own":
        v = 2 if schedule == "interleaved" else 1
        act = 16 * 64 * 128 * 4  # the whole batch's activations, over its micro-batches
        assert sum(s["comm"]["per_rank"]) == 2 * (2 * v - 1) * act
        f = _recorded_schedule(s, tmp_path, 3)
        assert s["extra"]["peak_live_microbatches"] == f["peak_live_theory"]


INTERLEAVED_TIMED = ("--schedule", "interleaved", "--microbatches", 4, "--preset", "small",
                     "--steps", 3, "--stage-compute-ms", 20)


@pytest.mark.slow
@pytest.mark.parametrize("schedule, stages, m", [("interleaved", 2, 4), ("zbh1", 4, 8)])
def test_new_schedules_bubble_and_memory_match_theory(schedule, stages, m, tmp_path, shared_run):
    """With a known busy time per forward (and per B and W, or twice per whole backward), the
    replay of the recorded action lists has the formula's bubble exactly and the live
    micro-batches per rank are the action list's. The measured bubble is left to the benchmark
    records (python -m dtlab.docsgen.records.schedule_runs): on a loaded machine it drifts from
    the formula by more than any margin a test could hold (0.168 against 0.111 for ZB-H1 at
    P = 4, M = 8 on 2 shared cores)."""
    args = ("--schedule", schedule, "--microbatches", m, "--preset", "small", "--steps", 3,
            "--stage-compute-ms", 20)
    if args == INTERLEAVED_TIMED:  # shared with the baseline test above
        p, s, tmp_path = shared_run("pipeline", stages, *args)
    else:
        p, s = run_lab("pipeline", stages, tmp_path, *args)
    assert p.returncode == 0, p.stderr[-3000:]
    f = _recorded_schedule(s, tmp_path, 3)
    assert f["bubble_theory"] == pytest.approx(bubble_theory(stages, m, schedule,
                                                             2 if schedule == "interleaved" else 1))
    assert f["bubble_ideal"] == pytest.approx(f["bubble_theory"])
    assert s["extra"]["peak_live_microbatches"] == f["peak_live_theory"]


def test_pipeline_schedule_bad_input(tmp_path):
    for args, says in [(("--schedule", "interleaved", "--preset", "tiny"),
                        "2 ranks x 2 chunks = 4 virtual stages but preset 'tiny' has 2 blocks"),
                       (("--schedule", "interleaved", "--preset", "small", "--microbatches", "3"),
                        "--microbatches 3 must be a multiple of 2"),
                       (("--schedule", "1f1b", "--virtual-stages", "2"),
                        "only --schedule interleaved runs several chunks per rank")]:
        p, s = run_lab("pipeline", 2, tmp_path, *args)
        assert p.returncode == 2 and s is None and says in p.stderr, p.stderr
