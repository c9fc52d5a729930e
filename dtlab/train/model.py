"""ToyGPT: the one small decoder-only transformer that every lab trains.

It is written so that every strategy can cut it:
- ``model.layers`` is a flat, ordered list ``[Embedding, Block, ..., Block, LMHead]`` and the
  forward pass is just that list applied in order, so ``model.stages(n)`` can hand contiguous
  slices of it to pipeline stages;
- every matrix multiply is a named ``nn.Linear`` (``attn.q/k/v`` or ``attn.qkv``, ``attn.proj``,
  ``mlp.fc``, ``mlp.proj``, ``head``), which is what column/row-parallel plans name;
- there is no dropout and no buffer (the causal mask is built inside attention), so a replica's
  state is exactly its parameters and runs are deterministic;
- the attention core (softmax(q k^T / sqrt(d)) v over the causal mask) is ``attn.core``, a plain
  function a lab may replace (context parallelism puts ring attention there), and the embedding
  takes the global positions of the tokens it is given from ``positions`` when a lab holds only
  some of them;
- ``recompute`` (``none``, ``full``, ``selective``) checkpoints blocks: their activations are
  dropped after the forward and recomputed in the backward (dtlab/train/recompute.py).

Initial weights come from ``init_seed`` alone, through a private generator, so every rank and the
single-process baseline start bit-for-bit equal no matter what else touched the global RNG.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from dtlab.costmodel.shapes import Shape
from dtlab.errors import UsageError
from dtlab.train.data import ARITH_VOCAB
from dtlab.train.recompute import recompute


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 16
    seq_len: int = 32
    n_layer: int = 2
    n_head: int = 2
    d_model: int = 32
    d_ff: int = 128
    fused_qkv: bool = False
    init_seed: int = 0
    recompute: str = "none"     # none | full (every block) | selective (every k-th block)
    recompute_every: int = 2    # k for selective
    moe_experts: int = 0        # > 0: every block's MLP is a mixture of this many experts
    moe_top_k: int = 1          # experts each token is sent to
    moe_aux_weight: float = 0.01  # weight of the load-balancing loss

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model", "d_ff"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(
                f"ModelConfig: d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                "pick a d_model that is a multiple of n_head")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"ModelConfig.recompute must be one of {', '.join(RECOMPUTE)}, "
                             f"got {self.recompute!r}")
        if self.moe_experts < 0 or (self.moe_experts and not
                                    1 <= self.moe_top_k <= self.moe_experts):
            raise ValueError(f"ModelConfig: moe_top_k={self.moe_top_k} must be in 1.."
                             f"moe_experts={self.moe_experts}")
        if self.recompute_every < 1:
            raise ValueError(f"ModelConfig.recompute_every must be >= 1, got "
                             f"{self.recompute_every}")

    def recomputes(self, block: int) -> bool:
        """Whether block ``block`` (0-based) is recomputed in the backward."""
        return self.recompute == "full" or (
            self.recompute == "selective" and block % self.recompute_every == 0)


RECOMPUTE = ("none", "full", "selective")


# Presets. ``vocab_size=None`` means "as large as the data's vocabulary"; gpt2-124m keeps GPT-2's
# own vocabulary so its parameter count is the familiar 124M.
PRESETS: dict[str, dict] = {
    "tiny": dict(seq_len=32, n_layer=2, n_head=2, d_model=32, d_ff=128, batch_size=16, lr=3e-3),
    "small": dict(seq_len=64, n_layer=4, n_head=4, d_model=128, d_ff=512, batch_size=16, lr=1e-3),
    # long sequences, small width: activations (which grow with seq) dominate the model states
    "long": dict(seq_len=256, n_layer=4, n_head=4, d_model=64, d_ff=256, batch_size=8, lr=1e-3),
    "gpt2-124m": dict(vocab_size=50257, seq_len=1024, n_layer=12, n_head=12, d_model=768,
                      d_ff=3072, batch_size=8, lr=6e-4),
}
DEFAULT_PRESET = "tiny"


def preset_names() -> list[str]:
    return list(PRESETS)


def preset(name: str) -> dict:
    """The preset's settings (model shape plus default global batch size and learning rate)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def config_from_preset(name: str, vocab_size: int, **overrides) -> ModelConfig:
    p = preset(name)
    p.pop("batch_size"), p.pop("lr")
    p.setdefault("vocab_size", vocab_size)
    if p["vocab_size"] < vocab_size:
        raise ValueError(f"preset {name!r} has vocab_size {p['vocab_size']} < data vocabulary "
                         f"{vocab_size}")
    return replace(ModelConfig(**p), **overrides)


