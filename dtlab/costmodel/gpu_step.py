"""A modern transformer's training step on GPUs, from its shapes: time by part and memory by
part. ``dtlab plan validate --measured-set playbook-h100`` (dtlab/plan/measured.py) fits and
checks it on the measured H100 sweep in docs/reference/measured/ (the record:
docs/reference/plan-measured-h100.json); ``dtlab plan --gpu`` ranks layouts with it
(dtlab/plan/gpu_search.py).

This is the planner's second model. The first (:mod:`dtlab.costmodel.step_time`) is exact about
the labs' fp32 toy on this machine's CPU; this one describes what Megatron-LM, nanotron or
torchtitan run on a GPU cluster:

- blocks Llama-style (RMSNorm, SwiGLU with three matrices, rotary, grouped-query attention with
  its own key/value heads) or GPT-like (LayerNorm, GELU MLP, learned positions); embeddings tied
  or not;
- bf16 compute with fp32 master weights and Adam moments, gradients accumulated in fp32 (or bf16);
- flash attention (no s x s scores kept, causal: half the score FLOPs computed);
- recomputation none / selective (the attention core again) / full (the whole forward again);
- ZeRO 0-3 over the data-parallel group, sequence parallelism beside tensor parallelism,
  gradient accumulation in every layout, the 1F1B and interleaved 1F1B pipelines.

Time is summed per operation, not per step. Each GEMM comes from its shapes after the TP cut and
costs its FLOPs at the GPU's maximum achievable matmul rate (``Gpu.mamf``), rounded up to whole
waves of 128 x 128 output tiles over the GPU's SMs (a thin GEMM fills fewer SMs), or its bytes at
HBM bandwidth when that is longer. Flash attention runs at ``FLASH_SHARE`` of the dense peak.
Norms, activations, residuals, rotary, the loss, gradient accumulation and the optimizer move
their bytes at HBM bandwidth. Collectives cost alpha-beta rings (all-reduce 2(W-1)/W of the
bytes, gather and scatter (W-1)/W) on NVLink inside a node and on the GPU's NIC between nodes.
Tensor-parallel collectives sit on the critical path; the data-parallel reduce overlaps the last
micro-batch's backward except what outlasts it; ZeRO's parameter gather after the step is
exposed; pipeline sends go with each micro-batch.

A micro-batch lasts the longer of two paths: the GPU's (GEMMs, attention, HBM work, TP rings)
and the host's (the framework launching each block's kernels, ``per_layer`` seconds a block,
plus the TP rings' latency, plus ``cross_sync`` a block a TP rank when the pipeline's stages
sit on different nodes). nanotron at one sequence a micro-batch is host-bound on an H100: a
block takes about 4 ms whatever its size, which is why tp 2-8 at mbs 1 all run at about the
same speed in the Ultra-Scale Playbook's sweep. The ``cross_sync`` effect is measured there
(about 2.7 ms a block a TP rank, the same in every leave-one-model-out fold), not derived.

Six named constants (:class:`Constants`) turn these ideal times into a prediction: five for
time, fitted on measured runs (``dtlab plan validate --measured-set``) and stated with the
record, and memory's fixed overhead. For a given choice of which path bounds each run, the time
is linear in the five, so the fit alternates (:func:`fit_time`): decide the paths with the last
constants, solve the least squares with non-negative coefficients, repeat.

Standard library only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

from dtlab.costmodel.fitting import nnls_relative
from dtlab.costmodel.gpus import Gpu

FLASH_SHARE = 0.35      # flash attention (fwd + bwd, causal) reaches about a third of the dense
#                         BF16 peak on an H100: FlashAttention-3 paper (Shah et al., 2024) reports
#                         FlashAttention-2 at 300-370 TFLOP/s forward and less backward
TILE = 128              # output tile edge of a tensor-core GEMM (cuBLAS's large tiles)
ALPHA_NVLINK = 3e-6     # seconds a ring step inside a node (NCCL over NVLink, order of magnitude)
ALPHA_NET = 10e-6       # seconds a ring step between nodes
BUCKET = 25 * 2**20     # bytes of gradients a DP bucket holds (torch DDP's default)
BF16, FP32 = 2, 4


@dataclass(frozen=True)
class Arch:
    """A transformer's shapes. ``kv_heads`` None: as many as ``heads`` (no GQA)."""
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    seq: int
    kv_heads: int | None = None
    style: str = "llama"          # llama | gpt
    tied: bool = False

    @property
    def kv(self) -> int:
        return self.kv_heads or self.heads

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_width(self) -> int:
        return self.kv * self.head_dim

    def layer_params(self) -> int:
        h, f = self.hidden, self.ffn
        attn = 2 * h * h + 2 * h * self.kv_width
        if self.style == "llama":
            return attn + 3 * h * f + 2 * h
        return attn + 4 * h + 2 * h * f + f + h + 4 * h        # biases and two LayerNorms

    def embedding_params(self) -> int:
        return self.vocab * self.hidden + (self.seq * self.hidden if self.style == "gpt" else 0)

    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    def params(self) -> int:
        final_norm = self.hidden * (1 if self.style == "llama" else 2)
        return (self.layers * self.layer_params() + self.embedding_params() + self.head_params()
                + final_norm)

    def untied(self) -> "Arch":
        """The model a pipeline runs: the embedding on the first stage and the head on the last
        cannot share one matrix, so a tied model gets its own head there (nanotron does so)."""
        return replace(self, tied=False)

    def model_flops_per_token(self) -> float:
        """The field's MFU numerator: 6 N + 12 L h s (the attention scores counted whole, as
        PaLM's appendix and the Ultra-Scale Playbook count them)."""
        return 6 * self.params() + 12 * self.layers * self.hidden * self.seq


