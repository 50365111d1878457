"""Adaptive tuning: grow the ranks of the most important adapters to follow the budget (spec E.2, E.3, K.5)."""

from __future__ import annotations

import math
from typing import Optional

from .arch import Layout
from .layer import APTLinear, ParamChange
from .masks import APTMasks
from .runtime import kv_heads_kept


def live_widths(layers: dict[str, APTLinear], layout: Layout, masks: APTMasks) -> dict[str, int]:
    """``in + out`` of each adapter counting only kept (mask > 0) heads, neurons and hidden dimensions.

    Once pruned blocks are removed physically this is ``in_features + out_features`` (spec E.3.1); while removal is
    held back during distillation it leaves the held blocks out, so rank growth does not depend on when blocks are
    removed. Adapters outside the attention/FFN sites keep their physical widths.
    """
    hidden = int((masks.hidden > 0).sum())
    units: dict[int, tuple[int, int]] = {}
    for i, site in enumerate(layout.attentions):
        alive = masks.heads[i] > 0
        q_width = int(alive.sum()) * site.head_dim
        kv_width = int(kv_heads_kept(alive, site.group_size).sum()) * site.head_dim
        qkv = ((site.q, (hidden, q_width + 2 * kv_width)),) if site.fused else (
            (site.q, (hidden, q_width)), (site.k, (hidden, kv_width)), (site.v, (hidden, kv_width)))
        extra = tuple((module, (hidden, q_width)) for module in site.extra)
        for module, width in qkv + extra + ((site.o, (q_width, hidden)),):
            if module is not None:
                units[id(module)] = width
    for j, site in enumerate(layout.ffns):
        n = int((masks.neurons[j] > 0).sum())
        up = ((site.up, (hidden, 2 * n)),) if site.fused else ((site.up, (hidden, n)), (site.gate, (hidden, n)))
        for module, width in up + ((site.down, (n, hidden)),):
            if module is not None:
                units[id(module)] = width
    for module in layout.readers:
        units[id(module)] = (hidden, module.out_features)
    return {name: sum(units.get(id(l), (l.in_features, l.out_features))) for name, l in layers.items()}


def adapter_size(layers: dict[str, APTLinear], adapter_name: str = "default",
                 widths: Optional[dict[str, int]] = None) -> int:
    """``sum (in + out) * r`` over adapters (spec E.3.1), with ``widths[name] = in + out`` when given."""
    return sum((widths[n] if widths is not None else l.in_features + l.out_features) * l.r[adapter_name]
               for n, l in layers.items())


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
