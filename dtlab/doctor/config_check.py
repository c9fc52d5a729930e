"""Check an accelerate config file before `accelerate launch` reads it.

    python -m dtlab.doctor.config_check accelerate launchers/configs/accelerate_multi_cpu.yaml

accelerate answers a malformed config with a Python traceback from deep inside its launcher (or,
worse, starts a different number of processes than meant). launchers/accelerate.sh runs this check
first: exit status 2 and one line naming the key and the fix, or 0 and nothing.
(DeepSpeed JSON configs are checked by ``labs.deepspeed_zero.load_config``.)
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

from dtlab.errors import UsageError
from dtlab.doctor.hostfile import check as check_hosts
from dtlab.doctor.hostfile import why_unsafe

DISTRIBUTED_TYPES = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_XPU", "DEEPSPEED", "FSDP",
                     "XLA", "MEGATRON_LM")
MIXED_PRECISION = ("no", "fp16", "bf16", "fp8")


class ConfigError(UsageError):
    """A config that cannot work; the message names the file, the key and the fix."""


def _positive_int(cfg: dict, key: str, path: Path, default: int = 1) -> int:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{path}: {key} must be a positive integer, got {v!r}")
    return v


def _one_of(cfg: dict, key: str, allowed: tuple, default, path: Path, hint: str = ""):
    v = cfg.get(key, default)
    if v not in allowed:
        raise ConfigError(f"{path}: {key} must be one of {', '.join(allowed)}, got {v!r}{hint}")
    return v


def check_accelerate_config(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it ({e.__class__.__name__}); give a YAML file "
                          "written by `accelerate config` or one of launchers/configs/") from None
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}; fix the file") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a mapping of accelerate settings at the top level, "
                          f"got {type(cfg).__name__}")
    dt = _one_of(cfg, "distributed_type", DISTRIBUTED_TYPES, "NO", path)
    nproc = _positive_int(cfg, "num_processes", path)
    machines = _positive_int(cfg, "num_machines", path)
    rank = cfg.get("machine_rank", 0)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < machines:
        raise ConfigError(f"{path}: machine_rank must be in 0..{machines - 1} "
                          f"(num_machines {machines}), got {rank!r}")
    if nproc < machines:
        raise ConfigError(f"{path}: num_processes ({nproc}) counts all machines' processes and "
                          f"cannot be below num_machines ({machines})")
    _one_of(cfg, "mixed_precision", MIXED_PRECISION, "no", path,
            " (quote 'no': a bare no is YAML's false)")
    if dt == "DEEPSPEED":
        ds = cfg.get("deepspeed_config")
        if not isinstance(ds, dict):
            raise ConfigError(f"{path}: distributed_type DEEPSPEED needs a deepspeed_config "
                              "mapping (zero_stage, offload_optimizer_device, ...)")
        if ds.get("zero_stage", 0) not in (0, 1, 2, 3):
            raise ConfigError(f"{path}: deepspeed_config.zero_stage must be 0, 1, 2 or 3, got "
                              f"{ds.get('zero_stage')!r}")
    if dt == "FSDP" and not isinstance(cfg.get("fsdp_config", {}), dict):
        raise ConfigError(f"{path}: fsdp_config must be a mapping")
    # what accelerate hands to ssh, pdsh or DeepSpeed's launcher is checked like a hostfile
    ip = cfg.get("main_process_ip")
    if ip is not None and (why := why_unsafe(str(ip))):
        raise ConfigError(f"{path}: main_process_ip {ip!r} refused: {why}")
    hostfile = (cfg.get("deepspeed_config") or {}).get("deepspeed_hostfile") \
        if isinstance(cfg.get("deepspeed_config"), dict) else None
    if hostfile and machines > 1 and (problem := check_hosts(str(hostfile))):
        raise ConfigError(f"{path}: deepspeed_config.deepspeed_hostfile: {problem}")
    return cfg


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "accelerate":
        print("usage: python -m dtlab.doctor.config_check accelerate FILE.yaml", file=sys.stderr)
        return 2
    try:
        check_accelerate_config(argv[1])
    except ConfigError as e:
        print(f"dtlab: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
