"""Adaptive tuning: grow the ranks of the most important adapters to follow the budget (spec E.2, E.3, K.5)."""

from __future__ import annotations

import math

from .layer import APTLinear, ParamChange


def adapter_size(layers: dict[str, APTLinear], adapter_name: str = "default") -> int:
    """``sum (in + out) * r`` over adapters (spec E.3.1)."""
    return sum((l.in_features + l.out_features) * l.r[adapter_name] for l in layers.values())


def plan_rank_growth(sizes: dict[str, tuple[int, int]], importance: dict[str, float], budget: int,
                     max_rank: int) -> dict[str, int]:
    """New ranks for the top half of the adapters below ``max_rank`` so the adapter size meets ``budget``.

    ``sizes[name] = (in + out, r)``. Adapters are ranked by importance (descending; unknown importance counts as 0,
    ties keep name order); the first ``floor(n/2)`` of those below the cap get ``min(max_rank, floor(r * q))``
    with ``q = 1 + (budget - P) / sum_selected (in + out) r`` (spec E.3.3-4). Returns only changed ranks.
    """
    current = sum(width * r for width, r in sizes.values())
    if budget <= current:
        return {}
    order = sorted(sizes, key=lambda n: -importance.get(n, 0.0))
    eligible = [n for n in order if sizes[n][1] < max_rank]
    selected = eligible[: len(sizes) // 2]
    denom = sum(sizes[n][0] * sizes[n][1] for n in selected)
    if not selected or denom == 0:
        return {}
    q = 1.0 + (budget - current) / denom
    plan = {}
    for n in selected:
        r = sizes[n][1]
        new_r = min(max_rank, int(math.floor(r * q)))
        if new_r > r:
            plan[n] = new_r
    return plan


def grow_ranks(layers: dict[str, APTLinear], plan: dict[str, int], adapter_name: str = "default") -> list[ParamChange]:
    changes: list[ParamChange] = []
    for name, new_r in plan.items():
        changes += layers[name].grow_rank(adapter_name, new_r)
    return changes
