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
    "rank_grid": ("return rank // (pp * tp), (rank // tp) % pp, rank % tp",
                  "return rank % dp, (rank // dp) % pp, rank // (dp * pp)",
                  "dp=1, pp=2, tp=2: coords of rank 1 should be (d, p, t) = (0, 0, 1), got "
                  "(0, 1, 0)\n  tp must vary fastest: ranks 0..tp-1 share a tp group"),
    "gpipe": ('[("B", i) for i in range(microbatches)]',
              '[("B", i) for i in reversed(range(microbatches))]',
              "P=1, M=2, stage 0: the backwards run last-first (B1 ... B0); this lab runs them in "
              "micro-batch order"),
    "expert_dispatch": ("dist.all_to_all_single(received, x[order].contiguous(), recv, send)",
                        "dist.all_to_all_single(received, x[order].contiguous(), send, recv)",
                        "rank 0, world 2: ValueError: in dispatch: splits are swapped: "
                        "all_to_all_single(output, input, output_split_sizes, "
                        "input_split_sizes) takes what this rank receives"),
    "ddp_buckets": ("            flat /= self.world\n", "",
                    "rank 0, world 2, one step: 0.weight.grad differs from the all-reduced "
                    "average: 128 element(s) differ, first at index 0: expected 0.00273432, got "
                    "0.00546863\n  the gradients are 2 times too large: all_reduce sums, divide "
                    "by the world size (2) to average"),
    "interleaved_1f1b": ("return (stages - 1) / (chunks * microbatches + stages - 1)",
                         "return (stages - 1) / (microbatches + stages - 1)",
                         "bubble_fraction(P=2, M=2, V=2): expected 0.2 = (P-1)/(V M + P-1), got "
                         "0.333333; the bubble was not divided by V"),
    "zero_bubble": ('        actions.append(("B", i))\n        if i >= stage:  # the weight '
                    'gradient runs `stage` micro-batches behind\n'
                    '            actions.append(("W", i - stage))',
                    '        if i >= stage:\n            actions.append(("W", i - stage))\n'
                    '        actions.append(("B", i))',
                    "P=1, M=1, stage 0: W0 runs before B0: the weights' gradient x^T dL/dy "
                    "needs dL/dy"),
    "checkpoint_reshard": ("    size = -(-numel // new_world)", "    size = numel // new_world",
                           "numel 1 saved by W=1 (chunks of [1]), resharded to W'=2, rank 0: "
                           "expected elements [0, 1) (1 of them), got no elements; the chunk "
                           "size rounds up: ceil(numel / W') = 1"),
    "sequence_parallel": ("    def backward(ctx, grad):\n        return reduce_scatter_sequence("
                          "grad)",
                          "    def backward(ctx, grad):\n        grad = grad.clone()\n"
                          "        dist.all_reduce(grad)\n        return grad",
                          "rank 0, world 2, GatherFromSP, x of shape (2, 3, 4): the backward "
                          "returned a gradient of shape (2, 6, 4) for an input of shape "
                          "(2, 3, 4); dist.all_reduce sums the gradient but leaves every rank "
                          "all the tokens"),
    "dataparallel": ("torch.stack(grads).sum(0)", "torch.stack(grads).mean(0)",
                     "2 replica(s), batch 7, step 0: the master's 0.weight.grad differs from the "
                     "whole batch's: 40 element(s) differ, first at index 0: expected 0.0472817, "
                     "got 0.0236409; the gradients are 2 (R) times too small: they were "
                     "averaged, not summed"),
    "shm_averaging": ("    barrier.wait()                # every row written\n"
                      "    mean = table.sum(0) / world",
                      "    mean = table.sum(0) / world\n    barrier.wait()",
                      "the table was read before every worker had written its row: 10 "
                      "element(s) differ"),
    "zero2": ("return owned / self.world", "return owned",
              "rank 0, world 2, step 0: unit 0 (layer 0, 25 numbers): the gradients were summed, "
              "not averaged: 13 element(s) differ, first at index 0: expected 0.0196729, got "
              "0.0393458; reduce_scatter sums over the ranks, divide by the world size (2)"),
    "zero3": ("            if torch.is_grad_enabled() and out.requires_grad:  # its backward "
              "needs them again\n                out.register_hook(lambda grad: self.gather(u))\n",
              "",
              "rank 0, world 2, round 0: backward failed (setStorage: sizes [2, 6], strides [6, "
              "1], storage offset 0, and itemsize 8 requiring a storage size of 96 are out of "
              "bounds for storage of size 0): a layer's parameters were freed after forward and "
              "not gathered again before its backward"),
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


GRID = ("def coords(rank, dp, pp, tp):\n"
        "    return rank // (pp * tp), (rank // tp) % pp, rank % tp\n\n\n")
