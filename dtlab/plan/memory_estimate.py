"""``dtlab memory``: how much GPU and CPU memory training (or inference) of a model needs, per ZeRO
stage, offload choice and precision, before anything is launched.

Answers QUESTIONS.md 52 and 55-58. Memory is counted in bytes per parameter, component by
component, and each component is either replicated on every GPU or partitioned over all N GPUs
(nodes x GPUs per node), depending on the ZeRO stage:

precision ``fp32`` (what the labs run; labs/zero.py measures exactly these):
    weights 4, gradients 4, Adam moments 8                                         = 16 B/param
precision ``mixed`` (fp16 or bf16 training with fp32 master weights; DeepSpeed's layout):
    16-bit weights 2, 16-bit gradients 2, fp32 gradient partition 4,
    fp32 master weights 4, Adam moments 8                                          = 20 B/param
(The ZeRO paper's 2 + 2 + 12 = 16 B/param leaves out the fp32 copy of the gradients that
DeepSpeed's optimizer steps from; DeepSpeed's own estimators count it.)

Partitioned from stage 1: the optimizer side (moments, master weights, fp32 gradients); from
stage 2: the 16-bit gradients; from stage 3: the weights. Stage 3 also holds the gathered weights
and gradients of the largest layer while it is in use (4 B per parameter of that layer in mixed
precision, 8 B in fp32). In mixed precision at stage 3 the reduced gradients go straight into the
fp32 partition, so no 16-bit gradient partition stays.

Offload ``optimizer`` moves the optimizer side to the CPU (at stage 2 and 3 the reduced gradient
partitions go with it); ``param`` (stage 3) moves the weight partitions too. CPU memory per node is
the larger of two moments: loading (each process builds the full fp32 model before it is
partitioned: 4 B/param x GPUs per node; with DeepSpeed's ``zero.Init`` at stage 3, one layer at a
time) and training (the offloaded partitions of that node's GPUs).

Activations per GPU for a micro-batch of b sequences of s tokens, hidden size h, FFN width f, a
heads and L layers, counted for this project's block (pre-LN, no dropout, fused attention that
keeps only a log-sum-exp per row, no s x s score matrix), in elements:
    per layer  8 s b h + 2 s b f    (the two LN inputs and outputs, q, k, v, the attention output,
                                     which is also the projection's input, GELU in and out)
               + (a + 4) s b fp32   (attention log-sum-exp per head and row, LN mean and rstd)
    head       2 s b h + (2 + V) s b fp32 (final LN in and out, its statistics, the log-softmax of
                                     the logits) + the int64 token and position indices
times 4 bytes in fp32 and 2 in mixed precision. Activation checkpointing per layer keeps only
each layer's input (s b h) plus one layer's full set while it is recomputed. With f = 4h and
16-bit activations the per-layer term is 32 s b h bytes; Korthikanti et al. (2022) count
34 s b h for a GPT layer, plus 5 a s^2 b for attention scores that a fused kernel never keeps,
because their layer also keeps dropout masks.

Validation (tests/test_memory.py, docs/memory.md): model states against DeepSpeed's
``estimate_zero2_model_states_mem_needs`` and ``estimate_zero3_model_states_mem_needs`` (same
figures where their assumptions match; each difference explained), and against the bytes
labs/zero.py counts from live tensors, and activations against the bytes autograd saves in a real
forward pass.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass, field

from dtlab.errors import UsageError
from dtlab.costmodel.activations import activation_formula
from dtlab.costmodel.zero_memory import BYTES_PER_PARAM, zero_state_bytes
from dtlab.report import tables as report

GB = 10**9
GIB = 2**30



class EstimateError(UsageError):
    """Bad input to the estimator (one line, exit status 2)."""


def parse_count(text: str) -> int:
    """``7e9``, ``7B``, ``65b``, ``124M``, ``1.5T``, ``350k``, ``27136`` -> an integer."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", str(text))
    if not m:
        raise EstimateError(f"--params {text!r}: give a number such as 7e9, 7B, 350M or 27136")
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
    value = float(m.group(1)) * scale[m.group(2).lower()]
    if value < 1:
        raise EstimateError(f"--params {text!r}: must be at least 1 parameter")
    return int(round(value))


