"""One global compression target split into per-layer levels, guided by a sensitivity scan.

A scan measures, for each layer alone, the model's output error at a few compression levels
(prune ratios, rank fractions) and what each level saves (FLOPs or parameters). :func:`allocate`
then picks one level per layer so that the savings reach the target while the summed error
stays small: a greedy walk along each layer's lower convex hull of (saved, error), always taking
the cheapest next step in error per unit saved. Errors of different layers are treated as
additive, the usual first-order assumption of such scans; the caller verifies the result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Level:
    """One measured point of a layer's scan: compressing ``layer`` at ``level`` saves ``saved`` at output error ``error``."""

    layer: str
    level: float
    saved: float
    error: float


@dataclass
class Allocation:
    """The chosen level per layer (layers absent stay as they are), the total saved, and whether the target was met."""

    chosen: dict[str, Level] = field(default_factory=dict)
    saved: float = 0.0
    target: float = 0.0

    @property
    def reached(self) -> bool:
        """Whether the savings meet the target."""
        return self.saved >= self.target * (1 - 1e-9)


def lower_hull(levels: Sequence[Level]) -> list[Level]:
    """The points of ``levels`` on the lower convex hull of (saved, error), from (0, 0), by increasing saved."""
    points = sorted((p for p in levels if p.saved > 0), key=lambda p: (p.saved, p.error, p.level))
    hull: list[Level] = []
    origin = (0.0, 0.0)
    for point in points:
        if hull and point.saved == hull[-1].saved and point.error >= hull[-1].error:
            continue  # the same saving for no less error (two methods of one layer can cost the same)
        if hull and point.error <= hull[-1].error and point.saved >= hull[-1].saved:
            # dominates the previous point: saves at least as much for no more error
            while hull and point.error <= hull[-1].error:
                hull.pop()
        while hull:
            base = (hull[-2].saved, hull[-2].error) if len(hull) >= 2 else origin
            last = hull[-1]
            cross = (last.saved - base[0]) * (point.error - base[1]) - (last.error - base[1]) * (point.saved - base[0])
            if cross <= 0:  # last lies on or above the segment base -> point
                hull.pop()
            else:
                break
        hull.append(point)
    return hull


def allocate(curves: Mapping[str, Sequence[Level]], target: float) -> Allocation:
    """Per-layer levels whose savings sum to at least ``target`` with the least total error (greedy on hulls).

    Deterministic: ties go to the layer that comes first in ``curves``. When the target cannot be
    met, every layer ends at its largest measured saving and ``reached`` is False.
    """
    hulls = {name: lower_hull(levels) for name, levels in curves.items()}
    position = {name: 0 for name in hulls}
    result = Allocation(target=target)
    order = list(hulls)
    while result.saved < target:
        best: tuple[float, int, str] | None = None
        for rank, name in enumerate(order):
            hull = hulls[name]
            step = position[name]
            if step >= len(hull):
                continue
            previous = hull[step - 1] if step else None
            d_saved = hull[step].saved - (previous.saved if previous else 0.0)
            d_error = hull[step].error - (previous.error if previous else 0.0)
            cost = max(d_error, 0.0) / d_saved
            if best is None or (cost, rank) < best[:2]:
                best = (cost, rank, name)
        if best is None:
            break
        name = best[2]
        level = hulls[name][position[name]]
        previous = result.chosen.get(name)
        result.saved += level.saved - (previous.saved if previous else 0.0)
        result.chosen[name] = level
        position[name] += 1
    return result
