"""Bad input fails fast: exit status 2 and one line naming the input and the fix, no traceback.

Fuzzed with hypothesis: the checks `dtlab run` makes before it starts any process (every lab's
flags, presets, world size against the lab's layout, batch divisibility, checkpoint and fault
flags), DeepSpeed JSON configs and accelerate YAML configs. The contract asserted for every
generated input: either it is accepted, or the answer is SystemExit(2) with one `dtlab: error:`
line (or argparse's usage + error lines); any other exception is a bug. A few real subprocess
runs check the same from the outside.
"""
import contextlib
import io
import json
import string
import subprocess

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings, strategies as st

from conftest import ROOT, dtlab
from dtlab import registry
from dtlab.errors import UsageError, fail
from dtlab.launch import launcher as launch
from dtlab.doctor.config_check import ConfigError, check_accelerate_config
from labs.deepspeed_zero import load_config

LABS = [name for name, lab in registry.LABS.items() if not lab.missing() and not lab.gpu_only]
FLAGS = ["--steps", "--preset", "--batch-size", "--lr", "--seed", "--timeout", "--stage",
         "--offload", "--impl", "--dp", "--pp", "--tp", "--schedule", "--microbatches",
         "--ckpt-dir", "--ckpt-every", "--ckpt-keep", "--fail-at-step", "--fail-rank",
         "--fail-in", "--stall-at-step", "--stall-rank", "--accum", "--bucket-mb", "--config",
         "--mixed-precision", "--data", "--algo", "--bogus"]
VALUES = ["0", "1", "2", "3", "-1", "7", "1e9", "nan", "abc", "", "tiny", "small", "gpt2-124m",
          "huge", "own", "torch", "none", "param", "optimizer", "1f1b", "gpipe", "checkpoint",
          "step", "0.5", "/nonexistent/file", "ds_zero2", "ds_zero9", "fp16", "bf16",
          # numeric extremes and odd paths
          "inf", "-inf", "1e308", "-0", "4.9e-324", "9" * 30, "0x10", "1_000",
          "/tmp/dtlab-ünïcode-路径", "/tmp/with space", "/dev/null", "/"]
token = st.one_of(st.sampled_from(FLAGS), st.sampled_from(VALUES),
                  st.text(string.ascii_letters + string.digits + string.punctuation + " ", max_size=8))


