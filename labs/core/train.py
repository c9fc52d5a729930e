"""The one training loop. The single-process baseline is this loop at world size 1.

    for step in range(steps):
        x, y   = corpus.global_batch(step)          # same data for every strategy
        x, y   = strategy.local_batch(x, y)         # e.g. this rank's rows
        loss   = strategy.forward_backward(x, y)    # forward, loss, backward
        strategy.after_backward()                   # e.g. wait for gradient all-reduces
        strategy.optimizer_step()
        record the loss of the whole global batch, the step time and the bytes communicated

A lab is a :class:`Strategy` subclass that overrides the hook it changes (DDP wraps the model;
ZeRO replaces ``optimizer_step``; a pipeline replaces ``forward_backward``), plus ``main``, which
is one call to :func:`run_lab`. Afterwards rank 0 collects the full parameters, reruns (or reads a
cached) baseline with identical settings, and writes the run record.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from labs import registry
from labs.core import checkpoint as ckpt
from labs.core import faults
from labs.core import memory as mem
from labs.core import record, runtime
from labs.core.comm import CommCounter
from labs.core.data import Corpus, DataError, check_divisible, rank_slice
from labs.core.model import (DEFAULT_PRESET, ModelConfig, ToyGPT, build_model,
                             config_from_preset, loss_fn, preset, preset_names)


class UsageError(ValueError):
    """Bad user input; reported as one line with exit status 2."""


# --------------------------------------------------------------------------- settings

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
    model: ModelConfig = field(default_factory=ModelConfig)

    def identity(self) -> dict:
        """Everything that determines the baseline's trajectory (the cache key)."""
        d = asdict(self)
        d.pop("out")
        d["data"] = self.corpus().describe()
        return d

    def corpus(self) -> Corpus:
        return Corpus(self.batch_size, self.model.seq_len, seed=self.seed, path=self.data)


def add_common_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("common run settings")
    g.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    g.add_argument("--preset", default=DEFAULT_PRESET,
                   help=f"model preset: {', '.join(preset_names())} (default {DEFAULT_PRESET})")
    g.add_argument("--batch-size", type=int, default=None,
                   help="global batch size in sequences (default: the preset's)")
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: preset's)")
    g.add_argument("--seed", type=int, default=0, help="data and init seed (default 0)")
    g.add_argument("--data", default=None, help="UTF-8 text file to train on, char-level "
                   "(default: synthetic addition problems, no files needed)")
    g.add_argument("--out", default="runs/latest", help="run record folder (default runs/latest)")
    g.add_argument("--backend", default=None, choices=["gloo", "nccl"],
                   help="process-group backend (default: nccl with CUDA, else gloo)")
    g.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if present)")
    g.add_argument("--timeout", type=float, default=runtime.DEFAULT_TIMEOUT_S,
                   help="seconds a collective or the start-up may wait for a missing rank "
                        f"(default {runtime.DEFAULT_TIMEOUT_S:g})")
    g.add_argument("--no-baseline", action="store_true",
                   help="skip the baseline comparison (baseline.ok is then null)")
    g.add_argument("--log-every", type=int, default=None, help="print a loss line every N steps")
    r = p.add_argument_group("checkpoints and injected faults (docs/reliability.md)")
    r.add_argument("--ckpt-dir", default=None,
                   help="write checkpoints here, and resume from the newest complete one")
    r.add_argument("--ckpt-every", type=int, default=5,
                   help="steps between checkpoints (default 5)")
    r.add_argument("--ckpt-keep", type=int, default=2,
                   help="complete checkpoints kept; older ones are deleted (default 2)")
    r.add_argument("--fail-at-step", type=int, default=None,
                   help="kill --fail-rank with SIGKILL at the start of this step "
                        "(first attempt only)")
    r.add_argument("--fail-rank", type=int, default=0,
                   help="rank that --fail-at-step kills (default 0)")
    r.add_argument("--fail-in", default="step", choices=["step", "checkpoint"],
                   help="checkpoint: die while writing the first checkpoint at or after "
                        "--fail-at-step instead (default step)")
    r.add_argument("--stall-at-step", type=int, default=None,
                   help="--stall-rank stops answering at the start of this step")
    r.add_argument("--stall-rank", type=int, default=0, help="rank that stalls (default 0)")
    return p


