"""Tables of run records, for the terminal (rich) and for markdown reports."""
from __future__ import annotations


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


COLUMNS = ("lab", "variant", "world", "steps", "loss first->last", "max rel dloss",
           "max abs dparam", "ok", "step ms", "tokens/s", "comm/step/rank", "peak mem/rank")


def row(s: dict) -> list[str]:
    b = s["baseline"]
    ok = {True: "yes", False: "NO", None: "drift" if b.get("note") else "-"}[b["ok"]]
    peaks = [m["peak"] for m in s["memory"]["per_rank"]]
    return [s["lab"], s["variant"], str(s["world_size"]), str(s["steps"]),
            f"{s['losses'][0]:.3f}->{s['losses'][-1]:.3f}", _sci(b.get("max_rel_loss_diff")),
            _sci(b.get("max_abs_param_diff")), ok, f"{s['time']['step_s_median'] * 1e3:.1f}",
            f"{s['time']['tokens_per_s']:,.0f}", human_bytes(s["comm"]["bytes_per_step"]),
            human_bytes(max(peaks) if peaks else None)]


def print_table(summaries: list[dict], title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in COLUMNS:
        t.add_column(c, justify="left" if c in ("lab", "variant") else "right")
    for s in summaries:
        r = row(s)
        if r[7] == "NO":
            r[7] = "[bold red]NO[/]"
        t.add_row(*r)
    console = Console()
    if not console.is_terminal:  # logs and pipes: do not squeeze the table into 80 columns
        console = Console(width=200)
    console.print(t)


def markdown_table(summaries: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(s)) + " |" for s in summaries]
    return "\n".join(lines) + "\n"