@dataclass(frozen=True)
class GpuLayout:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    mbs: int = 1                  # sequences a micro-batch
    grad_acc: int = 1             # micro-batches a step, per DP rank
    zero: int = 0
    sp: bool = False              # sequence parallelism beside TP
    recompute: str = "none"       # none | selective | full
    interleave: int = 1           # model chunks a pipeline rank (interleaved 1F1B when > 1)
    grad_fp32: bool = True        # gradients accumulated in fp32

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    def label(self) -> str:
        parts = [f"dp{self.dp}", f"tp{self.tp}", f"pp{self.pp}", f"mbs{self.mbs}",
                 f"ga{self.grad_acc}"]
        if self.interleave > 1:
            parts.append(f"v{self.interleave}")
        if self.zero:
            parts.append(f"zero{self.zero}")
        if self.sp:
            parts.append("sp")
        if self.recompute != "none":
            parts.append(f"rc-{self.recompute}")
        return " ".join(parts)


@dataclass(frozen=True)
class GpuCluster:
    gpu: Gpu
    nodes: int = 1
    per_node: int = 8
    nvlink: float | None = None   # bytes/s one direction a GPU; None: the GPU's
    nic: float | None = None      # bytes/s one direction a GPU between nodes; None: the GPU's

    @property
    def world(self) -> int:
        return self.nodes * self.per_node

    @property
    def intra_bw(self) -> float:
        return self.nvlink or self.gpu.nvlink

    @property
    def inter_bw(self) -> float:
        return self.nic or self.gpu.nic


@dataclass(frozen=True)
class Constants:
    """What turns the ideal times into a prediction (fitted; see the record for the values)."""
    compute: float = 1.0          # x the GEMMs' and flash attention's ideal time
    memory_bound: float = 1.0     # x the HBM time of norms, activations, loss, optimizer
    per_layer: float = 0.0        # host seconds to launch a block's forward + backward, a
    #                               micro-batch (a micro-batch lasts at least its launches)
    comm: float = 1.0             # x every collective's and send's alpha-beta time (TP, DP, PP)
    cross_sync: float = 0.0       # host seconds a block a micro-batch a TP rank when the
    #                               pipeline's stages sit on different nodes (measured effect)
    overhead: float = 0.0         # bytes a GPU holds beyond the model's: context, buffers

    TIME = ("compute", "memory_bound", "per_layer", "comm", "cross_sync")

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in (*self.TIME, "overhead")}