def _outcome(fn) -> tuple[str, str]:
    """('ok'|'exit2', stderr) for fn(); any other exception propagates and fails the test."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            fn()
        except SystemExit as e:
            assert e.code == 2, f"exit status {e.code}, stderr {err.getvalue()!r}"
            return "exit2", err.getvalue()
    return "ok", err.getvalue()


def _validate(lab: str, nproc: int, argv: list[str]) -> None:
    """What `dtlab run` does before it starts anything: the checks, bad input as exit 2."""
    try:
        launch.validate(registry.LABS[lab], nproc, argv)
    except UsageError as e:
        fail(str(e))


def _assert_one_line_error(text: str) -> None:
    lines = text.strip().split("\n")  # only newlines: a generated argument may hold a \r
    assert "Traceback" not in text
    if lines and lines[0].startswith("usage:"):  # argparse: usage, then `prog: error: ...`
        assert ": error: " in lines[-1], text
    else:
        assert len(lines) == 1 and lines[0].startswith("dtlab: error: ") and len(lines[0]) > 30, \
            text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lab=st.sampled_from(LABS), nproc=st.integers(-2, 9), argv=st.lists(token, max_size=6))
def test_run_checks_before_launch(lab, nproc, argv):
    """Everything `dtlab run LAB --nproc N ARGS` checks before it starts a process."""
    kind, err = _outcome(lambda: _validate(lab, nproc, argv))
    if kind == "exit2":
        _assert_one_line_error(err)


@pytest.mark.parametrize("lab,nproc,argv,says", [
    ("ddp", 3, [], "--batch-size 16 is not divisible by the data-parallel world size 3"),
    ("tensor_parallel", 3, [], "3"),
    ("parallel3d", 8, ["--dp", "1", "--pp", "2", "--tp", "2"], "world size 8 != dp x pp x tp"),
    ("ddp", 2, ["--preset", "huge"], "--preset"),
    ("ddp", 2, ["--steps", "0"], "--steps must be >= 1"),
    ("zero", 1, [], "runs on >=2 process(es), not 1"),
    ("zero", 2, ["--stage", "1", "--offload", "param"], "--offload param"),
    ("ddp", 2, ["--ckpt-every", "0", "--ckpt-dir", "x"], "--ckpt-every must be >= 1"),
    ("ddp", 2, ["--timeout", "1e300"], "--timeout must be in (0, 604800] seconds"),
    ("ddp", 2, ["--batch-size", "200000", "--preset", "small"], "needs about"),
    ("ddp", 2, ["--allreduce", "shm"], "--allreduce belong to --impl own"),
    # checkpoint and fault flags (tests/test_reliability.py runs one through the real CLI)
    ("torch_multiprocessing", 1, ["--ckpt-dir", "x"],
     "--ckpt-dir: lab 'torch_multiprocessing' cannot checkpoint: its workers are started"),
    ("zero", 2, ["--impl", "fairscale-oss", "--ckpt-dir", "x"], "--ckpt-dir works with --impl own"),
    ("ddp", 2, ["--fail-at-step", "9", "--steps", "4"], "--fail-at-step must be in 0..3"),
    ("ddp", 2, ["--stall-at-step", "1", "--stall-rank", "2"],
     "--stall-rank must be in 0..1 for 2 process(es), got 2"),
    ("ddp", 2, ["--fail-at-step", "1", "--fail-in", "checkpoint"],
     "--fail-in checkpoint needs --ckpt-dir"),
])
def test_named_bad_inputs(lab, nproc, argv, says):
    kind, err = _outcome(lambda: _validate(lab, nproc, argv))
    assert kind == "exit2" and says in err, err
    _assert_one_line_error(err)


# ---- DeepSpeed JSON configs

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2, 5), st.floats(allow_nan=False),
                      st.sampled_from(["cpu", "none", "nvme", "gpu", "", "auto"]))
ds_keys = st.sampled_from(["zero_optimization", "stage", "offload_optimizer", "offload_param",
                           "device", "fp16", "bf16", "enabled", "train_batch_size", "x"])
json_value = st.recursive(json_leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=3), st.dictionaries(ds_keys, kids, max_size=4)), max_leaves=12)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=json_value)
def test_deepspeed_config_fuzz(tmp_path, cfg):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(cfg))
    try:
        path, loaded = load_config(str(f))
    except UsageError as e:
        assert str(e).startswith(f"--config {f}: ") and "\n" not in str(e)
        return
    assert loaded == cfg  # accepted only when every checked key is sound
    zero = cfg.get("zero_optimization", {"stage": 0})
    assert zero.get("stage", 0) in (0, 1, 2, 3)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=64))
@example(raw=b"{}")
@example(raw=b'{"zero_optimization": {"stage": 2}}')
def test_deepspeed_config_garbage_bytes(tmp_path, raw):
    f = tmp_path / "ds.json"
    f.write_bytes(raw)
    try:
        path, loaded = load_config(str(f))
    except UsageError as e:
        assert str(e).startswith(f"--config {f}: ") and "\n" not in str(e)
        return
    # accepted: the bytes were a JSON object, and the config is exactly what they say
    assert path == f and isinstance(loaded, dict) and loaded == json.loads(raw)


# ---- accelerate YAML configs

acc_keys = st.sampled_from(["distributed_type", "num_processes", "num_machines", "machine_rank",
                            "mixed_precision", "deepspeed_config", "zero_stage", "fsdp_config",
                            "use_cpu"])
acc_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2, 9),
                     st.sampled_from(["MULTI_GPU", "MULTI_CPU", "DEEPSPEED", "FSDP", "NO", "GPU",
                                      "no", "fp16", "bf16", "fp32", ""]))
acc_value = st.recursive(acc_leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=3), st.dictionaries(acc_keys, kids, max_size=5)), max_leaves=12)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=acc_value)
def test_accelerate_config_fuzz(tmp_path, cfg):
    f = tmp_path / "acc.yaml"
    f.write_text(yaml.safe_dump(cfg))
    try:
        loaded = check_accelerate_config(f)
    except ConfigError as e:
        assert str(e).startswith(f"{f}: ") and "\n" not in str(e)
        return
    assert isinstance(loaded, dict) and loaded.get("num_processes", 1) >= 1


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=64))
@example(raw=b"num_processes: 2\n")
@example(raw=b"{}")
def test_accelerate_config_garbage_bytes(tmp_path, raw):
    f = tmp_path / "acc.yaml"
    f.write_bytes(raw)
    try:
        loaded = check_accelerate_config(f)
    except ConfigError as e:
        assert str(e).startswith(f"{f}: ") and "\n" not in str(e)
        return
    # accepted: the bytes were a YAML mapping of sound settings, returned as they say
    assert loaded == yaml.safe_load(raw.decode()) and loaded.get("num_processes", 1) >= 1


def test_shipped_accelerate_configs_pass():
    files = sorted((ROOT / "launchers/configs").glob("accelerate_*.yaml"))
    assert len(files) == 5
    for f in files:
        assert check_accelerate_config(f)["num_processes"] >= 1


# ---- from the outside: real processes

# (an unknown lab, a world size the batch does not divide and an unknown preset, from the
# outside: tests/test_cli.py::test_bad_input_is_one_line_exit_2, with the whole message)
@pytest.mark.parametrize("args,says", [
    (("run", "deepspeed_zero", "--nproc", "2", "--config", "ds_zero9"),
     ("--config ds_zero9: no such file", "ds_zero3_offload")),  # and names the known configs
    (("run", "ddp", "--nproc", "2", "--max-restarts", "-1"), ("--max-restarts must be >= 0",)),
    (("memory", "--params", "lots"), ("--params",)),
    (("bench", "comm", "--sizes", "lots"), ("lots",)),
])
def test_cli_bad_input_exit_2_one_line(args, says):
    p = dtlab(*args, timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    _assert_one_line_error(p.stderr)
    assert all(part in p.stderr for part in says), p.stderr


def test_accelerate_launcher_checks_its_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("distributed_type: MULTI_GPU\nnum_processes: 0\n")
    p = subprocess.run(["bash", "launchers/accelerate.sh", str(bad)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.strip() == f"dtlab: error: {bad}: num_processes must be a positive " \
                               "integer, got 0"


# ---- files a user hands in: --data, .deepspeed_env, hostfiles

@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=200),
                     st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_data_file_fuzz(tmp_path, raw):
    """Any bytes as --data (binary, unicode, too short, thousands of distinct characters):
    a run's settings, or one line naming the file and the fix."""
    import argparse

    from dtlab.train.settings import add_common_args, settings_from_args
    f = tmp_path / "données.txt"
    f.write_bytes(raw)
    for preset in ("tiny", "gpt2-124m"):
        args = add_common_args(argparse.ArgumentParser()).parse_args(
            ["--data", str(f), "--preset", preset])
        kind, err = _outcome(lambda: _settings_or_fail(settings_from_args, args))
        if kind == "exit2":
            _assert_one_line_error(err)
            assert str(f) in err


