"""Hostile inputs: every public entry point either rejects bad input with a ValueError (or FileNotFoundError /
FileExistsError) that names the problem, or returns a valid result. Property-based (hypothesis) where the input space
is numeric; file corruption cases for the export format.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
import os
import shutil
import tempfile
from pathlib import Path

import peft
import pytest
import torch
from conftest import logits, make_inputs, make_model, random_masks
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import apt_hf
from apt_hf.arch import CountModel
from apt_hf.callback import resolve_plan
from apt_hf.config import APTConfig
from apt_hf.schedule import (adapter_budget, decay_window_start, distill_mu, mask_step, pruning_event_steps,
                             target_density)
from apt_hf.search import fill_budget, search_kept, swap_to_budget

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAN, INF = float("nan"), float("inf")
BIG = 10 ** 12

# ================================================================================================ search
# Salience values: zeros, ties (a few repeated values), tiny, huge (float32 max), negative (never produced by the
# salience, but the search must not care).
SALIENCE = st.one_of(st.just(0.0), st.sampled_from([1.0, 2.0, 0.5]), st.floats(0, 1e6, allow_nan=False),
                     st.sampled_from([1e30, 3e38, 1e-30, -1.0]))


@st.composite
def structures(draw):
    """A random CountModel (BERT-like, GQA or gated layers) plus salience for every block and a budget fraction."""
    frac = draw(st.integers(-20, 130)) / 100
    n_att = draw(st.integers(0, 3))
    n_ffn = draw(st.integers(0, 3))
    groups = [draw(st.sampled_from([1, 1, 2, 4])) for _ in range(n_att)]
    heads = [g * draw(st.integers(0, 3)) for g in groups]
    neurons = [draw(st.integers(0, 6)) for _ in range(n_ffn)]
    hidden = draw(st.integers(1, 6))
    extra = [draw(st.integers(0, 2)) for _ in range(n_att)]  # DeBERTa-v2's per-head position projections
    cm = CountModel(
        head_dim=tuple(draw(st.integers(1, 4)) for _ in range(n_att)), group_size=tuple(groups),
        qkv_bias=tuple(draw(st.integers(0, 1)) for _ in range(n_att)),
        o_bias=tuple(draw(st.integers(0, 1)) for _ in range(n_att)),
        ffn_mats=tuple(draw(st.sampled_from([2, 3])) for _ in range(n_ffn)),
        ffn_in_bias=tuple(draw(st.integers(0, 2)) for _ in range(n_ffn)),
        down_bias=tuple(draw(st.integers(0, 1)) for _ in range(n_ffn)),
        norm_per_dim=draw(st.integers(0, 4)),
        extra_mats=tuple(extra), extra_bias=tuple(draw(st.integers(0, e)) for e in extra),
    )
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))

    def scores(n):
        return torch.tensor(draw(st.lists(SALIENCE, min_size=n, max_size=n)), dtype=dtype)

    s_heads = [scores(h) for h in heads]
    s_neurons = [scores(n) for n in neurons]
    s_hidden = scores(hidden)
    return cm, s_heads, s_neurons, s_hidden, frac


def full_sets(s_heads, s_neurons, s_hidden):
    return ([torch.ones(len(s), dtype=torch.bool) for s in s_heads],
            [torch.ones(len(s), dtype=torch.bool) for s in s_neurons], torch.ones(len(s_hidden), dtype=torch.bool))


def costs(cm, s_heads, s_neurons, s_hidden):
    h, n, d = full_sets(s_heads, s_neurons, s_hidden)
    head_cost, neuron_cost = cm.block_costs(int(d.sum()))
    return head_cost, neuron_cost, max(cm.hidden_cost(h, n), 1.0)


def check_kept(cm, kept, s_heads, s_neurons, s_hidden, budget):
    k_heads, k_neurons, k_hidden = kept
    assert [k.shape for k in k_heads] == [s.shape for s in s_heads]
    assert [k.shape for k in k_neurons] == [s.shape for s in s_neurons]
    assert k_hidden.shape == s_hidden.shape
    assert all(k.dtype == torch.bool for k in k_heads + k_neurons + [k_hidden])
    assert cm.count(k_heads, k_neurons, k_hidden) <= budget  # never more parameters than the target
    for k, g in zip(k_heads, cm.group_size):  # grouped-query rule: surviving groups keep the same head count
        if g > 1 and k.numel():
            per_group = k.view(-1, g).sum(1)
            assert len(set(per_group[per_group > 0].tolist())) <= 1


@FAST
@given(structures())
def test_search_and_fill_budget_stay_within_budget(data):
    cm, s_heads, s_neurons, s_hidden, frac = data
    head_cost, neuron_cost, hidden_cost = costs(cm, s_heads, s_neurons, s_hidden)
    full = cm.count(*full_sets(s_heads, s_neurons, s_hidden))
    budget = frac * full
    empty = cm.count([torch.zeros(len(s), dtype=torch.bool) for s in s_heads],
                     [torch.zeros(len(s), dtype=torch.bool) for s in s_neurons],
                     torch.zeros(len(s_hidden), dtype=torch.bool))
    args = (s_heads, s_neurons, s_hidden, cm.count, head_cost, neuron_cost, hidden_cost, budget)
    if budget < empty:
        with pytest.raises(ValueError, match="impossible"):
            search_kept(*args, head_groups=list(cm.group_size))
        return
    kept = search_kept(*args, head_groups=list(cm.group_size))
    check_kept(cm, kept, s_heads, s_neurons, s_hidden, budget)
    if budget >= full:
        assert cm.count(*kept) == full or any(g > 1 for g in cm.group_size)
    densities = ([s.double() / c for s, c in zip(s_heads, head_cost)],
                 [s.double() / c for s, c in zip(s_neurons, neuron_cost)], s_hidden.double() / hidden_cost)
    filled = fill_budget(cm, kept, densities, budget)
    check_kept(cm, filled, s_heads, s_neurons, s_hidden, budget)
    for before, after in zip(kept[0] + kept[1] + [kept[2]], filled[0] + filled[1] + [filled[2]]):
        assert bool((after | ~before).all()), "fill_budget must only add blocks"
    assert cm.count(*filled) >= cm.count(*kept)
    swapped = swap_to_budget(cm, filled, densities, budget)
    check_kept(cm, swapped, s_heads, s_neurons, s_hidden, budget)
    assert cm.count(*swapped) >= cm.count(*filled)  # a swap is only taken when it lands within 1 % below budget


@FAST
@given(structures(), st.sampled_from(["head", "neuron", "hidden-dimension"]), st.sampled_from([NAN, INF, -INF]),
       st.integers(0, 100))
def test_non_finite_salience_is_rejected_by_name(data, where, bad, pos):
    cm, s_heads, s_neurons, s_hidden, _ = data
    target = {"head": [s for s in s_heads if len(s)], "neuron": [s for s in s_neurons if len(s)],
              "hidden-dimension": [s_hidden]}[where]
    assume(target)
    t = target[pos % len(target)]
    t[pos % len(t)] = bad
    head_cost, neuron_cost, hidden_cost = costs(cm, s_heads, s_neurons, s_hidden)
    full = cm.count(*full_sets(s_heads, s_neurons, s_hidden))
    with pytest.raises(ValueError, match=rf"{where}.*NaN or inf"):
        search_kept(s_heads, s_neurons, s_hidden, cm.count, head_cost, neuron_cost, hidden_cost, full,
                    head_groups=list(cm.group_size))
    densities = ([s.double() for s in s_heads], [s.double() for s in s_neurons], s_hidden.double())
    kept = tuple([torch.zeros(len(s), dtype=torch.bool) for s in group] for group in (s_heads, s_neurons))
    with pytest.raises(ValueError, match=rf"{where}.*NaN or inf"):
        fill_budget(cm, (kept[0], kept[1], torch.zeros(len(s_hidden), dtype=torch.bool)), densities, full)


def test_search_rejects_bad_budget_and_costs():
    cm = CountModel((2,), (1,), (1,), (1,), (2,), (1,), (1,), 2, (0,), (0,))
    s = ([torch.ones(2)], [torch.ones(3)], torch.ones(4))
    with pytest.raises(ValueError, match="budget is NaN"):
        search_kept(*s, cm.count, 1.0, 1.0, 1.0, NAN)
    with pytest.raises(ValueError, match="budget is NaN"):
        fill_budget(cm, ([torch.ones(2, dtype=torch.bool)], [torch.ones(3, dtype=torch.bool)],
                         torch.ones(4, dtype=torch.bool)), s, NAN)
    for bad in (0.0, -1.0, NAN, INF):
        with pytest.raises(ValueError, match="cost"):
            search_kept(*s, cm.count, bad, 1.0, 1.0, 100.0)
        with pytest.raises(ValueError, match="cost"):
            search_kept(*s, cm.count, 1.0, 1.0, bad, 100.0)
    with pytest.raises(ValueError, match="group"):
        search_kept(*s, cm.count, 1.0, 1.0, 1.0, 100.0, head_groups=[3])
    with pytest.raises(ValueError, match="1-D"):
        search_kept([torch.ones(2, 2)], s[1], s[2], cm.count, 1.0, 1.0, 1.0, 100.0)


# ================================================================================================ schedule
INTS = st.one_of(st.integers(-5, 60), st.sampled_from([0, 1, BIG, -BIG]))
FLOATS = st.one_of(st.floats(-2, 2), st.sampled_from([NAN, INF, -INF, 0.0, 1.0, 1e-300]))


@FAST
@given(INTS, INTS, st.integers(-5, 80))  # num_events is the list length: a huge one is a huge (valid) list
def test_pruning_event_steps_hostile(start, end, n):
    try:
        events = pruning_event_steps(start, end, n)
    except ValueError:
        assert start < 0 or end <= start or n < 1
        return
    assert len(events) == n and events[-1] == end
    assert all(start <= e <= end for e in events)
    assert events == sorted(events)
    if n <= end - start:  # resolve_plan guarantees this; fewer steps than events repeat steps by design
        assert all(a < b for a, b in zip(events, events[1:])) and events[0] > start


@FAST
@given(INTS, INTS, INTS, INTS, FLOATS)
def test_target_density_hostile(step, start, end, warmup, final):
    try:
        rho = target_density(step, start=start, end=end, warmup_steps=warmup, final_density=final)
    except ValueError as err:
        assert start < 0 or warmup < 0 or not 0 < final <= 1 or end <= start + warmup, err
        return
    assert final <= rho <= 1.0
    later = target_density(step + 1, start=start, end=end, warmup_steps=warmup, final_density=final)
    assert later <= rho  # never rises
    if step >= end:
        assert rho == final


@FAST
@given(INTS, INTS, INTS, st.one_of(st.integers(-5, 10 ** 6), st.just(BIG)), FLOATS)
def test_adapter_budget_hostile(step, start, end, initial, ratio):
    try:
        b = adapter_budget(step, start=start, end=end, initial=initial, ratio=ratio)
    except ValueError:
        assert start < 0 or end <= start or initial < 0 or not (math.isfinite(ratio) and ratio > 0)
        return
    lo, hi = sorted([initial, initial * Fraction(ratio)])  # exact: a float product can round past the floor
    assert isinstance(b, int) and math.floor(lo) <= b <= math.ceil(hi)


@FAST
@given(INTS, INTS, INTS, st.integers(-3, 50), INTS, st.one_of(st.floats(-2, 2), st.just(float("nan"))))
def test_distill_mu_and_window_hostile(step, start, end, window, prev, cap):
    try:
        mu = distill_mu(step, start=start, end=end, cap=cap)
        assert 0.0 <= mu <= cap <= 1.0
    except ValueError:
        assert start < 0 or end <= start or not 0 < cap <= 1
    previous = prev if prev < end else None
    try:
        w = decay_window_start(end, previous, window, start)
    except ValueError:
        assert window < 0 or (previous is None and start > end)
        return
    floor = start if previous is None else previous
    assert floor <= w <= end


@FAST
@given(st.lists(st.floats(0, 1), min_size=1, max_size=8), st.data(), FLOATS, st.booleans())
def test_mask_step_hostile(values, data, decay, hard):
    mask = torch.tensor(values)
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=len(values), max_size=len(values))))
    try:
        out = mask_step(mask, keep, decay, hard)
    except ValueError as err:
        assert not (math.isfinite(decay) and decay >= 0), err
        return
    assert out.shape == mask.shape and bool(((out >= 0) & (out <= 1)).all())
    if hard:
        assert torch.equal(out, keep.float())
    else:
        assert bool(((out - mask).abs() <= decay + 1e-6).all())
    with pytest.raises(ValueError, match="bool"):
        mask_step(mask, keep.float(), 0.1, hard)
    with pytest.raises(ValueError, match="shape"):
        mask_step(mask, torch.ones(len(values) + 1, dtype=torch.bool), 0.1, hard)


# ================================================================================================ APTConfig
INT_FIELD_BAD = st.sampled_from([0.5, 2.5, NAN, INF, "8", None, True])
REAL_BAD = st.sampled_from([NAN, INF, -INF, "0.5", None, True])
STEP_BAD = st.one_of(st.integers(-BIG, -1), st.floats(1.0001, 1e9), st.floats(-1e9, -1e-9),
                     st.sampled_from([NAN, INF, "10", None, True]))
BAD_VALUES = {
    "r": st.one_of(st.integers(-BIG, 0), INT_FIELD_BAD),
    "lora_alpha": st.one_of(st.floats(-1e9, 0), REAL_BAD),
    "lora_dropout": st.one_of(st.floats(-1e9, -1e-9), st.floats(1, 1e9), REAL_BAD),
    "target_sparsity": st.one_of(st.floats(-1e9, -1e-9), st.floats(1, 1e9), REAL_BAD),
    "pruning_start": STEP_BAD,
    "pruning_end": STEP_BAD,
    "sparsity_warmup": STEP_BAD,
    "num_pruning_events": st.one_of(st.integers(-BIG, 0), INT_FIELD_BAD),
    "mask_decay_window": st.one_of(st.integers(-BIG, -1), INT_FIELD_BAD.filter(lambda v: v is not None)),
    "mask_decay": st.one_of(st.floats(-1e9, 0), st.floats(1.0001, 1e9), REAL_BAD),
    "salience_beta": st.one_of(st.floats(-1e9, -1e-9), st.floats(1, 1e9), REAL_BAD),
    "max_rank": st.one_of(st.integers(-BIG, 7), INT_FIELD_BAD),  # default r = 8
    "tuning_budget_ratio": st.one_of(st.floats(-1e9, 0.9999), REAL_BAD),
    "distill_end": STEP_BAD.filter(lambda v: v is not None),  # None: distillation ends with the pruning window
    "distill_temperature": st.one_of(st.floats(-1e9, 0), REAL_BAD),
    "distill_pred_weight": st.one_of(st.floats(-1e9, -1e-9), st.sampled_from([NAN, INF, -INF, "1", True])),
    "distill_layer_weight": st.one_of(st.floats(-1e9, -1e-9), REAL_BAD),
    "distill_num_layers": st.one_of(st.integers(-BIG, 0), INT_FIELD_BAD),
    "transform_rank": st.one_of(st.integers(-BIG, 0), INT_FIELD_BAD),
    "distill_mu_max": st.one_of(st.floats(-1e9, 0), st.floats(1.0001, 1e9), REAL_BAD),
    "post_distill_lr_ratio": st.one_of(st.floats(-1e9, 0), st.floats(1.0001, 1e9), REAL_BAD),
    "pretune_density": st.one_of(st.floats(-1e9, 0.3999), st.floats(1.0001, 1e9), REAL_BAD),  # default sparsity 0.6
    "pretune_batches": st.one_of(st.integers(-BIG, 0), INT_FIELD_BAD),
}


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(BAD_VALUES)).flatmap(lambda f: st.tuples(st.just(f), BAD_VALUES[f])))
def test_config_rejects_bad_numeric_fields_by_name(field_value):
    field, value = field_value
    with pytest.raises(ValueError, match=rf"APTConfig\.{field}="):
        APTConfig(**{field: value})


def test_every_numeric_field_is_covered():
    import dataclasses

    numeric = {f.name for f in dataclasses.fields(APTConfig) if f.name in APTConfig.__dataclass_fields__
               and isinstance(f.default, (int, float)) and not isinstance(f.default, bool)} | {"distill_pred_weight"}
    assert numeric <= set(BAD_VALUES), sorted(numeric - set(BAD_VALUES))


STEPS_OR_FRACTION = st.one_of(st.integers(0, 10 ** 6), st.floats(0, 1))


@st.composite
def valid_configs(draw):
    r = draw(st.integers(1, 64))
    return dict(
        task_type=draw(st.sampled_from(["SEQ_CLS", "CAUSAL_LM", "SEQ_2_SEQ_LM", None])),
        r=r, lora_alpha=draw(st.floats(1e-3, 1e3)), lora_dropout=draw(st.floats(0, 0.99)),
        target_modules=draw(st.one_of(st.none(), st.lists(st.sampled_from(["query", "value", "q_proj", "v_proj"]),
                                                          min_size=1, max_size=3, unique=True))),
        rank_pattern=draw(st.dictionaries(st.sampled_from(["a.query", "b.value"]), st.integers(1, 64), max_size=2)),
        target_sparsity=draw(st.floats(0, 0.99)), pruning_start=draw(STEPS_OR_FRACTION),
        pruning_end=draw(STEPS_OR_FRACTION), sparsity_warmup=draw(STEPS_OR_FRACTION),
        num_pruning_events=draw(st.integers(1, 100)),
        mask_decay_window=draw(st.one_of(st.none(), st.integers(0, 1000))),
        mask_decay=draw(st.floats(1e-6, 1)), salience_beta=draw(st.floats(0, 0.999)),
        use_kurtosis=draw(st.sampled_from([None, True, False])), adaptive_pruning=draw(st.booleans()),
        adaptive_tuning=draw(st.booleans()), max_rank=draw(st.integers(r, 256)),
        tuning_budget_ratio=draw(st.floats(1, 100)), distillation=draw(st.booleans()),
        distill_end=draw(st.one_of(st.none(), STEPS_OR_FRACTION)), distill_temperature=draw(st.floats(1e-3, 100)),
        distill_pred_weight=draw(st.one_of(st.none(), st.floats(0, 10))),
        distill_layer_weight=draw(st.floats(0, 10)), distill_num_layers=draw(st.integers(1, 12)),
        transform_rank=draw(st.integers(1, 64)), post_distill_lr_ratio=draw(st.floats(1e-6, 1)),
        distill_mu_max=draw(st.floats(1e-6, 1)),
    )


@settings(max_examples=40, deadline=None)
@given(valid_configs())
def test_valid_config_round_trips(kwargs):
    cfg = APTConfig(**kwargs)
    again = APTConfig(**cfg.to_dict())
    assert again == cfg and again.to_dict() == cfg.to_dict()
    with tempfile.TemporaryDirectory() as tmp:
        cfg.save_pretrained(tmp)
        loaded = APTConfig.from_pretrained(tmp)
        generic = peft.PeftConfig.from_pretrained(tmp)
    assert isinstance(loaded, APTConfig) and loaded.to_dict() == cfg.to_dict()
    for name in ("pruning_start", "pruning_end", "sparsity_warmup", "distill_end"):  # int = steps, float = fraction
        assert type(getattr(loaded, name)) is type(getattr(cfg, name))
    assert generic.peft_type == apt_hf.config.APT_PEFT_TYPE


# ================================================================================================ resolve_plan
SCHEDULES = st.fixed_dictionaries(dict(
    pruning_start=st.one_of(st.integers(0, 300), st.floats(0, 0.3)),
    pruning_end=st.one_of(st.integers(0, 3000), st.floats(0.05, 1)),
    sparsity_warmup=st.one_of(st.integers(0, 100), st.floats(0, 0.1)),
    num_pruning_events=st.integers(1, 30), mask_decay_window=st.one_of(st.none(), st.integers(0, 300)),
    target_sparsity=st.floats(0, 0.99)))


@settings(max_examples=150, deadline=None)
@given(st.one_of(SCHEDULES, valid_configs()), st.integers(1, 5000))
def test_resolve_plan_hostile(kwargs, max_steps):
    cfg = APTConfig(**kwargs)
    try:
        plan = resolve_plan(cfg, max_steps)
    except ValueError as err:
        assert "schedule" in str(err) and str(max_steps) in str(err), err
        return
    assert 0 <= plan.start < plan.end <= max_steps
    assert len(plan.events) == cfg.num_pruning_events and plan.events[-1] == plan.end
    assert all(a < b for a, b in zip(plan.events, plan.events[1:])) and plan.events[0] > plan.start
    floors = (plan.start,) + plan.events[:-1]
    assert all(f <= w <= e for f, w, e in zip(floors, plan.windows, plan.events))
    assert plan.target(plan.end) == pytest.approx(1 - cfg.target_sparsity)
    assert all(plan.final_density <= plan.target(e) <= 1 for e in plan.events)


@pytest.mark.parametrize("kw,max_steps", [
    (dict(pruning_start=5, pruning_end=400), 100),  # last event after the run ends
    (dict(distillation=False), 1000),  # the paper's schedule: start 200 (steps) but end 0.075 * 1000 = 75
    (dict(pruning_start=0, pruning_end=0.5, sparsity_warmup=0, num_pruning_events=10), 12),  # 6 steps, 10 events
    (dict(pruning_start=0.5, pruning_end=1.0, sparsity_warmup=0.5), 10),  # warm-up swallows the window
])
def test_resolve_plan_too_short_names_the_schedule(kw, max_steps):
    cfg = APTConfig.paper_preset(**kw) if "distillation" in kw else APTConfig(**kw)
    with pytest.raises(ValueError, match="schedule") as info:
        resolve_plan(cfg, max_steps)
    assert str(max_steps) in str(info.value)


# ================================================================================================ export / load
def wrap(kind: str = "bert") -> peft.PeftModel:
    task = "SEQ_CLS" if kind in ("bert", "roberta") else "CAUSAL_LM"
    return peft.get_peft_model(make_model(kind), APTConfig(task_type=task))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pm = wrap("llama_gqa")
    random_masks(pm, seed=3, no_heads_layer=None)
    masks = apt_hf.get_masks(pm)
    masks.heads[1] = torch.tensor([1, 1, 0, 0, 1, 1, 0, 0.])  # two query heads in each kv group
    path = tmp_path_factory.mktemp("export") / "model"
    apt_hf.export_pruned(pm, path)
    assert apt_hf.load_pruned(path) is not None
    return pm, path


@pytest.fixture
def broken(exported, tmp_path):
    """A fresh copy of the export to damage."""
    path = tmp_path / "copy"
    shutil.copytree(exported[1], path)
    return path


def edit_record(path: Path, fn) -> None:
    record = json.loads((path / "apt_structure.json").read_text())
    fn(record)
    (path / "apt_structure.json").write_text(json.dumps(record))


@pytest.mark.parametrize("keep", [0, 4, 8, 100, -1])
def test_truncated_weights_are_named(broken, keep):
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: keep if keep >= 0 else len(data) - 1])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated or corrupted"):
        apt_hf.load_pruned(broken)


def test_deleted_config_is_named(broken):
    os.remove(broken / "config.json")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        apt_hf.load_pruned(broken)


@pytest.mark.parametrize("key,value", [
    ("heads", [-1, 8, 8]), ("kv_heads", [2, -2, 2]), ("neurons", [-3, 80, 80]), ("hidden_size", -1),
    ("neurons", [2.5, 80, 80]), ("hidden_size", "64"), ("hidden_size", None), ("heads", 8), ("kv_heads", [2, True, 2]),
])
def test_bad_numbers_in_structure_are_named(broken, key, value):
    edit_record(broken, lambda r: r.__setitem__(key, value))
    with pytest.raises(ValueError, match=rf"{key}.*corrupted"):
        apt_hf.load_pruned(broken)


@pytest.mark.parametrize("key", ["heads", "kv_heads", "neurons", "hidden_size"])
def test_missing_numbers_in_structure_are_named(broken, key):
    edit_record(broken, lambda r: r.pop(key))
    with pytest.raises(ValueError, match=rf"lacks \['{key}'\]"):
        apt_hf.load_pruned(broken)


@pytest.mark.parametrize("edit,match", [
    (lambda r: r["kv_heads"].pop(), "kv_heads"),
    (lambda r: r["neurons"].pop(), "FFN sites"),
    (lambda r: r.__setitem__("hidden_size", 10 ** 6), "hidden_size"),
    (lambda r: r.__setitem__("neurons", [81, 1, 1]), "neurons"),
    (lambda r: r.__setitem__("heads", [9, 8, 8]), "heads"),
])
def test_mismatched_numbers_in_structure_are_named(broken, edit, match):
    edit_record(broken, edit)
    with pytest.raises(ValueError, match=rf"(?s){match}.*corrupted"):
        apt_hf.load_pruned(broken)


def test_structure_file_not_an_object(broken):
    (broken / "apt_structure.json").write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match="lacks"):
        apt_hf.load_pruned(broken)


def test_export_into_non_empty_folder_changes_nothing(exported, tmp_path):
    pm, _ = exported
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_bytes(b"keep me\x00\xff")
    (target / "config.json").write_text('{"mine": true}')
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(FileExistsError, match="overwrite"):
        apt_hf.export_pruned(pm, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


@pytest.mark.parametrize("value", [0.5, 0.01, 0.99])
def test_export_with_fractional_hidden_mask_is_refused(value, tmp_path):
    pm = wrap("bert")
    masks = apt_hf.get_masks(pm)
    masks.hidden[3] = value
    with pytest.raises(ValueError, match="fractional"):
        apt_hf.export_pruned(pm, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    masks.hidden[3] = 0.0  # binary again: the export works and the training model is untouched
    apt_hf.export_pruned(pm, tmp_path / "out")
    assert apt_hf.get_masks(pm).hidden.numel() == 32


# ================================================================================================ saved adapters
@pytest.fixture(scope="module")
def pruned_adapter(tmp_path_factory):
    """A saved APT adapter of a tiny BERT whose random masks were applied physically."""
    pm = wrap("bert")
    random_masks(pm, seed=2)
    apt_hf.find_apt_model(pm).prune_to_masks()
    folder = tmp_path_factory.mktemp("adapter")
    pm.save_pretrained(folder)
    return folder


def _tampered(folder: Path, tmp_path: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    out = tmp_path / "tampered"
    shutil.copytree(folder, out)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    edit({k.split("apt_masks.", 1)[1]: k for k in tensors if "apt_masks." in k}, tensors)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def _set(name, fn):
    def edit(keys, tensors):
        tensors[keys[name]] = fn(tensors[keys[name]])
    return edit


@pytest.mark.parametrize("edit,message", [
    (_set("kept_heads_1", lambda t: t.flip(0)), "increasing order"),
    (_set("kept_heads_1", lambda t: torch.cat([t[:1], t[:1], t[2:]])), "increasing order"),
    (_set("kept_neurons_2", lambda t: t.float() + 0.5), "integer tensor"),
    (_set("hidden", lambda t: torch.where(torch.arange(len(t)) == 3, float("nan"), t)), "outside \\[0, 1\\]"),
    (_set("neurons_0", lambda t: t * 2), "outside \\[0, 1\\]"),
    (_set("heads_2", lambda t: t[:-1]), "length"),
])
def test_tampered_adapter_records_are_refused(pruned_adapter, tmp_path, edit, message):
    """Duplicate, permuted or fractional kept records and NaN / out-of-range masks never load silently."""
    peft.PeftModel.from_pretrained(make_model("bert"), pruned_adapter)  # the untouched adapter loads
    with pytest.raises(ValueError, match=message):
        peft.PeftModel.from_pretrained(make_model("bert"), _tampered(pruned_adapter, tmp_path, edit))


# ============================================================================================ export files (issue 12)
def weight_files(path: Path) -> set[str]:
    return {p.name for p in path.iterdir() if p.name.startswith("model") and p.suffix != ".py"}


@pytest.mark.parametrize("first,second", [({}, {"max_shard_size": "20KB"}), ({"max_shard_size": "20KB"}, {})])
def test_overwrite_removes_the_earlier_exports_files(exported, tmp_path, first, second):
    """A sharded export over a single-file one (and back) leaves no stale weights file for a loader to pick up."""
    pm, reference = exported
    target = tmp_path / "again"
    apt_hf.export_pruned(pm, target, **first)
    before = weight_files(target)
    apt_hf.export_pruned(pm, target, overwrite=True, **second)
    after = weight_files(target)
    sharded = "model.safetensors.index.json" in after
    assert before != after and sharded == ("max_shard_size" in second)
    shards = set(json.loads((target / "model.safetensors.index.json").read_text())["weight_map"].values()) \
        if sharded else set()
    assert after == ({"model.safetensors.index.json", *shards} if sharded else {"model.safetensors"})
    listed = json.loads((target / "apt_structure.json").read_text())["files"]
    assert set(listed) == {p.name for p in target.iterdir()} - {"apt_structure.json"}
    inputs = make_inputs("llama_gqa")
    assert (logits(apt_hf.load_pruned(target), inputs) - logits(apt_hf.load_pruned(reference), inputs)).abs().max() == 0


def test_overwrite_refuses_a_folder_with_other_files(exported, tmp_path):
    pm, _ = exported
    target = tmp_path / "mixed"
    apt_hf.export_pruned(pm, target)
    (target / "my_notes.txt").write_text("keep me")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(FileExistsError, match=r"my_notes\.txt.*overwrite=True only replaces an earlier export"):
        apt_hf.export_pruned(pm, target, overwrite=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_stale_single_file_next_to_shards_is_refused(broken):
    """A folder holding both a single weights file and a sharded index (what overwriting used to leave) is not read."""
    shutil.copy(broken / "model.safetensors", broken / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {"x": "model-00001-of-00001.safetensors"}}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="stale"):
        apt_hf.load_pruned(broken)


@pytest.mark.parametrize("edit,match", [
    (lambda r: r.__setitem__("format_version", 99), r"format_version=99.*reads versions \[1, 2\]"),
    (lambda r: r.__setitem__("format_version", "2"), "format_version='2'"),
    (lambda r: r.__setitem__("pruned_by", "someone"), r"unknown keys \['pruned_by'\]"),
    (lambda r: r.__setitem__("family", "gpt2"), "family='gpt2'"),
])
def test_unknown_record_versions_and_keys_are_refused(broken, edit, match):
    edit_record(broken, edit)
    with pytest.raises(ValueError, match=match):
        apt_hf.load_pruned(broken)


@pytest.mark.parametrize("architectures", [["AutoModel"], ["BertForSequenceClassification"], ["NoSuchModel"], []])
def test_bad_architecture_names_are_refused(broken, architectures):
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = architectures
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"architectures=.*model class of model_type 'llama'"):
        apt_hf.load_pruned(broken)


def test_config_and_record_that_disagree_are_refused(broken):
    config = json.loads((broken / "config.json").read_text())
    config["apt_pruned"]["neurons"][0] -= 1
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="describe different structures"):
        apt_hf.load_pruned(broken)


@pytest.mark.parametrize("where", ["adapter", "base", "head"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_not_exported(where, bad, tmp_path):
    """A diverged run: export_pruned and merge_and_unload().save_pretrained refuse, naming the tensors."""
    pm = wrap("llama_gqa")
    random_masks(pm, seed=3)
    part = {"adapter": "layers.2.self_attn.q_proj.apt_B", "base": "layers.2.mlp.down_proj.weight",
            "head": "lm_head.weight"}[where]
    with torch.no_grad():
        next(p for n, p in pm.named_parameters() if part in n).fill_(bad)
    named = {"adapter": "layers.2.self_attn.q_proj.weight"}.get(where, part)
    message = rf"NaN or inf values in 1 of the model's tensors \[.*{named}.*Nothing was saved"
    with pytest.raises(ValueError, match=message):
        apt_hf.export_pruned(pm, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="NaN or inf"):
        pm.merge_and_unload().save_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged").exists() or not any((tmp_path / "merged").iterdir())
