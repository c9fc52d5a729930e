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

import argparse
import ipaddress
import re
import sys
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

DS_LINE = re.compile(r"^(\S+)\s+slots=(\d+)")
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")  # always used with fullmatch
MAX_SLOTS = 4096  # more processes than any one machine runs: a typo, and a list that size


def lines_as_deepspeed_reads_them(text: str) -> list[str]:
    """DeepSpeed reads a hostfile with ``readlines()`` in text mode: lines end at ``\n``,
    ``\r\n`` or ``\r`` and nowhere else (``str.splitlines`` would also split at form feeds,
    ``\x85``, ``\u2028`` and more, seeing hosts DeepSpeed does not)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


USER = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")  # a POSIX login name


def split_user(name: str) -> tuple[str | None, str]:
    """'alice@w1' -> ('alice', 'w1'): pdsh and ssh take a user before the host."""
    user, at, host = name.rpartition("@")
    return (user, host) if at else (None, name)


def is_address(host: str) -> bool:
    """A numeric IPv4 or IPv6 address (an IPv6 one with an optional zone: fe80::1%eth0)."""
    addr, _, zone = host.partition("%")
    try:
        ipaddress.ip_address(addr)
    except ValueError:
        return False
    return not zone or (":" in addr and bool(re.fullmatch(r"[A-Za-z0-9_.-]+", zone)))


def why_unsafe(name: str) -> str | None:
    """None for a name that is safe to hand to ssh and pdsh (a host name, ``user@host``, an IPv4
    or IPv6 address), else which character is wrong and why, with its code point and column."""
    if not name:
        return "it is empty"
    user, host = split_user(name)
    if user is not None:
        if not USER.fullmatch(user):
            return f"the user {user!r} before '@' is not a login name (letters, digits, _ . -)"
        return why_unsafe(host)
    if is_address(name):
        return None
    if name.startswith("-"):
        return ("it starts with '-', so ssh would read it as an option (as in "
                "-oProxyCommand=...)")
    if SAFE_NAME.fullmatch(name):
        return None
    col, ch = next((i, c) for i, c in enumerate(name, 1)
                   if not re.fullmatch(r"[A-Za-z0-9._-]", c) or (i == 1 and c in ".-"))
    label = unicodedata.name(ch, "a control character" if ord(ch) < 32 or ord(ch) == 127
                             else "unnamed")
    how = ""
    if ch in "\ufeff\u200b\u200c\u200d\u00a0" or unicodedata.category(ch) in ("Cf", "Zs"):
        how = "; an invisible character, usually pasted from a web page, chat or word processor"
    elif ord(ch) < 32 or ord(ch) == 127:
        how = "; a control character, usually from a file edited on another system"
    elif ch in "$`;|&<>()'\"\\*?![]{}~#" or ch.isspace():
        how = "; a shell would interpret it"
    return f"character {col} is U+{ord(ch):04X} {label} {ch!r}{how}"


# DeepSpeed's pdsh runner writes the working folder, its python, --master_addr and (quoted only
# when they hold a space) the script's flags into the one command string every node's shell
# runs; these characters are the ones its own exports leave unquoted (add_export)
REMOTE_WORD = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")  # always used with fullmatch
REMOTE_FIX = "use only letters, digits and _ @ % + = : , . / -"


def why_unsafe_word(value: str) -> str | None:
    """None for a value a remote shell reads as one word, as written; else what is wrong."""
    if not value:
        return "it is empty, and an empty word vanishes from the remote command"
    col, ch = next(((i, c) for i, c in enumerate(value, 1) if not REMOTE_WORD.fullmatch(c)),
                   (0, ""))
    return f"character {col} is {ch!r}" if col else None


def why_unsafe_path(value: str) -> str | None:
    """As ``why_unsafe_word``, and no leading '-' (it would be read as an option)."""
    if value.startswith("-"):
        return "it starts with '-', so it would be read as an option"
    return why_unsafe_word(value)


def lab_flags_problem(args: list[str]) -> str | None:
    """The first of a script's flags that DeepSpeed's pdsh command would hand a shell to run or
    split, as one line naming the flag and the character; None when all are plain words."""
    for i, arg in enumerate(args):
        if arg.startswith("-") and "=" in arg:
            name, value = arg.split("=", 1)
        elif arg.startswith("-"):
            name, value = arg, arg
        else:
            name = args[i - 1] if i and args[i - 1].startswith("-") else f"argument {i + 1}"
            value = arg
        why = why_unsafe_word(value) or (why_unsafe_word(name) if name != value else None)
        if why:
            return (f"lab flag {name} {value!r} refused: {why}: with a hostfile DeepSpeed writes "
                    "the lab's flags into the command pdsh runs on every node and quotes only "
                    "those holding a space (a shell still expands $ and ` inside its quotes); "
                    + REMOTE_FIX)
    return None


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
    return why_unsafe(name) is None


def parse(text: str, path: str = "hostfile") -> Hostfile:
    hf = Hostfile(path)
    for number, raw in enumerate(lines_as_deepspeed_reads_them(text), start=1):
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
        if (why := why_unsafe(host)):
            hf.add("error", f"{where}: host name {host!r} refused: {why}",
                   "retype the name as a plain host name or address", number, None)
            continue
        if slots > MAX_SLOTS:
            hf.add("error", f"{where}: '{host}' has slots={slots}, more than any machine runs "
                   f"(at most {MAX_SLOTS} here)", "give the number of GPUs on that host", number,
                   host)
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
        if "@" in host or ":" in host:
            hf.add("warn", f"{where}: DeepSpeed's --include/--exclude split host names at '@' "
                   f"and ':', so they cannot name '{host}'", "use it without --include/--exclude, "
                   "or give the host a plain name (/etc/hosts, ~/.ssh/config)", number, host)
        hf.hosts[host] = slots
        hf.line_of[host] = number
    if not hf.hosts and hf.ok:
        hf.add("error", f"{path}: no hosts; DeepSpeed stops with 'Hostfile is empty or not "
               "formatted correctly'", "add lines like `worker-1 slots=8`")
    if len(hf.hosts) > 1:
        for host in hf.hosts:
            if is_loopback(host):
                hf.add("error", f"{path}:{hf.line_of[host]}: '{host}' is the loopback of whichever "
                       "machine reads it: with several hosts, each would reach itself there, "
                       "not this machine", "list every host by a name or address the others "
                       "can reach", hf.line_of[host], host)
    return hf


def is_loopback(host: str) -> bool:
    h = split_user(host)[1]
    if h in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(h.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def load(path: str | Path) -> Hostfile:
    p = Path(path)
    if not p.is_file():
        hf = Hostfile(str(path))
        hf.add("error", f"{path}: not found. DeepSpeed would not stop: it prints 'Unable to find "
               "hostfile, will proceed with training with local resources only' and trains on "
               "this machine alone", "give the right path (DeepSpeed's default is /job/hostfile)")
        return hf
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as e:
        hf = Hostfile(str(path))
        hf.add("error", f"{path}: cannot be read ({e.strerror})", "make it a readable text file")
        return hf
    except UnicodeDecodeError as e:
        hf = Hostfile(str(path))
        hf.add("error", f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); DeepSpeed would "
               "stop with a UnicodeDecodeError", "save it as plain UTF-8 text")
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
        name, colon, slots = part.partition(":")
        if colon and not slots:
            errors.append(f"{flag} {spec!r}: '{name}:' has an empty slot list; DeepSpeed 0.19.8's "
                          "runner stops on it (ValueError: invalid literal for int() with base "
                          f"10: ''): write {name} for all of its slots or {name}:0,1 for some")
            continue
        if (why := why_unsafe(name)):
            errors.append(f"{flag} {spec!r}: host name {name!r} refused: {why}")
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
    active = OrderedDict((h, chosen[h]) for h in pool if chosen.get(h))
    if not active and not errors and not any(f.check == "include/exclude" and
                                             f.severity == "error" for f in hf.findings):
        hf.findings.append(Finding(
            "include/exclude", "error", f"{flag} {spec!r} leaves no host and no slot to run on: "
            "DeepSpeed's runner stops with IndexError: list index out of range (at "
            "list(active_resources.keys())[0])", f"leave at least one slot out of {flag}"))
    return active


def first_error(hf: Hostfile) -> Finding | None:
    return next((f for f in hf.findings if f.severity == "error"), None)


def check(hostfile: str | None, include: str = "", exclude: str = "",
          master_addr: str = "", cwd: str = "", python: str = "",
          lab_args: list[str] | None = None) -> str | None:
    """The first problem that would make a launch with these settings unsafe or wrong, as one
    line, or None. What the launchers run before they hand anything to DeepSpeed or ssh.
    ``cwd``, ``python`` and ``lab_args``: what DeepSpeed's pdsh command will hold (give them
    where the launch goes through pdsh)."""
    if master_addr and (why := why_unsafe(master_addr)):
        return f"MASTER_ADDR {master_addr!r} refused: {why}"
    for what, value in (("the working folder", cwd), ("the python", python)):
        if value and (why := why_unsafe_path(value)):
            return (f"{what} {value!r} refused: {why}: DeepSpeed runs `cd <folder>; <python> "
                    "-u -m deepspeed.launcher.launch ...` unquoted on every node; move it to a "
                    "path that holds only letters, digits and _ @ % + = : , . / -")
    if lab_args and (problem := lab_flags_problem(lab_args)):
        return problem
    if hostfile is None:
        if include or exclude:
            return "INCLUDE/EXCLUDE need a HOSTFILE"
        return None
    hf = load(hostfile)
    if (f := first_error(hf)) is None:
        resolve(hf, include, exclude)
        f = first_error(hf)
    return None if f is None else f.message + (f"; fix: {f.fix}" if f.fix else "")


def main(argv=None) -> int:
    """``python -m dtlab.doctor.hostfile [--hostfile F] [--include S] [--exclude S]
    [--master-addr A] [--cwd DIR] [--python PATH] [-- LAB FLAGS...]``: exit 2 with one line
    when the launch settings are refused, else 0. What follows ``--`` is checked as the flags
    DeepSpeed's pdsh command will carry."""
    argv = list(sys.argv[1:] if argv is None else argv)
    lab_args = argv[argv.index("--") + 1:] if "--" in argv else None
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m dtlab.doctor.hostfile",
                                description="check a DeepSpeed hostfile and host selection "
                                            "before a launcher uses them")
    p.add_argument("--hostfile", default=None)
    p.add_argument("--include", default="")
    p.add_argument("--exclude", default="")
    p.add_argument("--master-addr", default="")
    p.add_argument("--cwd", default="", help="the folder DeepSpeed will cd to on every node")
    p.add_argument("--python", default="", help="the python DeepSpeed will start there")
    a = p.parse_args(argv)
    problem = check(a.hostfile, a.include, a.exclude, a.master_addr, a.cwd, a.python, lab_args)
    if problem:
        print(f"dtlab: error: {problem}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
