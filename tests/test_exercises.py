"""Exercises: every reference solution passes `dtlab check`, every untouched skeleton fails with
its TODO message, and a subtly wrong solution fails with what differed."""
import pytest

from conftest import ROOT, dtlab
from dtlab.exercises import checker as exercises

SOLUTIONS = ROOT / "dtlab" / "exercises" / "solutions"
NAMES = list(exercises.EXERCISES)


@pytest.mark.parametrize("name", NAMES)
def test_reference_solution_passes(name):
    ex = exercises.get(name)
    p = dtlab("check", name, "--impl", SOLUTIONS / ex.file, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip().endswith("PASS")
    for world in ex.worlds:
        assert f"ok   {name} on {world} processes" in p.stdout


@pytest.mark.parametrize("name", NAMES)
def test_untouched_skeleton_fails_helpfully(tmp_path, name):
    p = dtlab("exercise", name, "--dest", tmp_path)
    assert p.returncode == 0, p.stderr
    f = tmp_path / exercises.get(name).file
    assert "TODO" in f.read_text() and "Hints" in f.read_text() or name == "loss_scaler"
    p = dtlab("check", name, "--impl", f, timeout=300)
    assert p.returncode == 1
    assert "not done yet: TODO: " in p.stdout and "(your file, line " in p.stdout
    assert "Traceback" not in p.stdout + p.stderr
    again = dtlab("exercise", name, "--dest", tmp_path)  # never overwrites the learner's work
    assert again.returncode == 2 and "exists (your work?)" in again.stderr


MUTATIONS = {  # a subtle bug in the reference solution, and what the checker must say
    "ring_allreduce": ("send, recv = chunk(rank - step), chunk(rank - step - 1)",
                       "send, recv = chunk(rank - step), chunk(rank - step)",
                       "world 2, size 1: the process died (exit code -6) before reporting: a "
                       "message arrived with a different size"),
    "loss_scaler": ("if self.clean_steps == self.growth_interval:",
                    "if self.clean_steps > self.growth_interval:",
                    "pattern 0 (growth_interval 3), step 2 (overflow=False, history ...): "
                    "expected scale 2048, got 1024"),
    "tensor_parallel": ("    dist.all_reduce(partial)  # sum of every rank's partial product\n"
                        "    return partial + bias",
                        "    partial = partial + bias\n    dist.all_reduce(partial)\n"
                        "    return partial",
                        "row_parallel_forward differs from the full MLP"),
    "1f1b": ("warmup = min(stages - 1 - stage, microbatches)",
             "warmup = min(stages - stage, microbatches)",
             "P=1, M=2, stage 0: action 1 should be ('B', 0), got ('F', 1)"),
    "zero1": ("self.shard.grad = owned / self.world", "self.shard.grad = owned",
              "step 0, parameter 0 (shape (5, 3)): "),
    "ring_attention": ("out = torch.exp(lse_a - shift)[..., None] * out_a + ", "out = out_a + ",
                       "the running output was not rescaled when the running maximum changed: "
                       "out_a must be multiplied by exp(lse_a - lse)"),
}


@pytest.mark.parametrize("name", NAMES)
def test_subtly_wrong_solution_is_caught(tmp_path, name):
    old, new, says = MUTATIONS[name]
    src = (SOLUTIONS / exercises.get(name).file).read_text()
    assert old in src
    f = tmp_path / exercises.get(name).file
    f.write_text(src.replace(old, new))
    passed, lines = exercises.check(name, f)
    text = "\n".join(lines)
    assert not passed, text
    assert says in text, text
    if "expected" in says:
        assert "expected" in text and "got" in text


def test_ring_exercise_refuses_library_collectives(tmp_path):
    f = tmp_path / "ring_allreduce.py"
    f.write_text("import torch.distributed as dist\n\n\ndef ring_all_reduce(x):\n"
                 "    dist.all_reduce(x)\n    return x\n")
    passed, lines = exercises.check("ring_allreduce", f)
    assert not passed
    assert "dist.all_reduce is switched off in this exercise" in "\n".join(lines)


def test_exercise_bad_input():
    for args, says in [(("exercise", "nope"), "unknown exercise 'nope'; choose from"),
                       (("check", "zero1", "--impl", "/nonexistent.py"),
                        "--impl /nonexistent.py: no such file")]:
        p = dtlab(*args)
        assert p.returncode == 2 and says in p.stderr, p.stderr