def _settings_or_fail(fn, args):
    try:
        fn(args)
    except UsageError as e:
        fail(str(e))


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=120), st.lists(st.sampled_from(
    ["A=1", "B=x y", 'C="q"', "D=$(id)", "E=`id`", "F=a\\b", "", "# c", "=", "1X=2",
     "PATH=/usr/bin:$PATH", "G=ü", "H=a\x00b"]), max_size=5).map(
        lambda ls: "\n".join(ls).encode("utf-8"))))
def test_deepspeed_env_fuzz(tmp_path, raw):
    """Any .deepspeed_env: the doctor reports on it, never crashes; a value the remote shell
    would expand is an error."""
    import argparse

    from dtlab.doctor import diagnose as doctor
    (tmp_path / ".deepspeed_env").write_bytes(raw)
    args = doctor.add_arguments(argparse.ArgumentParser()).parse_args(["--cwd", str(tmp_path)])
    d = doctor.Doctor(args)
    d.cwd = str(tmp_path)
    d.check_deepspeed_env()
    d.check_exports()
    errors = [f.message for f in d.findings if f.severity == "error"]
    text = raw.decode("utf-8", "replace")
    if any(c in v for line in text.splitlines() if "=" in line
           for v in [line.split("=", 1)[1]] for c in ('"', "$", "`", "\\")):
        assert errors


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=80), st.text(max_size=80).map(str.encode)))
def test_hostfile_check_fuzz(tmp_path, raw):
    """The check every launcher runs: any hostfile bytes give accepted or one error line."""
    from dtlab.doctor import hostfile
    f = tmp_path / "hostfile"
    f.write_bytes(raw)
    problem = hostfile.check(str(f))
    assert problem is None or ("\n" not in problem and len(problem) > 10)


@pytest.mark.parametrize("flag", ["--lr", "--timeout"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_not_a_number_is_refused(flag, value):
    kind, err = _outcome(lambda: _validate("ddp", 2, [f"{flag}={value}"]))
    assert kind == "exit2" and "invalid finite number value" in err, err


def test_data_with_more_characters_than_the_vocabulary(tmp_path):
    f = tmp_path / "wide.txt"
    f.write_text("".join(chr(0x20000 + i) for i in range(51000)) * 2, encoding="utf-8")
    kind, err = _outcome(lambda: _validate("ddp", 2, ["--data", str(f), "--preset",
                                                       "gpt2-124m"]))
    assert kind == "exit2" and "vocab_size 50257 < data vocabulary 51000" in err, err
    _assert_one_line_error(err)


def test_gpu_check_refuses_a_runs_folder_with_old_runs_in_it(tmp_path):
    """The GPU check's record lists every log in its runs folder: one left by an earlier check
    would be reported as this one's, so a folder that is not empty is refused before anything
    runs (and without RUNS it makes a new one with mktemp -d)."""
    (tmp_path / "ddp-nccl.log").write_text("an old run\n")
    p = subprocess.run(["bash", str(ROOT / "tests/gpu/check.sh")], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path,
                       env={"PATH": "/usr/bin:/bin", "RUNS": str(tmp_path),
                            "OUT": str(tmp_path / "out")})
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"RUNS={tmp_path} is not empty; give an empty or new folder" in p.stderr
    assert not (tmp_path / "out").exists()
