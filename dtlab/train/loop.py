"""The one training loop. The single-process baseline is this loop at world size 1.

    for step in range(steps):
        x, y   = corpus.global_batch(step)          # same data for every strategy
        x, y   = strategy.local_batch(x, y)         # e.g. this rank's rows
        loss   = strategy.forward_backward(x, y)    # forward, loss, backward
        strategy.after_backward()                   # e.g. wait for gradient all-reduces
        strategy.optimizer_step()
        record the loss of the whole global batch, the step time and the bytes communicated

A lab is a :class:`Strategy` subclass that overrides the hooks it changes (DDP wraps the model;
ZeRO replaces ``optimizer_step``; a pipeline replaces ``forward_backward``), plus ``main``, which
is one call to ``dtlab.harness.run_lab``. The harness hands this loop its step hooks (checkpoints,
injected faults, the flight recorder, the profiler: :class:`StepHook`), so none of that machinery
lives here; afterwards it collects the full parameters, compares them with :func:`baseline` and
writes the run record.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import time

import torch
import torch.distributed as dist

from dtlab.measure import memory_meter as mem
from dtlab.measure import run_record as record
from dtlab.measure.comm_counter import CommCounter
from dtlab.train import runtime
from dtlab.train.data import rank_slice
from dtlab.train.layout import ParamLayout, whole_params
from dtlab.train.model import ToyGPT, build_model, loss_fn
from dtlab.train.settings import Settings


# --------------------------------------------------------------------------- strategy

class Strategy:
    """Plain training on one process; labs subclass it and override the hooks they change.
    The class attributes below are the flags a lab sets (the defaults are the baseline's)."""

    name = "baseline"
    variant = "single"
    dtype = "fp32"
    tolerance = record.FP32_TOLERANCE
    checks_ok = True            # a lab with its own checks (e.g. against a library op) sets this
    equivalent = True           # False for strategies not equal to the baseline by design,
    drift_reason = ""           # and why, in a few words ("1 step skipped", "Hogwild")
    whole_batch = False         # True: every rank takes the whole global batch (TP, PP)

    def __init__(self, rt: runtime.Runtime, settings: Settings):
        self.rt, self.settings = rt, settings
        self.comm = CommCounter(rt.world_size)
        self.meter = mem.ActivationMeter()
        self.extra: dict = {}
        self.lab = self.name
        self.current_step: int | None = None
        self.lab_flags: dict = {}
        self.trajectory: tuple[list, list] = ([], [])
        self.flight = None  # the flight recorder, where the harness runs one

    # ---- set-up
    def build(self) -> None:
        """Create ``self.model`` and ``self.optimizer``."""
        self.model = build_model(self.settings.model, self.rt.device)
        self.optimizer = self.make_optimizer(self.model.parameters())

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, **self.settings.adamw())

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

    def param_layout(self) -> ParamLayout:
        """Where this rank's parameters sit in the whole model. The run's full parameters (for
        the comparison) and a checkpoint's canonical state are both read through it, so a lab
        that shards the model says how here, and nowhere else. The default: every rank holds
        the whole model under the baseline's names."""
        m = getattr(self.model, "module", self.model)
        return ParamLayout(dict(m.named_parameters()))

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """Full parameters under the baseline's names, on rank 0 (None elsewhere). Every rank
        calls it: where the layout shards the model this is a collective."""
        full = whole_params(self.param_layout(), self.gather_object)
        return full if self.rt.is_main else None

    def memory(self) -> dict:
        params = list(self.model.parameters())
        return mem.snapshot(params, self.optimizer, self.meter, self.rt.device)

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

class StepHook:
    """What the loop is handed to act around its steps; every method is optional. The harness
    (dtlab/harness.py) builds the list: checkpoints and resuming, injected faults, the flight
    recorder, the profiler (dtlab/reliability/hooks.py, dtlab/measure/profiler.py)."""

    def begin(self, strategy: Strategy) -> int:
        """Before the first step; returns the step to start from (a resumed checkpoint's)."""
        return 0

    def before_step(self, strategy: Strategy, step: int) -> None:
        pass

    def after_step(self, strategy: Strategy, step: int, row: dict) -> None:
        """After a step; ``row`` is its line of steps.jsonl, which a hook may add to."""

    def end(self, strategy: Strategy) -> None:
        """After the last step, or when a step raised."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(strategy: Strategy, hooks: list[StepHook] = (),
          log_every: int | None = None) -> tuple[list[float], list[dict]]:
    rt, s = strategy.rt, strategy.settings
    corpus = s.corpus()
    losses, steps = strategy.trajectory = [], []  # the failure report reads the history so far
    log_every = max(1, s.steps // 10) if log_every is None else log_every
    with contextlib.ExitStack() as ending:
        start = 0
        for hook in hooks:
            start = max(start, hook.begin(strategy))
            ending.callback(hook.end, strategy)
        for step in range(start, s.steps):
            strategy.current_step = step
            for hook in hooks:
                hook.before_step(strategy, step)
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
            for hook in hooks:
                hook.after_step(strategy, step, steps[-1])
    return losses, steps


def baseline(settings: Settings, device: torch.device) -> tuple[list[float], dict]:
    """The reference trajectory: this loop, one process, the whole global batch (cached),
    without recomputation (which must not change a bit)."""
    settings = dataclasses.replace(
        settings, model=dataclasses.replace(settings.model, recompute="none", recompute_every=2))
    key = record.cache_key({**settings.identity(), "device": device.type})
    hit = record.load_cached(key)
    if hit is not None:
        return hit
    rt = runtime.Runtime(device=device)
    strat = Strategy(rt, settings)
    strat.build()
    losses, _ = train(strat, log_every=0)
    params = strat.full_state()
    record.store_cached(key, losses, params)
    return losses, params
