"""Tests of apt_hf.baselines.fisher_prune: the retraining-free "LoRA+Prune" baseline (Kwon et al. 2022, spec I).

A tiny BERT classifier is trained for a few steps on a synthetic 3-class task (label = how many of tokens 1 and 2
are "low" ids), wrapped with APT masks, and pruned without retraining.
"""

from __future__ import annotations

import math

import peft
import pytest
import torch
import transformers
from conftest import make_inputs, make_model

import apt_hf
from apt_hf.baselines import collect_mask_grads, fisher_prune, rearrange_layer

VOCAB, T, LABELS = 50, 10, 3
TOL = 1e-4


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, T), generator=g)
    labels = (ids[:, 1] < 27).long() + (ids[:, 2] < 27).long()
    mask = torch.ones(n, T, dtype=torch.long)
    mask[n // 2:, -3:] = 0  # right padding on half the examples
    ids[n // 2:, -3:] = 0
    return ids, mask, labels


def loader(n: int, seed: int, batch: int = 32) -> list[dict]:
    ids, mask, labels = synthetic(n, seed)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7))
    ids, mask, labels = ids[perm], mask[perm], labels[perm]
    return [{"input_ids": ids[i:i + batch], "attention_mask": mask[i:i + batch], "labels": labels[i:i + batch]}
            for i in range(0, n, batch)]