def plans_from_args(args: argparse.Namespace, settings: Settings, world: int,
                    lab: str) -> tuple[ckpt.Plan, faults.FaultPlan]:
    """The checkpoint and fault flags, validated (UsageError names the flag and the fix)."""
    plan = ckpt.Plan(args.ckpt_dir, args.ckpt_every, args.ckpt_keep)
    why = registry.LABS[lab].no_checkpoint if lab in registry.LABS else None
    if plan.ckpt_dir is not None and why:
        raise UsageError(f"--ckpt-dir: lab {lab!r} cannot checkpoint: {why}")
    if plan.ckpt_every < 1:
        raise UsageError(f"--ckpt-every must be >= 1, got {plan.ckpt_every}")
    if plan.ckpt_keep < 1:
        raise UsageError(f"--ckpt-keep must be >= 1, got {plan.ckpt_keep}")
    if plan.ckpt_dir is not None:
        d = Path(plan.ckpt_dir)
        if d.exists() and not d.is_dir():
            raise UsageError(f"--ckpt-dir {d} is a file; give a folder (it is created if missing)")
    fp = faults.FaultPlan(args.fail_at_step, args.fail_rank, args.fail_in, args.stall_at_step,
                          args.stall_rank)
    if (msg := fp.check(world, settings.steps, plan.ckpt_dir)):
        raise UsageError(msg)
    return plan, fp


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
    s = Settings(preset=args.preset, steps=args.steps, batch_size=batch, lr=lr, seed=args.seed,
                 data=args.data, out=args.out)
    vocab = Corpus(1, 1, path=None).vocab_size if args.data is None else None
    if vocab is None:  # a text file: its characters are the vocabulary
        seq = config_from_preset(args.preset, 1).seq_len
        vocab = Corpus(batch, seq, path=args.data).vocab_size
    s.model = config_from_preset(args.preset, vocab, init_seed=args.seed)
    s.corpus()  # validates --data against the model's sequence length
    return s


# --------------------------------------------------------------------------- strategy

