"""Tables of run records, for the terminal (rich) and for markdown reports."""
from __future__ import annotations


def console(width: int = 200):
    """A rich console that keeps wide tables whole: a terminal's own width, or ``width`` when
    the output goes to a log or a pipe (rich would squeeze tables into 80 columns there)."""
    from rich.console import Console  # rich: start-up (the CLI parser imports this)
    c = Console()
    return c if c.is_terminal else Console(width=width)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def _num(x: float | None) -> str:
    """A loss in a table; a record keeps a NaN or infinity as null."""
    return "nan" if x is None else f"{x:.3f}"


def _floats(xs) -> list[float]:
    return [float("nan") if x is None else x for x in xs]


COLUMNS = ("lab", "variant", "world", "steps", "loss first->last", "max rel dloss",
           "max abs dparam", "ok", "step ms", "tokens/s", "comm/step/rank", "peak mem/rank")


def verdict_word(s: dict) -> str:
    """The ok column: yes / NO, what failed, or why a run is not held to the baseline. A run
    that differs by design (a step skipped on purpose, Hogwild) reads as ok with the reason,
    so a newcomer does not take it for a failure; real failures read NO."""
    b = s["baseline"]
    if s.get("nonfinite"):
        return "NO (diverged)"
    if b.get("ok") is False:
        return "NO"
    if not s.get("ok", True):
        return "checks FAILED"
    if b.get("ok") is None:
        return f"ok ({b['note']})" if b.get("note") else "-"
    return "yes"


def row(s: dict) -> list[str]:
    b = s["baseline"]
    ok = verdict_word(s)
    peaks = [m["peak"] for m in s["memory"]["per_rank"]]
    return [s["lab"], s["variant"], str(s["world_size"]), str(s["steps"]),
            f"{_num(s['losses'][0])}->{_num(s['losses'][-1])}", _sci(b.get("max_rel_loss_diff")),
            _sci(b.get("max_abs_param_diff")), ok, f"{s['time']['step_s_median'] * 1e3:.1f}",
            f"{s['time']['tokens_per_s']:,.0f}", human_bytes(s["comm"]["bytes_per_step"]),
            human_bytes(max(peaks) if peaks else None)]


def print_table(summaries: list[dict], title: str | None = None) -> None:
    from rich.table import Table  # rich: start-up (the CLI parser imports this)

    t = Table(title=title)
    for c in COLUMNS:
        t.add_column(c, justify="left" if c in ("lab", "variant") else "right")
    for s in summaries:
        r = row(s)
        if r[7].startswith(("NO", "checks")):
            r[7] = f"[bold red]{r[7]}[/]"
        t.add_row(*r)
    console().print(t)


REPORT_COLUMNS = ("lab", "variant", "world", "max rel loss diff", "max abs param diff", "ok",
                  "step ms", "tokens/s", "comm/step/rank", "exposed comm", "peak mem/rank")


def run_label(s: dict) -> str:
    return f"{s['lab']} [{s['variant']}] x{s['world_size']}"


def profile_shares(s: dict) -> dict[str, float] | None:
    """Mean over ranks of each share of the profiled step (computation, communication, overlap,
    exposed_communication, other; dtlab profile), or None for a run not profiled."""
    rows = [r["share_of_step"] for r in (s.get("extra", {}).get("profile") or []) if r]
    if not rows:
        return None
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def exposed_share(s: dict) -> float | None:
    """Mean over ranks of the profiled step's exposed-communication share."""
    shares = profile_shares(s)
    return None if shares is None else shares["exposed_communication"]


def report_row(s: dict) -> list[str]:
    b = s["baseline"]
    ok = verdict_word(s)
    peaks = [m["peak"] for m in s["memory"]["per_rank"]]
    ex = exposed_share(s)
    return [s["lab"], s["variant"], str(s["world_size"]), _sci(b.get("max_rel_loss_diff")),
            _sci(b.get("max_abs_param_diff")), ok, f"{s['time']['step_s_median'] * 1e3:.1f}",
            f"{s['time']['tokens_per_s']:,.0f}", human_bytes(s["comm"]["bytes_per_step"]),
            "-" if ex is None else f"{ex:.0%}", human_bytes(max(peaks) if peaks else None)]