@dataclass
class Arch:
    """What activations and the largest layer depend on; any field may be unknown (None)."""
    n_layer: int | None = None
    d_model: int | None = None
    n_head: int | None = None
    d_ff: int | None = None
    vocab_size: int | None = None
    seq_len: int | None = None

    def block_params(self) -> int | None:
        h, f = self.d_model, self.d_ff or (4 * self.d_model if self.d_model else None)
        if h is None:
            return None
        # q, k, v (no bias) + proj (bias) + fc, proj (biases) + 2 LayerNorms
        return 3 * h * h + h * h + h + h * f + f + f * h + h + 4 * h

    def largest_layer(self) -> int | None:
        sizes = [self.block_params()]
        if self.vocab_size and self.d_model:
            sizes.append(self.vocab_size * self.d_model)  # the embedding or the LM head
        sizes = [s for s in sizes if s]
        return max(sizes) if sizes else None


@dataclass
class Setup:
    params: int
    nodes: int = 1
    gpus_per_node: int = 1
    precision: str = "mixed"
    batch: int = 1              # micro-batch per GPU, in sequences
    seq_len: int | None = None
    arch: Arch = field(default_factory=Arch)
    largest_layer: int | None = None
    zero_init: bool = True      # stage 3 builds weights partitioned (deepspeed.zero.Init)

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


def model_states(s: Setup, stage: int, offload: str) -> dict:
    """Bytes of weights, gradients and optimizer state per GPU (ZeRO's formula,
    ``dtlab.measure.memory_meter.zero_state_bytes``) plus the stage-3 layer buffer, and per node's CPU."""
    states = zero_state_bytes(s.params, s.gpus, stage, offload, s.precision)
    gpu = {k: states["device"][k] for k in ("params", "grads", "optimizer")}
    largest = s.largest_layer or s.arch.largest_layer()
    gpu["layer_buffer"] = 0.0
    if stage == 3:
        # the gathered weights and gradients of the layer in use
        w = BYTES_PER_PARAM[s.precision]["params"]
        gpu["layer_buffer"] = 2 * w * largest if largest else None
    load_per_process = 4 * s.params if not (stage == 3 and s.zero_init) else 4 * (largest or 0)
    cpu = {"offloaded": states["cpu"]["total"] * s.gpus_per_node,
           "loading": load_per_process * s.gpus_per_node}
    cpu["total"] = max(cpu["offloaded"], cpu["loading"])
    gpu["total"] = sum(v for v in gpu.values() if v is not None)
    return {"gpu": gpu, "cpu_per_node": cpu}


def activation_detail(s: Setup, recompute: str = "none", every: int = 2, tp: int = 1,
                      sp: bool = False, cp: int = 1) -> dict | None:
    """Bytes autograd keeps for backward per GPU, term by term (``activation_formula`` in
    dtlab/costmodel/activations.py, the formula the labs' measurements are checked against); None when
    the architecture is not known."""
    a = s.arch
    if None in (a.n_layer, a.d_model, a.n_head):
        return None
    seq = s.seq_len or a.seq_len
    if seq is None:
        return None
    return activation_formula(a.n_layer, a.d_model, a.n_head, a.d_ff or 4 * a.d_model,
                              a.vocab_size or 0, s.batch, seq,
                              4 if s.precision == "fp32" else 2, recompute, every, tp, sp, cp)


def activation_bytes(s: Setup, checkpointing: bool) -> float | None:
    """Activation memory per GPU without and with full recomputation (with it: the kept block
    inputs plus one block's whole set while it is recomputed)."""
    d = activation_detail(s, "full" if checkpointing else "none")
    return None if d is None else d["forward"] + d["recompute_peak"]


def estimate(s: Setup, stages=(0, 1, 2, 3), offloads=("none", "optimizer", "param")) -> dict:
    rows = []
    for stage in stages:
        for off in offloads:
            if (off != "none" and stage == 0) or (off == "param" and stage != 3):
                continue  # offload needs ZeRO; parameter offload needs stage 3
            ms = model_states(s, stage, off)
            acts = {ck: activation_bytes(s, ck) for ck in (False, True)}
            rows.append({"stage": stage, "offload": off, **ms,
                         "activations": {"no_checkpointing": acts[False],
                                         "checkpointing": acts[True]}})
    return {"setup": {**asdict(s), "gpus": s.gpus}, "rows": rows,
            "inference_gpu_bytes": inference_bytes(s)}


