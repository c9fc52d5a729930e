"""Which labs exist, what they need and how many processes they run on.

Kept free of heavy imports so ``dtlab list`` answers instantly and never imports an optional
dependency: presence is checked with ``importlib.util.find_spec``.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Lab:
    name: str
    summary: str
    min_world: int = 1
    max_world: int | None = None          # None: any size
    tour_nproc: int = 2                   # what `dtlab tour` runs it with
    requires: tuple[str, ...] = ()        # importable modules it needs
    extra: str | None = None              # the pip extra that brings them
    gpu_only: str | None = None           # why it cannot run without CUDA, if it cannot
    tolerance: str = "fp32: loss 1e-5 rel, params 1e-4 abs"
    data_parallel: bool = True            # the global batch is split over all ranks
    tour_args: tuple[str, ...] = field(default=())
    tour_more: tuple[tuple[str, ...], ...] = field(default=())  # further variants in the tour
    tour_gpu: tuple[tuple[tuple[str, ...], str], ...] = field(default=())  # (args, why CUDA)
    no_checkpoint: str | None = None      # why --ckpt-dir cannot work with it, if it cannot
    library: tuple[tuple[str, str], ...] = ()  # --impl NAME -> "labs.library.MODULE:CLASS"
    moe: bool = False                     # runs the mixture-of-experts model (--moe-experts)

    @property
    def module(self) -> str:
        return f"labs.{self.name}"

    def library_strategy(self, impl: str):
        """The Strategy class of a library variant (``--impl``), imported only when asked for:
        the lab file names no library, so it reads as our algorithm alone."""
        spec = dict(self.library).get(impl)
        if spec is None:
            raise KeyError(f"lab {self.name!r} has no library variant {impl!r}")
        module, cls = spec.split(":")
        return getattr(importlib.import_module(module), cls)

    def world_text(self) -> str:
        if self.max_world == self.min_world:
            return str(self.min_world)
        return f"{self.min_world}..{self.max_world}" if self.max_world else f">={self.min_world}"

    def missing(self) -> list[str]:
        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    def status(self) -> str:
        """Whether it can run here, for ``dtlab list``."""
        if (missing := self.missing()):
            return f"needs {', '.join(missing)} (extra '{self.extra}')"
        return f"GPU only: {self.gpu_only}" if self.gpu_only else "ready"

    def check_world(self, n: int) -> str | None:
        """An error message when ``n`` processes do not suit this lab, else None."""
        if n < self.min_world or (self.max_world is not None and n > self.max_world):
            return f"lab {self.name!r} runs on {self.world_text()} process(es), not {n}"
        return None


LABS: dict[str, Lab] = {lab.name: lab for lab in [
    Lab("baseline", "one process, whole global batch: the reference every lab must equal",
        min_world=1, max_world=1, tour_nproc=1, moe=True),
    Lab("dataparallel", "nn.DataParallel and the same written out: scatter, replicate, "
        "parallel_apply, gather, reduce; device 0's extra memory measured",
        min_world=1, max_world=1, tour_nproc=1, data_parallel=False,
        tour_gpu=((("--impl", "torch"), "nn.DataParallel itself needs CUDA devices"),),
        no_checkpoint="a single process driving several GPUs; nothing to restart",
        library=(("torch", "labs.library.dataparallel_torch:TorchDataParallel"),)),
    Lab("torch_multiprocessing", "mp.spawn workers averaging gradients in shared memory; "
        "Hogwild reported as not equivalent", min_world=1, max_world=1, tour_nproc=1,
        data_parallel=False,
        no_checkpoint="its workers are started by torch.multiprocessing, not torchrun, so "
                      "nothing restarts them"),
    Lab("ring_allreduce", "ring all-reduce from isend/irecv (plus naive and tree), checked "
        "against the library, then used to train", tour_nproc=3, tour_args=("--batch-size", "12"),
        tour_more=(("--batch-size", "12", "--algo", "tree"),)),
    Lab("ddp", "DistributedDataParallel: replicas, bucketed gradient all-reduce, counted bytes",
        tour_more=(("--impl", "own"),),
        tour_gpu=((("--backend", "nccl"), "NCCL runs on CUDA devices only"),),
        library=(("torch", "labs.library.ddp_torch:TorchDDP"),)),
    Lab("amp", "autocast fp16/bf16, our dynamic loss scaler beside torch's GradScaler and "
        "DeepSpeed's, fp32 master weights", tolerance="fp16 1e-2, bf16 3e-2 (see docs/amp.md)",
        tour_args=("--inject-overflow-at", "3"), tour_more=(("--dtype", "bf16"),),
        tour_gpu=((("--dtype", "fp16", "--scaler", "torch"),
                   "fp16 autocast with tensor cores is the case AMP exists for; on CUDA only"),),
        no_checkpoint="its fp32 master weights and loss-scaler state are not checkpointed yet",
        library=(("deepspeed", "labs.library.amp_deepspeed:DeepSpeedFP16"),)),
    Lab("zero", "ZeRO stages 0-3 written out: optimizer state, gradients, parameters "
        "partitioned; CPU offload; memory counted beside the formulas", min_world=2,
        tour_args=("--stage", "3"),
        tour_more=(("--stage", "0"), ("--stage", "1"), ("--stage", "2"),
                   ("--stage", "3", "--offload", "param")),
        library=tuple((impl, "labs.library.zero_libraries:LibraryZeRO")
                      for impl in ("fairscale-oss", "fairscale-sdp", "fsdp2"))),
    Lab("deepspeed_zero", "DeepSpeed's engine with ZeRO 0-3 and CPU offload from JSON configs; "
        "stage-3 parameters gathered and a checkpoint merged to fp32", requires=("deepspeed",),
        extra="deepspeed", tour_args=("--config", "ds_zero3"),
        no_checkpoint="DeepSpeed checkpoints through engine.save_checkpoint (docs/deepspeed.md)"),
    Lab("accelerate_lab", "Hugging Face accelerate: Accelerator.prepare, backward, gradient "
        "accumulation, the DeepSpeed plugin; the CPU launch that really starts N processes",
        requires=("accelerate",), extra="accelerate", tour_args=("--accum", "2"),
        tour_gpu=((("--zero-stage", "2"), "accelerate 1.15 uses its DeepSpeed plugin on "
                   "accelerators only"),),
        no_checkpoint="accelerate checkpoints through Accelerator.save_state"),
    Lab("tensor_parallel", "Megatron column/row-parallel layers, heads split, vocab-parallel "
        "loss (own) and DTensor's plan (torch); --sp: sequence parallelism", data_parallel=False,
        tour_more=(("--impl", "torch"), ("--sp", "--recompute", "full")),
        library=(("torch", "labs.library.dtensor_tensor_parallel:TorchTensorParallel"),)),
    Lab("pipeline", "stages over ranks; GPipe, 1F1B, interleaved 1F1B and ZB-H1 as action lists; "
        "measured bubble and live micro-batches against each formula; schedule picture",
        data_parallel=False,
        tour_more=(("--schedule", "gpipe"), ("--impl", "torch"), ("--schedule", "zbh1"),
                   ("--schedule", "interleaved", "--preset", "small")),
        library=(("torch", "labs.library.torch_pipeline:TorchPipeline"),)),
    Lab("parallel3d", "data x pipeline x tensor parallel on one grid of ranks (TP inside, PP "
        "across, DP outermost); --cp: context parallel, a 4D grid", min_world=1, tour_nproc=4, data_parallel=False,
        tour_args=("--dp", "1", "--pp", "2", "--tp", "2", "--preset", "small")),
    Lab("context_parallel", "the sequence cut over ranks, ring attention (online softmax, K/V "
        "passed around), zig-zag vs contiguous causal layout", min_world=2, data_parallel=False,
        tour_more=(("--layout", "contiguous"),)),
    Lab("expert_parallel", "a mixture-of-experts model with its experts spread over ranks, "
        "tokens dispatched and returned by all-to-all; ep x dp; capacity factor", min_world=2,
        moe=True, tour_args=("--moe-experts", "4", "--moe-top-k", "2"),
        tour_more=(("--moe-experts", "4", "--moe-top-k", "2", "--capacity-factor", "1.0"),),
        no_checkpoint="its expert shards are not written to the canonical checkpoint yet"),
]}


def get(name: str) -> Lab:
    if name not in LABS:
        raise KeyError(f"unknown lab {name!r}; `dtlab list` shows the labs: {', '.join(LABS)}")
    return LABS[name]
