"""What the record tools share: the machine a record was made on, their common flags, and the
marked tables of docs/ they fill in."""
from __future__ import annotations

import argparse
import os
import platform
import re
import socket
from importlib import metadata
from pathlib import Path

from dtlab.measure.run_record import atomic_write_text


def machine() -> dict:
    """The machine and software a record was made with (no heavy imports: versions from the
    installed distributions)."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = None
    versions = {}
    for dist in ("torch", "deepspeed", "accelerate", "fairscale", "matplotlib", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(),
            "memory_gib": None if mem is None else round(mem, 1), "os": platform.platform(),
            "python": platform.python_version(), **versions}


def fill_marked_tables(docs: Path, pages, tag: str, blocks: dict[str, str]) -> list[str]:
    """Write every ``blocks[name]`` between ``<!-- TAG:name -->`` and ``<!-- /TAG:name -->`` in
    the pages under ``docs``; returns the pages that changed. How recorded figures reach the
    docs (``python -m dtlab.docsgen.records.long_sequences``, ``schedexp``) without hand copying."""
    changed = []
    for page in pages:
        path = Path(docs) / page
        text = new = path.read_text()
        for name, body in blocks.items():
            new = re.sub(rf"<!-- {tag}:{name} -->\n.*?<!-- /{tag}:{name} -->",
                         lambda _m: f"<!-- {tag}:{name} -->\n{body}\n<!-- /{tag}:{name} -->",
                         new, flags=re.S)
        if new != text:
            atomic_write_text(path, new)
            changed.append(page)
    return changed


def record_tool_parser(prog: str, description: str):
    """The flags every record tool shares (``python -m dtlab.docsgen.records.schedule_runs``, ``commexp``):
    where the record goes, the pictures, the docs to write, and redrawing from a record."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--json", required=True, help="where to write the record")
    p.add_argument("--img", default=None, help="folder for the pictures")
    p.add_argument("--docs", default=None, help="docs folder whose tables to write")
    p.add_argument("--redraw", action="store_true",
                   help="only write the tables again from --json")
    return p