@pytest.fixture(scope="module")
def trained_state() -> dict:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=16, num_labels=LABELS,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    ids, mask, labels = synthetic(2048, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(200):
        j = torch.randint(0, len(ids), (64,), generator=g)
        loss = model(input_ids=ids[j], attention_mask=mask[j], labels=labels[j]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert accuracy(model) > 0.9, "the synthetic task should be learnt before pruning"
    return {"config": config, "state": {k: v.clone() for k, v in model.state_dict().items()}}


def fresh(trained_state) -> peft.PeftModel:
    """The trained classifier wrapped with APT masks (adapters on query/value only, B = 0)."""
    model = transformers.BertForSequenceClassification(trained_state["config"])
    model.load_state_dict(trained_state["state"])
    return peft.get_peft_model(model.eval(), apt_hf.APTConfig(task_type="SEQ_CLS", target_modules=["query", "value"]))


EVAL = synthetic(512, 12345)


def accuracy(model) -> float:
    ids, mask, labels = EVAL
    with torch.no_grad():
        return float((model(input_ids=ids, attention_mask=mask).logits.argmax(-1) == labels).float().mean())


def test_fisher_non_negative_and_zero_for_dead_blocks(trained_state):
    pm = fresh(trained_state)
    apt = apt_hf.find_apt_model(pm)
    lay, dh = apt.layout, apt.layout.attentions[0].head_dim
    with torch.no_grad():
        # head 1 of layer 0 and neurons 3, 7 of FFN 1 write nothing: they cannot affect the loss
        lay.attentions[0].o.weight[:, dh:2 * dh] = 0.0
        lay.ffns[1].down.weight[:, [3, 7]] = 0.0
        apt_hf.get_masks(pm).heads[1][2] = 0.0  # an already-pruned head
    flags = {n: p.requires_grad for n, p in pm.named_parameters()}
    head_grads, neuron_grads = collect_mask_grads(pm, loader(128, 3))
    assert flags == {n: p.requires_grad for n, p in pm.named_parameters()}  # restored
    assert [g.shape for g in head_grads] == [(4, 4), (4, 4)]  # one row per batch
    fh = [g.pow(2).sum(0) for g in head_grads]
    fn = [g.pow(2).sum(0) for g in neuron_grads]
    assert all(bool((f >= 0).all()) for f in fh + fn)
    assert float(fh[0][1]) == 0.0 and float(fh[1][2]) == 0.0
    assert float(fn[1][3]) == 0.0 and float(fn[1][7]) == 0.0
    # gradients do reach the other blocks (the APT hooks skip all-ones masks; fisher_prune's own hooks do not)
    assert float(fh[0][0]) > 0 and float(fh[1][0]) > 0
    assert int((fn[0] > 0).sum()) > 100
    # per-example rows: 128 of them
    hx, _ = collect_mask_grads(pm, loader(128, 3), granularity="example")
    assert hx[0].shape == (128, 4) and float(hx[0][:, 1].abs().max()) == 0.0


@pytest.mark.parametrize("density", [0.3, 0.45, 0.6, 0.8])
def test_search_respects_budget(trained_state, density):
    pm = fresh(trained_state)
    r = fisher_prune(pm, loader(128, 1), density, num_samples=128, tune_masks=False)
    apt = apt_hf.find_apt_model(pm)
    budget = density * apt.n_params
    assert r["budget"] == pytest.approx(budget)
    assert r["count"] == apt_hf.count_params(pm) <= budget
    assert r["count"] >= 0.98 * budget, (r["count"], budget)
    assert r["density"] == pytest.approx(r["count"] / apt.n_params)
    masks = apt_hf.get_masks(pm)
    assert bool((masks.hidden == 1).all())  # hidden dimensions are never pruned
    assert all(bool(((m == 0) | (m == 1)).all()) for m in list(masks.heads) + list(masks.neurons))
    assert r["kept_heads"] + r["kept_neurons"] < r["total_heads"] + r["total_neurons"]
    for key in ("time_fisher_s", "time_search_s", "time_rearrange_s", "time_tune_s", "time_total_s"):
        assert r[key] >= 0


def test_rearrange_keeps_size_and_lowers_objective():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, 1, generator=g)
    grads = torch.randn(16, 12, generator=g) + base * torch.linspace(-2, 2, 12)  # correlated columns
    order = torch.sort(grads.pow(2).sum(0), stable=True).indices
    keep = torch.ones(12, dtype=torch.bool)
    keep[order[:5]] = False  # prune the 5 lowest-Fisher blocks, as the search would

    def objective(k):
        return float(grads[:, ~k].sum(1).pow(2).sum())

    new = rearrange_layer(keep, grads)
    assert int(new.sum()) == int(keep.sum())
    assert objective(new) <= objective(keep) + 1e-9


def test_export_reproduces_tuned_masked_model(trained_state, tmp_path):
    pm = fresh(trained_state)
    r = fisher_prune(pm, loader(256, 2), 0.5, num_samples=256, tune_samples=128)
    masks = apt_hf.get_masks(pm)
    values = torch.cat([m for m in list(masks.heads) + list(masks.neurons)])
    assert r["tuned_sites"] >= 1
    assert bool(((values > 0) & (values != 1)).any()), "mask tuning should move some kept mask values off 1"
    assert bool((values >= 0).all()) and float(values.max()) <= 10.0
    assert r["count"] <= r["budget"]
    ids, mask, _ = EVAL
    with torch.no_grad():
        ref = pm(input_ids=ids[:64], attention_mask=mask[:64]).logits
    exported = apt_hf.export_pruned(pm, tmp_path / "out")
    with torch.no_grad():
        out = exported(input_ids=ids[:64], attention_mask=mask[:64]).logits
    assert (out - ref).abs().max().item() < TOL
    loaded = apt_hf.load_pruned(tmp_path / "out")
    with torch.no_grad():
        again = loaded(input_ids=ids[:64], attention_mask=mask[:64]).logits
    assert (again - ref).abs().max().item() < TOL
    n_exported = sum(p.numel() for p in exported.parameters())
    n_full = sum(p.numel() for p in fresh(trained_state).get_base_model().parameters())
    assert n_exported < n_full


def random_prune(pm, density: float, seed: int) -> None:
    """Keep heads / neurons in a random order while they fit the same B.3 budget (masks 0/1, no tuning)."""
    apt = apt_hf.find_apt_model(pm)
    cm, masks = apt.count_model(), apt.masks
    budget = density * apt.n_params
    heads = [torch.zeros(m.numel(), dtype=torch.bool) for m in masks.heads]
    neurons = [torch.zeros(m.numel(), dtype=torch.bool) for m in masks.neurons]
    hidden = masks.hidden > 0
    blocks = [(heads, i, j) for i, h in enumerate(heads) for j in range(h.numel())]
    blocks += [(neurons, i, j) for i, n in enumerate(neurons) for j in range(n.numel())]
    for b in torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed)).tolist():
        store, i, j = blocks[b]
        store[i][j] = True
        if cm.count(heads, neurons, hidden) > budget:
            store[i][j] = False
    for i, h in enumerate(heads):
        masks.heads[i] = h.float()
    for i, n in enumerate(neurons):
        masks.neurons[i] = n.float()
    assert apt_hf.count_params(pm) <= budget