def inference_bytes(s: Setup) -> float:
    """Weights only, 16-bit (2 B/param) or fp32 (4), on one GPU; the KV cache comes on top."""
    return (4 if s.precision == "fp32" else 2) * s.params


def deepspeed_reference(s: Setup, stage: int, offload: str, buffer_factor: float = 1.5):
    """DeepSpeed's own estimate (cpu_bytes, gpu_bytes) for the same setup, or None where it has
    no estimator (stages 0 and 1)."""
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import (  # deepspeed: an optional extra
            estimate_zero2_model_states_mem_needs)
        return estimate_zero2_model_states_mem_needs(
            s.params, s.gpus_per_node, s.nodes, cpu_offload=offload != "none",
            additional_buffer_factor=buffer_factor)
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import (  # deepspeed: an optional extra
            estimate_zero3_model_states_mem_needs)
        largest = s.largest_layer or s.arch.largest_layer() or 0
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            s.params, largest, s.gpus_per_node, s.nodes, cpu_offload=offload != "none",
            cpu_offload_params=offload == "param", zero_init=s.zero_init,
            additional_buffer_factor=buffer_factor)
        return cpu, gpu
    return None


# --------------------------------------------------------------------------- command line

def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    m = p.add_argument_group("the model (one of --params, --preset, --model-config)")
    m.add_argument("--params", help="parameter count: 7e9, 7B, 350M, ...")
    m.add_argument("--preset", help="a dtlab model preset (tiny, small, gpt2-124m)")
    m.add_argument("--model-config", help="JSON with n_layer, d_model, n_head, d_ff, vocab_size, "
                   "seq_len (the fields of dtlab.train.model.ModelConfig)")
    m.add_argument("--layers", type=int, help="number of transformer layers")
    m.add_argument("--hidden", type=int, help="hidden size d_model")
    m.add_argument("--heads", type=int, help="attention heads")
    m.add_argument("--ffn", type=int, help="MLP width (default 4 x hidden)")
    m.add_argument("--vocab", type=int, help="vocabulary size")
    m.add_argument("--largest-layer", help="parameters of the largest layer (stage 3 buffer; "
                   "default from the architecture)")
    h = p.add_argument_group("hardware and training")
    h.add_argument("--nodes", type=int, default=1)
    h.add_argument("--gpus-per-node", type=int, default=1)
    h.add_argument("--zero", default="all", help="0, 1, 2, 3 or all (default all)")
    h.add_argument("--offload", default="all", help="none, optimizer, param or all (default all)")
    h.add_argument("--precision", default="mixed", choices=sorted(BYTES_PER_PARAM),
                   help="mixed: fp16/bf16 with fp32 master weights (default); fp32")
    h.add_argument("--batch", type=int, default=1, help="micro-batch per GPU in sequences")
    h.add_argument("--seq", type=int, help="sequence length (default: the model's)")
    h.add_argument("--recompute", default="none", choices=["none", "full", "selective"],
                   help="activation recomputation for the detailed activation figure")
    h.add_argument("--recompute-every", type=int, default=2,
                   help="selective: recompute blocks 0, k, 2k, ... (default 2)")
    h.add_argument("--tp", type=int, default=1, help="tensor parallel size (activations)")
    h.add_argument("--sp", action="store_true", help="sequence parallelism with --tp")
    h.add_argument("--cp", type=int, default=1, help="context parallel size (activations)")
    h.add_argument("--no-zero-init", action="store_true",
                   help="stage 3: every process builds the full model on the CPU first")
    h.add_argument("--gpu-mem", type=float, help="GPU memory in GB (10^9 B): say what fits")
    h.add_argument("--cpu-mem", type=float, help="CPU memory per node in GB: say what fits")
    h.add_argument("--compare-deepspeed", action="store_true",
                   help="add DeepSpeed's own estimates (stage 2, 3) beside ours")
    h.add_argument("--json", action="store_true", help="print every figure as JSON")
    return p


