"""Tests of the training-time machinery: salience math, rank-growth planning, optimizer surgery, the budget filler,
and `APTCallback` / `APTTrainer` inside a stock `transformers.Trainer` (spec C, D, E, K.3-K.8).

Every run trains a tiny random model on a learnable synthetic task (label = first token > 50) for 45 optimizer steps
with four pruning events at steps 13, 22, 31 and 40. Torch is pinned to one thread for this module: on a 2-core
machine shared with other processes, tiny matrix products are ~8x faster single-threaded.
"""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace
from typing import Optional

import peft
import pytest
import scipy.stats
import torch
import transformers
from conftest import TokenTask, make_model
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Trainer, TrainerCallback, TrainingArguments

import apt_hf
from apt_hf import salience, tuning
from apt_hf.arch import CountModel, describe
from apt_hf.callback import APTCallback
from apt_hf.layer import ParamChange
from apt_hf.optim import apply_param_changes, remap_state
from apt_hf.salience import SalienceCollector
from apt_hf.schedule import adapter_budget
from apt_hf.search import fill_budget, search_kept, swap_to_budget

MAX_STEPS = 45
LR = 1e-3
SCHEDULE = dict(pruning_start=5, pruning_end=40, sparsity_warmup=5, num_pruning_events=4, mask_decay_window=5,
                mask_decay=0.25)
EVENTS = (13, 22, 31, 40)


# ================================================================================================ helpers
def tiny(kind: str) -> transformers.PreTrainedModel:
    """``bert``: BertForSequenceClassification (hidden 32, 8 heads of 4, FFN 96); ``gqa``:
    LlamaForSequenceClassification (hidden 64, 8 heads / 2 kv heads, FFN 80).

    Blocks of such tiny models are coarse (one head or hidden dimension can be several % of the target), so the
    final density lands within 1 % of the target only when some blocks remain to fill the gap; the sizes here do.
    """
    if kind == "gqa":
        return make_model("llama_cls", num_labels=2, num_key_value_heads=2)
    return make_model(kind, num_labels=2, num_attention_heads=8, intermediate_size=96)


def apt_model(kind: str = "bert", **cfg) -> peft.PeftModel:
    return peft.get_peft_model(tiny(kind), apt_hf.APTConfig(task_type="SEQ_CLS", **{**SCHEDULE, **cfg}))


def make_args(out, max_steps: int = MAX_STEPS, **kw) -> TrainingArguments:
    base = dict(per_device_train_batch_size=8, max_steps=max_steps, learning_rate=LR, logging_steps=5, report_to=[],
                save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    return TrainingArguments(str(out), **{**base, **kw})


def run(pm, out, callbacks=(), trainer_cls=Trainer, add_apt: bool = True, **kw):
    """Train ``pm``; returns (trainer, the APTCallback instance)."""
    cbs = list(callbacks)
    apt_cb = None
    if add_apt:
        apt_cb = next((c for c in cbs if isinstance(c, APTCallback)), None)
        if apt_cb is None:
            apt_cb = APTCallback()
            cbs.append(apt_cb)
    tr = trainer_cls(model=pm, args=make_args(out, **kw), train_dataset=TokenTask(), callbacks=cbs)
    tr.train()
    if apt_cb is None:
        apt_cb = next(c for c in tr.callback_handler.callbacks if isinstance(c, APTCallback))
    return tr, apt_cb


def inner_optimizer(opt) -> torch.optim.Optimizer:
    while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def ranks(pm) -> dict[str, int]:
    return {n: l.r["default"] for n, l in apt_hf.find_apt_model(pm).apt_layers().items()}


def density(pm) -> float:
    apt = apt_hf.find_apt_model(pm)
    return apt_hf.count_params(pm) / apt.n_params


def train_losses(tr) -> list[float]:
    return [h["loss"] for h in tr.state.log_history if "loss" in h]


class Recorder(TrainerCallback):
    """After APTCallback: per step, the shape of every parameter, the ranks, the LR and the attention geometry."""

    def __init__(self) -> None:
        self.shapes: dict[int, dict[str, tuple]] = {}
        self.ranks: dict[int, dict[str, int]] = {}
        self.lr: dict[int, float] = {}
        self.sites: dict[int, list] = {}
        self.optimizer_ids: set = set()

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        self.shapes[0] = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self.ranks[0] = ranks(model)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        s = state.global_step
        self.shapes[s] = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self.ranks[s] = ranks(model)
        self.lr[s] = optimizer.param_groups[0]["lr"]
        self.optimizer_ids.add((id(optimizer), id(inner_optimizer(optimizer))))
        if s in EVENTS:
            self.sites[s] = [(site.num_heads, site.num_kv_heads, site.head_dim,
                              getattr(site.core, "num_key_value_groups", None),
                              apt_hf.arch.base_linear(site.o).in_features,
                              None if site.v is None else apt_hf.arch.base_linear(site.v).out_features)
                             for site in describe(model).attentions]


def base_numel(shapes: dict[str, tuple]) -> int:
    return sum(math.prod(s) for n, s in shapes.items() if "apt_" not in n)


# ================================================================================================ 1. unit
def test_product_of_sums_hand_example():
    act = torch.tensor([[[1.0, -2.0, 0.0], [3.0, 0.5, -1.0]], [[-1.0, 1.0, 2.0], [0.0, 0.0, 1.0]]])  # (2, 2, 3)
    grad = torch.tensor([[[0.5, 1.0, -1.0], [0.0, -2.0, 1.0]], [[1.0, 0.0, 0.0], [-0.5, 1.0, 2.0]]])
    # sum|act| over (batch, tokens) = [5, 3.5, 4]; sum|grad| = [2, 4, 4]
    expected = torch.tensor([5.0 * 2.0, 3.5 * 4.0, 4.0 * 4.0])
    assert torch.allclose(salience.product_of_sums(act, grad), expected)
    # 2-D (tokens, coords) works the same way
    assert torch.allclose(salience.product_of_sums(act[0], grad[0]), torch.tensor([4.0 * 0.5, 2.5 * 3.0, 1.0 * 2.0]))


@pytest.mark.parametrize("seed", [3, 4])
def test_column_kurtosis_matches_scipy(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(37, 11, generator=g, dtype=torch.float64) ** 3 + 0.3  # heavy tails, non-zero mean
    x = torch.randn(11, generator=g, dtype=torch.float64) * 5
    x[4] = 0.0  # an inactive input: its column of O is all zeros
    got = salience.column_kurtosis(w, x)
    want = scipy.stats.kurtosis((w * x).numpy(), axis=0, fisher=True, bias=True)
    want[4] = 0.0  # scipy returns NaN for a constant sample; APT scores it 0
    assert got.shape == (11,)
    assert torch.allclose(got.double(), torch.from_numpy(want), rtol=1e-4, atol=1e-4)


def test_column_kurtosis_constant_columns_are_zero():
    w = torch.tensor([[2.0, 1.0, 0.3], [2.0, -1.0, 0.3], [2.0, 1.0, 0.3], [2.0, -1.0, 0.3]])
    got = salience.column_kurtosis(w, torch.tensor([1.7, 1.0, -3.1]))
    assert got[0] == 0 and got[2] == 0 and torch.isfinite(got).all()  # constant columns (rounding noise ignored)
    assert torch.isclose(got[1], torch.tensor(-2.0))  # two-point distribution: kurtosis 1, excess -2


def test_ema_and_outlier_term():
    out = salience.ema(torch.tensor([1.0, 2.0, 0.0]), torch.tensor([3.0, 4.0, 10.0]), 0.85)
    assert torch.allclose(out, torch.tensor([0.85 + 0.45, 1.7 + 0.6, 1.5]))
    assert torch.allclose(salience.outlier_term(torch.tensor([-1.0, 0.0, 4.0])), torch.tensor([0.0, 0.0, 2.0]))


def test_head_kurtosis_per_head():
    g = torch.Generator().manual_seed(0)
    d, heads, dh = 6, 3, 4
    w = torch.randn(d, heads * dh, generator=g)
    x = torch.randn(heads * dh, generator=g).abs() + 0.1
    x[5] = 20.0  # an outlier coordinate in head 1
    got = salience.head_kurtosis(w, x, dh)
    assert got.shape == (heads,)
    want = [scipy.stats.kurtosis((w[:, h * dh:(h + 1) * dh] * x[h * dh:(h + 1) * dh]).reshape(-1).numpy(),
                                 fisher=True, bias=True) for h in range(heads)]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float32), rtol=1e-4, atol=1e-4)
    # column kurtosis: kurtosis of column j of W * x over the output axis
    col = salience.column_kurtosis(w, x)
    want_col = scipy.stats.kurtosis((w * x).numpy(), axis=0, fisher=True, bias=True)
    assert torch.allclose(col, torch.from_numpy(want_col).float(), rtol=1e-4, atol=1e-4)