NAMED_MISTAKES = {  # exercise, a learner's file with a classic mistake, what the checker says
    "grid groups miss a rank": (
        "rank_grid", GRID + "def groups(dp, pp, tp):\n"
        "    n = dp * pp * tp\n"
        "    return {k: [list(range(i, min(i + s, n - 1))) for i in range(0, n - 1, s)]\n"
        "            for k, s in (('tp', tp), ('pp', pp), ('dp', dp))}\n",
        "dp=1, pp=1, tp=1: the tp groups miss rank(s) [0]; every rank is in exactly one tp group"),
    "grid groups overlap": (
        "rank_grid", GRID + "def groups(dp, pp, tp):\n"
        "    n = dp * pp * tp\n"
        "    return {k: [list(range(i, i + s)) for i in range(0, n, s)] + [[0]]\n"
        "            for k, s in (('tp', tp), ('pp', pp), ('dp', dp))}\n",
        "dp=1, pp=1, tp=1: the tp groups overlap: rank(s) [0] are in more than one tp group"),
    "grid tp groups strided": (
        "rank_grid", GRID + "def groups(dp, pp, tp):\n"
        "    n = dp * pp * tp\n"
        "    return {k: [list(range(i, n, n // s)) for i in range(n // s)]\n"
        "            for k, s in (('tp', tp), ('pp', pp), ('dp', dp))}\n",
        "dp=1, pp=2, tp=2: [0, 2] is not a tp group; expected [[0, 1], [2, 3]]\n"
        "  tp must vary fastest: ranks 0..tp-1 share a tp group"),
    "gpipe bubble over M": (
        "gpipe", "def gpipe(p, m, s):\n"
        "    return [('F', i) for i in range(m)] + [('B', i) for i in range(m)]\n\n\n"
        "def bubble_fraction(p, m):\n    return (p - 1) / m\n",
        "bubble_fraction(P=2, M=1): expected 0.5 = (P-1)/(M+P-1), got 1; (P-1)/M divides by the "
        "busy slots only"),
    "dispatch's way back not in the original order": (
        "expert_dispatch", ("    out[order] = back\n", "    out = back\n"),
        "rank 0, world 2, uneven splits: the return trip did not restore the original order"),
    "dispatch reads the row width from x[0]": (
        "expert_dispatch", ("x.new_empty((sum(recv), *x.shape[1:]))",
                            "x.new_empty((sum(recv), len(x[0])))"),
        "rank 1, world 2, rank 1 has no rows: IndexError: index 0 is out of bounds for dimension "
        "0 with size 0 (your file, line 13: received = x.new_empty((sum(recv), len(x[0]))))\n"
        "  rank 1 has no rows (x has shape (0, 3)): there is no x[0]; take the row shape from "
        "x.shape[1:]"),
    "ddp waits on each bucket in the hook": (
        "ddp_buckets", ("self.pending.append((dist.all_reduce(flat, async_op=True), flat, "
                        "self.buckets[i]))",
                        "self.pending.append((dist.all_reduce(flat, async_op=True), flat, "
                        "self.buckets[i]))\n            self.pending[-1][0].wait()"),
        "rank 0, world 2, one step: bucket 0 was waited on before backward ended; waiting on "
        "each bucket right after launching it blocks backward until its all-reduce is done, so "
        "nothing overlaps"),
    "ddp buckets in forward order": (
        "ddp_buckets", ("for p in reversed(self.params):", "for p in self.params:"),
        "rank 0, world 2, one step: launched buckets of [4, 60, 208, 272, 128] elements, "
        "expected [64, 192, 272, 144] (parameters from the last to the first, a bucket closed "
        "at >= 60 elements); the buckets were filled in forward parameter order"),
    "ddp communicates under no_sync": (
        "ddp_buckets", ("        if not self.syncing:\n            return\n", ""),
        "rank 0, world 2, 3 micro-batches, the first 2 under no_sync(): 4 all-reduce(s) during "
        "backward 0 under no_sync()"),
    "interleaved: the chunk does not wrap around": (
        "interleaved_1f1b", ("return group * stages + within % stages, within // stages",
                             "return group * stages + within % stages, min(k // stages, "
                             "chunks - 1)"),
        "P=2, V=2, M=4, stage 0: action 4 should be ('F', 2, 0), got ('F', 2, 1): the wrong "
        "chunk after a wrap-around: this is forward 4 of the stage (from 0), past the P V = 4"),
    "interleaved: a chunk past the last": (
        "interleaved_1f1b", ("return group * stages + within % stages, within // stages",
                             "return group * stages + within % stages, k // stages"),
        "P=2, V=2, M=4, stage 0: action 4 is ('F', 2, 2), but a stage holds chunks 0..1: the "
        "wrong chunk after a wrap-around"),
    "interleaved: backwards on the forwards' chunks": (
        "interleaved_1f1b", ("backwards = [(i, chunks - 1 - c) for i, c in forwards]",
                             "backwards = list(forwards)"),
        "P=2, V=2, M=2, stage 0: action 4 should be ('B', 0, 1), got ('B', 0, 0): the "
        "backwards walk the chunks the other way"),
    "interleaved: M not a multiple of P accepted": (
        "interleaved_1f1b", ('    if microbatches % stages:\n        raise ValueError(f"'
                             '{microbatches} micro-batches do not make groups of {stages} '
                             'stages")\n', ""),
        "P=2, V=2, M=3: interleaved_1f1b returned a schedule; the lab runs micro-batches in "
        "groups of P"),
    "zbh1: W right after its B on every stage": (
        "zero_bubble", "def zbh1(p, m, s):\n"
        "    w = min(p - 1 - s, m)\n"
        "    acts = [('F', i) for i in range(w)]\n"
        "    for i in range(w, m):\n"
        "        acts += [('F', i), ('B', i - w), ('W', i - w)]\n"
        "    for i in range(m - w, m):\n"
        "        acts += [('B', i), ('W', i)]\n"
        "    return acts\n\n\n"
        "def bubble_fraction(p, m):\n    return (p - 1) / (3 * m + p - 1)\n",
        "P=2, M=2, stage 1: action 2 should be ('F', 1), got ('W', 0): W on the critical path"),
    "zbh1: B and W fused": (
        "zero_bubble", "def zbh1(p, m, s):\n"
        "    w = min(p - 1 - s, m)\n"
        "    acts = [('F', i) for i in range(w)]\n"
        "    for i in range(w, m):\n"
        "        acts += [('F', i), ('B', i - w)]\n"
        "    return acts + [('B', i) for i in range(m - w, m)]\n\n\n"
        "def bubble_fraction(p, m):\n    return (p - 1) / (3 * m + p - 1)\n",
        "P=1, M=1, stage 0: no W in the list: B and W fused"),
    "zbh1: 1F1B's bubble": (
        "zero_bubble", ("return (stages - 1) / (3 * microbatches + stages - 1)",
                        "return (stages - 1) / (microbatches + stages - 1)"),
        "bubble_fraction(P=2, M=2): expected 0.142857 = (P-1)/(3M+P-1), got 0.333333; that is "
        "1F1B's bubble"),
    "reshard: chunk size from the old world": (
        "checkpoint_reshard", ("    size = -(-numel // new_world)",
                               "    size = -(-numel // len(chunks))"),
        "numel 2 saved by W=1 (chunks of [2]), resharded to W'=2, rank 0: expected elements "
        "[0, 1) (1 of them), got elements [0, 2); the chunk size came from the old world, "
        "ceil(numel / W) = 2"),
    "reshard: off by one at the boundary": (
        "checkpoint_reshard", ("    hi = min((rank + 1) * size, numel)",
                               "    hi = min((rank + 1) * size - 1, numel)"),
        "numel 1 saved by W=1 (chunks of [1]), resharded to W'=1, rank 0: expected elements "
        "[0, 1) (1 of them), got no elements; off by one at a boundary: rank 0's chunk is "
        "[0, 1)"),
    "reshard: the padding left in the last chunk": (
        "checkpoint_reshard", ("    return torch.cat(pieces) if pieces else chunks[0].new_empty(0)",
                               "    out = torch.cat(pieces) if pieces else chunks[0].new_empty(0)\n"
                               "    return torch.cat([out, out.new_zeros(size - len(out))])"),
        "numel 1 saved by W=1 (chunks of [1]), resharded to W'=2, rank 1: expected elements "
        "[1, 1) (0 of them), got no elements then 1 padding zero(s); the padding was left in"),
    "sequence parallel: gathered along the batch": (
        "sequence_parallel", ("    return torch.cat(parts, dim=1)",
                              "    return torch.cat(parts, dim=0)"),
        "rank 0, world 2, GatherFromSP, x of shape (2, 3, 4): the output has shape (4, 3, 4), "
        "expected (2, 6, 4): gathered along dimension 0 (the batch) instead of 1 (the "
        "sequence)"),
    "dataparallel: outputs gathered out of order": (
        "dataparallel", ("torch.cat(outs)", "torch.cat(outs[::-1])"),
        "2 replica(s), batch 7, step 0: the outputs were gathered out of order: row 0 of the "
        "output is row 4 of the batch"),
    "dataparallel: the last, smaller chunk dropped": (
        "dataparallel", ("return list(x.chunk(len(self.replicas)))",
                         "size = len(x) // len(self.replicas)\n"
                         "        return [x[i * size:(i + 1) * size] for i in "
                         "range(len(self.replicas))]"),
        "2 replica(s), batch 7, step 0: the gathered output has 6 rows for a batch of 7: the "
        "rows of the last, smaller chunk were dropped (x.chunk(2) gives chunks of [4, 3]"),
    "dataparallel: gradients not reduced into the master": (
        "dataparallel", ("torch.stack(grads).sum(0)", "grads[0]"),
        "the master's gradient holds replica 0's rows only: the other replicas' gradients were "
        "not added into the master's .grad"),
    "dataparallel: replicas not refreshed": (
        "dataparallel", ("        self.replicate()\n", ""),
        "2 replica(s), batch 7, step 1: the replicas ran with the previous step's parameters"),
    "shm: summed, not averaged": (
        "shm_averaging", ("table.sum(0) / world", "table.sum(0)"),
        "world 2, worker 0, round 0: the rows were summed, not averaged: 10 element(s) differ, "
        "first at index 0: expected 1.10117, got 2.20235; divide the sum by the world size W = 2"),
    "shm: every worker writes row 0": (
        "shm_averaging", ("table[rank].copy_(grad)", "table[0].copy_(grad)"),
        "world 2, worker 1, round 0: row 1 of the table (this worker's) does not hold its "
        "gradient: nothing wrote it this round; each worker writes its gradient into its own "
        "row, table[rank]"),
    "shm: no barrier after reading": (
        "shm_averaging", ("    barrier.wait()                # every row read: the next round "
                          "may overwrite them\n", ""),
        "world 2, worker 0, round 0: barrier.wait() was called 1 time(s) in one "
        "average_gradients"),
    "zero2: all-reduce instead of reduce-scatter": (
        "zero2", ("        owned = torch.empty(per, dtype=grads.dtype)\n"
                  "        dist.reduce_scatter_tensor(owned, grads)",
                  "        dist.all_reduce(grads)\n        owned = grads"),
        "rank 0, world 2, step 0: unit 2 (layer 4, 14 numbers): this rank kept a gradient of 14 "
        "elements, the whole unit; ZeRO-2 keeps only its shard of 7 (ceil(14/2)): "
        "reduce-scatter, not all-reduce"),
    "zero2: padding at the front": (
        "zero2", ("grads[:numel] = torch.cat([p.grad", "grads[per * self.world - numel:] = "
                  "torch.cat([p.grad"),
        "rank 1, world 2, step 0: unit 0 (layer 0, 25 numbers): this rank's gradient shard "
        "holds elements [12, 25) of the unit's flat averaged gradient, but rank 1 owns [13, 26)"),
    "zero2: full gradients kept": (
        "zero2", ("            p.grad = None  # the full gradient is not kept: ZeRO-2's saving\n",
                  "            pass\n"),
        "rank 0, world 2, step 0: after backward, 0.weight.grad still holds the full gradient"),
    "zero3: not freed after forward": (
        "zero3", ("            self.free(u)  # the layer has run\n", "            pass\n"),
        "rank 0, world 2, round 0, forward: unit 0 (layer 0: 0.weight, 0.bias) was still "
        "gathered when layer 2 ran: the forward hook must free each layer right after it has "
        "run"),
    "zero3: own shard gathered first": (
        "zero3", ("        dist.all_gather_into_tensor(u.full, u.shard)",
                  "        parts = [torch.empty_like(u.shard) for _ in range(self.world)]\n"
                  "        dist.all_gather(parts, u.shard)\n"
                  "        u.full.copy_(torch.cat([u.shard] + [t for r, t in enumerate(parts) "
                  "if r != self.rank]))"),
        "rank 1, world 2, round 0, forward: unit 0 (layer 0: 0.weight, 0.bias) was gathered in "
        "the wrong rank order: slice 0 of the gathered vector holds rank 1's shard"),
    "zero3: no gather before the layer": (
        "zero3", ("        u.module.register_forward_pre_hook(lambda module, args: "
                  "self.gather(u))\n", ""),
        "rank 0, world 2, round 0, forward: unit 0 (layer 0: 0.weight, 0.bias) was not gathered "
        "when it ran (its parameters have no memory): the forward pre-hook must gather it"),
}


@pytest.mark.parametrize("case", list(NAMED_MISTAKES))
def test_classic_mistake_is_named(tmp_path, case):
    name, source, says = NAMED_MISTAKES[case]
    f = tmp_path / exercises.get(name).file
    if isinstance(source, tuple):  # (old, new): the reference solution with one change
        old, new = source
        source = (SOLUTIONS / f.name).read_text()
        assert old in source
        source = source.replace(old, new)
    f.write_text(source)
    passed, lines = exercises.check(name, f)
    text = "\n".join(lines)
    assert not passed, text
    assert says in text, text