def invalid(a: Arch, lay: GpuLayout, c: GpuCluster, batch: int | None = None) -> str | None:
    """Why this layout cannot run this model on this cluster, or None."""
    if lay.world != c.world:
        return f"uses {lay.world} GPUs, the cluster has {c.world}"
    if a.heads % lay.tp or a.kv % lay.tp:
        return f"{a.heads} heads ({a.kv} key/value) do not split over tp={lay.tp}"
    if a.layers < lay.pp * lay.interleave:
        return f"{a.layers} layers cannot fill pp={lay.pp} x {lay.interleave} chunks"
    if lay.sp and lay.tp == 1:
        return "sequence parallelism needs tp > 1"
    if lay.sp and (a.seq * lay.mbs) % lay.tp:
        return f"{a.seq * lay.mbs} tokens do not split over tp={lay.tp}"
    if lay.zero >= 2 and lay.pp > 1:
        return "ZeRO-2/3 shard gradients a pipeline needs across micro-batches (pp must be 1)"
    if lay.interleave > 1 and (lay.pp == 1 or lay.grad_acc % lay.pp):
        return "interleaved 1F1B needs pp > 1 and micro-batches a multiple of pp"
    if batch is not None and batch != lay.dp * lay.mbs * lay.grad_acc:
        return f"dp x mbs x grad_acc = {lay.dp * lay.mbs * lay.grad_acc}, not the batch {batch}"
    return None


# ------------------------------------------------------------------------------ compute
def gemm_seconds(m: int, n: int, k: int, g: Gpu) -> float:
    """One GEMM (m x k) @ (k x n) in bf16: whole waves of tiles at the achievable rate, or its
    bytes at HBM bandwidth when that takes longer."""
    tiles = math.ceil(m / TILE) * math.ceil(n / TILE)
    waves = math.ceil(tiles / g.sms)
    compute = waves * g.sms * TILE * TILE * 2 * k / g.mamf
    return max(compute, BF16 * (m * k + k * n + m * n) / g.hbm_bytes_per_s)


def _fwd_bwd(m: int, n: int, k: int, g: Gpu) -> tuple[float, float]:
    """(forward, backward) of a linear layer: backward is the input's and the weight's GEMMs."""
    return gemm_seconds(m, n, k, g), gemm_seconds(m, k, n, g) + gemm_seconds(k, n, m, g)


