"""The least-squares fits on relative error the planner uses, standard library only: ``y ~ a + c x``
(the CPU calibration's per-piece compute times, the collectives' alpha-beta), so the microsecond
calls count as much as the long ones, and non-negative constants of a linear model (the GPU
model's, :mod:`dtlab.costmodel.gpu_step`); and Spearman's rank correlation, which both of the
planner's validations report."""
from __future__ import annotations

import statistics


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


def _solve(mat: list[list[float]], rhs: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (small dense systems)."""
    n = len(rhs)
    a = [row[:] + [r] for row, r in zip(mat, rhs)]
    for i in range(n):
        piv = max(range(i, n), key=lambda r: abs(a[r][i]))
        a[i], a[piv] = a[piv], a[i]
        if abs(a[i][i]) < 1e-300:
            raise ValueError("the features do not determine the constants (a column is zero)")
        for r in range(i + 1, n):
            f = a[r][i] / a[i][i]
            for j in range(i, n + 1):
                a[r][j] -= f * a[i][j]
    x = [0.0] * n
    for i in reversed(range(n)):
        x[i] = (a[i][n] - sum(a[i][j] * x[j] for j in range(i + 1, n))) / a[i][i]
    return x


def nnls_relative(rows: list[list[float]], ys: list[float]) -> list[float]:
    """c >= 0 minimising sum((rows[i] . c / ys[i] - 1)^2): Lawson and Hanson's active set on the
    rows divided by y, with the normal equations solved directly (a handful of columns)."""
    a = [[v / y for v in r] for r, y in zip(rows, ys)]
    n = len(a[0])
    ata = [[sum(r[i] * r[j] for r in a) for j in range(n)] for i in range(n)]
    atb = [sum(r[i] for r in a) for i in range(n)]
    free: list[int] = []
    x = [0.0] * n
    for _ in range(10 * n):
        grad = [atb[i] - sum(ata[i][j] * x[j] for j in range(n)) for i in range(n)]
        cand = [i for i in range(n) if i not in free and grad[i] > 1e-12]
        if not cand:
            break
        free.append(max(cand, key=lambda i: grad[i]))
        while True:
            sub = _solve([[ata[i][j] for j in free] for i in free], [atb[i] for i in free])
            if all(v > 0 for v in sub):
                x = [0.0] * n
                for i, v in zip(free, sub):
                    x[i] = v
                break
            # step back toward the last feasible x until a coefficient reaches zero
            alpha = min(x[i] / (x[i] - v) for i, v in zip(free, sub) if v <= 0)
            z = [0.0] * n
            for i, v in zip(free, sub):
                z[i] = v
            x = [x[i] + alpha * (z[i] - x[i]) for i in range(n)]
            free = [i for i in free if x[i] > 1e-15]
    return x


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Rank correlation (ties get their mean rank); None for fewer than 3 points."""
    if len(xs) < 3:
        return None

    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return num / den if den else None
