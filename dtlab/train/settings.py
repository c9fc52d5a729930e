"""The run settings every lab shares: the common flags, their validation, and ``Settings``.

``add_common_args`` defines the flags (defaults live here, in argparse); ``settings_from_args``
validates them without changing ``args`` and raises ``UsageError`` naming the flag and the fix.
The checkpoint and fault-injection flags are reliability's (dtlab/reliability/options.py).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from dtlab.train import runtime
from dtlab.train.data import Corpus
from dtlab.errors import UsageError
from dtlab.train.model import (DEFAULT_PRESET, RECOMPUTE, ModelConfig, config_from_preset, preset,
                              preset_names)

MAX_TIMEOUT_S = 7 * 24 * 3600  # a week: beyond it torch's timedelta arithmetic overflows

# AdamW's moment decay rates for every lab, library and DeepSpeed config (GPT-style training)
ADAMW_BETAS = (0.9, 0.95)


@dataclass
class Settings:
    preset: str = DEFAULT_PRESET
    steps: int = 20
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0
    data: str | None = None
    out: str = "runs/latest"
    profile_dir: str | None = None  # profile the run (traces and a time split per rank)
    model: ModelConfig = field(default_factory=ModelConfig)

    def identity(self) -> dict:
        """Everything that determines the baseline's trajectory (the cache key)."""
        d = asdict(self)
        d.pop("out")
        d.pop("profile_dir")
        for k in ("recompute", "recompute_every"):  # they change no bit of the trajectory
            d["model"].pop(k)
        d["data"] = self.corpus().describe()
        return d

    def corpus(self) -> Corpus:
        """The data, read and tokenised once per process (kept beside the fields, not in
        them: ``asdict`` and the cache key see only the settings)."""
        key = (self.batch_size, self.model.seq_len, self.seed, self.data)
        cached = self.__dict__.get("_corpus")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_corpus"] = (key, Corpus(*key[:3], path=self.data))
        return cached[1]

    def adamw(self) -> dict:
        """The optimizer's hyper-parameters, for torch, FairScale and DeepSpeed alike."""
        return {"lr": self.lr, "betas": ADAMW_BETAS, "weight_decay": self.weight_decay}


def finite(text: str) -> float:
    """An argparse type: a real number, not NaN or an infinity (which compare False with every
    bound, so a check like ``lr <= 0`` would let them through)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


finite.__name__ = "finite number"  # argparse names the type in its error message


def add_common_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("common run settings")
    g.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    g.add_argument("--preset", default=DEFAULT_PRESET,
                   help=f"model preset: {', '.join(preset_names())} (default {DEFAULT_PRESET})")
    g.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default: the preset's)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="global batch size in sequences (default: the preset's)")
    g.add_argument("--lr", type=finite, default=None, help="AdamW learning rate (default: preset's)")
    g.add_argument("--seed", type=int, default=0, help="data and init seed (default 0)")
    g.add_argument("--data", default=None, help="UTF-8 text file to train on, char-level "
                   "(default: synthetic addition problems, no files needed)")
    g.add_argument("--out", default="runs/latest", help="run record folder (default runs/latest)")
    g.add_argument("--backend", default=None, choices=["gloo", "nccl"],
                   help="process-group backend (default: nccl with CUDA, else gloo)")
    g.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if present)")
    g.add_argument("--timeout", type=finite, default=runtime.DEFAULT_TIMEOUT_S,
                   help="seconds a collective or the start-up may wait for a missing rank "
                        f"(default {runtime.DEFAULT_TIMEOUT_S:g})")
    g.add_argument("--no-baseline", action="store_true",
                   help="skip the baseline comparison (baseline.ok is then null)")
    g.add_argument("--log-every", type=int, default=None, help="print a loss line every N steps")
    g.add_argument("--recompute", default="none", choices=list(RECOMPUTE),
                   help="activation recomputation: full (every block keeps only its input and "
                        "runs its forward again in the backward), selective (every k-th block), "
                        "none (default; docs/activation-recomputation.md)")
    g.add_argument("--moe-experts", type=int, default=0,
                   help="make every block's MLP a mixture of this many experts (default 0: a "
                        "plain MLP; docs/expert-parallel.md)")
    g.add_argument("--moe-top-k", type=int, default=1,
                   help="experts each token goes to (default 1)")
    g.add_argument("--recompute-every", type=int, default=2,
                   help="k of --recompute selective: blocks 0, k, 2k, ... (default 2)")
    g.add_argument("--profile-dir", default=None,
                   help="profile the run with torch.profiler: traces in DIR/tb and a time split "
                        "per rank in the record (dtlab profile sets it)")
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    try:
        p = preset(args.preset)
    except KeyError as e:
        raise UsageError(f"--preset: {e.args[0]}") from None
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    batch = args.batch_size if args.batch_size is not None else p["batch_size"]
    lr = args.lr if args.lr is not None else p["lr"]
    if batch < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch}")
    if lr <= 0:
        raise UsageError(f"--lr must be > 0, got {lr}")
    if not 0 < args.timeout <= MAX_TIMEOUT_S:
        raise UsageError(f"--timeout must be in (0, {MAX_TIMEOUT_S}] seconds, got {args.timeout:g}")
    s = Settings(preset=args.preset, steps=args.steps, batch_size=batch, lr=lr, seed=args.seed,
                 data=args.data, out=args.out, profile_dir=args.profile_dir)
    if args.moe_experts < 0:
        raise UsageError(f"--moe-experts must be >= 0, got {args.moe_experts}")
    if args.moe_experts and not 1 <= args.moe_top_k <= args.moe_experts:
        raise UsageError(f"--moe-top-k {args.moe_top_k} must be between 1 and --moe-experts "
                         f"{args.moe_experts}")
    if args.recompute_every < 1:
        raise UsageError(f"--recompute-every must be >= 1, got {args.recompute_every}")
    if args.seq_len is not None and args.seq_len < 2:
        raise UsageError(f"--seq-len must be >= 2, got {args.seq_len}")
    seq = args.seq_len or config_from_preset(args.preset, 1).seq_len
    s.model = replace(s.model, seq_len=seq)
    vocab = s.corpus().vocab_size  # reads --data (once) and checks it against seq_len
    try:
        s.model = config_from_preset(args.preset, vocab, init_seed=args.seed, seq_len=seq,
                                     recompute=args.recompute,
                                     recompute_every=args.recompute_every,
                                     moe_experts=args.moe_experts, moe_top_k=args.moe_top_k)
    except ValueError as e:
        raise UsageError(f"--data {args.data}: {e}; use a preset that takes the data's "
                         "vocabulary (tiny, small) or a file with fewer distinct characters"
                         ) from None
    return s