def setup_from_args(a: argparse.Namespace) -> Setup:
    arch = Arch()
    given = [x for x in ("params", "preset", "model_config") if getattr(a, x)]
    if not given:
        raise EstimateError("give the model: --params 7e9, --preset small or --model-config F")
    if a.preset and a.model_config:
        raise EstimateError("give either --preset or --model-config, not both")
    params = None
    if a.preset or a.model_config:
        from dtlab.train.model import ModelConfig, ToyGPT, preset  # torch: only for a model
        if a.preset:
            try:
                cfg = preset(a.preset)
            except KeyError as e:
                raise EstimateError(f"--preset: {e.args[0]}") from None
        else:
            try:
                with open(a.model_config) as f:
                    cfg = json.load(f)
            except OSError as e:
                raise EstimateError(f"--model-config {a.model_config}: {e.strerror}") from None
            except json.JSONDecodeError as e:
                raise EstimateError(f"--model-config {a.model_config}: not valid JSON at line "
                                    f"{e.lineno} ({e.msg})") from None
        fields = {k: v for k, v in cfg.items() if k in ModelConfig.__dataclass_fields__}
        try:
            mc = ModelConfig(**fields)
        except (TypeError, ValueError) as e:
            raise EstimateError(f"model config: {e}; fields are "
                                f"{', '.join(ModelConfig.__dataclass_fields__)}") from None
        arch = Arch(mc.n_layer, mc.d_model, mc.n_head, mc.d_ff, mc.vocab_size, mc.seq_len)
        params = ToyGPT.count_params(mc)
    for flag, name in (("layers", "n_layer"), ("hidden", "d_model"), ("heads", "n_head"),
                       ("ffn", "d_ff"), ("vocab", "vocab_size"), ("seq", "seq_len")):
        v = getattr(a, flag)
        if v is not None:
            if v < 1:
                raise EstimateError(f"--{flag} must be >= 1, got {v}")
            setattr(arch, name, v)
    if a.params:
        params = parse_count(a.params)
    for flag in ("nodes", "gpus_per_node", "batch"):
        if getattr(a, flag) < 1:
            raise EstimateError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    return Setup(params=params, nodes=a.nodes, gpus_per_node=a.gpus_per_node,
                 precision=a.precision, batch=a.batch, seq_len=arch.seq_len, arch=arch,
                 largest_layer=parse_count(a.largest_layer) if a.largest_layer else None,
                 zero_init=not a.no_zero_init)


def _choices(text: str, allowed: list, flag: str, cast=str) -> tuple:
    if text == "all":
        return tuple(allowed)
    try:
        got = tuple(cast(t) for t in text.split(","))
    except ValueError:
        got = (None,)
    bad = [g for g in got if g not in allowed]
    if bad:
        raise EstimateError(f"--{flag} {text!r}: choose from {', '.join(map(str, allowed))} "
                            "or all")
    return got


def _gb(x) -> str:
    return "-" if x is None else f"{x / GB:,.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dtlab memory", description=__doc__.splitlines()[0])
    return run(add_arguments(p).parse_args(argv))