def test_hidden_dimensions_get_the_kurtosis_term():
    """Spec C.1/C.2, K.3: with use_kurtosis, a hidden dimension's score adds sqrt(max(K, 0)) of its row of
    O = W * x_bar (W: each attention output and FFN down projection, x_bar: its input averaged over batch and
    tokens), summed over those projections; heads and neurons get theirs as before."""
    pm = peft.get_peft_model(make_model("llama_gqa"), apt_hf.APTConfig(task_type="CAUSAL_LM"))
    layout = apt_hf.find_apt_model(pm).layout
    plain, kurt = SalienceCollector(layout, 0.85, False), SalienceCollector(layout, 0.85, True)
    plain.attach(layout)
    kurt.attach(layout)
    means: dict = {}
    hooks = [site.o.register_forward_pre_hook(lambda m, a, key=("o", i): means.__setitem__(key, a[0].detach()))
             for i, site in enumerate(layout.attentions)]
    hooks += [site.down.register_forward_pre_hook(lambda m, a, key=("d", i): means.__setitem__(key, a[0].detach()))
              for i, site in enumerate(layout.ffns)]
    ids = torch.randint(3, 101, (4, 7), generator=torch.Generator().manual_seed(0))
    pm.train()
    pm(input_ids=ids, labels=ids).loss.backward()
    for h in hooks:
        h.remove()
    assert plain.end_step() and kurt.end_step()
    want = torch.zeros_like(plain.ema_hidden, dtype=torch.float64)
    for (kind, i), x in means.items():
        site = layout.attentions[i] if kind == "o" else layout.ffns[i]
        w = (site.o if kind == "o" else site.down).weight.detach()
        o = (w * x.mean(dim=(0, 1))).double().numpy()
        want += torch.from_numpy(scipy.stats.kurtosis(o, axis=1, fisher=True, bias=True)).clamp_min(0).sqrt()
    assert float(want.sum()) > 0
    torch.testing.assert_close((kurt.ema_hidden - plain.ema_hidden).double(), 0.15 * want, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(a, b) for a, b in zip(kurt.ema_heads, plain.ema_heads))
    assert any(not torch.allclose(a, b) for a, b in zip(kurt.ema_neurons, plain.ema_neurons))


def test_plan_rank_growth_hand_example():
    # (in + out, r); "a" is the most important but already at the cap, so it is skipped.
    sizes = {"a": (10, 16), "b": (10, 8), "c": (20, 8), "d": (10, 8)}
    imp = {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}
    current = 160 + 80 + 160 + 80
    # exact fill: q = 1 + (720 - 480) / (80 + 160) = 2
    assert tuning.plan_rank_growth(sizes, imp, 720, max_rank=16) == {"b": 16, "c": 16}
    # flooring: q = 1 + 220/240 -> floor(8 q) = 15; the budget is filled up to less than one rank row of each
    plan = tuning.plan_rank_growth(sizes, imp, 700, max_rank=16)
    assert plan == {"b": 15, "c": 15}
    after = current + 10 * 7 + 20 * 7
    assert after <= 700 < after + 10 + 20
    # cap: a huge budget stops at max_rank; only floor(4 / 2) = 2 adapters grow
    assert tuning.plan_rank_growth(sizes, imp, 10**6, max_rank=16) == {"b": 16, "c": 16}
    # another order of importance picks another top half (unknown importance counts as 0)
    assert tuning.plan_rank_growth(sizes, {"d": 5.0, "c": 1.0}, 720, max_rank=16) == {"d": 16, "c": 16}
    # no growth when the budget is already met
    assert tuning.plan_rank_growth(sizes, imp, current, max_rank=16) == {}


def test_roberta_base_adapter_budget_spec_e2():
    """Spec E.2: q, v (768+768)*8 and FFN-up (768+3072)*8 over 12 layers = 663,552; budget 1.30 ... 4.00 x."""
    layers = {}
    for i in range(12):
        for name, (i_f, o_f) in {"query": (768, 768), "value": (768, 768), "intermediate.dense": (768, 3072)}.items():
            layers[f"l{i}.{name}"] = SimpleNamespace(in_features=i_f, out_features=o_f, r={"default": 8})
    initial = tuning.adapter_size(layers)
    assert initial == 663_552
    events = [811, 1423, 2034, 2646, 3257, 3869, 4480, 5092, 5703, 6315]
    ratios = [adapter_budget(e, start=200, end=6315, initial=initial, ratio=4.0) / initial for e in events]
    assert [round(r, 2) for r in ratios] == [1.30, 1.60, 1.90, 2.20, 2.50, 2.80, 3.10, 3.40, 3.70, 4.00]
    # the first event grows the top 18 of 36 adapters and stays within the budget
    sizes = {n: (l.in_features + l.out_features, 8) for n, l in layers.items()}
    imp = {n: float(k) for k, n in enumerate(layers)}
    budget = adapter_budget(811, start=200, end=6315, initial=initial, ratio=4.0)
    plan = tuning.plan_rank_growth(sizes, imp, budget, max_rank=64)
    assert len(plan) == 18 and set(plan) == set(list(layers)[18:])
    grown = initial + sum(sizes[n][0] * (r - 8) for n, r in plan.items())
    assert grown <= budget


def test_remap_state_pruning_selects_rows_and_columns():
    old = torch.nn.Parameter(torch.zeros(4, 3))
    value = torch.arange(12.0).view(4, 3)
    rows = torch.tensor([0, 2])
    change = ParamChange(old, torch.nn.Parameter(torch.zeros(2, 3)), (rows, None))
    assert torch.equal(remap_state(value, change), value[rows])
    cols = torch.tensor([1, 2])
    change = ParamChange(old, torch.nn.Parameter(torch.zeros(4, 2)), (None, cols))
    assert torch.equal(remap_state(value, change), value[:, cols])
    change = ParamChange(old, torch.nn.Parameter(torch.zeros(2, 2)), (rows, cols))
    assert torch.equal(remap_state(value, change), value[rows][:, cols])
    # scalar state (Adam's step) passes through
    step = torch.tensor(7.0)
    assert remap_state(step, change) is step


