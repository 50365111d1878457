"""Salience-density binary search for the kept structure (spec D.1, B.3).

Blocks are attention heads, FFN neurons and hidden dimensions.  Each block's density is
``salience / cost``.  All blocks are ranked jointly (heads, then neurons, then dims; stable
sort by density, descending), and the largest prefix of that ranking whose parameter count
(evaluated by a caller-supplied ``count_fn``, e.g. the B.3 formula) fits the budget is kept.

The module is pure: it only touches the tensors it is given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .runtime import heads_by_group, kv_heads_kept

__all__ = ["search_kept", "fill_budget", "swap_to_budget", "CountFn"]

CountFn = Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], float]


def _check_scores(scores: torch.Tensor, what: str) -> None:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        raise ValueError(f"{what} scores must be 1-D tensors; got {type(scores).__name__} "
                         f"with shape {tuple(getattr(scores, 'shape', ()))}.")
    if scores.numel() and not bool(torch.isfinite(scores).all()):
        raise ValueError(
            f"{what} scores contain NaN or inf; check the salience accumulation (e.g. fp16 overflow) "
            "before calling the search."
        )


def _expand_costs(cost: Sequence[float] | float, n_layers: int, what: str) -> list[float]:
    if isinstance(cost, (list, tuple)):
        costs = [float(c) for c in cost]
        if len(costs) != n_layers:
            raise ValueError(
                f"{what} cost has {len(costs)} entries but there are {n_layers} {what} layers; "
                "pass one cost per layer or a single scalar."
            )
    else:
        costs = [float(cost)] * n_layers
    for c in costs:
        if not math.isfinite(c) or c <= 0:
            raise ValueError(f"{what} cost must be a positive finite number (got {c}).")
    return costs


def _repair_gqa_layer(kept: torch.Tensor, rank: torch.Tensor, dens: torch.Tensor, group: int) -> torch.Tensor:
    """Make every surviving key/value group of one GQA layer keep the same number of heads.

    ``kept``, ``rank`` and ``dens`` are the layer's kept mask, global rank positions and
    densities; heads ``g*group .. g*group+group-1`` form group ``g``.  Only heads already in
    ``kept`` are candidates, so the result is a subset of ``kept``.
    """
    n_heads = kept.numel()
    if group <= 1 or not bool(kept.any()):
        return kept
    n_groups = n_heads // group
    kept_g = heads_by_group(kept, group)
    # Order each group's heads by global rank (kept heads first, best density first).
    big = torch.iinfo(rank.dtype).max
    order = torch.argsort(torch.where(kept_g, heads_by_group(rank, group), big), dim=1, stable=True)
    dens_sorted = torch.gather(torch.where(kept_g, heads_by_group(dens, group), 0.0), 1, order)
    top_sum = torch.cumsum(dens_sorted, dim=1)  # top_sum[g, c-1]: sum of the c best kept densities
    n_kept = kept_g.sum(dim=1)

    best: tuple[float, int, int] | None = None  # (total density, kept heads, c)
    for c in range(1, group + 1):
        eligible = n_kept >= c
        n_g = int(eligible.sum())
        if n_g == 0:
            break
        total = float(top_sum[:, c - 1][eligible].sum())
        key = (total, n_g * c, c)
        if best is None or key > best:
            best = key
    assert best is not None
    c = best[2]
    eligible = n_kept >= c
    pos = torch.empty_like(order)
    pos.scatter_(1, order, torch.arange(group).expand(n_groups, group).contiguous())
    new_kept = (pos < c) & eligible.unsqueeze(1)
    return new_kept.reshape(n_heads)


def search_kept(
    head_scores: list[torch.Tensor],
    neuron_scores: list[torch.Tensor],
    hidden_scores: torch.Tensor,
    count_fn: CountFn,
    head_cost: list[float] | float,
    neuron_cost: list[float] | float,
    hidden_cost: float,
    budget: float,
    head_groups: list[int] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Choose the kept heads, neurons and hidden dimensions under a parameter budget (spec D.1).

    Steps (D.1 1-4):

    1. density of each block = score / cost (``head_cost[l]`` / ``neuron_cost[l]`` per layer,
       or one scalar for all layers; ``hidden_cost`` for every dimension; B.3 gives the costs);
    2. concatenate all heads (layer by layer), then all neurons, then all dimensions, and
       sort jointly by density, descending, with a stable sort (ties keep that order);
    3. binary-search the LARGEST prefix length ``i`` with ``count_fn(prefix_i) <= budget``,
       using ``O(log n)`` calls of ``count_fn`` (which must be monotone non-decreasing in each
       kept set);
    4. the prefix is kept.

    Grouped-query attention (beyond the reference code, which has no GQA): if
    ``head_groups`` is given, ``head_groups[l]`` is the number of query heads that share one
    key/value head in attention layer ``l`` (group ``g`` = heads ``g*G .. g*G+G-1``; 1 means
    plain multi-head attention).  After the prefix is chosen, each GQA layer with ``k`` kept
    heads is repaired so that every surviving group keeps the same number ``c`` of query
    heads: for each ``c`` in ``1..G`` the candidate arrangement keeps, in every group that has
    at least ``c`` heads in the prefix, its ``c`` best prefix heads (so ``n_g * c <= k``); the
    arrangement with the highest total density wins (ties: more kept heads, then larger
    ``c``).  Candidates are drawn from the prefix only, so the repair only ever REMOVES heads
    and, ``count_fn`` being monotone, the result stays within the budget.  Freed budget is not
    re-filled.

    Args:
        head_scores: per attention layer, a 1-D salience tensor over its heads (may be empty).
        neuron_scores: per FFN layer, a 1-D salience tensor over its neurons (may be empty).
        hidden_scores: 1-D salience over hidden dimensions.
        count_fn: ``count_fn(kept_heads, kept_neurons, kept_hidden)`` -> parameter count, where
            the arguments are bool tensors shaped like the score tensors.
        head_cost, neuron_cost: per-layer block cost (list) or one scalar; must be > 0.
        hidden_cost: cost of one hidden dimension; must be > 0.
        budget: the largest allowed count, e.g. ``rho_t * n_params`` of the original model.
        head_groups: optional query heads per key/value group, one entry per attention layer.

    Returns:
        ``(kept_heads, kept_neurons, kept_hidden)``: bool tensors shaped like the inputs.

    Raises:
        ValueError: on NaN/inf scores (naming the block type), non-1-D scores, mismatched
            cost / group lists, non-positive costs, head counts not divisible by their group
            size, a NaN budget, or a budget below the count of the empty structure ("target
            is impossible").
    """
    head_scores = list(head_scores)
    neuron_scores = list(neuron_scores)
    for s in head_scores:
        _check_scores(s, "head")
    for s in neuron_scores:
        _check_scores(s, "neuron")
    _check_scores(hidden_scores, "hidden-dimension")
    head_costs = _expand_costs(head_cost, len(head_scores), "head")
    neuron_costs = _expand_costs(neuron_cost, len(neuron_scores), "neuron")
    hidden_c = _expand_costs(hidden_cost, 1, "hidden-dimension")[0]
    if math.isnan(budget):
        raise ValueError("budget is NaN; pass rho_t * n_params of the original model.")
    if head_groups is not None:
        if len(head_groups) != len(head_scores):
            raise ValueError(
                f"head_groups has {len(head_groups)} entries but there are {len(head_scores)} attention "
                "layers; pass one group size per attention layer."
            )
        for layer, (g, s) in enumerate(zip(head_groups, head_scores)):
            if int(g) < 1 or s.numel() % int(g) != 0:
                raise ValueError(
                    f"attention layer {layer} has {s.numel()} heads, which is not a multiple of its "
                    f"group size {g}; head_groups[l] must be the query heads per key/value head (>= 1)."
                )

    head_sizes = [s.numel() for s in head_scores]
    neuron_sizes = [s.numel() for s in neuron_scores]
    n_hidden = hidden_scores.numel()
    device = hidden_scores.device

    def per_block(scores: list[torch.Tensor], costs: list[float]) -> list[torch.Tensor]:
        return [s.detach().to(device=device, dtype=torch.float64) / c for s, c in zip(scores, costs)]

    parts = per_block(head_scores, head_costs) + per_block(neuron_scores, neuron_costs)
    parts.append(hidden_scores.detach().to(dtype=torch.float64) / hidden_c)
    density = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)
    n = density.numel()

    order = torch.sort(density, descending=True, stable=True).indices
    rank = torch.empty(n, dtype=torch.long, device=device)
    rank[order] = torch.arange(n, device=device)

    split_sizes = head_sizes + neuron_sizes + [n_hidden]
    n_head_layers = len(head_sizes)
    n_neuron_layers = len(neuron_sizes)

    def unpack(kept: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        chunks = list(torch.split(kept, split_sizes))
        return (
            chunks[:n_head_layers],
            chunks[n_head_layers : n_head_layers + n_neuron_layers],
            chunks[-1],
        )

    def count(i: int) -> float:
        return float(count_fn(*unpack(rank < i)))

    empty_count = count(0)
    if not empty_count <= budget:
        raise ValueError(
            f"target is impossible: even the empty structure counts {empty_count} parameters, "
            f"above the budget {budget}; raise the target density."
        )

    # Largest i in [0, n] with count(i) <= budget; invariant: lo feasible, hi infeasible.
    if count(n) <= budget:
        best = n
    else:
        lo, hi = 0, n
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if count(mid) <= budget:
                lo = mid
            else:
                hi = mid
        best = lo

    kept_heads, kept_neurons, kept_hidden = unpack(rank < best)
    kept_heads = [k.clone() for k in kept_heads]
    kept_neurons = [k.clone() for k in kept_neurons]
    kept_hidden = kept_hidden.clone()

    if head_groups is not None:
        head_rank = torch.split(rank[: sum(head_sizes)], head_sizes)
        head_dens = torch.split(density[: sum(head_sizes)], head_sizes)
        kept_heads = [
            _repair_gqa_layer(k, r, d, int(g))
            for k, r, d, g in zip(kept_heads, head_rank, head_dens, head_groups)
        ]

    return kept_heads, kept_neurons, kept_hidden


def fill_budget(
    count_model,
    kept: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor],
    densities: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor],
    budget: float,
    allowed: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Add blocks beyond the searched prefix, in density order, while they still fit the budget (beyond spec D.1).

    The prefix search stops at the first block that does not fit, which on small models (where one hidden
    dimension costs a few percent of the model) can leave the count well under the target. This pass walks the
    remaining blocks by descending density and keeps every one whose exact extra cost (``count_model``'s B.3
    terms, updated incrementally) still fits. In grouped-query layers the unit is a *row*: one more query head in
    every surviving key/value group (its best remaining head), so the group rule keeps holding; rows of a layer
    are taken in order. A key/value group with no kept head can also come back whole (its key/value head and as
    many query heads as each surviving group keeps, its best ones; one where none survives), before any row of its
    layer is taken; the fill then runs again with the new groups. Blocks not in ``allowed`` (e.g. held back while
    distilling) are never added. The result never exceeds ``budget``.

    Raises:
        ValueError: on NaN/inf densities (naming the block type) or a NaN budget.
    """
    for what, group in (("head", densities[0]), ("neuron", densities[1]), ("hidden-dimension", [densities[2]])):
        for t in group:
            if torch.is_tensor(t) and t.numel() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"fill_budget: {what} densities contain NaN or inf; check the salience and the "
                                 "block costs before filling the budget.")
    if math.isnan(budget):
        raise ValueError("fill_budget: budget is NaN; pass rho_t * n_params of the original model.")
    cm = count_model
    heads, neurons, hidden = [h.clone() for h in kept[0]], [n.clone() for n in kept[1]], kept[2].clone()
    if allowed is not None:  # a block that may not be added counts as kept for the candidate lists below
        taken = ([h | ~a for h, a in zip(heads, allowed[0])], [n | ~a for n, a in zip(neurons, allowed[1])],
                 hidden | ~allowed[2])
    else:
        taken = (heads, neurons, hidden)
    d = int(hidden.sum())
    total = cm.count(heads, neurons, hidden)
    per_dim = float(cm.hidden_cost(heads, neurons))
    candidates: list[tuple[float, str, int, int]] = []
    rows: dict[tuple[int, int], list[int]] = {}
    revive: dict[tuple[int, int], list[int]] = {}
    for l, (k, t, dens) in enumerate(zip(heads, taken[0], densities[0])):
        g = cm.group_size[l]
        if g == 1:
            candidates += [(float(dens[j]), "h", l, j) for j in torch.nonzero(~t).flatten().tolist()]
            continue
        live = kv_heads_kept(k, g)
        alive = torch.nonzero(live).flatten().tolist()
        size = int(heads_by_group(k, g)[alive[0]].sum()) if alive else 1
        for grp in torch.nonzero(~live).flatten().tolist():
            free = torch.nonzero(~heads_by_group(t, g)[grp]).flatten()
            if len(free) >= size:
                revive[(l, grp)] = [grp * g + j for j in _densest(free, heads_by_group(dens, g)[grp])[:size]]
                candidates.append((float(sum(float(dens[j]) for j in revive[(l, grp)]) / size), "v", l, grp))
        if not alive:
            continue
        per_group = []
        for grp in alive:
            free = torch.nonzero(~heads_by_group(t, g)[grp]).flatten()
            per_group.append([grp * g + j for j in _densest(free, heads_by_group(dens, g)[grp])])
        for r in range(min(len(p) for p in per_group)):
            rows[(l, r)] = [p[r] for p in per_group]
            candidates.append((float(sum(float(dens[j]) for j in rows[(l, r)]) / len(rows[(l, r)])), "r", l, r))
    for f, (t, dens) in enumerate(zip(taken[1], densities[1])):
        candidates += [(float(dens[j]), "n", f, j) for j in torch.nonzero(~t).flatten().tolist()]
    candidates += [(float(densities[2][j]), "d", 0, j) for j in torch.nonzero(~taken[2]).flatten().tolist()]
    candidates.sort(key=lambda c: -c[0])
    next_row = {l: 0 for l in range(len(heads))}  # -1: a group came back, the layer's rows no longer hold
    revived = False
    for _, kind, l, j in candidates:
        if kind == "r":
            if j != next_row[l]:
                continue
            delta, grow = cm.query_heads_cost(l, d, len(rows[(l, j)]), kv=False)
        elif kind == "v":
            if next_row[l] > 0:  # a row was taken: the surviving groups keep more heads than this revival has
                continue
            delta, grow = _block_cost(cm, "v", l, d, per_dim, len(revive[(l, j)]))
        else:
            delta, grow = _block_cost(cm, kind, l, d, per_dim)
        if total + delta > budget:
            continue
        total += delta
        per_dim += grow
        if kind == "r":
            heads[l][rows[(l, j)]] = True
            next_row[l] += 1
        elif kind == "v":
            heads[l][revive[(l, j)]] = True
            next_row[l], revived = -1, True
        elif kind == "h":
            heads[l][j] = True
        elif kind == "n":
            neurons[l][j] = True
        else:
            hidden[j] = True
            d += 1
    if revived:  # rows of the layers with a revived group, now over the new set of groups
        return fill_budget(cm, (heads, neurons, hidden), densities, budget, allowed)
    return heads, neurons, hidden


def _block_cost(cm, kind: str, l: int, d: int, per_dim: float, size: int = 1) -> tuple[float, float]:
    """Parameters of one head (of a layer without key/value sharing), grouped-query row (``size`` heads), revived
    key/value group (``size`` query heads), neuron or hidden dimension at width ``d``, and how much it adds to the
    cost of one hidden dimension (spec B.3, the terms of ``CountModel.count``)."""
    if kind == "h":
        return cm.query_heads_cost(l, d)
    if kind == "r":  # a row of a grouped-query layer: one query head (q and o) in each of ``size`` live groups
        return cm.query_heads_cost(l, d, size, kv=False)
    if kind == "v":  # a key/value group brought back: its key/value head and ``size`` query heads
        q, q_grow = cm.query_heads_cost(l, d, size, kv=False)
        (one, one_grow), (bare, bare_grow) = cm.query_heads_cost(l, d), cm.query_heads_cost(l, d, kv=False)
        return q + one - bare, q_grow + one_grow - bare_grow  # one key/value head: a head with kv minus one without
    if kind == "n":
        return cm.ffn_mats[l] * d + cm.ffn_in_bias[l], cm.ffn_mats[l]
    return per_dim, 0.0


def swap_to_budget(
    count_model,
    kept: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor],
    densities: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor],
    budget: float,
    tolerance: float = 0.01,
    allowed: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor] | None = None,
    max_tries: int = 64,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Land the kept count in ``[(1 - tolerance) budget, budget]`` when a greedy fill ends lower (beyond spec D.1).

    After :func:`fill_budget` nothing more fits, yet the count can still sit far below the budget when the block
    that stopped the prefix is large (a head of a small model costs a few percent of it) and everything smaller is
    kept already. As in the classic repair of greedy knapsack, one not-kept block (the densest first, up to
    ``max_tries``) is taken back and the least dense kept blocks are dropped until the count fits again, skipping any
    whose removal would fall below the lower bound; the first swap that lands in the interval is returned, otherwise
    ``kept`` unchanged. In grouped-query layers the unit is a row, as in :func:`fill_budget`: taking one back adds
    the best remaining query head of every live key/value group (when each has one), dropping one removes the least
    dense kept head of every group (when each keeps two or more, so no group dies); a row's density is the mean of
    its heads'. A dead key/value group can be taken back whole, as in :func:`fill_budget`. Blocks not in
    ``allowed`` (e.g. held back while distilling) are never touched. The result never exceeds ``budget``.
    """
    cm = count_model
    heads, neurons, hidden = [h.clone() for h in kept[0]], [n.clone() for n in kept[1]], kept[2].clone()
    total = cm.count(heads, neurons, hidden)
    lower = (1.0 - tolerance) * budget
    if total >= lower or total > budget:
        return heads, neurons, hidden
    ok = allowed or ([torch.ones_like(h) for h in heads], [torch.ones_like(n) for n in neurons],
                     torch.ones_like(hidden))
    blocks: list[tuple[float, str, int, Any, bool]] = []  # density, kind, layer, index (a row: head list), kept
    for l, (k, a, dens) in enumerate(zip(heads, ok[0], densities[0])):
        if cm.group_size[l] == 1:
            blocks += [(float(dens[j]), "h", l, j, bool(k[j])) for j in torch.nonzero(a).flatten().tolist()]
        else:
            blocks += _gqa_rows(k, a, dens, cm.group_size[l], l)
    for l, (k, a, dens) in enumerate(zip(neurons, ok[1], densities[1])):
        blocks += [(float(dens[j]), "n", l, j, bool(k[j])) for j in torch.nonzero(a).flatten().tolist()]
    blocks += [(float(densities[2][j]), "d", 0, j, bool(hidden[j])) for j in torch.nonzero(ok[2]).flatten().tolist()]
    out_blocks = sorted((b for b in blocks if not b[4]), key=lambda b: -b[0])[:max_tries]
    in_blocks = sorted((b for b in blocks if b[4]), key=lambda b: b[0])
    d0, per_dim0 = int(hidden.sum()), float(cm.hidden_cost(heads, neurons))
    for _, kind, l, j, _ in out_blocks:
        cost, grow = _block_cost(cm, kind, l, d0, per_dim0, _size(j))
        t, per_dim, d = total + cost, per_dim0 + grow, d0 + (kind == "d")
        dropped = []
        for blk in in_blocks:
            if t <= budget:
                break
            if blk[1] == "r" and blk[2] == l and kind in "rv":  # one change to a grouped-query layer at a time
                continue
            c, g = _block_cost(cm, blk[1], blk[2], d, per_dim, _size(blk[3]))
            if t - c >= lower:
                t, per_dim, d = t - c, per_dim - g, d - (blk[1] == "d")
                dropped.append(blk)
        if lower <= t <= budget:
            for blk, value in [((None, kind, l, j), True)] + [(b, False) for b in dropped]:
                target = heads[blk[2]] if blk[1] in "hrv" else neurons[blk[2]] if blk[1] == "n" else hidden
                target[blk[3]] = value
            return heads, neurons, hidden
    return heads, neurons, hidden


