"""DeepSpeed's ZeRO on the shared model: the engine, a JSON config per stage, offload, and getting
the full parameters back out.

``deepspeed.initialize`` wraps the model in an *engine* that owns the optimizer, the data-parallel
gradient reduction, the precision and the ZeRO partitioning; all of it is chosen by the config
file, not by code. The training step becomes

    loss = loss_fn(engine(x), y)
    engine.backward(loss)      # gradients, reduced (and partitioned) as the config says
    engine.step()              # optimizer step on this rank's partition, parameters re-gathered

The configs are in launchers/configs/: ds_zero0.json .. ds_zero3.json, ds_zero2_offload.json
(optimizer state and step on the CPU, DeepSpeedCPUAdam) and ds_zero3_offload.json (parameters
too). The lab takes the batch size and learning rate from its own flags, so the run is
comparable with the baseline: ``train_batch_size``, the micro-batch per rank and the AdamW
``lr`` in the file are replaced (a line says so when they differ).

Getting full parameters back (what this lab checks against the baseline):
- with stage 0-2 every rank holds full parameters: ``engine.module.state_dict()``;
- with stage 3 each rank holds 1/W of each parameter (``p.ds_tensor``; ``p`` itself is empty):
  ``deepspeed.zero.GatheredParameters(params)`` gathers them for the duration of a ``with``;
- from a checkpoint: ``engine.save_checkpoint(dir)`` writes each rank's partitions, and
  ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(dir)`` merges them
  into one fp32 state dict (the same as the ``zero_to_fp32.py`` script DeepSpeed puts in dir).
Both routes are checked equal to each other and to the baseline.

Explained in docs/deepspeed.md.

Run (torchrun, or DeepSpeed's own launcher):
    torchrun --nproc_per_node=2 -m labs.deepspeed_zero --config ds_zero3 --steps 20
    deepspeed --num_gpus 2 --no_local_rank --module labs.deepspeed_zero --config ds_zero2
    dtlab run deepspeed_zero --nproc 2 --config ds_zero3_offload
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dtlab import registry
from dtlab.measure import memory_meter as mem
from dtlab.measure.comm_counter import library_collectives
from dtlab.train.data import check_divisible
from dtlab.train.model import ToyGPT, loss_fn
from dtlab.train.settings import ADAMW_BETAS
from dtlab.errors import UsageError
from dtlab.harness import add_common_args, run_lab
from dtlab.train.loop import Strategy

CONFIG_DIR = Path(__file__).resolve().parents[1] / "launchers" / "configs"


def load_config(name_or_path: str) -> tuple[Path, dict]:
    """A config by name (``ds_zero2``) from launchers/configs/, or by path; clear errors."""
    path = Path(name_or_path)
    if not path.is_file():
        named = CONFIG_DIR / (name_or_path if name_or_path.endswith(".json")
                              else f"{name_or_path}.json")
        if not named.is_file():
            known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("ds_*.json")))
            raise UsageError(f"--config {name_or_path}: no such file; give a path or one of: "
                             f"{known}")
        path = named
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {path}: cannot read it ({e.__class__.__name__}); give a "
                         "DeepSpeed JSON config") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"--config {path}: not valid JSON at line {e.lineno} column {e.colno} "
                         f"({e.msg}); fix the file (JSON allows no comments or trailing commas)"
                         ) from None
    if not isinstance(cfg, dict):
        raise UsageError(f"--config {path}: expected a JSON object at the top level")
    zero = cfg.get("zero_optimization", {"stage": 0})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (0, 1, 2, 3):
        raise UsageError(f"--config {path}: zero_optimization.stage must be 0, 1, 2 or 3, "
                         f"got {stage!r}")
    for key in ("offload_optimizer", "offload_param"):
        dev = zero.get(key, {}).get("device", "none") if isinstance(zero.get(key, {}), dict) \
            else None
        if dev not in ("none", "cpu", "nvme"):
            raise UsageError(f"--config {path}: zero_optimization.{key}.device must be none, "
                             f"cpu or nvme, got {dev!r}")
    if zero.get("offload_param") and stage != 3:
        raise UsageError(f"--config {path}: offload_param needs zero_optimization.stage 3")
    for key in ("fp16", "bf16"):
        if not isinstance(cfg.get(key, {}), dict):
            raise UsageError(f"--config {path}: {key} must be an object such as "
                             f'{{"enabled": false}}, got {cfg[key]!r}')
    if cfg.get("fp16", {}).get("enabled") or cfg.get("bf16", {}).get("enabled"):
        raise UsageError(f"--config {path}: this lab compares fp32 training with the fp32 "
                         "baseline; remove fp16/bf16 (mixed precision: dtlab run amp --impl "
                         "deepspeed)")
    return path, cfg


class DeepSpeedZeRO(Strategy):
    name = "deepspeed_zero"

    def __init__(self, rt, settings, config_path: Path, config: dict):
        super().__init__(rt, settings)
        self.config_path, self.config = config_path, config
        zero = config.get("zero_optimization", {})
        self.stage = zero.get("stage", 0)
        off = [k.split("_")[1] for k in ("offload_optimizer", "offload_param")
               if zero.get(k, {}).get("device", "none") != "none"]
        self.variant = f"stage{self.stage}" + (f"-offload-{'+'.join(off)}" if off else "")

    def build(self) -> None:
        try:
            import deepspeed
        except ImportError:
            raise UsageError("this lab needs DeepSpeed: pip install -c constraints.txt "
                             "-e '.[deepspeed]'") from None
        if self.rt.distributed:
            deepspeed.init_distributed(dist_backend=self.rt.backend)  # reuses our process group
        s, cfg = self.settings, json.loads(json.dumps(self.config))
        micro = s.batch_size // self.rt.world_size
        wanted = {"train_batch_size": s.batch_size, "train_micro_batch_size_per_gpu": micro,
                  "gradient_accumulation_steps": 1}
        opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
        opt.setdefault("params", {})
        changed = [f"{k} {cfg.get(k)} -> {v}" for k, v in wanted.items()
                   if k in cfg and cfg[k] != v]
        if opt["params"].get("lr") not in (None, s.lr):
            changed.append(f"optimizer lr {opt['params']['lr']} -> {s.lr}")
        cfg.update(wanted)
        opt["params"].update(lr=s.lr, betas=list(ADAMW_BETAS), weight_decay=s.weight_decay)
        if changed:
            self.rt.log(f"{self.config_path.name}: set from the lab's flags: {'; '.join(changed)}")
        model = ToyGPT(s.model).to(self.rt.device)
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=cfg)
        self.extra.update(config=str(self.config_path), ds_config=cfg, stage=self.stage)

    def forward_backward(self, x, y):
        with library_collectives(self.comm), self.meter.measure(self.model.parameters()):
            loss = loss_fn(self.model(x), y)
            self.model.backward(loss)
        return loss.detach()

    def optimizer_step(self) -> None:
        with library_collectives(self.comm):
            self.model.step()

    # ---- getting the parameters back
    def full_state(self):
        import deepspeed
        module = self.model.module
        params = list(module.parameters())
        # Stage 3: gather every partition for the duration of the block (a collective).
        with deepspeed.zero.GatheredParameters(params, enabled=self.stage == 3):
            gathered = {n: p.detach().float().cpu().clone() for n, p in module.named_parameters()}
        self._check_checkpoint(gathered)
        return gathered if self.rt.is_main else None

    def _check_checkpoint(self, gathered: dict) -> None:
        """Save a ZeRO checkpoint (every rank writes its partitions), merge it into one fp32
        state dict on rank 0, and check it equals the gathered parameters."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        ckpt = Path(self.settings.out) / "ds_checkpoint"
        self.model.save_checkpoint(str(ckpt), tag="final")
        self.rt.barrier()
        if not self.rt.is_main:
            return
        if self.stage == 0:  # no partitions: the module's state dict is saved whole
            states = ckpt / "final" / "mp_rank_00_model_states.pt"
            merged = torch.load(states, map_location="cpu", weights_only=True)["module"]
        else:
            merged = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="final")
        diff = max((merged[n].float() - t).abs().max().item() for n, t in gathered.items())
        same_keys = set(merged) == set(gathered)
        self.extra["checkpoint_to_fp32"] = {
            "dir": str(ckpt), "tensors": len(merged), "same_names": same_keys,
            "max_abs_diff_vs_gathered": diff}
        self.checks_ok = same_keys and diff == 0.0

    def memory(self) -> dict:
        params = list(self.model.module.parameters())
        # Stage 3 keeps a partition in p.ds_tensor; p itself is an empty placeholder.
        held = [getattr(p, "ds_tensor", p) for p in params]
        opt = getattr(self.optimizer, "optimizer", self.optimizer)  # ZeRO wraps a torch optimizer
        flat = [t for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")
                for t in getattr(self.optimizer, name, [])]
        out = mem.snapshot(held, opt, self.meter, self.rt.device)
        out["fp32_partitions"] = mem.tensor_bytes(flat)  # ZeRO's own flat fp32 master copy
        return out

    def close(self) -> None:
        self.model.destroy() if hasattr(self.model, "destroy") else None
        super().close()


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labs.deepspeed_zero", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="ds_zero2",
                   help="a DeepSpeed JSON config: a path, or a name from launchers/configs/ "
                        "(ds_zero0..ds_zero3, ds_zero2_offload, ds_zero3_offload; default "
                        "ds_zero2)")
    # The deepspeed launcher passes --local_rank unless given --no_local_rank.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return add_common_args(p)


def check_args(args, settings, world: int) -> None:
    load_config(args.config)
    check_divisible(settings.batch_size, world)


def make_strategy(rt, settings, args) -> Strategy:
    return DeepSpeedZeRO(rt, settings, *load_config(args.config))


def main(argv=None) -> int:
    return run_lab(registry.get("deepspeed_zero"), make_parser(), make_strategy, argv,
                   check_args=check_args)


if __name__ == "__main__":
    sys.exit(main())