def test_remap_state_growth_zero_pads():
    a_old = torch.nn.Parameter(torch.zeros(2, 3))
    value = torch.arange(1.0, 7.0).view(2, 3)
    change = ParamChange(a_old, torch.nn.Parameter(torch.zeros(5, 3)), (torch.arange(2), None))
    out = remap_state(value, change)
    assert out.shape == (5, 3) and torch.equal(out[:2], value) and torch.equal(out[2:], torch.zeros(3, 3))
    b_old = torch.nn.Parameter(torch.zeros(3, 2))
    vb = torch.arange(1.0, 7.0).view(3, 2)
    change = ParamChange(b_old, torch.nn.Parameter(torch.zeros(3, 4)), (None, torch.arange(2)))
    out = remap_state(vb, change)
    assert torch.equal(out[:, :2], vb) and torch.equal(out[:, 2:], torch.zeros(3, 2))


def test_apply_param_changes_keeps_optimizer_and_moments():
    p = torch.nn.Parameter(torch.randn(4, 3))
    q = torch.nn.Parameter(torch.randn(2))
    opt = torch.optim.AdamW([p, q], lr=0.1)
    (p.sum() * 2 + (p ** 2).sum() + q.sum()).backward()
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    q_state = {k: v.clone() for k, v in opt.state[q].items()}
    rows = torch.tensor([1, 3])
    new = torch.nn.Parameter(p.data[rows].clone())
    assert apply_param_changes(opt, [ParamChange(p, new, (rows, None))]) == 1
    assert opt.param_groups[0]["params"][0] is new and p not in opt.state
    assert torch.equal(opt.state[new]["exp_avg"], before["exp_avg"][rows])
    assert torch.equal(opt.state[new]["exp_avg_sq"], before["exp_avg_sq"][rows])
    assert torch.equal(opt.state[new]["step"], before["step"])
    assert all(torch.equal(opt.state[q][k], v) for k, v in q_state.items())
    new.grad = torch.ones_like(new)
    opt.step()  # still works with the swapped tensor
    assert int(opt.state[new]["step"]) == 2


_COUNT_MODELS: dict = {}  # built on first use: count constants of the conftest tiny BERT and tiny LLaMA-GQA


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(["bert", "gqa"]), seed=st.integers(0, 10**6), frac=st.floats(0.02, 1.0),
       spread=st.floats(0.0, 3.0))
def test_fill_budget_within_budget_and_above_prefix(kind, seed, frac, spread):
    if not _COUNT_MODELS:
        _COUNT_MODELS.update(bert=CountModel.from_layout(describe(make_model("bert"))),
                             gqa=CountModel.from_layout(describe(make_model("llama_gqa"))))
    cm: CountModel = _COUNT_MODELS[kind]
    g = torch.Generator().manual_seed(seed)
    n_layers = len(cm.head_dim)
    n_heads = {"bert": 4, "gqa": 8}[kind]
    n_neurons = {"bert": 48, "gqa": 80}[kind]
    d = {"bert": 32, "gqa": 64}[kind]

    def scores(*shape):
        return torch.exp(spread * torch.randn(*shape, generator=g))

    hs = [scores(n_heads) for _ in range(n_layers)]
    ns = [scores(n_neurons) for _ in range(n_layers)]
    ds = scores(d)
    full = cm.count([torch.ones(n_heads, dtype=torch.bool)] * n_layers,
                    [torch.ones(n_neurons, dtype=torch.bool)] * n_layers, torch.ones(d, dtype=torch.bool))
    budget = frac * full
    head_cost, neuron_cost = cm.block_costs(d)
    hidden_cost = cm.hidden_cost([torch.ones(n_heads, dtype=torch.bool)] * n_layers,
                                 [torch.ones(n_neurons, dtype=torch.bool)] * n_layers)
    kept = search_kept(hs, ns, ds, cm.count, head_cost, neuron_cost, hidden_cost, budget,
                       head_groups=list(cm.group_size))
    dens = ([s / c for s, c in zip(hs, head_cost)], [s / c for s, c in zip(ns, neuron_cost)], ds / hidden_cost)
    filled = fill_budget(cm, kept, dens, budget)
    prefix_count, count = cm.count(*kept), cm.count(*filled)
    assert count <= budget
    assert count >= prefix_count
    # a superset of the prefix; grouped-query layers grow by whole rows and revived groups: every surviving group
    # survives, and all keep the same number of query heads
    for a, b in zip(kept[0] + kept[1] + [kept[2]], filled[0] + filled[1] + [filled[2]]):
        assert bool((b | a).eq(b).all())
    for l, g_size in enumerate(cm.group_size):
        if g_size > 1:
            before, after = kept[0][l].view(-1, g_size), filled[0][l].view(-1, g_size)
            assert bool((after.any(1) | ~before.any(1)).all())
            per_group = after.sum(1)[after.any(1)]
            assert bool((per_group == per_group[0]).all()) if per_group.numel() else True
    # maximal: no single remaining neuron / hidden dimension / plain head would still fit
    for l, k in enumerate(filled[1]):
        for j in torch.nonzero(~k).flatten().tolist()[:3]:
            more = [x.clone() for x in filled[1]]
            more[l][j] = True
            assert cm.count(filled[0], more, filled[2]) > budget
    for j in torch.nonzero(~filled[2]).flatten().tolist()[:3]:
        more = filled[2].clone()
        more[j] = True
        assert cm.count(filled[0], filled[1], more) > budget


# ================================================================================================ 2. integration
def check_integration(tr, apt_cb, rec: Recorder, pm, target: float) -> None:
    apt = apt_hf.find_apt_model(pm)
    assert apt_cb.plan.events == EVENTS
    # training ran to the end and every logged loss is finite
    assert tr.state.global_step == MAX_STEPS
    losses = train_losses(tr)
    assert len(losses) >= MAX_STEPS // 5 and all(math.isfinite(x) for x in losses)
    assert apt_cb.events_done == len(EVENTS)
    # final density: at or below the target, by less than 1 % of it
    dens = apt_hf.count_params(pm) / apt.n_params
    assert 0.99 * target <= dens <= target + 1e-12, dens
    # parameter tensors shrink exactly at the events (and nowhere else)
    steps = sorted(rec.shapes)
    changed = [s for prev, s in zip(steps, steps[1:]) if rec.shapes[s] != rec.shapes[prev]]
    assert changed == list(EVENTS)
    for e in EVENTS:
        assert base_numel(rec.shapes[e]) < base_numel(rec.shapes[e - 1]), f"no base tensor shrank at event {e}"
        prev = rec.shapes[e - 1]
        assert any("apt_" not in n and math.prod(s) < math.prod(prev[n]) for n, s in rec.shapes[e].items())
    # every parameter that exists is trained by the optimizer, and only those
    opt = inner_optimizer(tr.optimizer)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in pm.parameters() if p.requires_grad}
    # the optimizer and its accelerate wrapper are never replaced
    assert rec.optimizer_ids == {(id(tr.optimizer), id(opt))}
    # ranks: at each event at most the top half grows; some stay at r; none passes the cap
    r0, n = pm.peft_config["default"].r, len(rec.ranks[0])
    assert set(rec.ranks[0].values()) == {r0}
    for e in EVENTS:
        grown = [k for k in rec.ranks[e] if rec.ranks[e][k] > rec.ranks[e - 1][k]]
        assert 1 <= len(grown) <= n // 2, (e, grown)
        assert all(rec.ranks[e][k] == rec.ranks[e - 1][k] for k in rec.ranks[e] if k not in grown)
        assert max(rec.ranks[e].values()) <= pm.peft_config["default"].max_rank
    after_first = rec.ranks[EVENTS[0]].values()
    assert any(r > r0 for r in after_first) and sum(r == r0 for r in after_first) >= n - n // 2
    final = ranks(pm)
    assert any(r > r0 for r in final.values())
    # the adapter factor shapes follow the ranks
    for name, layer in apt.apt_layers().items():
        assert layer.apt_A["default"].shape[0] == layer.apt_B["default"].shape[1] == final[name]


