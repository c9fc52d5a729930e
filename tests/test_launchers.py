"""DeepSpeed's and accelerate's launchers (launchers/deepspeed.sh, launchers/accelerate.sh) and
the accelerate lab: real multi-process runs equal to the baseline, and clear errors on bad
input."""
import json
import os
import subprocess

import pytest

from conftest import ROOT, free_port, run_lab


def launch(script, *args, env=None, timeout=300):
    e = dict(os.environ, MASTER_PORT=str(free_port()), **(env or {}))
    return subprocess.run([str(ROOT / "launchers" / script), *map(str, args)], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout)


def summary(out):
    return json.loads((out / "summary.json").read_text())


# ---- accelerate
@pytest.mark.parametrize("accum", [1, 2])
def test_accelerate_lab_equals_baseline(accum, tmp_path):
    pytest.importorskip("accelerate")
    p, s = run_lab("accelerate_lab", 2, tmp_path, "--steps", 4, "--accum", accum)
    assert p.returncode == 0, p.stderr[-2000:]
    assert s["ok"] is True and s["world_size"] == 2
    assert s["extra"]["distributed_type"].endswith("MULTI_CPU")
    assert s["extra"]["wrapped_as"] == "DistributedDataParallel"
    # DDP's all-reduce, once per optimizer step whatever the accumulation (no_sync inside)
    ops = s["comm"]["by_op"]
    assert ops["all_reduce"]["bytes"] == 4 * 4 * s["n_params"]


def test_accelerate_mixed_precision_flag(tmp_path):
    pytest.importorskip("accelerate")
    p, s = run_lab("accelerate_lab", 2, tmp_path / "bf16", "--steps", 4,
                   "--mixed-precision", "bf16")
    assert p.returncode == 0, p.stderr[-2000:]
    assert s["ok"] is True and s["dtype"] == "bf16"
    assert s["extra"]["matmul_dtype"] == "bfloat16"      # autocast really ran
    assert s["baseline"]["max_abs_param_diff"] > 1e-5    # and changed the numbers (within bf16's bound)
    if not __import__("torch").cuda.is_available():
        p, s = run_lab("accelerate_lab", 2, tmp_path / "fp16", "--steps", 4,
                       "--mixed-precision", "fp16")
        assert p.returncode == 0, p.stderr[-2000:]
        # accelerate 1.15 accepts fp16 on the CPU but does not autocast: fp32 throughout
        assert s["extra"]["matmul_dtype"] == "float32"
        assert s["baseline"]["max_rel_loss_diff"] < 1e-5


