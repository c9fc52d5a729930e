"""The one least-squares fit the calibrations use: ``y ~ a + c x`` on relative error, so the
microsecond calls count as much as the long ones (the planner's per-piece compute times, the
collectives' alpha-beta)."""
from __future__ import annotations


def fit_line_relative(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(a, c) minimising sum(((a + c x) / y - 1)^2): weighted least squares in closed form (the
    2x2 normal equations), standard library only."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"a line needs 2 or more points, got {len(xs)} x and {len(ys)} y")
    u = [1.0 / y for y in ys]                     # the design matrix's rows, divided by y
    v = [x / y for x, y in zip(xs, ys)]
    suu, suv, svv = sum(a * a for a in u), sum(a * b for a, b in zip(u, v)), sum(b * b for b in v)
    det = suu * svv - suv * suv
    if det == 0:
        raise ValueError("the points do not determine a line (every x the same)")
    su, sv = sum(u), sum(v)
    return (svv * su - suv * sv) / det, (suu * sv - suv * su) / det