def test_swap_to_budget_lands_within_one_percent():
    """A large block (a head) that stopped the prefix, everything smaller already kept: fill_budget cannot add
    anything, so the count sits a head's cost below the budget; the swap keeps that head and drops the least dense
    neurons instead, landing in [0.99 budget, budget]."""
    cm = CountModel.from_layout(describe(tiny("bert")))
    heads = [torch.ones(8, dtype=torch.bool) for _ in range(3)]
    neurons = [torch.ones(96, dtype=torch.bool) for _ in range(3)]
    hidden = torch.ones(32, dtype=torch.bool)
    full = cm.count(heads, neurons, hidden)
    heads[0][5] = False  # the least dense block is a head ...
    dens = ([torch.full((8,), 2.0) for _ in range(3)], [torch.linspace(1.5, 3.0, 96) for _ in range(3)],
            torch.full((32,), 5.0))
    dens[0][0][5] = 1.0
    budget = full - 100  # ... but only 2 neurons' worth must go
    kept = fill_budget(cm, (heads, neurons, hidden), dens, budget)
    assert cm.count(*kept) < 0.99 * budget  # the greedy result: a whole head below the budget
    swapped = swap_to_budget(cm, kept, dens, budget)
    assert 0.99 * budget <= cm.count(*swapped) <= budget
    assert bool(swapped[0][0][5]) and int(sum(int(n.sum()) for n in swapped[1])) < 3 * 96
    assert int(sum(int((~n).sum()) for n in swapped[1])) <= 3
    # blocks that are not allowed (held back while distilling) are never taken back
    allowed = ([h.clone() for h in heads], [torch.ones(96, dtype=torch.bool)] * 3, torch.ones(32, dtype=torch.bool))
    same = swap_to_budget(cm, kept, dens, budget, allowed=allowed)
    assert all(torch.equal(a, b) for a, b in zip(same[0] + same[1] + [same[2]], kept[0] + kept[1] + [kept[2]]))



def test_swap_to_budget_takes_grouped_query_rows():
    """Grouped-query layers swap whole rows (one query head per live key/value group): a row that stopped the prefix
    is taken back against the least dense neurons, no group loses its last head, and the count lands in
    [0.99 budget, budget] (issue 13 item 5 on a LLaMA-GQA model, where heads were never swapped before)."""
    layout = describe(tiny("gqa"))
    cm = CountModel.from_layout(layout)
    g = cm.group_size[0]
    assert g > 1
    heads = [torch.ones(s.num_heads, dtype=torch.bool) for s in layout.attentions]
    neurons = [torch.ones(f.num_neurons, dtype=torch.bool) for f in layout.ffns]
    hidden = torch.ones(layout.hidden_size, dtype=torch.bool)
    full = cm.count(heads, neurons, hidden)
    row = [q * g for q in range(len(heads[0]) // g)]  # the first head of every group of layer 0
    for j in row:
        heads[0][j] = False
    dens = ([torch.full((len(h),), 2.0) for h in heads], [torch.linspace(1.5, 3.0, len(n)) for n in neurons],
            torch.full((len(hidden),), 5.0))
    dens[0][0][row] = 1.0
    kept = fill_budget(cm, (heads, neurons, hidden), dens, full - 100)
    assert cm.count(*kept) < 0.99 * (full - 100)  # the greedy result: a whole row below the budget
    swapped = swap_to_budget(cm, kept, dens, full - 100)
    assert 0.99 * (full - 100) <= cm.count(*swapped) <= full - 100
    assert bool(swapped[0][0].all())  # the row came back ...
    assert int(sum(int((~n).sum()) for n in swapped[1])) >= 1  # ... against neurons
    # a row that would kill a group (one head left in it) is never dropped
    one = [torch.zeros(len(h), dtype=torch.bool) for h in heads]
    for h in one:
        h[::g] = True
    rows = apt_hf.search._gqa_rows(one[0], torch.ones_like(one[0]), dens[0][0], g, 0)
    assert [r[4] for r in rows] == [False]  # only the row to take back; none to drop

def test_fill_and_swap_bring_back_a_dead_key_value_group():
    """A grouped-query layer whose last event dropped a whole key/value group: when the group's cost fits the budget,
    fill_budget brings it back whole (key/value head plus as many query heads as the other groups keep, its best
    ones); when only a swap fits, swap_to_budget takes it back against the least dense neurons; a group whose heads
    are not allowed never comes back (found in a DDP LLaMA-GQA run that ended at density 0.1798 for a target of
    0.20, tests/mp_script.py --kind gqa --sparsity 0.8 --kurtosis)."""
    layout = describe(tiny("gqa"))
    cm = CountModel.from_layout(layout)
    g = cm.group_size[0]
    heads = [torch.ones(s.num_heads, dtype=torch.bool) for s in layout.attentions]
    neurons = [torch.ones(f.num_neurons, dtype=torch.bool) for f in layout.ffns]
    hidden = torch.ones(layout.hidden_size, dtype=torch.bool)
    assert g > 2 and len(heads[0]) // g >= 2
    heads[0].view(-1, g)[1:] = False  # layer 0 keeps 2 query heads in group 0; the other groups are dead
    heads[0][2:g] = False
    dens = ([torch.linspace(1.0, 2.0, len(h)) for h in heads], [torch.linspace(1.5, 3.0, len(n)) for n in neurons],
            torch.full((len(hidden),), 5.0))
    base = cm.count(heads, neurons, hidden)
    revived = [h.clone() for h in heads]
    best = [g + g - 2, g + g - 1]  # the two densest heads of group 1
    revived[0][best] = True
    one_group = cm.count(revived, neurons, hidden) - base
    # the group fits: it comes back whole, with the best two heads, and nothing breaks the group rule
    filled = fill_budget(cm, (heads, neurons, hidden), dens, base + one_group + 10)
    grouped = filled[0][0].view(-1, g)
    assert bool(grouped.any(1)[1]) and sorted(torch.nonzero(grouped[1]).flatten().add(g).tolist()) == best
    kept_per_group = grouped.sum(1)[grouped.any(1)]
    assert bool((kept_per_group == 2).all())
    assert base + one_group <= cm.count(*filled) <= base + one_group + 10
    # not allowed (held back while distilling): never brought back
    allowed = ([h.clone() for h in heads], [torch.ones_like(n) for n in neurons], torch.ones_like(hidden))
    held = fill_budget(cm, (heads, neurons, hidden), dens, base + one_group + 10, allowed)
    assert torch.equal(held[0][0], heads[0])
    # only a swap fits: group 0 whole (no row left to add), the budget 1,000 parameters short of the group's return
    heads[0][:g] = True
    base = cm.count(heads, neurons, hidden)
    whole = [h.clone() for h in heads]
    whole[0][:] = True
    budget = cm.count(whole, neurons, hidden) - 1000
    no_room = fill_budget(cm, (heads, neurons, hidden), dens, budget)
    assert cm.count(*no_room) == base < 0.99 * budget
    swapped = swap_to_budget(cm, no_room, dens, budget)
    assert 0.99 * budget <= cm.count(*swapped) <= budget
    assert bool(swapped[0][0].all())
    assert int(sum(int((~n).sum()) for n in swapped[1])) >= 1000 // (cm.ffn_mats[0] * len(hidden))


class EventLog(TrainerCallback):
    """Kept parameter count after every step (added after APTCallback)."""

    def __init__(self) -> None:
        self.count: dict[int, int] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.count[state.global_step] = apt_hf.count_params(model)
        return control


def test_final_density_within_one_percent_below_target(tmp_path):
    """Issue 13 recipe: tiny BERT (hidden 64, 4 layers of 4 heads, FFN 128), stock Trainer + APTCallback, 160 steps
    at batch 16. With this seed the last event used to remove one more head and end at density 0.3749 for a 0.40
    target; every event must land within 1 % below its target, and nothing changes after the final one."""
    class Task(torch.utils.data.Dataset):
        def __init__(self) -> None:
            g = torch.Generator().manual_seed(0)
            self.ids = torch.randint(3, 120, (2560, 8), generator=g)

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict:
            x = self.ids[i]
            return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": (x[0] > 60).long()}

    torch.manual_seed(2)
    config = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=128, num_labels=2)
    pm = peft.get_peft_model(transformers.BertForSequenceClassification(config), apt_hf.APTConfig(
        task_type="SEQ_CLS", target_sparsity=0.6, pruning_start=0.05, pruning_end=0.6, sparsity_warmup=0.05,
        num_pruning_events=5, mask_decay_window=10))
    log = EventLog()
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=16, max_steps=160, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1000, seed=2)
    cb = APTCallback()
    Trainer(model=pm, args=args, train_dataset=Task(), callbacks=[cb, log]).train()
    n = apt_hf.find_apt_model(pm).n_params
    for event in cb.plan.events:
        target = cb.plan.target(event)
        assert 0.99 * target <= log.count[event] / n <= target, (event, log.count[event] / n, target)
    last = cb.plan.events[-1]
    assert all(log.count[s] == log.count[last] for s in range(last, 161))
    assert 0.396 <= log.count[160] / n <= 0.40


