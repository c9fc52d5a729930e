"""How each answer of docs/questions.md is sourced: the command its ``Try:`` line gives, the record
that command wrote (under docs/reference/), the figure's key there and the figure as the record
gives it. Where no figure can exist on this machine, the one-line reason and the published figure
quoted instead (a key of sources.SOURCES). The test suite holds the page to this table and the
table to the records; ``dtlab docs refresh --render`` writes it onto the page."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Answer:
    command: str            # the `Try:` command, exactly as the page quotes it
    record: str = ""        # the record under docs/reference/ that command wrote
    key: str = ""           # the figure's key on the page: <!--fig:KEY-->
    where: str = ""         # where in the record the figure is, for a reader
    none_why: str = ""      # when no figure can exist here: why, in one line
    published: str = ""     # then: the SOURCES key of the published figure quoted instead


# question number -> its answer's source
ANSWERS: dict[int, Answer] = {
    1: Answer("dtlab run ddp --nproc 2", "tour.json", "run.ddp.torch.sent",
              "runs[ddp torch].comm.bytes_per_step"),
    2: Answer("dtlab bench comm --nproc 2,4 --impl library,ring,naive,tree --sizes 1KiB,256KiB,1MiB,4MiB,16MiB,64MiB --iters 20",
              "comm.json", "comm.ring64", "rows[ring, W=2, 64 MiB].busbw_vs_library"),
    3: Answer("dtlab run ddp --nproc 2 --impl own --allreduce ring --preset small --steps 30 "
              "--bucket-mb 1", "labs.json", "overlap.ring-yes.wait_ms",
              "runs.ddp-overlap-ring-yes.extra.overlap_timing.wait_after_backward_s_median"),
    4: Answer("dtlab run pipeline --nproc 2", "tour.json", "run.pipeline.own-1f1b.rel",
              "runs[pipeline own-1f1b].baseline.max_rel_loss_diff"),
    5: Answer("dtlab run tensor_parallel --nproc 2", "tour.json", "run.tensor_parallel.own.rel",
              "runs[tensor_parallel own].baseline.max_rel_loss_diff"),
    6: Answer("dtlab run pipeline --nproc 2 --preset tiny --schedule 1f1b --microbatches 4 "
              "--steps 3 --stage-compute-ms 20", "labs.json", "bubble.1f1b.p2.m4",
              "runs.pipeline-1f1b-p2-m4.extra.bubble_measured"),
    7: Answer("dtlab run parallel3d --nproc 4 --dp 1 --pp 2 --tp 2 --preset small", "tour.json",
              "run.parallel3d.dp1-pp2-tp2-1f1b.rel",
              "runs[parallel3d dp1-pp2-tp2-1f1b].baseline.max_rel_loss_diff"),
    8: Answer("dtlab memory --params 1.3B --gpus-per-node 1", "answers-q1-33.json",
              "q8.memory.z0", "runs.memory-1.3b.rows[stage 0, no offload].gpu"),
    9: Answer("dtlab run ddp --nproc 2 --preset tiny --batch-size 64 --steps 20",
              "answers-q1-33.json", "q9.two.step_ms", "runs.two-ranks.step_s_median"),
    10: Answer("dtlab run zero --nproc 2 --stage 3 --offload param", "tour.json",
               "zero.offload.device", "runs[zero own-stage3-offload-param].memory.per_rank[0]"),
    11: Answer("dtlab run pipeline --nproc 4 --preset small --schedule gpipe --microbatches 1 "
               "--steps 3 --stage-compute-ms 20", "labs.json", "bubble.gpipe.p4.m1",
               "runs.pipeline-gpipe-p4-m1.extra.bubble_measured"),
    12: Answer("dtlab run tensor_parallel --nproc 2", "tour.json",
               "run.tensor_parallel.own.sent", "runs[tensor_parallel own].comm.bytes_per_step",
               none_why="only 1D tensor parallelism is implemented; 2D, 2.5D and 3D are not",
               published="colossalai-tp"),
    13: Answer("dtlab run pipeline --nproc 4 --schedule zbh1 --microbatches 8 --preset small "
               "--steps 3 --stage-compute-ms 20", "schedules-experts.json",
               "sched.zbh1.p4.v1.m8", "pipelines[zbh1, P=4, M=8].bubble_measured"),
    14: Answer("dtlab run zero --nproc 2 --stage 3", "tour.json", "run.zero.own-stage3.sent",
               "runs[zero own-stage3].comm.bytes_per_step"),
    15: Answer("sudo dtlab bench cluster", "cluster.json", "cluster.zero-stage-3.ratio",
               "strategies[zero stage 3]: 2 nodes @ 100mbit over 1 node, step_ms"),
    16: Answer("dtlab run baseline --nproc 1 --preset long --steps 12 --seq-len 256 "
               "--recompute full", "long-sequences.json", "recompute.full.ratio",
               "recompute_step_time[seq 256, full].ratio"),
    17: Answer("dtlab run deepspeed_zero --nproc 2 --config ds_zero3", "tour.json",
               "run.deepspeed_zero.stage3.rel",
               "runs[deepspeed_zero stage3].baseline.max_rel_loss_diff"),
    18: Answer("dtlab plan --layers 32 --d-model 4096 --heads 32 --seq 2048 --batch 512 --nodes 4 --devices-per-node 8 --device-memory 80GiB --peak-flops 312e12 --intra 3,300 --inter 10,200",
               "plan-a100.json", "plan:q18", "ranked[0]: label, time.total, memory"),
    19: Answer("sudo dtlab plan validate --calibration docs/reference/plan-calibration.json "
               "--cluster-rates 100mbit,1gbit,unshaped", "plan-validate.json",
               "plan.goal.mape", "summary.mape_time"),
    20: Answer("dtlab run ddp --nproc 2", "tour.json", "ddp.step_ms",
               "runs[ddp torch].time.step_s_median"),
    21: Answer("sudo dtlab doctor --hostfile hostfile --master-addr 10.84.0.11 --master-port 29611 --collective --collective-timeout 5",
               "doctor-collective.json", "doctor.link-of-doc2-down.error",
               "cases[link of doc2 down].findings[ssh].message"),
    22: Answer("sudo dtlab bench cluster", "cluster.json",
               "cluster.ddp.2-nodes-100mbit.step_ms", "strategies[ddp, 2 nodes @ 100mbit].step_ms"),
    23: Answer("sudo dtlab doctor --hostfile hostfile --master-addr 10.84.0.11 --master-port 29611 --collective --collective-timeout 5",
               "doctor-collective.json", "doctor.healthy.busbw",
               "cases[healthy].collective.busbw_GBps"),
    24: Answer("dtlab run pipeline --nproc 2", "tour.json", "run.pipeline.own-1f1b.sent",
               "runs[pipeline own-1f1b].comm.bytes_per_step"),
    25: Answer("dtlab run pipeline --nproc 4 --preset small --schedule 1f1b --microbatches 8 "
               "--steps 3 --stage-compute-ms 20", "labs.json", "bubble.1f1b.p4.m8",
               "runs.pipeline-1f1b-p4-m8.extra.bubble_measured"),
    26: Answer("dtlab run pipeline --nproc 2 --preset tiny --schedule gpipe --microbatches 8 "
               "--steps 3 --stage-compute-ms 20", "labs.json", "bubble.gpipe.p2.m8",
               "runs.pipeline-gpipe-p2-m8.extra.bubble_measured"),
    27: Answer("dtlab run baseline", "tour.json", "baseline.step_ms",
               "runs[baseline single].time.step_s_median"),
    28: Answer("dtlab run dataparallel --nproc 1", "tour.json", "run.dataparallel.own.rel",
               "runs[dataparallel own].baseline.max_rel_loss_diff"),
    29: Answer("dtlab run dataparallel --nproc 1", "tour.json", "run.dataparallel.own.step_ms",
               "runs[dataparallel own].time.step_s_median"),
    30: Answer("dtlab run dataparallel --nproc 1", "tour.json", "dp.first_key",
               "runs[dataparallel own].extra.save_load.load_prefixed_into_plain.first_key"),
    31: Answer("dtlab run dataparallel --nproc 1", "tour.json", "dp.replica0.bytes",
               "runs[dataparallel own].extra.replica_bytes[0].total"),
    32: Answer("dtlab run dataparallel --nproc 1", none_why="nn.DataParallel's warnings need two "
               "or more CUDA devices; the lent H200 was one", published="torch-dataparallel"),
    33: Answer("dtlab run dataparallel --nproc 1", none_why="the error needs a CUDA device 0 "
               "that holds no parameters; the lent H200 was one device", published="torch-dataparallel"),
    34: Answer("dtlab run dataparallel --nproc 1", "tour.json", "dataparallel.rel",
               "runs[dataparallel own].baseline.max_rel_loss_diff"),
    35: Answer("dtlab run ddp --nproc 4 --steps 20", "labs.json", "q.ddp.w4.sent",
               "runs.ddp-torch-w4.comm.bytes_per_step"),
    36: Answer("dtlab run ddp --nproc 2 --impl own --allreduce ring --batch-size 24 --steps 20",
               "labs.json", "q.ddp.own.w2b24.rel",
               "runs.ddp-own-w2-ring.baseline.max_rel_loss_diff"),
    37: Answer("dtlab run ddp --nproc 2", "tour.json", "run.ddp.torch.param",
               "runs[ddp torch].baseline.max_abs_param_diff"),
    38: Answer("dtlab run dataparallel --nproc 1", "tour.json", "dataparallel.step_ms",
               "runs[dataparallel own].time.step_s_median"),
    39: Answer("dtlab run torch_multiprocessing --nproc 1", "tour.json", "mp.rel",
               "runs[torch_multiprocessing sync].baseline.max_rel_loss_diff"),
    40: Answer("dtlab run torch_multiprocessing --nproc 1", "tour.json", "q.mp.write",
               "runs[torch_multiprocessing sync].comm.by_op.shared_memory_write.bytes / steps"),
    41: Answer("dtlab run torch_multiprocessing --nproc 1 --sharing-strategy file_system",
               "questions.json", "q.mp.file-system.fds",
               "runs.mp-file-system.extra.sharing.open_file_descriptors"),
    42: Answer("dtlab run amp --nproc 2 --dtype bf16", "tour.json", "q.act.bf16.w2",
               "runs[amp bf16-own].memory.per_rank[0].activations_peak"),
    43: Answer("dtlab run amp --nproc 2 --dtype bf16", "tour.json", "run.amp.bf16-own.rel",
               "runs[amp bf16-own].baseline.max_rel_loss_diff"),
    44: Answer("dtlab run amp --nproc 1 --master-weights --inject-overflow-at 3", "questions.json",
               "q.amp.master.skipped", "runs.amp-master-weights.extra.skipped_steps"),
    45: Answer("dtlab run amp --nproc 1 --inject-overflow-at 2,5,6 --growth-interval 3 --steps 14",
               "questions.json", "q.amp.scaler.history", "runs.amp-scaler-own.extra.loss_scale"),
    46: Answer("dtlab run amp --nproc 2 --dtype bf16", "tour.json", "amp.bf16.rel",
               "runs[amp bf16-own].baseline.max_rel_loss_diff"),
    47: Answer("dtlab run deepspeed_zero --nproc 2 --config ds_zero3", "tour.json",
               "run.deepspeed_zero.stage3.rel",
               "runs[deepspeed_zero stage3].baseline.max_rel_loss_diff"),
    48: Answer("dtlab run deepspeed_zero --nproc 2 --config ds_zero3", "tour.json",
               "q.ds3.all_gather", "runs[deepspeed_zero stage3].comm.by_op.all_gather"),
    49: Answer("dtlab run deepspeed_zero --nproc 2 --config ds_zero3", "tour.json",
               "q.ds3.fp32_diff",
               "runs[deepspeed_zero stage3].extra.checkpoint_to_fp32.max_abs_diff_vs_gathered"),
    50: Answer("dtlab run accelerate_lab --nproc 2 --accum 2", "tour.json",
               "run.accelerate_lab.multi_cpu-accum2.rel",
               "runs[accelerate_lab multi_cpu-accum2].baseline.max_rel_loss_diff"),
    51: Answer("dtlab run zero --nproc 2 --stage 1", "tour.json", "q.zero.w2.s1.optimizer",
               "runs[zero own-stage1].memory.per_rank[0].optimizer"),
    52: Answer("dtlab run zero --nproc 4 --preset small --stage 3 --steps 5 --offload none",
               "labs.json", "q.zero.small.s3.states", "runs.zero-small-s3-none.memory.per_rank[0]"),
    53: Answer("dtlab run zero --nproc 4 --preset small --stage 3 --steps 5 --offload none",
               "labs.json", "q.zero.small.s3.sent", "runs.zero-small-s3-none.comm.bytes_per_step"),
    54: Answer("dtlab run zero --nproc 4 --preset small --stage 2 --steps 5 --offload optimizer",
               "labs.json", "q.zero.small.s2off.cpu",
               "runs.zero-small-s2-optimizer.memory.per_rank[0].offload.optimizer"),
    55: Answer("dtlab memory --params 7B", "questions.json", "q.mem.7b.weights",
               "runs.memory-7b.inference_gpu_bytes"),
    56: Answer("dtlab memory --params 65B --layers 80 --hidden 8192 --heads 64 --ffn 22016 --vocab "
               "32000 --seq 2048 --gpus-per-node 4 --gpu-mem 32 --cpu-mem 512", "questions.json",
               "q.mem.65b.gpu", "runs.memory-65b-v100.rows[stage 3, offload param].gpu.total"),
    57: Answer("dtlab memory --params 7B --gpus-per-node 8", "questions.json", "q.mem.7b8.z2",
               "runs.memory-7b-8gpus.rows[stage 2, offload none].gpu.total"),
    58: Answer("dtlab memory --params 7B --zero 3 --offload optimizer", "questions.json",
               "q.mem.7b.z3off.cpu", "runs.memory-7b-z3-offload.rows[0].cpu_per_node.total"),
    59: Answer("dtlab run ddp --nproc 2", "tour.json", "mfu.mfu", "runs[ddp torch].flops.mfu"),
    60: Answer("sudo dtlab bench cluster --out runs/docs/cluster", "cluster.json",
               "q.link.1gbit.busbw", "links[rate 1gbit, 8 MiB, library, 1 rank a node].busbw_GBps"),
    61: Answer("nvidia-smi topo -m", none_why="the one GPU lent (an H200) had no second GPU to "
               "link to, and this machine has none", published="nvidia-h200"),
    62: Answer("nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader",
               "gpu.json", "q.gpu.name", "gpu"),
    63: Answer("dtlab run ddp --nproc 2", "tour.json", "mfu.flops",
               "runs[ddp torch].flops.model_flops_per_step"),
    64: Answer("ds_report", "questions.json", "q.ds_report.compatible", "runs.ds-report.ops"),
    65: Answer('python -c "import torch; print(torch.finfo(torch.float16).eps, '
               'torch.finfo(torch.float32).max)"', none_why="tf32 is a mode of GPU tensor cores; torch has no tf32 tensor type and "
               "this machine's CPU matmuls have no such mode", published="nvidia-a100"),
    66: Answer("dtlab run ddp --nproc 2", "tour.json", "mfu.sweep",
               "runs[ddp torch].flops.matmul_sweep"),
    67: Answer("dtlab profile ddp --nproc 2", "tour.json", "ddp.exposed",
               "runs[ddp torch].extra.profile[0].share_of_step.exposed_communication"),
}


def table(ref_dir: Path) -> str:
    """The committed table: each answer's command, record, where the figure is in it and the
    figure as the record gives it; or the reason none can exist here and the published source."""
    from dtlab.docsgen.sources import SOURCES
    from dtlab.docsgen import lab_figures, ops_figures
    figs = {**lab_figures.figures(ref_dir), **ops_figures.figures(ref_dir)}
    rows = ["| question | command | record | where | figure |", "|---|---|---|---|---|"]
    for n, a in sorted(ANSWERS.items()):
        if a.key:
            fig = figs.get(a.key, "(not in the records)")
            fig = "a marked table" if ":" in a.key else fig.replace("|", "/")
            cells = [f"`{a.record}`", a.where, fig]
            if a.none_why:
                cells[-1] += f" (and none here: {a.none_why})"
        else:
            title = SOURCES.get(a.published, ("(unknown source)", ""))[0]
            cells = ["-", f"none here: {a.none_why}", f"published: {title}"]
        rows.append(f"| {n} | `{a.command}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)
