"""The per-step hot path (issue 17): cached kurtosis inputs, batched host transfers, mask writes that prime the
fullness cache. Each fast path is checked against the plain computation it replaces."""

from __future__ import annotations

import weakref

import peft
import pytest
import torch
from conftest import make_model

import apt_hf
from apt_hf import salience
from apt_hf.arch import base_linear
from apt_hf.salience import SalienceCollector


def apt_llama():
    return peft.get_peft_model(make_model("llama_mha"), apt_hf.APTConfig(task_type="CAUSAL_LM", distillation=False))


def test_power_sums_follow_in_place_edits_and_replacement():
    pm = apt_llama()
    apt = apt_hf.find_apt_model(pm)
    collector = SalienceCollector(apt.layout, 0.85, use_kurtosis=True)
    w = base_linear(apt.layout.attentions[0].o).weight
    first = collector._power_sums(w)
    assert torch.allclose(first, salience.column_power_sums(w))
    assert collector._power_sums(w) is first  # cached while the weight is unchanged
    with torch.no_grad():
        w.add_(0.5)  # an in-place edit (e.g. a merge) bumps the version counter
    second = collector._power_sums(w)
    assert torch.allclose(second, salience.column_power_sums(w)) and not torch.allclose(first, second)


def test_kurtosis_terms_match_the_reference_after_physical_pruning():
    pm = apt_llama()
    apt = apt_hf.find_apt_model(pm)
    collector = SalienceCollector(apt.layout, 0.85, use_kurtosis=True)
    g = torch.Generator().manual_seed(0)

    def means():
        return ([torch.rand(base_linear(s.o).in_features, generator=g) for s in apt.layout.attentions],
                [torch.rand(base_linear(f.down).in_features, generator=g) for f in apt.layout.ffns])

    def reference(mc, mi):
        heads = [salience.outlier_term(salience.head_kurtosis(base_linear(s.o).weight, m, s.head_dim))
                 for s, m in zip(apt.layout.attentions, mc)]
        neurons = [salience.outlier_term(salience.column_kurtosis(base_linear(f.down).weight, m))
                   for f, m in zip(apt.layout.ffns, mi)]
        return heads, neurons

    for step in range(2):
        mc, mi = means()
        got, want = collector._kurtosis_terms(mc, mi), reference(mc, mi)
        for a, b in zip(got[0] + got[1], want[0] + want[1]):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
        if step == 0:  # remove a head and some neurons: new weight tensors, new shapes
            apt.apply_structure([torch.tensor([0, 2, 3, 5, 6, 7])] + [None] * 2,
                                [torch.arange(0, 80, 2)] + [None] * 2, None)
            collector.layout = apt.layout
    assert len(collector._sums) == 6  # entries of replaced weights are dropped


def test_to_host_keeps_slots_shapes_and_none():
    a, b = torch.arange(6.0).view(2, 3), torch.tensor([7.0], dtype=torch.float64)
    out = salience.to_host([a, None, b])
    assert out[1] is None and torch.equal(out[0], a) and out[2].dtype == torch.float32 and out[2].item() == 7.0
    assert salience.to_host([None, None]) == [None, None]


def test_mask_values_round_trip_and_prime_the_fullness_cache():
    pm = apt_llama()
    masks = apt_hf.get_masks(pm)
    heads, neurons, hidden = masks.values()
    assert all(torch.equal(h, m) for h, m in zip(heads, masks.heads)) and torch.equal(hidden, masks.hidden)
    heads[1] = heads[1].clone()
    heads[1][3] = 0.5
    masks.set_values(heads, neurons, hidden)
    assert masks.heads[1][3] == 0.5
    for m in [*masks.heads, *masks.neurons, masks.hidden]:  # cached from the CPU values, still valid
        cached = masks._full_cache[id(m)]
        assert cached[:2] == (m._version, m.data_ptr()) and cached[2] == bool((m == 1).all())
    assert not masks.is_full(masks.heads[1]) and masks.is_full(masks.heads[0])
    with pytest.raises(ValueError, match="shape"):
        masks.set_values(heads, neurons, hidden[:-1])


def test_pruning_releases_frozen_weights_as_it_goes():
    pm = apt_llama()
    apt = apt_hf.find_apt_model(pm)
    site = apt.layout.attentions[0]
    frozen = weakref.ref(base_linear(site.o).weight)
    adapter = weakref.ref(site.q.apt_B["default"])
    changes = apt.apply_structure([torch.tensor([0, 2, 3, 5, 6, 7]), None, None], [None] * 3, None)
    assert frozen() is None  # freed while the event still holds its change records: no second copy of the model
    assert adapter() is not None and any(c.old is adapter() for c in changes)  # the optimizer state is keyed on it
    assert all(c.old.is_meta and c.old.shape != c.new.shape for c in changes if not c.new.requires_grad)