def run(a: argparse.Namespace) -> int:
    try:
        s = setup_from_args(a)
        stages = _choices(a.zero, [0, 1, 2, 3], "zero", int)
        offloads = _choices(a.offload, ["none", "optimizer", "param"], "offload")
        result = estimate(s, stages, offloads)
        for flag in ("tp", "cp", "recompute_every"):
            if getattr(a, flag) < 1:
                raise EstimateError(f"--{flag.replace('_', '-')} must be >= 1, got "
                                    f"{getattr(a, flag)}")
        if a.sp and a.tp == 1:
            raise EstimateError("--sp cuts the sequence over the tensor parallel ranks: give "
                                "--tp 2 or more")
        seq, heads = s.seq_len or s.arch.seq_len, s.arch.n_head
        if seq and seq % (a.cp * (a.tp if a.sp else 1)):
            raise EstimateError(f"--seq {seq} does not split into --cp {a.cp}"
                                + (f" x --tp {a.tp} (sequence parallel)" if a.sp else "")
                                + " equal pieces; give a sequence length that does")
        if heads and heads % a.tp:
            raise EstimateError(f"--tp {a.tp} must divide the {heads} attention heads")
        result["activation_detail"] = activation_detail(s, a.recompute, a.recompute_every,
                                                        a.tp, a.sp, a.cp)
        if result["activation_detail"] is not None:
            result["activation_detail"]["setting"] = {
                "recompute": a.recompute, "recompute_every": a.recompute_every, "tp": a.tp,
                "sp": a.sp, "cp": a.cp}
    except EstimateError as e:
        print(f"dtlab: error: {e}", file=sys.stderr)
        return 2
    for r in result["rows"]:
        if a.compare_deepspeed:
            ref = deepspeed_reference(s, r["stage"], r["offload"])
            r["deepspeed"] = None if ref is None else {"cpu_per_node": ref[0], "gpu": ref[1]}
        if a.gpu_mem:
            need = r["gpu"]["total"] + (r["activations"]["checkpointing"] or 0)
            r["fits_gpu"] = need <= a.gpu_mem * GB
        if a.cpu_mem:
            r["fits_cpu"] = r["cpu_per_node"]["total"] <= a.cpu_mem * GB
    if a.json:
        print(json.dumps(result, indent=2))
        return 0
    print_report(result, a)
    return 0


def print_report(result: dict, a) -> None:
    from rich.table import Table  # rich: start-up (the CLI parser imports this)

    s = result["setup"]
    arch = s["arch"]
    title = (f"{s['params']:,} parameters ({s['params'] / 1e9:.3g} B), {s['precision']}, "
             f"{s['nodes']} node(s) x {s['gpus_per_node']} GPU(s), micro-batch {s['batch']}"
             + (f" x {s['seq_len']} tokens" if s["seq_len"] else ""))
    t = Table(title=title + "  [GB = 10^9 bytes]")
    cols = ["ZeRO", "offload", "GPU weights", "GPU grads", "GPU optim", "GPU layer buf",
            "GPU states", "acts", "acts (ckpt)", "CPU/node"]
    if a.compare_deepspeed:
        cols += ["DS GPU", "DS CPU/node"]
    if a.gpu_mem:
        cols.append(f"fits {a.gpu_mem:g} GB")
    for c in cols:
        t.add_column(c, justify="right")
    for r in result["rows"]:
        g, acts = r["gpu"], r["activations"]
        line = [str(r["stage"]), r["offload"], _gb(g["params"]), _gb(g["grads"]),
                _gb(g["optimizer"]), _gb(g["layer_buffer"]), _gb(g["total"]),
                _gb(acts["no_checkpointing"]), _gb(acts["checkpointing"]),
                _gb(r["cpu_per_node"]["total"])]
        if a.compare_deepspeed:
            ds = r.get("deepspeed")
            line += [_gb(ds["gpu"]) if ds else "-", _gb(ds["cpu_per_node"]) if ds else "-"]
        if a.gpu_mem:
            line.append("yes" if r["fits_gpu"] else "no")
        t.add_row(*line)
    console = report.console()
    console.print(t)
    if arch["n_layer"] is None:
        console.print("activations: give --layers, --hidden, --heads and --seq (or --preset) "
                      "to include them")
    d = result.get("activation_detail")
    if d is not None:
        st = d["setting"]
        console.print(
            f"activations per GPU with recompute {st['recompute']}"
            + (f" (every {st['recompute_every']})" if st["recompute"] == "selective" else "")
            + f", tp {st['tp']}{' + sp' if st['sp'] else ''}, cp {st['cp']}: "
            f"{d['forward']:,} B saved in the forward ({d['per_block']:,} B per block kept whole,"
            f" {d['kept_per_block']:,} B per recomputed block), plus {d['recompute_peak']:,} B "
            "while a block is recomputed")
    console.print(f"inference, weights only: {_gb(result['inference_gpu_bytes'])} GB "
                  "(plus the KV cache and workspace)")
    console.print("CPU/node is the larger of loading (each process builds the fp32 model) and "
                  "the offloaded partitions; DeepSpeed multiplies its CPU figure by 1.5.")