def test_accelerate_launcher_multi_cpu_starts_every_process(tmp_path):
    pytest.importorskip("accelerate")
    p = launch("accelerate.sh", "multi_cpu", "--steps", 3, "--out", tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    s = summary(tmp_path)
    assert s["world_size"] == 2 and s["ok"] is True


def test_accelerate_launcher_single_and_nproc(tmp_path):
    pytest.importorskip("accelerate")
    p = launch("accelerate.sh", "single", "--steps", 3, "--out", tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert summary(tmp_path)["world_size"] == 1


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU refusal")
@pytest.mark.parametrize("config", ["deepspeed", "fsdp", "multi_gpu"])
def test_accelerate_gpu_configs_refused_on_cpu(config):
    p = launch("accelerate.sh", config)
    assert p.returncode == 2 and "needs GPUs" in p.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU refusal")
def test_accelerate_zero_stage_on_cpu_explains(tmp_path):
    pytest.importorskip("accelerate")
    p, _ = run_lab("accelerate_lab", 2, tmp_path, "--zero-stage", "2")
    assert p.returncode == 2 and "only on accelerators" in p.stderr


def test_accelerate_bad_config_name():
    p = launch("accelerate.sh", "tpu_pod")
    assert p.returncode == 2 and "unknown config 'tpu_pod'" in p.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["multi_gpu", "deepspeed", "fsdp"])
def test_accelerate_plugins_on_gpu(config, tmp_path):
    p = launch("accelerate.sh", config, "--steps", 4, "--out", tmp_path,
               env={"NPROC": str(min(2, __import__("torch").cuda.device_count()))})
    assert p.returncode == 0, p.stderr[-3000:]
    assert summary(tmp_path)["ok"] is True


# ---- deepspeed
def test_deepspeed_launcher_on_this_machine(tmp_path):
    pytest.importorskip("deepspeed")
    p = launch("deepspeed.sh", "deepspeed_zero", "--config", "ds_zero2", "--steps", 3,
               "--out", tmp_path, env={"NUM_GPUS": "2"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    s = summary(tmp_path)
    assert s["world_size"] == 2 and s["ok"] is True


def test_deepspeed_launcher_hostfile_include(tmp_path):
    pytest.importorskip("deepspeed")
    hf = tmp_path / "hostfile"
    hf.write_text("localhost slots=2\n")
    # one slot of two; DeepSpeed checks ssh to the first host and asks it for its address
    # unless told not to / told the address
    p = launch("deepspeed.sh", "deepspeed_zero", "--steps", 3, "--out", tmp_path / "run",
               env={"HOSTFILE": str(hf), "INCLUDE": "localhost:1", "NO_SSH_CHECK": "1",
                    "MASTER_ADDR": "127.0.0.1"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert summary(tmp_path / "run")["world_size"] == 1


@pytest.mark.parametrize("env,message", [
    ({"HOSTFILE": "/nonexistent/hosts"}, "not found (DeepSpeed would silently run"),
    ({"HOSTFILE": "/etc/hostname", "INCLUDE": "a", "EXCLUDE": "b"}, "cannot be used together"),
    ({"INCLUDE": "a"}, "INCLUDE/EXCLUDE need a HOSTFILE"),
    ({"HOSTFILE": "/etc/hostname", "NO_SSH": "1"}, "NO_SSH=1 needs NODE_RANK"),
    ({"NUM_GPUS": "two"}, "NUM_GPUS must be a positive integer"),
])
def test_deepspeed_launcher_bad_input(env, message):
    p = launch("deepspeed.sh", "deepspeed_zero", env=env)
    assert p.returncode == 2 and message in p.stderr, p.stderr


# ---- hostile input never reaches ssh
HOSTILE = "-oProxyCommand=touch${IFS}pwned"


@pytest.mark.parametrize("case", ["hostfile", "include", "master_addr", "relative"])
def test_hostile_hostfile_through_deepspeed_launcher_creates_nothing(case, tmp_path):
    """DeepSpeed's runner runs `ssh <first host> hostname` for any hostfile: a host named like an
    ssh option would run a command. The launcher checks every name with the doctor's parser
    first: exit 2, one line, no file created."""
    hf = tmp_path / "hf"
    hf.write_text(f"{HOSTILE} slots=1\n" if case == "hostfile" else "worker-1 slots=1\n")
    env = {"HOSTFILE": str(hf), "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    if case == "include":
        env["INCLUDE"] = f"worker-1:0@{HOSTILE}"
    if case == "master_addr":
        env["MASTER_ADDR"] = "$(touch pwned)"
    if case == "relative":  # a relative HOSTFILE is checked, and passed, as the caller meant it
        hf.write_text(f"{HOSTILE} slots=1\n")
        env["HOSTFILE"] = "hf"
    p = subprocess.run([str(ROOT / "launchers" / "deepspeed.sh"), "deepspeed_zero"],
                       cwd=tmp_path, env=dict(os.environ, **env), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dtlab: error: ") and "refused" in lines[0]
    assert not (tmp_path / "pwned").exists() and not (ROOT / "pwned").exists()


def test_hostile_accelerate_config_refused(tmp_path):
    pytest.importorskip("accelerate")
    hf = tmp_path / "hostfile"
    hf.write_text(f"{HOSTILE} slots=1\n")
    cfg = tmp_path / "ds.yaml"
    cfg.write_text("distributed_type: DEEPSPEED\nnum_machines: 2\nnum_processes: 2\n"
                   f"machine_rank: 0\nmain_process_ip: worker-1\ndeepspeed_config:\n"
                   f"  zero_stage: 2\n  deepspeed_hostfile: {hf}\n")
    p = launch("accelerate.sh", str(cfg), "--steps", 2)
    assert p.returncode == 2 and "deepspeed_hostfile" in p.stderr and "refused" in p.stderr
    cfg.write_text("distributed_type: MULTI_CPU\nnum_machines: 2\nnum_processes: 2\n"
                   "machine_rank: 0\nmain_process_ip: '$(touch pwned)'\n")
    p = launch("accelerate.sh", str(cfg), "--steps", 2)
    assert p.returncode == 2 and "main_process_ip" in p.stderr
    assert not (tmp_path / "pwned").exists() and not (ROOT / "pwned").exists()


def test_bare_python_is_resolved_to_its_path(tmp_path):
    """With the environment activated and PYTHON=python3 (no .venv path), the DeepSpeed launcher
    is looked up beside the resolved interpreter: the script gets past that check to the
    hostfile check."""
    import sys
    hf = tmp_path / "hf"
    hf.write_text(f"{HOSTILE} slots=1\n")
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, PYTHON="python3", HOSTFILE=str(hf),
               PATH=f"{bindir}:{os.environ['PATH']}")
    p = subprocess.run([str(ROOT / "launchers" / "deepspeed.sh"), "deepspeed_zero"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "no deepspeed launcher" not in p.stderr, p.stderr
    assert "refused" in p.stderr


def test_deepspeed_launcher_refuses_lab_flags_a_remote_shell_would_run(tmp_path):
    """With a hostfile, DeepSpeed writes the lab's flags into the command pdsh runs on every
    node, quoting only those with a space (and a shell expands $ and ` inside the quotes): the
    launcher refuses such a flag before it runs DeepSpeed. A fake `deepspeed` beside PYTHON
    writes a marker if it is ever started."""
    import sys
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    marker = tmp_path / "deepspeed-was-run"
    (bindir / "deepspeed").write_text(f"#!/bin/sh\ntouch {marker}\n")
    for f in ("python", "deepspeed"):
        (bindir / f).chmod(0o755)
    hf = tmp_path / "hosts"
    hf.write_text("worker-1 slots=1\nworker-2 slots=1\n")
    env = {"PYTHON": str(bindir / "python"), "HOSTFILE": str(hf)}
    for flags, says in [
            (["--out", "runs/x;id"], "lab flag --out 'runs/x;id' refused: character 7 is ';'"),
            (["--out=runs/$(id)"], "lab flag --out 'runs/$(id)' refused: character 6 is '$'"),
            (["--out", "runs/`id`"], "lab flag --out 'runs/`id`' refused: character 6 is '`'"),
            (["--steps", "3", "--out", "a b"], "lab flag --out 'a b' refused: character 2 is ' '")]:
        p = launch("deepspeed.sh", "deepspeed_zero", *flags, env=env, timeout=120)
        assert p.returncode == 2 and p.stderr.startswith("dtlab: error: ") and \
            says in p.stderr, p.stdout + p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and not marker.exists()
    # without a hostfile DeepSpeed starts the ranks from an argument list: the flag is launched
    p = launch("deepspeed.sh", "deepspeed_zero", "--out", "runs/x;id",
               env={"PYTHON": str(bindir / "python")}, timeout=120)
    assert p.returncode == 0 and marker.exists(), p.stderr
