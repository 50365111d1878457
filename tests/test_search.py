"""Tests for apt_hf.search.search_kept (spec D.1, B.3)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from apt_hf.search import search_kept

DH = 2  # head width used by the toy BERT-like counter


def bert_count(n_layers: int):
    """The B.3 BERT formula d'*(4*H'*dh + 2*N' + 6L) + 3*H'*dh + N' on bool kept sets."""

    def count(heads: list[torch.Tensor], neurons: list[torch.Tensor], hidden: torch.Tensor) -> float:
        h = sum(int(k.sum()) for k in heads)
        n = sum(int(k.sum()) for k in neurons)
        d = int(hidden.sum())
        return float(d * (4 * h * DH + 2 * n + 6 * n_layers) + 3 * h * DH + n)

    return count


def bert_costs(n_heads_tot: int, n_neurons_tot: int, d: int, n_layers: int) -> tuple[float, float, float]:
    return 4 * d * DH + 3 * DH, 2 * d + 1, 4 * n_heads_tot * DH + 2 * n_neurons_tot + 6 * n_layers


def reference_prefix(heads, neurons, hidden, head_cost, neuron_cost, hidden_cost, count_fn, budget):
    """Independent brute force: Python stable sort, count every prefix, take the largest feasible."""
    dens: list[float] = []
    sizes: list[int] = []
    for s in heads:
        dens += [float(x) / head_cost for x in s.tolist()]
        sizes.append(len(s))
    for s in neurons:
        dens += [float(x) / neuron_cost for x in s.tolist()]
        sizes.append(len(s))
    dens += [float(x) / hidden_cost for x in hidden.tolist()]
    sizes.append(len(hidden))
    order = sorted(range(len(dens)), key=lambda j: -dens[j])

    def masks(i: int):
        flat = [False] * len(dens)
        for j in order[:i]:
            flat[j] = True
        out, pos = [], 0
        for sz in sizes:
            out.append(torch.tensor(flat[pos : pos + sz], dtype=torch.bool))
            pos += sz
        return out[: len(heads)], out[len(heads) : len(heads) + len(neurons)], out[-1]

    best = max(i for i in range(len(dens) + 1) if count_fn(*masks(i)) <= budget)
    return masks(best)


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == torch.bool
        assert torch.equal(x, y), (x, y)


# ---------------------------------------------------------------- hand example


def linear_count(heads, neurons, hidden) -> float:
    return 10.0 * sum(int(k.sum()) for k in heads) + sum(int(k.sum()) for k in neurons) + 5.0 * int(hidden.sum())


HAND = dict(
    head_scores=[torch.tensor([20.0, 1.0])],  # densities 2, 0.1
    neuron_scores=[torch.tensor([3.0, 0.0])],  # densities 3, 0
    hidden_scores=torch.tensor([10.0, 5.0]),  # densities 2, 1
    count_fn=linear_count,
    head_cost=10.0,
    neuron_cost=[1.0],
    hidden_cost=5.0,
)
# joint order: n0 (3), h0 (2), d0 (2, tie: heads come before dims), d1 (1), h1 (0.1), n1 (0)
# cumulative counts:   1,      11,      16,                                21,     31,      32


@pytest.mark.parametrize(
    "budget, heads, neurons, hidden",
    [
        (0.0, [False, False], [False, False], [False, False]),
        (0.5, [False, False], [False, False], [False, False]),
        (1.0, [False, False], [True, False], [False, False]),
        (11.0, [True, False], [True, False], [False, False]),
        (15.9, [True, False], [True, False], [False, False]),
        (20.0, [True, False], [True, False], [True, False]),
        (21.0, [True, False], [True, False], [True, True]),
        (31.5, [True, True], [True, False], [True, True]),
        (1e9, [True, True], [True, True], [True, True]),
    ],
)
def test_hand_example(budget, heads, neurons, hidden) -> None:
    kh, kn, kd = search_kept(**HAND, budget=budget)
    assert_same(kh, [torch.tensor(heads)])
    assert_same(kn, [torch.tensor(neurons)])
    assert torch.equal(kd, torch.tensor(hidden))
    assert linear_count(kh, kn, kd) <= budget


def test_empty_layers_and_no_blocks() -> None:
    kh, kn, kd = search_kept([torch.zeros(0)], [], torch.zeros(0), linear_count, 1.0, 1.0, 1.0, 0.0)
    assert [k.shape for k in kh] == [torch.Size([0])] and kn == [] and kd.shape == (0,)