def _densest(free: torch.Tensor, dens: torch.Tensor) -> list[int]:
    """The indices ``free`` ordered by descending ``dens`` (ties: lower index first)."""
    return [int(j) for j in free[torch.argsort(dens[free], descending=True, stable=True)]]


def _size(index: Any) -> int:
    return len(index) if isinstance(index, list) else 1


def _gqa_rows(kept: torch.Tensor, allowed: torch.Tensor, dens: torch.Tensor, g: int, layer: int
              ) -> list[tuple[float, str, int, list[int], bool]]:
    """The row that can be taken back, the row that can be dropped and the dead groups that can come back whole in
    one grouped-query layer (see :func:`swap_to_budget`)."""
    k, a, s = heads_by_group(kept, g), heads_by_group(allowed, g), heads_by_group(dens, g).float()
    alive = kv_heads_kept(kept, g)
    live = torch.nonzero(alive).flatten().tolist()
    size = int(k[live[0]].sum()) if live else 1
    rows = []
    for q in torch.nonzero(~alive).flatten().tolist():  # a dead group brought back whole
        free = torch.nonzero(a[q]).flatten()
        if len(free) >= size:
            best = [q * g + j for j in _densest(free, s[q])[:size]]
            rows.append((float(dens[best].float().mean()), "v", layer, best, False))
    if not live:
        return rows
    addable = [torch.nonzero(~k[q] & a[q]).flatten() for q in live]
    if all(len(c) for c in addable):
        best = [q * g + int(c[s[q, c].argmax()]) for q, c in zip(live, addable)]
        rows.append((float(dens[best].float().mean()), "r", layer, best, False))
    droppable = [torch.nonzero(k[q] & a[q]).flatten() for q in live]
    if all(int(k[q].sum()) >= 2 and len(c) for q, c in zip(live, droppable)):
        worst = [q * g + int(c[s[q, c].argmin()]) for q, c in zip(live, droppable)]
        rows.append((float(dens[worst].float().mean()), "r", layer, worst, True))
    return rows
