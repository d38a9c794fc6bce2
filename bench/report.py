"""One row per (case, metric): our figure, the baseline's figure from the same run, the ratio, the target."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def fmt(value: float | None) -> str:
    if value is None:
        return ""
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 0.1:
        return f"{value:.2f}"
    return f"{value:.4f}"


@dataclass
class Row:
    """A figure of ours against one baseline.

    :param goal: decides whether the target is met, from ``ours / baseline``.
    :param goal_value: decides it from our figure alone (e.g. a memory ceiling).
    :param lower_is_better: for calls, CPU, memory, delays (only changes how the ratio reads).
    """

    case: str
    metric: str
    ours: float
    baseline: str
    baseline_value: float | None
    target: str = ""
    goal: Callable[[float], bool] | None = field(default=None, repr=False)
    goal_value: Callable[[float], bool] | None = field(default=None, repr=False)
    lower_is_better: bool = False
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if not self.baseline_value:
            return None
        return self.ours / self.baseline_value

    @property
    def met(self) -> bool | None:
        if self.goal is not None and self.ratio is not None:
            return self.goal(self.ratio)
        if self.goal_value is not None:
            return self.goal_value(self.ours)
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "metric": self.metric,
            "ours": self.ours,
            "baseline": self.baseline,
            "baseline_value": self.baseline_value,
            "ratio": self.ratio,
            "target": self.target,
            "met": self.met,
            "note": self.note,
        }


def render(rows: list[Row]) -> str:
    header = [
        "Case",
        "Metric",
        "Ours",
        "Baseline (same run)",
        "Baseline",
        "Ours/base",
        "Target",
        "Met",
        "Note",
    ]
    table = [header]
    for row in rows:
        ratio = row.ratio
        met = {True: "yes", False: "NO", None: ""}[row.met]
        table.append(
            [
                row.case,
                row.metric,
                fmt(row.ours),
                row.baseline,
                fmt(row.baseline_value),
                f"{ratio:.2f}x" if ratio is not None else "",
                row.target,
                met,
                row.note,
            ]
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    numeric = {2, 4, 5}
    lines = []
    for n, cells in enumerate(table):
        parts = [
            c.rjust(widths[i]) if i in numeric and n else c.ljust(widths[i]) for i, c in enumerate(cells)
        ]
        lines.append(" | ".join(parts).rstrip())
        if n == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)