def test_bert_trainer_with_callback(tmp_path):
    pm = apt_model("bert")
    rec = Recorder()
    tr, apt_cb = run(pm, tmp_path, callbacks=[APTCallback(), rec])
    check_integration(tr, apt_cb, rec, pm, target=0.4)
    # the model still answers after all the surgery
    with torch.no_grad():
        out = pm(**{k: v[:4] for k, v in TokenTask()[:4].items() if k != "labels"}).logits
    assert out.shape == (4, 2) and torch.isfinite(out).all()


def test_llama_gqa_trainer_with_callback(tmp_path):
    # high sparsity and no kurtosis term so that query heads are actually removed in this tiny model
    pm = apt_model("gqa", target_sparsity=0.8, use_kurtosis=False)
    rec = Recorder()
    tr, apt_cb = run(pm, tmp_path, callbacks=[APTCallback(), rec])
    check_integration(tr, apt_cb, rec, pm, target=0.2)
    removed_heads = False
    for e in EVENTS:
        for h, kv, dh, groups, o_in, v_out in rec.sites[e]:
            removed_heads |= h < 8
            if h == 0:  # a fully removed attention is allowed
                assert o_in == 0
                continue
            assert kv > 0 and h % kv == 0, (e, h, kv)  # same number of query heads in every kept kv group
            assert groups == h // kv  # repeat_kv uses the updated group size
            assert o_in == h * dh and v_out == kv * dh
    assert removed_heads, "no query head was removed; the GQA check did not exercise anything (re-tune the test)"


# ================================================================================================ 3. optimizer
class MomentSnapshot(TrainerCallback):
    """Before APTCallback: at each event step's on_step_end, copy every trainable parameter and its Adam state."""

    def __init__(self, apt_cb: APTCallback) -> None:
        self.apt_cb = apt_cb
        self.before: dict[int, dict] = {}
        self.importance: dict[int, dict] = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        if state.global_step not in EVENTS:
            return
        opt = inner_optimizer(optimizer)
        snap = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                snap[name] = (p, p.detach().clone(), {k: v.clone() for k, v in opt.state.get(p, {}).items()})
        self.before[state.global_step] = snap
        self.importance[state.global_step] = (dict(self.apt_cb.importance.importance()), ranks(model))


class MomentCheck(TrainerCallback):
    """After APTCallback: check each parameter's moments against the snapshot (kept, sliced or zero-padded)."""

    def __init__(self, snap: MomentSnapshot) -> None:
        self.snap = snap
        self.kinds: dict[str, int] = {"same": 0, "sliced": 0, "grown": 0}
        self.checked_events: list[int] = []
        self.pending: Optional[dict] = None

    @staticmethod
    def _index(old: torch.Tensor, new: torch.Tensor, dim: int) -> list[list[int]]:
        """Candidate old positions for each new position along ``dim``; the other dimension is not sliced."""
        if new.shape[dim] >= old.shape[dim]:
            return [[j] for j in range(old.shape[dim])]
        other = 1 - dim
        c = old.shape[other]
        assert new.shape[other] >= c, "a tensor was sliced along both dimensions at once"
        n_part = new.narrow(other, 0, c)
        out = []
        for j in range(new.shape[dim]):
            row = n_part.select(dim, j)
            out.append([i for i in range(old.shape[dim]) if torch.equal(old.select(dim, i), row)])
        return out

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        s = state.global_step
        opt = inner_optimizer(optimizer)
        if self.pending is not None:  # the step after an event: every new parameter is trained
            for name, (p, data) in self.pending.items():
                assert not torch.equal(p.detach(), data), f"{name} did not train after the event"
            self.pending = None
        if s not in EVENTS:
            return
        before = self.snap.before[s]
        self.pending = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            old_p, old_data, old_state = before[name]
            new_state = opt.state.get(p, {})
            if not old_state:  # never had a gradient (e.g. distillation's Tr under a stock Trainer)
                assert not new_state
                continue
            assert set(new_state) == set(old_state), f"{name}: optimizer state keys changed (reset?)"
            assert torch.equal(new_state["step"], old_state["step"])
            self.pending[name] = (p, p.detach().clone())
            if p is old_p:
                for k in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(new_state[k], old_state[k]), f"{name}.{k} changed without a shape change"
                self.kinds["same"] += 1
                continue
            new_data = p.detach()
            o2, n2 = old_data.reshape(old_data.shape[0], -1), new_data.reshape(new_data.shape[0], -1)
            idx = [self._index(o2, n2, 0), self._index(o2, n2, 1)]
            sliced = any(new_data.shape[d] < old_data.shape[d] for d in range(new_data.dim()))
            grown = any(new_data.shape[d] > old_data.shape[d] for d in range(new_data.dim()))
            self.kinds["sliced"] += sliced
            self.kinds["grown"] += grown
            for k in ("exp_avg", "exp_avg_sq"):
                old_m = old_state[k].reshape(o2.shape)
                new_m = new_state[k].reshape(n2.shape)
                rows, cols = idx
                region = new_m[: len(rows), : len(cols)]
                if n2.shape[0] < o2.shape[0]:  # rows sliced: each kept row carries its old moments
                    old_sub = old_m[:, : len(cols)]
                    for i, cand in enumerate(rows):
                        assert cand, f"{name}: row {i} of the new tensor is not an old row"
                        assert any(torch.equal(region[i], old_sub[j]) for j in cand), \
                            f"{name}.{k}: moments of surviving row {i} were not carried over"
                elif n2.shape[1] < o2.shape[1]:  # columns sliced
                    old_sub = old_m[: len(rows)]
                    for c, cand in enumerate(cols):
                        assert cand, f"{name}: column {c} of the new tensor is not an old column"
                        assert any(torch.equal(region[:, c], old_sub[:, j]) for j in cand), \
                            f"{name}.{k}: moments of surviving column {c} were not carried over"
                else:  # pure growth: the old block sits first, unchanged
                    assert torch.equal(region, old_m), f"{name}.{k}: moments not kept across rank growth"
                # fresh rank rows / columns start from zero moments
                assert not new_m[len(rows):].any() and not new_m[:, len(cols):].any(), f"{name}.{k}: fresh != 0"
                # the carried moments are really non-zero, so a reset would have been caught
                if k == "exp_avg_sq":
                    assert region.abs().sum() > 0, f"{name}: carried exp_avg_sq is all zero"
        self.checked_events.append(s)