def test_all_zero_scores_keep_concat_order() -> None:
    kh, kn, kd = search_kept(
        [torch.zeros(2), torch.zeros(1)], [torch.zeros(2)], torch.zeros(2), linear_count, 10.0, 1.0, 5.0, 25.0
    )
    # all densities 0: concatenation order h00, h01, h10, n0, n1, d0, d1 -> 10, 20, 30 > 25
    assert_same(kh, [torch.tensor([True, True]), torch.tensor([False])])
    assert_same(kn, [torch.tensor([False, False])])
    assert not kd.any()


def test_count_fn_called_logarithmically() -> None:
    calls = 0

    def counting(heads, neurons, hidden):
        nonlocal calls
        calls += 1
        return linear_count(heads, neurons, hidden)

    g = torch.Generator().manual_seed(0)
    heads = [torch.rand(12, generator=g) for _ in range(12)]
    neurons = [torch.rand(300, generator=g) for _ in range(12)]
    hidden = torch.rand(64, generator=g)
    n = 12 * 12 + 12 * 300 + 64
    search_kept(heads, neurons, hidden, counting, 10.0, 1.0, 5.0, 1234.5)
    assert calls <= 2 + math.ceil(math.log2(n + 1))


# ---------------------------------------------------------------- property: largest feasible prefix



@settings(max_examples=200, deadline=None)
@given(
    heads=st.lists(st.lists(st.integers(0, 4).map(float), max_size=3), min_size=2, max_size=2),
    neurons=st.lists(st.lists(st.integers(0, 4).map(float), max_size=4), min_size=2, max_size=2),
    hidden=st.lists(st.integers(0, 4).map(float), max_size=3),
    frac=st.floats(0.0, 1.1),
)
def test_matches_brute_force(heads, neurons, hidden, frac) -> None:
    n_layers = 2
    h_t = [torch.tensor(h, dtype=torch.float32) for h in heads]
    n_t = [torch.tensor(n, dtype=torch.float32) for n in neurons]
    d_t = torch.tensor(hidden, dtype=torch.float32)
    count = bert_count(n_layers)
    hc, nc, dc = bert_costs(sum(map(len, heads)), sum(map(len, neurons)), len(hidden), n_layers)
    full = count(
        [torch.ones(len(h), dtype=torch.bool) for h in heads],
        [torch.ones(len(n), dtype=torch.bool) for n in neurons],
        torch.ones(len(hidden), dtype=torch.bool),
    )
    budget = frac * full
    kh, kn, kd = search_kept(h_t, n_t, d_t, count, [hc, hc], nc, dc, budget)
    rh, rn, rd = reference_prefix(h_t, n_t, d_t, hc, nc, dc, count, budget)
    assert_same(kh, rh)
    assert_same(kn, rn)
    assert torch.equal(kd, rd)
    assert count(kh, kn, kd) <= budget
    assert [k.shape for k in kh] == [t.shape for t in h_t]
    assert [k.shape for k in kn] == [t.shape for t in n_t]


# ---------------------------------------------------------------- grouped-query attention


def gqa_count(groups: list[int]):
    """Toy GQA counter: q/o per query head, k/v per surviving key/value group, neurons, dims."""

    def count(heads, neurons, hidden) -> float:
        d = int(hidden.sum())
        q = sum(int(k.sum()) for k in heads)
        kv = sum(int(k.view(-1, g).any(dim=1).sum()) for k, g in zip(heads, groups))
        n = sum(int(k.sum()) for k in neurons)
        return float(d * (2 * q * DH + 2 * kv * DH + 3 * n + 2) + n)

    return count


def test_gqa_hand_example() -> None:
    # layer 0: G=2, groups {0,1}, {2,3}; layer 1: plain MHA (G=1)
    heads = [torch.tensor([9.0, 1.0, 10.0, 9.5]), torch.tensor([5.0, 0.0])]

    def per_head(hs, ns, dims) -> float:
        return float(sum(int(k.sum()) for k in hs))

    # budget 4: prefix = h0_2 (10), h0_3 (9.5), h0_0 (9), h1_0 (5).  Layer 0 has k=3:
    # c=1 keeps {0, 2} (total 19), c=2 keeps {2, 3} (total 19.5) -> c=2 wins.
    kh, _, _ = search_kept(heads, [], torch.zeros(0), per_head, 1.0, 1.0, 1.0, 4.0, head_groups=[2, 1])
    assert_same(kh, [torch.tensor([False, False, True, True]), torch.tensor([True, False])])
    # with h0_3 lower, c=1 wins: {0, 2}
    heads[0] = torch.tensor([9.0, 1.0, 10.0, 8.0])
    kh, _, _ = search_kept(heads, [], torch.zeros(0), per_head, 1.0, 1.0, 1.0, 4.0, head_groups=[2, 1])
    assert_same(kh, [torch.tensor([True, False, True, False]), torch.tensor([True, False])])