class Embedding(nn.Module):
    """Token plus learned position embedding. ``positions``: the global positions of the tokens
    this module is given, when they are not 0..t-1 (a context-parallel rank's share)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.positions: torch.Tensor | None = None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = self.positions if self.positions is not None else \
            torch.arange(idx.shape[1], device=idx.device)
        return self.tok(idx) + self.pos(pos)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The attention core over [batch, heads, seq, head_dim]: causal softmax attention."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        d = cfg.d_model
        # q/k/v carry no bias: a key bias adds the same amount to every score of a query, so
        # softmax cancels it and its true gradient is zero. Adam would turn the rounding noise
        # in that zero into full-size steps, and two exact strategies would drift apart.
        if cfg.fused_qkv:
            self.qkv = nn.Linear(d, 3 * d, bias=False)
        else:
            self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.proj = nn.Linear(d, d)
        self.core = causal_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        # Heads come from the last dimension, so a tensor-parallel shard holding whole heads can
        # run this same code with fewer heads (n_head is read from the width it receives).
        hd = self.proj.in_features // self.n_head
        heads = q.shape[-1] // hd
        q, k, v = (z.view(b, t, heads, hd).transpose(1, 2) for z in (q, k, v))
        y = self.core(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, heads * hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class AddAuxiliaryLoss(torch.autograd.Function):
    """Forward: ``x`` unchanged. Backward: ``x``'s gradient, and 1 for ``aux``: the auxiliary
    loss's gradient joins the backward without changing the loss any lab computes and reports."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.dtype, ctx.device = aux.dtype, aux.device
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones((), dtype=ctx.dtype, device=ctx.device)


class MoE(nn.Module):
    """A mixture of experts in place of the MLP: a router scores the E experts for every token,
    the token goes to its top K, and its output is the experts' outputs weighted by their router
    probabilities. A load-balancing loss (Switch Transformer's E * sum_e f_e P_e, f_e the share of
    assignments expert e received, P_e its mean router probability) keeps the router from
    sending everything to a few experts; its gradient joins the backward through
    ``AddAuxiliaryLoss``.

    Two hooks let expert parallelism (labs/expert_parallel.py) cut it without changing the maths:
    ``run_experts(rows, counts)`` computes the experts on rows grouped by expert (here: locally),
    ``reduce_counts(counts)`` turns this process's assignment counts into the global ones f_e
    is taken from (here: unchanged). ``last_counts`` keeps the latest counts, for the record."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k, self.aux_weight = cfg.moe_experts, cfg.moe_top_k, \
            cfg.moe_aux_weight
        self.router = nn.Linear(cfg.d_model, cfg.moe_experts, bias=False)
        self.experts = nn.ModuleList([MLP(cfg) for _ in range(cfg.moe_experts)])
        self.run_experts = self.local_experts
        self.reduce_counts = lambda counts: counts
        self.last_counts: torch.Tensor | None = None

    def local_experts(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Rows grouped by expert, ``counts[e]`` of them for expert e, through their experts."""
        return torch.cat([self.experts[e](part) for e, part in
                          enumerate(rows.split(counts)) if counts[e]] or [rows[:0]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, h = x.shape, x.reshape(-1, x.shape[-1])
        n, k = h.shape[0], self.top_k
        if h.device.type == "meta":  # shapes only (FLOP counting): every token through k experts
            self.router(h)
            return sum(self.experts[e](h) for e in range(k)).view(shape)
        probs = F.softmax(self.router(h).float(), dim=-1)
        gate, expert = probs.topk(k, dim=-1)                    # [n, k] each
        flat_e = expert.reshape(-1)
        order = torch.argsort(flat_e, stable=True)              # assignments grouped by expert
        token = torch.arange(n, device=h.device).repeat_interleave(k)[order]
        counts = torch.bincount(flat_e, minlength=self.n_experts)
        out = self.run_experts(h[token], counts.tolist())
        y = torch.zeros_like(h).index_add(0, token, out * gate.reshape(-1)[order, None].to(h.dtype))
        total = self.reduce_counts(counts.float())
        self.last_counts = total.detach()
        share = total / total.sum()                             # f_e
        aux = self.aux_weight * self.n_experts * (share * probs.mean(dim=0)).sum()
        return AddAuxiliaryLoss.apply(y, aux).view(shape)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)). With ``recompute`` it
    keeps only its input for the backward and runs its forward again there."""

    def __init__(self, cfg: ModelConfig, recompute: bool = False):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(cfg.d_model), Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MoE(cfg) if cfg.moe_experts else MLP(cfg)
        self.recompute = recompute

    def body(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():
            return recompute(self.body, x)
        return self.body(x)


class LMHead(nn.Module):
    """Final LayerNorm and the projection to vocabulary logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(x))


class ToyGPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(
            [Embedding(cfg)] + [Block(cfg, cfg.recomputes(i)) for i in range(cfg.n_layer)]
            + [LMHead(cfg)])
        self.reset_parameters(cfg.init_seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """GPT-2 style init from ``seed`` only: N(0, 0.02), residual projections scaled by
        1/sqrt(2 * n_layer), zero biases, unit LayerNorm gains. Visiting parameters in name order
        makes the result independent of the global RNG and of the device."""
        g = torch.Generator().manual_seed(seed)
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if p.is_meta:  # shapes only (count_params)
                continue
            if name.endswith("bias"):
                p.zero_()
            elif ".ln" in name:
                p.fill_(1.0)
            else:
                std = resid_std if name.endswith("proj.weight") else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = idx
        for layer in self.layers:
            x = layer(x)
        return x

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @staticmethod
    def count_params(cfg: ModelConfig) -> int:
        """Parameter count from the shapes alone, by arithmetic: the same tensors as the modules
        above (tests/test_train.py holds it equal to a built model), without building one (a
        meta-device model costs about 2 s the first time, on every ``dtlab run``)."""
        d, f = cfg.d_model, cfg.d_ff
        mlp = d * f + f + f * d + d
        block = 2 * d + 3 * d * d + d * d + d + 2 * d          # ln1, q k v (or qkv), proj, ln2
        block += cfg.moe_experts * mlp + d * cfg.moe_experts if cfg.moe_experts else mlp
        return (cfg.vocab_size * d + cfg.seq_len * d + cfg.n_layer * block
                + 2 * d + d * cfg.vocab_size)                # ln_f, head

    def stages(self, n: int) -> list[nn.Sequential]:
        """Split ``layers`` into ``n`` contiguous pipeline stages with blocks spread as evenly as
        possible (the embedding rides with the first stage, the head with the last). The stages
        share the model's modules, so their parameter names map back with :func:`stage_names`."""
        if not 1 <= n <= self.cfg.n_layer:
            raise ValueError(f"cannot cut {self.cfg.n_layer} blocks into {n} pipeline stages; "
                             f"use 1 <= stages <= n_layer (or a preset with more layers)")
        bounds = stage_bounds(self.cfg.n_layer, n)
        return [nn.Sequential(*self.layers[lo:hi]) for lo, hi in bounds]


def stage_bounds(n_layer: int, n: int) -> list[tuple[int, int]]:
    """[lo, hi) indices into ``ToyGPT.layers`` for each of ``n`` stages."""
    base, extra = divmod(n_layer, n)
    out, start = [], 1  # layers[0] is the embedding
    for s in range(n):
        end = start + base + (1 if s < extra else 0)
        out.append((0 if s == 0 else start, end + (1 if s == n - 1 else 0)))
        start = end
    return out


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over every position of the (local) batch."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> ToyGPT:
    return ToyGPT(cfg).to(device)


def counted_flops_per_step(cfg, batch: int) -> int:
    """The FLOPs of one forward and backward of the whole global batch, counted on a meta model."""
    from torch.utils.flop_counter import FlopCounterMode  # only when FLOPs are counted
    with torch.device("meta"):
        model = ToyGPT(cfg)
    x = torch.zeros(batch, cfg.seq_len, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        loss_fn(model(x), x).backward()
    return int(counter.get_total_flops())


def formula_flops_per_step(cfg, batch: int) -> int:
    """The same by the usual formula: 6N a token plus attention's 12 L h s a token."""
    tokens = batch * cfg.seq_len
    embedding = cfg.vocab_size * cfg.d_model + cfg.seq_len * cfg.d_model
    n = ToyGPT.count_params(cfg) - embedding
    return int(6 * n * tokens + 12 * cfg.n_layer * cfg.d_model * cfg.seq_len * tokens)


def preset_shape(name: str, seq: int | None = None) -> tuple[Shape, int]:
    """A preset's shape (on the default data's vocabulary) and its global batch."""
    if name not in PRESETS:
        raise UsageError(f"--preset {name!r}: choose one of {', '.join(PRESETS)}")
    p = PRESETS[name]
    return Shape(p["n_layer"], p["d_model"], p["n_head"], p["d_ff"],
                    p.get("vocab_size") or len(ARITH_VOCAB), seq or p["seq_len"]), p["batch_size"]