def test_fisher_prune_beats_random_masks(trained_state):
    seeds = [0, 1, 2]
    fisher_acc, random_acc = [], []
    for seed in seeds:
        pm = fresh(trained_state)
        fisher_prune(pm, loader(256, 100 + seed), 0.6, num_samples=256, tune_samples=128)
        fisher_acc.append(accuracy(pm))
        pm = fresh(trained_state)
        random_prune(pm, 0.6, seed)
        random_acc.append(accuracy(pm))
    mean_f, mean_r = sum(fisher_acc) / len(seeds), sum(random_acc) / len(seeds)
    print("fisher_prune accuracy", fisher_acc, "random", random_acc)
    assert mean_f >= mean_r, (fisher_acc, random_acc)


def test_errors(trained_state):
    pm = fresh(trained_state)
    with pytest.raises(ValueError, match="impossible"):
        fisher_prune(pm, loader(64, 0), 0.01, num_samples=64)  # below the empty-structure count (~1.5 %)
    for bad in (0.0, -0.2, 1.5, math.nan):
        with pytest.raises(ValueError, match="target_density"):
            fisher_prune(pm, loader(64, 0), bad, num_samples=64)
    with pytest.raises(ValueError, match="no APT adapters"):
        fisher_prune(pm.get_base_model(), loader(64, 0), 0.5, num_samples=64)
    unlabeled = [{k: v for k, v in b.items() if k != "labels"} for b in loader(64, 0)]
    with pytest.raises(ValueError, match="labels"):
        fisher_prune(pm, unlabeled, 0.5, num_samples=64)
    with pytest.raises(TypeError, match="dict batches"):
        fisher_prune(pm, [(torch.zeros(2, 3),)], 0.5, num_samples=64)
    assert bool((apt_hf.get_masks(pm).heads[0] == 1).all())  # failed calls leave the masks alone


def test_grouped_query_attention_keeps_whole_groups(tmp_path):
    model = make_model("llama_cls", num_key_value_heads=2)  # 8 query heads, groups of 4
    pm = peft.get_peft_model(model, apt_hf.APTConfig(task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"]))
    batches = []
    for s in range(4):
        b = make_inputs("llama_cls", batch=8, seed=s)
        b["labels"] = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(s))
        batches.append(b)
    r = fisher_prune(pm, batches, 0.5, num_samples=32, tune_samples=16)
    assert r["count"] <= r["budget"] and r["count"] >= 0.9 * r["budget"]
    for m in apt_hf.get_masks(pm).heads:
        groups = (m > 0).view(-1, 4)
        assert bool((groups.all(1) | ~groups.any(1)).all()), m  # every key/value group kept whole or removed
    inputs = make_inputs("llama_cls", batch=4, seed=9)
    with torch.no_grad():
        ref = pm(**inputs).logits
    exported = apt_hf.export_pruned(pm, tmp_path / "gqa")
    with torch.no_grad():
        out = exported(**inputs).logits
    assert (out - ref).abs().max().item() < TOL