def test_event_keeps_optimizer_moments_and_schedule(tmp_path):
    pm = apt_model("bert")
    apt_cb = APTCallback()
    snap = MomentSnapshot(apt_cb)
    check = MomentCheck(snap)
    rec = Recorder()
    tr, _ = run(pm, tmp_path, callbacks=[snap, apt_cb, check, rec])
    assert check.checked_events == list(EVENTS)
    assert check.kinds["same"] > 0 and check.kinds["sliced"] > 0 and check.kinds["grown"] > 0, check.kinds
    # one optimizer object (and one accelerate wrapper) for the whole run
    assert rec.optimizer_ids == {(id(tr.optimizer), id(inner_optimizer(tr.optimizer)))}
    # the learning rate keeps following the linear schedule across the events
    for s, lr in rec.lr.items():
        assert lr == pytest.approx(LR * (MAX_STEPS - s) / MAX_STEPS, rel=1e-6, abs=1e-12), s
    # the grown adapters were the top half (by importance) of those below the cap
    n = len(rec.ranks[0])
    for e in EVENTS:
        imp, before_ranks = snap.importance[e]
        cap = pm.peft_config["default"].max_rank
        eligible = sorted((k for k in before_ranks if before_ranks[k] < cap), key=lambda k: -imp.get(k, 0.0))
        grown = {k for k in rec.ranks[e] if rec.ranks[e][k] > before_ranks[k]}
        assert grown <= set(eligible[: n // 2]), (e, grown)


# ================================================================================================ 4. bf16
@pytest.mark.parametrize("kind", ["bert", "gqa"])
def test_bf16_runs_through_all_events(kind, tmp_path):
    pm = apt_model(kind)  # LLaMA: kurtosis term on by default
    tr, apt_cb = run(pm, tmp_path, bf16=True)
    assert tr.state.global_step == MAX_STEPS and apt_cb.events_done == len(EVENTS)
    losses = train_losses(tr)
    assert losses and all(math.isfinite(x) for x in losses)
    assert 0.99 * 0.4 <= density(pm) <= 0.4
    assert apt_cb.salience_skipped == 0
    assert all(torch.isfinite(e).all() for e in apt_cb.collector.ema_heads + apt_cb.collector.ema_neurons)


# ================================================================================================ 5. accumulation
def test_gradient_accumulation_counts_optimizer_steps(tmp_path, monkeypatch):
    calls = []
    original = SalienceCollector.end_step

    def counting(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(SalienceCollector, "end_step", counting)

    class Substeps(TrainerCallback):
        n = 0

        def on_substep_end(self, args, state, control, **kw):
            Substeps.n += 1

    pm = apt_model("bert")
    tr, apt_cb = run(pm, tmp_path, callbacks=[Substeps()], per_device_train_batch_size=4, gradient_accumulation_steps=2)
    assert Substeps.n == MAX_STEPS  # one non-sync micro-batch per optimizer step: accumulation really happened
    plan = apt_cb.plan
    assert plan.events == EVENTS  # events are counted in optimizer steps
    assert len(calls) == plan.events[-1] - plan.start  # steps start+1 .. last event, once per optimizer step
    assert tr.state.global_step == MAX_STEPS and apt_cb.events_done == len(EVENTS)
    assert 0.99 * 0.4 <= density(pm) <= 0.4


# ================================================================================================ 6. non-finite
def test_non_finite_salience_step_is_skipped(tmp_path, monkeypatch):
    bad_step = 16  # inside the collection window, not an event or decay-window step
    state = {"armed": False, "injected": 0}
    original = SalienceCollector._accumulate

    def poisoned(self, store, i, score):
        if state["armed"]:
            state["armed"] = False
            state["injected"] += 1
            score = torch.full_like(score, float("inf"))
        return original(self, store, i, score)

    monkeypatch.setattr(SalienceCollector, "_accumulate", poisoned)
    apt_cb = APTCallback()

    def emas():
        c = apt_cb.collector
        return ([t.clone() for t in c.ema_heads + c.ema_neurons + [c.ema_hidden]],
                {k: v.clone() for k, v in apt_cb.importance.scores.items()})

    class Watch(TrainerCallback):
        snaps: dict = {}

        def on_step_begin(self, args, st, control, **kw):
            s = st.global_step + 1
            if s in (bad_step, bad_step + 1):
                Watch.snaps[("begin", s)] = emas()
            state["armed"] = s == bad_step

        def on_step_end(self, args, st, control, **kw):
            if st.global_step in (bad_step, bad_step + 1):
                Watch.snaps[("end", st.global_step)] = emas()

    pm = apt_model("bert")
    tr, _ = run(pm, tmp_path, callbacks=[apt_cb, Watch()])
    assert state["injected"] == 1

    def same(a, b) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and a[1].keys() == b[1].keys() and all(
            torch.equal(a[1][k], b[1][k]) for k in a[1])

    assert same(Watch.snaps[("begin", bad_step)], Watch.snaps[("end", bad_step)])  # the bad step changed nothing
    assert not same(Watch.snaps[("begin", bad_step + 1)], Watch.snaps[("end", bad_step + 1)])  # the next one did
    assert apt_cb.salience_skipped == 1
    logged = [h["apt/salience_skipped"] for h in tr.state.log_history if "apt/salience_skipped" in h]
    assert logged and logged[-1] == 1 and logged[0] == 0
    assert tr.state.global_step == MAX_STEPS and 0.99 * 0.4 <= density(pm) <= 0.4


class PoisonAdapters(TrainerCallback):
    """Write NaN into every adapter factor at the end of ``step`` (a diverged run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == self.step:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if ".apt_" in name:
                        p.fill_(float("nan"))
        return control


def test_diverged_run_is_stopped(tmp_path):
    """NaN weights mid-run: the run stops with a clear error instead of pruning on frozen salience to the end."""
    pm = apt_model("bert")
    tr = Trainer(model=pm, args=make_args(tmp_path), train_dataset=TokenTask(),
                 callbacks=[APTCallback(max_nonfinite_steps=5), PoisonAdapters(15)])
    with pytest.raises(apt_hf.TrainingDivergedError, match="5 consecutive optimizer steps"):
        tr.train()
    assert tr.state.global_step == 19  # steps 16..20 were not finite; the 5th stops the run


def test_event_on_stale_salience_is_flagged(tmp_path, caplog):
    pm = apt_model("bert")
    cb = APTCallback(max_nonfinite_steps=1000)
    tr = Trainer(model=pm, args=make_args(tmp_path), train_dataset=TokenTask(), callbacks=[cb, PoisonAdapters(15)])
    with caplog.at_level(logging.WARNING, logger="apt_hf.callback"):
        tr.train()
    stale = [r.getMessage() for r in caplog.records if "acts on salience last updated at step 15" in r.getMessage()]
    assert len(stale) == 3  # the events at 22, 31 and 40
    assert cb.salience_step == 15


def test_constant_dev_metric():
    history = [{"loss": 0.7, "step": 1}, {"eval_mcc": 0.0, "step": 4}, {"eval_mcc": 0.0, "step": 8}]
    assert apt_hf.callback.constant_dev_metric(history, "mcc") == (0.0, 2)
    assert apt_hf.callback.constant_dev_metric(history, "eval_mcc") == (0.0, 2)
    assert apt_hf.callback.constant_dev_metric(history[:2], "mcc") is None  # one evaluation says nothing yet
    assert apt_hf.callback.constant_dev_metric([*history, {"eval_mcc": 0.05}], "mcc") is None
    assert apt_hf.callback.constant_dev_metric(history, None) is None
    assert apt_hf.callback.constant_dev_metric(history, "accuracy") is None
    # after a step only, and a repeated evaluation of one step counts once
    moved = [{"eval_mcc": 0.2, "step": 2}, *history, {"eval_mcc": 0.0, "step": 8}]
    assert apt_hf.callback.constant_dev_metric(moved, "mcc") is None
    assert apt_hf.callback.constant_dev_metric(moved, "mcc", since=2) == (0.0, 2)
    assert apt_hf.callback.constant_dev_metric(moved, "mcc", since=2, at_least=3) is None


@pytest.mark.parametrize("course", ["stuck", "moving", "collapses"])
def test_a_model_that_has_not_learned_or_collapses_is_flagged(tmp_path, caplog, course):
    """A dev metric stuck at one value (a constant predictor) at the first real pruning event gets a warning that
    names the fix; so does one that has not moved since the last pruning event when training ends (the pruned
    model collapsed); a metric that moves gets neither."""
    cb = APTCallback()

    def metrics(_):
        step = tr.state.global_step
        if course == "stuck" or (course == "collapses" and step > cb.plan.events[-1]):
            return {"score": 0.5}
        return {"score": 0.5 + 0.01 * step}

    # three evaluations (steps 44, 48, 52) after the last event (step 40)
    args = make_args(tmp_path, max_steps=52, eval_strategy="steps", eval_steps=4, metric_for_best_model="score")
    tr = Trainer(model=apt_model("bert"), args=args, train_dataset=TokenTask(),
                 eval_dataset=torch.utils.data.Subset(TokenTask(), range(16)), compute_metrics=metrics,
                 callbacks=[cb])
    with caplog.at_level(logging.WARNING, logger="apt_hf.callback"):
        tr.train()
    first, last = cb.plan.first_real_event, cb.plan.events[-1]
    flagged = [r.getMessage() for r in caplog.records if "first pruning event" in r.getMessage()]
    at_end = [r.getMessage() for r in caplog.records if "after the last pruning event" in r.getMessage()]
    if course == "stuck":
        assert len(flagged) == 1 and f"(step {first})" in flagged[0]
        assert f"score has been 0.5 at all {(first - 1) // 4} evaluations" in flagged[0]
        assert "pruning_start" in flagged[0]
    else:
        assert flagged == []
    if course == "moving":
        assert at_end == []
    else:
        assert len(at_end) == 1 and "score = 0.5 at all 3 evaluations" in at_end[0]
        assert f"(step {last})" in at_end[0] and "pruning_start" in at_end[0]


class MaskWatch(TrainerCallback):
    """After APTCallback: per step, whether salience hooks are attached and the smallest mask value."""

    def __init__(self, cb: APTCallback) -> None:
        self.cb, self.hooked, self.low = cb, {}, {}

    def on_step_end(self, args, state, control, model=None, **kw):
        masks = apt_hf.find_apt_model(model).masks.values()
        self.hooked[state.global_step] = bool(self.cb.collector._handles)
        self.low[state.global_step] = min(float(m.min()) for m in [*masks[0], *masks[1], masks[2]] if m.numel())


def gated_trainer(tmp_path, curve, trainer_cls=Trainer, **kw):
    """A tiny BERT with ``pruning_start_gate=0.05`` whose dev metric 'score' is ``curve(step)``, evaluated at step 0
    and every 4 steps; returns (trainer, callback, watcher)."""
    cb = APTCallback()
    watch = MaskWatch(cb)
    args = make_args(tmp_path, max_steps=MAX_STEPS, **{**dict(eval_strategy="steps", eval_steps=4, eval_on_start=True,
                                                              metric_for_best_model="score"), **kw})
    tr = trainer_cls(model=apt_model("bert", pruning_start_gate=0.05), args=args, train_dataset=TokenTask(),
                     eval_dataset=torch.utils.data.Subset(TokenTask(), range(16)),
                     compute_metrics=lambda _: {"score": curve(tr.state.global_step)}, callbacks=[cb, watch])
    return tr, cb, watch


def test_pruning_start_gate_holds_the_window_until_the_dev_metric_moves(tmp_path):
    """Beyond spec D.2 (APTConfig.pruning_start_gate): the planned window opens at step 5, but the dev metric stays
    at the untrained model's 0.5 until step 16, so nothing is collected or masked before 16, and the whole schedule
    (window end, warm-up, events) moves to the plan that opens at 16. The model still reaches its target density."""
    tr, cb, watch = gated_trainer(tmp_path, lambda step: 0.5 if step < 16 else 0.6)
    tr.train()
    assert (cb.gate_baseline, cb.gate_opened) == (0.5, 16)
    assert cb.plan == apt_hf.schedule.gated_plan(cb.config, MAX_STEPS, 16, distill=False)
    assert cb.plan.start == 16 and cb.plan.end == 16 + round(35 * 29 / 40) and cb.plan.events[0] > 16
    assert not any(watch.hooked[s] for s in range(1, 17)) and watch.hooked[cb.plan.events[0]]
    assert all(watch.low[s] == 1.0 for s in range(1, cb.plan.windows[0]))
    assert cb.events_done == len(cb.plan.events)
    assert 0.99 * 0.4 <= cb.stats()["apt/density"] <= 0.4
    assert any(h.get("apt/pruning_start") == 16 for h in tr.state.log_history)


def test_pruning_start_gate_opens_at_the_planned_start_when_the_model_learns_early(tmp_path):
    tr, cb, _ = gated_trainer(tmp_path, lambda step: 0.5 + 0.02 * step)
    tr.train()
    assert cb.gate_opened == 5 and cb.plan == apt_hf.schedule.resolve_plan(cb.config, MAX_STEPS, distill=False)


def test_pruning_start_gate_opens_at_pruning_end_with_a_warning(tmp_path, caplog):
    """A dev metric that never moves: the window opens at the planned end (step 40), still reaching the target."""
    tr, cb, watch = gated_trainer(tmp_path, lambda step: 0.5)
    with caplog.at_level(logging.WARNING, logger="apt_hf.callback"):
        tr.train()
    assert cb.gate_opened == 40 and cb.plan.start == 40 and cb.events_done == len(cb.plan.events)
    assert not any(watch.hooked[s] for s in range(1, 41))
    warned = [r.getMessage() for r in caplog.records if "never beat the untrained" in r.getMessage()]
    assert len(warned) == 1 and "step 40" in warned[0]
    assert 0.99 * 0.4 <= cb.stats()["apt/density"] <= 0.4


def test_pruning_start_gate_moves_the_distillation_schedule(tmp_path):
    """With APTTrainer the distillation window, teacher-refresh steps and last event follow the moved plan."""
    tr, cb, _ = gated_trainer(tmp_path, lambda step: 0.5 if step < 16 else 0.6, trainer_cls=apt_hf.APTTrainer)
    tr.train()
    distiller = tr.distiller
    assert cb.gate_opened == 16 and cb.plan.distill_start == cb.plan.first_real_event + 1
    assert (distiller.start, distiller.end, distiller.last_event) == (cb.plan.distill_start, cb.plan.distill_end,
                                                                      cb.plan.events[-1])
    assert min(distiller.refresh_steps) >= 16


@pytest.mark.parametrize("resume_at", [12, 24])  # before and after the gate opened at step 16
def test_pruning_start_gate_state_is_resumed(tmp_path, resume_at):
    """The untrained model's metric and the opening step travel in the checkpoint: a run resumed before the gate
    opened still compares with step 0's metric (not with the resumed evaluation's), and one resumed after it keeps
    the moved plan."""
    curve = lambda step: 0.5 if step == 0 else 0.53 if step < 16 else 0.56  # noqa: E731
    ref, ref_cb, _ = gated_trainer(tmp_path / "ref", curve, save_strategy="steps", save_steps=12)
    ref.train()
    tr, cb, _ = gated_trainer(tmp_path / "resumed", curve)
    tr.train(resume_from_checkpoint=str(tmp_path / "ref" / f"checkpoint-{resume_at}"))
    assert (cb.gate_baseline, cb.gate_opened) == (0.5, 16) and cb.plan == ref_cb.plan
    assert cb.events_done == len(cb.plan.events) and cb.stats()["apt/density"] == ref_cb.stats()["apt/density"]


@pytest.mark.parametrize("missing, message", [
    (dict(eval_on_start=False), "eval_on_start=True"),
    (dict(metric_for_best_model=None), "metric_for_best_model"),
])
def test_pruning_start_gate_needs_the_untrained_models_metric(tmp_path, missing, message):
    tr, _, _ = gated_trainer(tmp_path, lambda step: 0.5, **missing)
    with pytest.raises(ValueError, match=f"pruning_start_gate=0.05.*{message}"):
        tr.train()


# ================================================================================================ 7. errors
@pytest.mark.parametrize("wrap", ["plain", "lora"])
def test_callback_without_apt_adapters(wrap, tmp_path):
    model = tiny("bert")
    if wrap == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"]))
    tr = Trainer(model=model, args=make_args(tmp_path, max_steps=3), train_dataset=TokenTask(),
                 callbacks=[APTCallback()])
    with pytest.raises(ValueError, match="get_peft_model"):
        tr.train()
    assert tr.state.global_step == 0


def test_schedule_that_never_finishes(tmp_path):
    pm = apt_model("bert", pruning_end=40)
    tr = Trainer(model=pm, args=make_args(tmp_path, max_steps=30), train_dataset=TokenTask(),
                 callbacks=[APTCallback()])
    with pytest.raises(ValueError, match="never finish"):
        tr.train()
    assert tr.state.global_step == 0


# ================================================================================================ 8. APTTrainer
def test_apt_trainer_logs_and_single_callback(tmp_path):
    explicit = apt_hf.APTTrainer(model=apt_model("bert"), args=make_args(tmp_path / "a"), train_dataset=TokenTask(),
                                 callbacks=[APTCallback()])
    assert sum(isinstance(c, APTCallback) for c in explicit.callback_handler.callbacks) == 1

    pm = apt_model("bert")
    tr = apt_hf.APTTrainer(model=pm, args=make_args(tmp_path / "b"), train_dataset=TokenTask())
    assert sum(isinstance(c, APTCallback) for c in tr.callback_handler.callbacks) == 1
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) >= MAX_STEPS // 5
    for h in logs:
        for key in ("apt/density", "apt/mean_rank", "apt/params"):
            assert key in h, (key, h)
    last = logs[-1]
    apt = apt_hf.find_apt_model(pm)
    assert last["apt/params"] == apt_hf.count_params(pm)
    assert last["apt/density"] == pytest.approx(apt_hf.count_params(pm) / apt.n_params)
    r = list(ranks(pm).values())
    assert last["apt/mean_rank"] == pytest.approx(sum(r) / len(r))
    assert logs[0]["apt/density"] == 1.0 and logs[-1]["apt/density"] < 0.41


# ================================================================================================ 9. ablations
def test_without_adaptive_tuning_ranks_stay(tmp_path):
    pm = apt_model("bert", adaptive_tuning=False)
    tr, apt_cb = run(pm, tmp_path)
    assert set(ranks(pm).values()) == {8}
    for layer in apt_hf.find_apt_model(pm).apt_layers().values():
        assert layer.apt_A["default"].shape[0] == 8 and layer.apt_B["default"].shape[1] == 8
    assert 0.99 * 0.4 <= density(pm) <= 0.4 and apt_cb.events_done == len(EVENTS)


def test_without_adaptive_pruning_density_stays(tmp_path):
    pm = apt_model("bert", adaptive_pruning=False)
    shapes = {n: p.shape for n, p in pm.named_parameters() if "apt_" not in n}
    tr, apt_cb = run(pm, tmp_path)
    assert density(pm) == 1.0
    assert {n: p.shape for n, p in pm.named_parameters() if "apt_" not in n} == shapes
    masks = apt_hf.get_masks(pm)
    assert all(bool((m == 1).all()) for m in list(masks.heads) + list(masks.neurons) + [masks.hidden])
    r = ranks(pm)
    assert any(v > 8 for v in r.values()) and any(v == 8 for v in r.values())
    assert apt_cb.events_done == len(EVENTS)
    logged = [h["apt/target_density"] for h in tr.state.log_history if "apt/target_density" in h]
    assert logged and all(v == 1.0 for v in logged)


@pytest.mark.parametrize("kind", ["bert", "llama_gqa", "phi3"])
def test_live_widths_count_only_kept_units(kind):
    """Adapter widths for rank growth (spec E.3.1) leave zero-masked blocks out, so they equal the physical widths
    after removal whether removal happens at the event or is held back (distillation)."""
    from conftest import random_masks

    targets = {"bert": ["query", "key", "value", "dense"], "llama_gqa": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                          "up_proj", "gate_proj", "down_proj"],
               "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}[kind]
    pm = peft.get_peft_model(make_model(kind), apt_hf.APTConfig(target_modules=targets))
    apt = apt_hf.find_apt_model(pm)
    layers = apt.apt_layers()
    full = tuning.live_widths(layers, apt.layout, apt.masks)
    assert full == {n: l.in_features + l.out_features for n, l in layers.items()}
    random_masks(pm, seed=3, no_heads_layer=None)
    masks = apt.masks
    if kind != "bert":  # keep the same number of heads in every surviving group, as the search does
        for i, m in enumerate(masks.heads):
            g = m.view(-1, apt.layout.attentions[i].group_size)
            g[:] = 0.0
            g[0, :1] = g[-1, :1] = 1.0
    held = tuning.live_widths(layers, apt.layout, masks)
    assert sum(held.values()) < sum(full.values())
    apt.prune_to_masks()
    layers = apt.apt_layers()
    assert held == {n: l.in_features + l.out_features for n, l in layers.items()}
    assert tuning.live_widths(layers, apt.layout, apt.masks) == held
