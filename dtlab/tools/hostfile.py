"""DeepSpeed hostfiles and ``--include``/``--exclude``, parsed the way DeepSpeed 0.19.8 parses them
(deepspeed/launcher/runner.py), but with every problem reported with its line and a fix, and
with warnings for what DeepSpeed accepts without a word.

What DeepSpeed does, and what this module reports:
- each line is stripped; empty lines and lines starting with ``#`` are skipped;
- any other line must match ``^(\\S+)\\s+slots=(\\d+)``; text after the digits is ignored, so
  ``host slots=4 # gpu box`` passes (warned here) and ``slots=0`` is accepted (warned here);
- a host twice, or no host at all, is an error; host order is node rank order;
- a missing hostfile is *not* an error for DeepSpeed: it prints "Unable to find hostfile, will
  proceed with training with local resources only" and trains on one machine (an error here);
- ``--include``/``--exclude`` take ``NAME[:SLOT[,SLOT...]][@NAME...]``, not both at once; an
  unknown host or a slot the host does not have is an error; a name without slots means every
  slot in 0.19.8 (older releases dropped such a host, DeepSpeed issue 6671: warned here).
Host names are also checked for safety: a name starting with ``-`` or holding shell characters
is refused, so it can never reach ssh as an option (``-oProxyCommand=...``) or a command.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

DS_LINE = re.compile(r"^(\S+)\s+slots=(\d+)")
SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


@dataclass
class Finding:
    check: str
    severity: str            # ok | info | warn | error
    message: str
    fix: str = ""
    line: int | None = None
    host: str | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "")}


@dataclass
class Hostfile:
    path: str
    hosts: "OrderedDict[str, int]" = field(default_factory=OrderedDict)
    line_of: dict = field(default_factory=dict)
    findings: list = field(default_factory=list)

    def add(self, severity: str, message: str, fix: str = "", line: int | None = None,
            host: str | None = None) -> None:
        self.findings.append(Finding("hostfile", severity, message, fix, line, host))

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)


def safe_name(name: str) -> bool:
    return bool(SAFE_NAME.match(name))


def parse(text: str, path: str = "hostfile") -> Hostfile:
    hf = Hostfile(path)
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = DS_LINE.search(line)
        where = f"{path}:{number}"
        if not m:
            hint = ""
            if re.search(r"slots\s*[:=]\s*\d+", line):
                hint = " (write `slots=N` with no spaces or colon)"
            elif len(line.split()) == 1:
                hint = " (the slot count is missing)"
            hf.add("error", f"{where}: '{line}' is not `HOST slots=N`{hint}; DeepSpeed stops "
                   "with 'Hostfile contains a bad entry'",
                   "one host per line, e.g. `worker-1 slots=8`", number)
            continue
        host, slots = m.group(1), int(m.group(2))
        if not safe_name(host):
            hf.add("error", f"{where}: host name '{host}' refused: it starts with '-' or holds "
                   "characters a shell or ssh would interpret", "use a plain host name or address",
                   number, None)
            continue
        rest = line[m.end():].strip()
        if rest:
            hf.add("warn", f"{where}: DeepSpeed ignores the text after the slot count: '{rest}'",
                   "put comments on lines of their own starting with #", number, host)
        if host in hf.hosts:
            hf.add("error", f"{where}: host '{host}' already on line {hf.line_of[host]}; DeepSpeed "
                   "refuses the file ('multiple entries')", "list every host once", number, host)
            continue
        if slots == 0:
            hf.add("warn", f"{where}: '{host}' has slots=0: DeepSpeed accepts it but starts no "
                   "process there", "give the number of GPUs to use, or remove the line",
                   number, host)
        hf.hosts[host] = slots
        hf.line_of[host] = number
    if not hf.hosts and hf.ok:
        hf.add("error", f"{path}: no hosts; DeepSpeed stops with 'Hostfile is empty or not "
               "formatted correctly'", "add lines like `worker-1 slots=8`")
    return hf


def load(path: str | Path) -> Hostfile:
    p = Path(path)
    if not p.is_file():
        hf = Hostfile(str(path))
        hf.add("error", f"{path}: not found. DeepSpeed would not stop: it prints 'Unable to find "
               "hostfile, will proceed with training with local resources only' and trains on "
               "this machine alone", "give the right path (DeepSpeed's default is /job/hostfile)")
        return hf
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        hf = Hostfile(str(path))
        hf.add("error", f"{path}: cannot be read ({e})", "make it a readable text file")
        return hf
    return parse(text, str(path))


def parse_filter(spec: str, flag: str) -> tuple["OrderedDict[str, list[int]]", list[str]]:
    """``NAME[:SLOT[,SLOT]]@NAME...`` -> {name: [slots]} and the errors found."""
    out: OrderedDict[str, list[int]] = OrderedDict()
    errors = []
    for part in spec.split("@"):
        if not part:
            errors.append(f"{flag} '{spec}': empty host between '@' separators")
            continue
        name, _, slots = part.partition(":")
        if not safe_name(name):
            errors.append(f"{flag} '{spec}': host name '{name}' refused (leading '-' or shell "
                          "characters)")
            continue
        try:  # a repeated name adds its slots, sorted and unique, as DeepSpeed merges them
            new = [int(s) for s in slots.split(",")] if slots else []
        except ValueError:
            errors.append(f"{flag} '{spec}': slots of '{name}' must be integers like {name}:0,1")
            continue
        out[name] = sorted(set(out.get(name, []) + new))
    return out, errors


def resolve(hf: Hostfile, include: str = "", exclude: str = "") -> "OrderedDict[str, list[int]]":
    """The hosts and slots DeepSpeed will use; problems are added to ``hf.findings``."""
    pool = OrderedDict((h, list(range(n))) for h, n in hf.hosts.items())
    if include and exclude:
        hf.findings.append(Finding("include/exclude", "error", "--include and --exclude cannot be "
                                   "combined (DeepSpeed: 'mutually exclusive')",
                                   "keep one of them"))
        return pool
    if not (include or exclude):
        return pool
    flag, spec = ("--include", include) if include else ("--exclude", exclude)
    wanted, errors = parse_filter(spec, flag)
    for e in errors:
        hf.findings.append(Finding("include/exclude", "error", e, "see `deepspeed --help`"))
    chosen: OrderedDict[str, list[int]] = OrderedDict() if include else \
        OrderedDict((h, list(s)) for h, s in pool.items())
    for name, slots in wanted.items():
        if name not in pool:
            hf.findings.append(Finding("include/exclude", "error", f"{flag}: host '{name}' is "
                                       f"not in {hf.path}", "use a host of the hostfile",
                                       host=name))
            continue
        bad = [s for s in slots if s not in pool[name]]
        if bad:
            hf.findings.append(Finding(
                "include/exclude", "error", f"{flag}: '{name}' has slots 0..{len(pool[name]) - 1}"
                f", not {', '.join(map(str, bad))}", f"use slots below {len(pool[name])}",
                host=name))
            continue
        if not slots and include:
            hf.findings.append(Finding(
                "include/exclude", "warn", f"--include '{name}' without slots means all of its "
                f"slots in DeepSpeed 0.19.8, but older releases dropped such a host (issue 6671)",
                f"write them out: {name}:{','.join(map(str, pool[name]))}", host=name))
        if include:
            chosen[name] = slots or list(pool[name])
        else:
            chosen[name] = [] if not slots else [s for s in chosen[name] if s not in slots]
    return OrderedDict((h, chosen[h]) for h in pool if chosen.get(h))