@lru_cache(maxsize=4096)
def layer_ideal(a: Arch, tp: int, mbs: int, sp: bool, recompute: str, g: Gpu) -> dict:
    """One block's ideal seconds and bytes for one micro-batch on one GPU (forward + backward,
    recomputation included): GEMMs and attention, HBM bytes, TP collective bytes."""
    t, h, f = mbs * a.seq, a.hidden, a.ffn
    qkv_n = (h + 2 * a.kv_width) // tp
    if a.style == "llama":
        shapes = [(t, qkv_n, h), (t, h, h // tp), (t, 2 * f // tp, h), (t, h, f // tp)]
    else:
        shapes = [(t, qkv_n, h), (t, h, h // tp), (t, f // tp, h), (t, h, f // tp)]
    fb = [_fwd_bwd(m, n, k, g) for m, n, k in shapes]
    gemm_f, gemm_b = sum(x for x, _ in fb), sum(y for _, y in fb)
    # causal flash attention: QK^T and PV over half the scores; backward 2.5x the forward
    attn_f = 2 * mbs * a.seq * a.seq * h / tp / (g.peak["bf16"] * FLASH_SHARE)
    attn_b = 2.5 * attn_f
    # HBM bytes of the element-wise work, forward (backward about twice)
    tok = t / tp if sp else t
    wide = (2 * f // tp) if a.style == "llama" else f // tp
    elem = tok * h * (2 * 2 + 2 * 3)                           # two norms, two residual adds
    elem += t * (2 * (h + a.kv_width) // tp * 2) if a.style == "llama" else 0   # rotary q, k
    elem += t * (wide + (wide // 2 if a.style == "llama" else wide))           # activation
    mem_f = elem * BF16
    mem_b = 2 * mem_f
    extra_f = {"none": 0.0, "selective": attn_f, "full": gemm_f + attn_f}[recompute]
    extra_mem = mem_f if recompute == "full" else 0.0
    # TP: with SP two all-gathers and two reduce-scatters forward and backward; without, two
    # all-reduces each way: the same ring bytes
    tp_bytes = 8 * t * h * BF16 if tp > 1 else 0
    return {"compute": gemm_f + gemm_b + attn_f + attn_b + extra_f,
            "backward": gemm_b + attn_b, "hbm_bytes": mem_f + mem_b + extra_mem,
            "tp_bytes": tp_bytes, "recompute": extra_f}


def head_ideal(a: Arch, tp: int, mbs: int, g: Gpu) -> dict:
    """The LM head and the loss for one micro-batch (last stage): the vocabulary GEMM, the
    logits read and written in fp32 for the softmax and its gradient."""
    t = mbs * a.seq
    f, b = _fwd_bwd(t, a.vocab // tp, a.hidden, g)
    logits = t * a.vocab / tp
    return {"compute": f + b, "backward": b, "hbm_bytes": logits * (BF16 + 3 * FP32)}


# ------------------------------------------------------------------------------ the groups
# Ranks are numbered TP fastest, then DP, then PP (Megatron's and nanotron's order): a TP group
# is tp neighbours, a DP group has stride tp, a pipeline's neighbours stride tp x dp.
@dataclass(frozen=True)
class Group:
    size: int
    cross: bool        # spans more than one node
    per_node: int      # of its members on one node: the NICs its rings can use at once


def group(size: int, stride: int, c: GpuCluster) -> Group:
    return Group(size, size * stride > c.per_node,
                 max(1, min(size, c.per_node // stride)) if stride <= c.per_node else 1)


def ring_seconds(kind: str, nbytes: float, g: Group, c: GpuCluster) -> float:
    """alpha-beta of a ring collective over group ``g`` on ``nbytes`` (the whole buffer). A group
    that crosses nodes runs one ring per member a node, each through that member's NIC (NCCL's
    channels on a rail-optimised network), up to the NVLink's bandwidth."""
    if g.size <= 1 or nbytes <= 0:
        return 0.0
    if g.cross:
        bw, alpha = min(c.intra_bw, g.per_node * c.inter_bw), ALPHA_NET
    else:
        bw, alpha = c.intra_bw, ALPHA_NVLINK
    steps = 2 * (g.size - 1) if kind == "all_reduce" else (g.size - 1)
    return steps * alpha + steps / g.size * nbytes / bw


# ------------------------------------------------------------------------------ the step
def stage_layers(a: Arch, lay: GpuLayout) -> int:
    """Blocks on the busiest stage: uneven splits give some stages one more."""
    return math.ceil(a.layers / lay.pp)


def stage_params(a: Arch, lay: GpuLayout) -> dict:
    """Parameters one GPU of the first and of the last stage holds."""
    per_stage = stage_layers(a, lay) * a.layer_params() / lay.tp
    emb = a.vocab * a.hidden / lay.tp + (a.seq * a.hidden if a.style == "gpt" else 0)
    head = a.vocab * a.hidden / lay.tp
    if lay.pp == 1:
        one = per_stage + emb + (0 if a.tied else head) + a.hidden
        return {"first": one, "last": one}
    return {"first": per_stage + emb, "last": per_stage + head + a.hidden}


def features(a: Arch, lay: GpuLayout, c: GpuCluster, overlap_s: float | None = None) -> dict:
    """The ideal seconds each constant multiplies (and the bytes), for one step of ``lay``.

    ``overlap_s``: how long the last micro-batch's backward runs while DP buckets reduce (None:
    the ideal backward, scaled by nothing)."""
    g = c.gpu
    m = lay.grad_acc
    layers = stage_layers(a, lay)
    li = layer_ideal(a, lay.tp, lay.mbs, lay.sp, lay.recompute, g)
    hi = head_ideal(a, lay.tp, lay.mbs, g)
    # one micro-batch on the busiest stage: the stages are balanced by compute with the head
    # counted as blocks (nanotron's partition), never below one block or the head itself
    share = max(1.0 / lay.pp, hi["compute"] / (a.layers * li["compute"] + hi["compute"]),
                li["compute"] / (a.layers * li["compute"] + hi["compute"]))
    blocks = share * (a.layers + hi["compute"] / li["compute"])   # in blocks' worth of work
    mb_compute = blocks * li["compute"]
    mb_hbm = (a.layers * li["hbm_bytes"] + hi["hbm_bytes"]) * share
    tpg = group(lay.tp, 1, c)
    mb_tp = layers * ring_seconds("all_gather", li["tp_bytes"] / 8, tpg, c) * 8
    # the rings' latency alone: the host waits for it too (nanotron's TP collectives are
    # launched one after the other, so a micro-batch cannot take less than launches + latency)
    mb_tp_alpha = (layers * 8 * (lay.tp - 1) * (ALPHA_NET if tpg.cross else ALPHA_NVLINK)
                   if lay.tp > 1 else 0.0)
    # 1F1B: M + (P-1)/v micro-batch slots on every stage
    slots = m + (lay.pp - 1) / lay.interleave
    # pipeline sends: activations (scattered over TP ranks with SP) forward, gradients back
    act_bytes = lay.mbs * a.seq * a.hidden * BF16 / (lay.tp if lay.sp else 1)
    send = 0.0
    if lay.pp > 1:
        ppg = group(2, lay.tp * lay.dp, c)
        bw, alpha = ((c.inter_bw, ALPHA_NET) if ppg.cross else (c.intra_bw, ALPHA_NVLINK))
        send = 2 * slots * lay.interleave * (alpha + act_bytes / bw)
    # gradient accumulation and the optimizer, on the busiest stage's parameters
    p = max(stage_params(a, lay).values())
    p_opt = p / lay.dp if lay.zero >= 1 else p
    acc_bytes = m * p * ((BF16 + 2 * FP32) if lay.grad_fp32 else 3 * BF16)
    opt_bytes = p_opt * (2 * FP32 + 4 * FP32 + FP32 + BF16)    # master, m, v r/w; grad; param
    # data parallel: fp32 (or bf16) gradients all-reduced, or reduce-scattered under ZeRO
    dpg = group(lay.dp, lay.tp, c)
    gbytes = p * (FP32 if lay.grad_fp32 else BF16)
    if lay.zero == 0:
        dp_reduce = ring_seconds("all_reduce", gbytes, dpg, c)
        dp_gather = 0.0
    else:
        dp_reduce = ring_seconds("reduce_scatter", gbytes, dpg, c)
        dp_gather = ring_seconds("all_gather", p * BF16, dpg, c)
        if lay.zero == 3:             # parameters gathered forward and backward a micro-batch
            dp_gather = 2 * m * dp_gather
    backward = (overlap_s if overlap_s is not None
                else share * (a.layers * li["backward"] + hi["backward"]))
    tail = ring_seconds("all_reduce", min(gbytes, BUCKET), dpg, c)
    if lay.zero >= 2 and m > 1:
        # (addition for the layout search; the measured sweep has ZeRO 0 and 1 only) ZeRO-2/3
        # keep only their shard of the gradients, so every micro-batch's backward
        # reduce-scatters its gradients (DeepSpeed's stage 2): m reduce-scatters a step, each
        # hiding behind its own micro-batch's backward, what outlasts it exposed
        dp_exposed = (m * max(tail, dp_reduce - backward) if lay.dp > 1 else 0.0) + dp_gather
    else:
        dp_exposed = (max(tail, dp_reduce - backward) if lay.dp > 1 else 0.0) + dp_gather
    return {
        # a micro-batch on the busiest stage: the GPU's work, and the host's launches
        "mb_compute": mb_compute, "mb_memory": mb_hbm / g.hbm_bytes_per_s, "mb_tp": mb_tp,
        "mb_blocks": blocks, "mb_tp_alpha": mb_tp_alpha,
        "mb_cross": (layers * lay.tp if lay.pp > 1 and lay.tp > 1
                     and group(lay.pp, lay.tp * lay.dp, c).cross else 0.0), "slots": slots,
        # once a step
        "step_memory": (acc_bytes + opt_bytes) / g.hbm_bytes_per_s,
        "net_comm": dp_exposed + send,
        # for the breakdown
        "bubble_share": (lay.pp - 1) / lay.interleave / slots,
        "recompute": slots * layers * li["recompute"],
        "dp": dp_exposed, "pp": send,
        "backward_mb": share * (a.layers * li["backward"] + hi["backward"]),
    }


def host_bound(x: dict, k: Constants) -> bool:
    """Whether the host's kernel launches outlast the GPU's work on a micro-batch."""
    gpu = k.compute * x["mb_compute"] + k.memory_bound * x["mb_memory"] + k.comm * x["mb_tp"]
    return host_seconds(x, k) > gpu


def host_seconds(x: dict, k: Constants) -> float:
    return (k.per_layer * x["mb_blocks"] + k.comm * x["mb_tp_alpha"]
            + k.cross_sync * x["mb_cross"])


def linear_row(x: dict, k: Constants) -> list[float]:
    """The step time as a row of coefficients of the five time constants: a micro-batch costs
    the GPU's work or the host's launches, whichever is longer (decided with ``k``)."""
    n = x["slots"]
    if host_bound(x, k):
        return [0.0, x["step_memory"], n * x["mb_blocks"], n * x["mb_tp_alpha"] + x["net_comm"],
                n * x["mb_cross"]]
    return [n * x["mb_compute"], n * x["mb_memory"] + x["step_memory"], 0.0,
            n * x["mb_tp"] + x["net_comm"], 0.0]


def step_seconds(a: Arch, lay: GpuLayout, c: GpuCluster, k: Constants) -> dict:
    """Predicted seconds of one step by part: compute, memory-bound, per-layer (the host's
    launches, when they outlast the GPU's work), TP, DP, PP and the bubble (the idle share of
    the stage's work)."""
    x = features(a, lay, c)
    # the DP reduce hides behind the last micro-batch's backward as fast as the fit says it runs
    x = features(a, lay, c, overlap_s=x["backward_mb"] * k.compute)
    n = x["slots"]
    host = host_bound(x, k)
    parts = {"compute": 0.0 if host else k.compute * n * x["mb_compute"],
             "memory_bound": k.memory_bound * ((0.0 if host else n * x["mb_memory"])
                                               + x["step_memory"]),
             "per_layer": k.per_layer * n * x["mb_blocks"] if host else 0.0,
             "tp_comm": k.comm * n * (x["mb_tp_alpha"] if host else x["mb_tp"]),
             "net_comm": k.comm * x["net_comm"],
             "cross_sync": k.cross_sync * n * x["mb_cross"] if host else 0.0}
    stage = parts["compute"] + parts["per_layer"] + parts["tp_comm"] + parts["cross_sync"] + (
        parts["memory_bound"] - k.memory_bound * x["step_memory"])
    bubble = x["bubble_share"] * stage          # the idle slots' share of the stage's time
    total = sum(parts.values())
    net = parts["net_comm"]
    dp_share = x["dp"] / (x["dp"] + x["pp"]) if x["dp"] + x["pp"] else 0.0
    return {"total": total, "compute": parts["compute"], "memory_bound": parts["memory_bound"],
            "per_layer": parts["per_layer"], "tp": parts["tp_comm"], "dp": net * dp_share,
            "pp": net * (1 - dp_share), "cross_sync": parts["cross_sync"], "bubble": bubble,
            "host_bound": host,
            "recompute": 0.0 if host else k.compute * x["recompute"],
            # (additions for the layout search) the idle share of the stage's time that
            # "bubble" is, and the once-a-step HBM work (accumulation, optimizer) inside
            # "memory_bound": the search splits the step into parts that sum to "total"
            "bubble_share": x["bubble_share"],
            "step_memory": k.memory_bound * x["step_memory"]}


# Tensors autograd keeps a block, in bf16 elements a token (no recomputation, flash attention):
# h wide: the two norms' inputs and outputs, q k v before and after rotary, the attention's
# output and the projections' gathered inputs (12; with SP all split tp ways, the norms' by
# the sequence and the attention's by the heads; without SP kept whole, an overestimate for
# q k v); ffn wide: gate and up (merged), SiLU of the gate, the product (6 with the cast
# copies). The counts are estimates: whole tensors, chosen against the measured sweep's peaks
# (docs/reference/plan-measured-h100.json), not read from nanotron's autograd graph.
ACT_H, ACT_F = 12, 6
LOGIT_BYTES = BF16 + FP32      # the logits in bf16 and their fp32 copy for the softmax
HEAD_BUFFERS = 8               # h-wide bf16 tensors a token the last stage holds beside them


def memory_bytes(a: Arch, lay: GpuLayout, c: GpuCluster, k: Constants) -> dict:
    """Peak bytes on the busiest GPU by part (the first stage holds the most activations, the
    last the logits; the larger of the two).

    Model states: bf16 weights, fp32 gradients (accumulated in fp32; bf16 with ``grad_fp32``
    False), the fp32 master copy and Adam's two moments (12 bytes a parameter). ZeRO-1 shards
    only the last 12 bytes over DP (nanotron's ZeRO-1 shards the optimizer's fp32 states, not the
    accumulated gradients), ZeRO-2 the gradients too, ZeRO-3 the weights. Activations: the
    tensors of :data:`ACT_H` and :data:`ACT_F` a layer, times the micro-batches 1F1B keeps in
    flight on the first stage (min(grad_acc, pp)). The last stage holds the logits. ``k.overhead``:
    the framework's fixed bytes (CUDA context, NCCL buffers, the allocator's slack)."""
    ps = stage_params(a, lay)
    t = lay.mbs * a.seq
    h, f = a.hidden, a.ffn
    sp_div = lay.tp if lay.sp else 1
    if lay.recompute == "full":
        per_layer = t * h * BF16 / sp_div                       # the block's input only
    else:
        wide = f if a.style == "llama" else f / 2
        per_layer = t * BF16 * (ACT_H * h / sp_div + ACT_F * wide / lay.tp)
    layers = stage_layers(a, lay)
    if lay.pp == 1:
        in_flight = 1.0
    else:
        in_flight = min(lay.grad_acc, lay.pp) * (1 + (lay.pp - 1) / (lay.pp * lay.interleave)
                                                 if lay.interleave > 1 else 1)
    logits = t * a.vocab / lay.tp * LOGIT_BYTES + HEAD_BUFFERS * t * h * BF16
    out = {}
    for stage, p in ps.items():
        zero_div = lay.dp if lay.zero else 1
        states = {
            "weights": p * BF16 / (lay.dp if lay.zero >= 3 else 1),
            "gradients": p * (FP32 if lay.grad_fp32 else BF16) / (lay.dp if lay.zero >= 2 else 1),
            "optimizer": p * 3 * FP32 / zero_div,               # fp32 master, Adam's m and v
        }
        act = per_layer * layers * (in_flight if stage == "first" else 1.0)
        part = {**states, "activations": act,
                "logits": logits if stage == "last" else 0.0, "overhead": k.overhead}
        part["total"] = sum(part.values())
        out[stage] = part
    return max(out.values(), key=lambda d: d["total"])


def hardware_flops_per_token(a: Arch, recompute: str = "none") -> float:
    """(Addition for the layout search) the FLOPs a GPU computes a token, recomputation
    included: the model's 6 N + 12 L h s, plus the forward again of what is recomputed (full:
    the blocks' 2 N_blocks + 4 L h s; selective: the attention core's 4 L h s)."""
    extra = {"none": 0.0, "selective": 4 * a.layers * a.hidden * a.seq,
             "full": 2 * a.layers * a.layer_params() + 4 * a.layers * a.hidden * a.seq}
    return a.model_flops_per_token() + extra[recompute]


def mfu(a: Arch, tokens_per_s_per_gpu: float, g: Gpu, pp: int = 1) -> float:
    """Model FLOPs utilisation: (6 N + 12 L h s) a token x tokens/s a GPU / the BF16 peak, with
    N the parameters the run holds (a pipeline unties the embeddings: :meth:`Arch.untied`)."""
    run = a.untied() if pp > 1 else a
    return run.model_flops_per_token() * tokens_per_s_per_gpu / g.peak["bf16"]


# ------------------------------------------------------------------------------ the fit
def fit_time(runs: list[tuple[Arch, GpuLayout, GpuCluster, float]],
             start: Constants = Constants(), rounds: int = 12) -> Constants:
    """The five time constants fitted on (arch, layout, cluster, measured seconds) runs. Which
    runs are host-bound, and how much of DP's reduce the backward hides, depend on the
    constants, so the fit alternates: decide both with the last round's constants, solve the
    linear least squares, again until nothing changes."""
    k = start
    for _ in range(rounds):
        rows = []
        for a, lay, c, _y in runs:
            x0 = features(a, lay, c)
            x = features(a, lay, c, overlap_s=x0["backward_mb"] * k.compute)
            rows.append(linear_row(x, k))
        coef = nnls_relative(rows, [y for *_, y in runs])
        new = replace(k, **dict(zip(Constants.TIME, coef)))
        if new == k:
            break
        k = new
    return k


def fit_overhead(runs: list[tuple[Arch, GpuLayout, GpuCluster, float]], k: Constants) -> Constants:
    """Memory's fixed overhead c minimising sum(((model_i + c) / measured_i - 1)^2)."""
    base = replace(k, overhead=0.0)
    num = den = 0.0
    for a, lay, c, y in runs:
        m = memory_bytes(a, lay, c, base)["total"]
        num += (1 - m / y) / y
        den += 1 / (y * y)
    return replace(k, overhead=max(0.0, num / den))