class Strategy:
    """Plain training on one process; labs subclass it and override the hooks they change."""

    name = "baseline"
    variant = "single"
    dtype = "fp32"
    tolerance = record.FP32_TOLERANCE
    checks_ok = True  # a lab with its own checks (e.g. against a library op) sets this
    equivalent = True  # False for strategies that are not equal to the baseline by design

    def __init__(self, rt: runtime.Runtime, settings: Settings):
        self.rt, self.settings = rt, settings
        self.comm = CommCounter(rt.world_size)
        self.meter = mem.ActivationMeter()
        self.extra: dict = {}
        self.lab = self.name
        self.ckpt_plan, self.fault_plan = ckpt.Plan(), faults.FaultPlan()
        self.current_step: int | None = None
        self.lab_flags: dict = {}
        self.trajectory: tuple[list, list] = ([], [])

    # ---- set-up
    def build(self) -> None:
        """Create ``self.model`` and ``self.optimizer``."""
        self.model = build_model(self.settings.model, self.rt.device)
        self.optimizer = self.make_optimizer(self.model.parameters())

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.settings.lr, betas=(0.9, 0.95),
                                 weight_decay=self.settings.weight_decay)

    whole_batch = False  # True: every rank takes the whole global batch (tensor, pipeline)

    @property
    def dp_rank(self) -> int:
        return 0 if self.whole_batch else self.rt.rank

    @property
    def dp_world(self) -> int:
        return 1 if self.whole_batch else self.rt.world_size

    # ---- one step
    def local_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rank_slice(x, self.dp_rank, self.dp_world), rank_slice(y, self.dp_rank, self.dp_world)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with self.meter.measure(self.model.parameters()):
            loss = loss_fn(self.model(x), y)
        loss.backward()
        return loss.detach()

    def after_backward(self) -> None:
        pass

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def global_loss(self, local_loss: torch.Tensor) -> float:
        """Loss of the whole global batch: the mean of the data-parallel ranks' equal slices.
        This all-reduce is bookkeeping, not training traffic, so it is not counted."""
        if self.rt.distributed and self.dp_world > 1:
            t = local_loss.detach().clone().float()
            dist.all_reduce(t)
            return t.item() / self.rt.world_size
        return local_loss.item()

    # ---- afterwards
    def num_params(self) -> int:
        """Parameters of the whole model (not of this rank's shard)."""
        return ToyGPT.count_params(self.settings.model)

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """Full parameters under the baseline's names, on rank 0 (None elsewhere)."""
        m = getattr(self.model, "module", self.model)
        return {k: v.detach().cpu() for k, v in m.named_parameters()} if self.rt.is_main else None

    def memory(self) -> dict:
        params = list(self.model.parameters())
        return mem.snapshot(params, self.optimizer, self.meter, self.rt.device)

    # ---- checkpoints (labs.core.checkpoint): what determines the rest of the run; a lab that
    # cannot resume says why in the registry (Lab.no_checkpoint)
    checkpoint_sharded = False   # True: every rank's state differs (ZeRO, TP, PP): all write

    def checkpoint_state(self) -> dict:
        m = getattr(self.model, "module", self.model)
        return {"model": m.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_checkpoint_state(self, state: dict) -> None:
        m = getattr(self.model, "module", self.model)
        m.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def gather_object(self, obj) -> list:
        """Every rank's ``obj`` as a list on rank 0 (processes without a process group, such as
        torch.multiprocessing workers, override this)."""
        if not self.rt.distributed:
            return [obj]
        out = [None] * self.rt.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        self.rt.barrier()

    def close(self) -> None:
        """Drop the model and optimizer before the process group goes. A DDP wrapper still alive
        at interpreter exit, after its group was destroyed, can abort the process from C++."""
        self.model = self.optimizer = None
        gc.collect()


# --------------------------------------------------------------------------- loop

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(strategy: Strategy, log_every: int | None = None,
          profile: bool = True) -> tuple[list[float], list[dict]]:
    rt, s = strategy.rt, strategy.settings
    corpus = s.corpus()
    losses, steps = strategy.trajectory = [], []  # the failure report reads the history so far
    start = ckpt.resume(strategy, losses, steps)
    if log_every is None:
        log_every = max(1, s.steps // 10)
    from labs.tools.profile import maybe_profiler  # DTLAB_PROFILE_DIR: dtlab profile
    prof = maybe_profiler(rt.rank, s.steps, rt.device.type) if profile else None
    with prof or contextlib.nullcontext():
        _steps(strategy, corpus, losses, steps, log_every, prof, start)
    if prof is not None:
        strategy.extra["profile"] = prof.summary
    return losses, steps


def _steps(strategy, corpus, losses, steps, log_every, prof, start=0) -> None:
    rt, s = strategy.rt, strategy.settings
    plan, fp = strategy.ckpt_plan, strategy.fault_plan
    for step in range(start, s.steps):
        strategy.current_step = step
        faults.heartbeat(rt.rank, step)
        if fp.fail_at_step == step and fp.fail_in == "step" and rt.rank == fp.fail_rank \
                and faults.first_attempt():
            faults.die(rt.rank, f"--fail-at-step {step}")
        if fp.stall_at_step == step and rt.rank == fp.stall_rank:
            faults.stall(rt.rank, step, rt.timeout_s)
        x, y = corpus.global_batch(step)
        x, y = strategy.local_batch(x.to(rt.device), y.to(rt.device))
        _sync(rt.device)
        t0 = time.perf_counter()
        loss = strategy.forward_backward(x, y)
        strategy.after_backward()
        strategy.optimizer_step()
        _sync(rt.device)
        dt = time.perf_counter() - t0
        strategy.comm.end_step()
        losses.append(strategy.global_loss(loss))
        steps.append({"step": step, "loss": losses[-1], "step_s": dt,
                      "comm_bytes": strategy.comm.step_sent[-1]})
        if log_every and (step % log_every == 0 or step == s.steps - 1):
            rt.log(f"step {step:4d}  loss {losses[-1]:.4f}  {dt * 1e3:7.1f} ms")
        if plan.due(step + 1, s.steps):
            steps[-1]["ckpt_s"] = ckpt.save(strategy, step + 1, losses, steps)
        if prof is not None:
            prof.step()


def lab_flags(args: argparse.Namespace) -> dict:
    """The lab's own flags (--stage, --impl, ...): the command-line values minus the common run
    settings, which ``Settings`` already holds."""
    common = {a.dest for a in add_common_args(argparse.ArgumentParser())._actions}
    return {k: v for k, v in sorted(vars(args).items()) if k not in common}


def baseline(settings: Settings, device: torch.device) -> tuple[list[float], dict]:
    """The reference trajectory: this loop, one process, the whole global batch (cached)."""
    key = record.cache_key({**settings.identity(), "device": device.type})
    hit = record.load_cached(key)
    if hit is not None:
        return hit
    rt = runtime.Runtime(device=device)
    strat = Strategy(rt, settings)
    strat.build()
    losses, _ = train(strat, log_every=0, profile=False)
    params = strat.full_state()
    record.store_cached(key, losses, params)
    return losses, params


def run(strategy: Strategy, lab: str, compare_baseline: bool = True,
        log_every: int | None = None) -> dict:
    """Build, train, compare with the baseline, write the record; returns the summary."""
    rt, s = strategy.rt, strategy.settings
    t_wall = time.perf_counter()
    strategy.lab = lab
    strategy.build()
    n_params = strategy.num_params()
    rt.log(f"{lab} [{strategy.variant}]  world {rt.world_size}  {rt.backend}/{rt.device}  "
           f"preset {s.preset} ({n_params:,} parameters)"
           f"  global batch {s.batch_size} x {s.model.seq_len} tokens  {s.steps} steps")
    from labs.tools.flops import UtilisationSampler
    with UtilisationSampler(rt.device) as sampler:  # GPU (NVML) or this process's CPU
        losses, steps = train(strategy, log_every)
    wall = time.perf_counter() - t_wall
    utilisation = strategy.gather_object(sampler.summary())
    full = strategy.full_state()
    if "profile" in strategy.extra:  # every rank's own summary, on rank 0
        strategy.extra["profile"] = strategy.gather_object(strategy.extra["profile"])
    mems = strategy.gather_object(strategy.memory())
    comms = strategy.gather_object(strategy.comm.summary())
    # Every rank leaves the process group together before rank 0 turns to the baseline, so no
    # rank sits in a collective (or tears a connection down) while rank 0 computes alone.
    strategy.barrier()
    strategy.close()
    runtime.shutdown(rt)
    summary = None
    if rt.is_main:
        step_s = statistics.median(st["step_s"] for st in steps)
        if compare_baseline:
            base_losses, base_params = baseline(s, rt.device)
            cmp = record.compare(losses, full, base_losses, base_params, strategy.tolerance)
            cmp["losses"] = base_losses  # the reference curve, for plots
            if not strategy.equivalent:  # drift is the expected outcome, not a failure
                cmp["ok"] = None
                cmp["note"] = "not numerically equivalent by design; the drift is reported"
        else:
            cmp = {"max_abs_loss_diff": None, "max_rel_loss_diff": None,
                   "max_abs_param_diff": None, "tolerance": dict(strategy.tolerance), "ok": None}
        comm = dict(comms[0])
        comm["per_rank"] = [c["bytes_per_step"] for c in comms]
        from labs.tools.flops import flops_record  # after training: its matmuls disturb nothing
        flops = flops_record(s.model, s.batch_size, step_s, rt.world_size, rt.device)
        flops["utilisation_per_rank"] = utilisation
        summary = {
            "lab": lab, "variant": strategy.variant, "world_size": rt.world_size,
            "backend": rt.backend, "device": str(rt.device), "dtype": strategy.dtype,
            "preset": s.preset, "steps": s.steps, "seed": s.seed,
            "batch_size": s.batch_size, "seq_len": s.model.seq_len, "n_params": n_params,
            "losses": losses, "baseline": cmp,
            "time": {"step_s_median": step_s,
                     "tokens_per_s": s.batch_size * s.model.seq_len / step_s, "wall_s": wall},
            "comm": comm, "memory": {"per_rank": mems}, "flops": flops, "extra": strategy.extra,
            "params_sha256": params_digest(full),
            # the verdict: baseline within tolerance (or not compared) and the lab's own checks
            "ok": cmp["ok"] is not False and bool(strategy.checks_ok),
        }
        record.write_record(Path(s.out), summary, steps)
        verdict = {True: "OK", False: "OUTSIDE TOLERANCE", None: "not compared"}[cmp["ok"]]
        if cmp["ok"] is not None:
            rt.log(f"baseline: max |loss diff| {cmp['max_abs_loss_diff']:.2e} "
                   f"(rel {cmp['max_rel_loss_diff']:.2e}), max |param diff| "
                   f"{cmp['max_abs_param_diff']:.2e}  -> {verdict}")
        rt.log(f"wrote {Path(s.out) / 'summary.json'}")
    return summary


def params_digest(params: dict[str, torch.Tensor] | None) -> str | None:
    """SHA-256 over the full parameters in name order: equal digests mean bitwise-equal models."""
    if params is None:
        return None
    h = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def run_lab(lab: str, parser: argparse.ArgumentParser, make_strategy, argv=None,
            check_args=None, rt: runtime.Runtime | None = None) -> int:
    """A lab's ``main``: parse, join the process group, run, report. Exit status 0 when within
    tolerance, 1 when outside, 2 for bad input, 3 when the process group failed. ``rt``: a
    runtime the caller made (torch.multiprocessing workers) instead of one from the environment."""
    args = parser.parse_args(argv)
    given_rt = rt
    try:
        settings = settings_from_args(args)
        world = rt.world_size if rt else int(os.environ.get("WORLD_SIZE", "1"))
        if check_args is not None:
            check_args(args, settings, world)
        else:
            check_divisible(settings.batch_size, world)
        plan, fault_plan = plans_from_args(args, settings, world, lab)
        rt = rt or runtime.init(args.backend, args.device, args.timeout, args.seed)
        strategy = make_strategy(rt, settings, args)
        strategy.ckpt_plan, strategy.fault_plan = plan, fault_plan
        strategy.lab_flags = lab_flags(args)
        try:
            summary = run(strategy, lab, compare_baseline=not args.no_baseline,
                          log_every=args.log_every)
        except RuntimeError as e:
            if not (rt.distributed and faults.is_comm_failure(e)):
                raise
            code = faults.report_failure(strategy, lab, e)
            if given_rt is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
                runtime.exit_now(code)
            return code
    except (UsageError, DataError, ckpt.CheckpointError) as e:
        if (given_rt.rank if given_rt else int(os.environ.get("RANK", "0"))) == 0:
            print(f"dtlab: error: {e}", file=sys.stderr, flush=True)
        return 2
    except runtime.RuntimeSetupError as e:
        print(f"dtlab: error: {e}", file=sys.stderr, flush=True)
        return 3
    finally:
        if rt is not None:
            runtime.shutdown(rt)
    code = 0 if summary is None or summary["ok"] else 1  # summary is None off rank 0
    if given_rt is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        runtime.exit_now(code)  # a launched rank: no interpreter teardown (see exit_now)
    return code
