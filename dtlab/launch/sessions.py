"""Processes a command starts, found and stopped as one job: what a timeout, a Ctrl-C or an error
in the caller must end, however the job's processes are arranged.

A process group is not enough here: torchrun starts every rank in a session of its own, and the
cluster's node agents run in theirs, so ``killpg`` on the command reaches neither. Each job's
environment carries a variable of its own (``DTLAB_JOB_<hex>=1``), which every process it starts
inherits; the job is every process whose ``/proc/PID/environ`` holds it. A job started inside
another (``dtlab bench hang`` runs ``dtlab run``) adds its own beside the outer one's, so the
outer job still finds every process.

    job = Job()
    proc = subprocess.Popen(argv, env=job.env(), start_new_session=True)
    ...
    job.stop()            # SIGTERM to all of them, SIGKILL to what is left after the grace
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

PREFIX = "DTLAB_JOB_"


class Terminated(Exception):
    """SIGTERM arrived while a job was running (``terminate_raises``)."""


class Job:
    def __init__(self):
        self.var = PREFIX + secrets.token_hex(8)
        self._mark = f"{self.var}=1".encode()

    def env(self, env: dict | None = None) -> dict:
        """``env`` (os.environ when None) with this job's variable."""
        return {**(os.environ if env is None else env), self.var: "1"}

    def pids(self) -> list[int]:
        """Every live process of this job (never this one)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:  # gone, or not ours to read
                continue
            if self._mark in environ.split(b"\0"):
                found.append(int(entry.name))
        return found

    def stop(self, grace: float = 5.0) -> list[int]:
        """SIGTERM to every process of the job, SIGKILL to those left after ``grace`` seconds;
        returns the pids it signalled. Zombies (ended, not yet reaped by their parent) count
        as ended."""
        hit = set()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            live = [p for p in self.pids() if not _zombie(p)]
            for pid in live:
                try:
                    os.kill(pid, sig)
                    hit.add(pid)
                except ProcessLookupError:
                    pass
            if sig == signal.SIGKILL or not live:
                break
            end = time.monotonic() + grace
            while time.monotonic() < end and any(not _zombie(p) for p in self.pids()):
                time.sleep(0.05)
        return sorted(hit)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def run(argv: list[str], timeout: float | None = None, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run`` whose timeout, Ctrl-C or error ends the whole job (every process it
    started, in whatever session), not only the direct child; raises TimeoutExpired after
    (with the output so far). Takes Popen's arguments and ``capture_output``."""
    job = Job()
    if kw.pop("capture_output", False):
        kw.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc = subprocess.Popen(argv, env=job.env(kw.pop("env", None)), start_new_session=True,
                            **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        job.stop()
        proc.kill()
        e.output, e.stderr = proc.communicate()
        raise
    except BaseException:
        job.stop()
        proc.kill()
        proc.communicate()
        raise
    # A command that ended by itself keeps what it started on purpose (``dtlab cluster up``
    # leaves the nodes' daemons running): only a timeout or an interruption ends the job.
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


class terminate_raises:
    """Within the block, SIGTERM raises ``Terminated`` (as Ctrl-C raises KeyboardInterrupt), so
    the caller's cleanup runs when it is stopped by ``kill``, Slurm or a test; the handler that
    was there before comes back after. A no-op outside the main thread."""

    def __enter__(self):
        self.before = None
        try:
            self.before = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread
            pass
        return self

    @staticmethod
    def _raise(signum, frame):
        raise Terminated("SIGTERM")

    def __exit__(self, *exc):
        if self.before is not None:
            signal.signal(signal.SIGTERM, self.before)
        return False