def expected_gqa(prefix: torch.Tensor, dens: list[float], group: int) -> torch.Tensor:
    """Independent statement of the repair rule for one layer."""
    n_groups = len(dens) // group
    if group == 1 or not prefix.any():
        return prefix
    best = None
    for c in range(1, group + 1):
        chosen: list[int] = []
        total = 0.0
        for g in range(n_groups):
            members = [j for j in range(g * group, (g + 1) * group) if prefix[j]]
            if len(members) >= c:
                members.sort(key=lambda j: (-dens[j], j))
                chosen += members[:c]
                total += sum(dens[j] for j in members[:c])
        if not chosen:
            continue
        key = (total, len(chosen), c)
        if best is None or key > best[0]:
            best = (key, chosen)
    out = torch.zeros(len(dens), dtype=torch.bool)
    out[best[1]] = True
    return out


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    groups=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    frac=st.floats(0.0, 1.1),
)
def test_gqa_property(data, groups, frac) -> None:
    heads = []
    for g in groups:
        n_groups = data.draw(st.integers(0, 3))
        heads.append(torch.tensor(data.draw(st.lists(st.integers(0, 4).map(float), min_size=g * n_groups,
                                                     max_size=g * n_groups)), dtype=torch.float32))
    neurons = [torch.tensor(data.draw(st.lists(st.integers(0, 4).map(float), max_size=3)))]
    hidden = torch.tensor(data.draw(st.lists(st.integers(0, 4).map(float), max_size=3)))
    count = gqa_count(groups)
    full = count([torch.ones_like(h, dtype=torch.bool) for h in heads],
                 [torch.ones_like(n, dtype=torch.bool) for n in neurons],
                 torch.ones_like(hidden, dtype=torch.bool))
    budget = frac * full
    args = (heads, neurons, hidden, count, 7.0, 5.0, 11.0, budget)
    ph, pn, pd = search_kept(*args)  # plain prefix, no repair
    kh, kn, kd = search_kept(*args, head_groups=groups)
    assert_same(kn, pn)
    assert torch.equal(kd, pd)
    assert count(kh, kn, kd) <= budget
    for k, p, s, g in zip(kh, ph, heads, groups):
        assert k.shape == s.shape
        assert bool((k <= p).all()), "repair may only remove heads"
        per_group = k.view(-1, g).sum(dim=1) if k.numel() else torch.zeros(0)
        nonzero = per_group[per_group > 0]
        assert nonzero.unique().numel() <= 1, "surviving groups must keep equal head counts"
        assert torch.equal(k, expected_gqa(p, [x / 7.0 for x in s.tolist()], g))


# ---------------------------------------------------------------- validation


def test_nan_and_inf_errors() -> None:
    base = dict(HAND, budget=10.0)
    with pytest.raises(ValueError, match="neuron"):
        search_kept(**{**base, "neuron_scores": [torch.tensor([float("nan"), 1.0])]})
    with pytest.raises(ValueError, match="head"):
        search_kept(**{**base, "head_scores": [torch.tensor([float("inf"), 1.0])]})
    with pytest.raises(ValueError, match="hidden"):
        search_kept(**{**base, "hidden_scores": torch.tensor([1.0, float("nan")])})
    with pytest.raises(ValueError, match="NaN"):
        search_kept(**{**base, "budget": float("nan")})


def test_impossible_budget() -> None:
    def with_floor(heads, neurons, hidden) -> float:
        return 5.0 + linear_count(heads, neurons, hidden)

    with pytest.raises(ValueError, match="target is impossible"):
        search_kept(**{**HAND, "count_fn": with_floor}, budget=4.0)
    kh, kn, kd = search_kept(**{**HAND, "count_fn": with_floor}, budget=5.0)
    assert not any(k.any() for k in kh + kn) and not kd.any()


def test_mismatch_errors() -> None:
    with pytest.raises(ValueError, match="cost"):
        search_kept(**{**HAND, "neuron_cost": [1.0, 2.0]}, budget=10.0)
    with pytest.raises(ValueError, match="cost"):
        search_kept(**{**HAND, "head_cost": 0.0}, budget=10.0)
    with pytest.raises(ValueError, match="head_groups"):
        search_kept(**HAND, budget=10.0, head_groups=[2, 2])
    with pytest.raises(ValueError, match="multiple"):
        search_kept(**{**HAND, "head_scores": [torch.ones(3)]}, budget=10.0, head_groups=[2])
    with pytest.raises(ValueError, match="1-D"):
        search_kept(**{**HAND, "hidden_scores": torch.ones(2, 2)}, budget=10.0)
