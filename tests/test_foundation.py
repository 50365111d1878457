"""Foundation tests: masks, exact physical pruning, export/reload, PEFT round trip, rank growth, counting, errors.

Spec sections A (adapter, masks, physical pruning), B.3 (parameter count), E.2/E.3 (adapter size, rank growth) and
K.1/K.2/K.5/K.9 (what apt_hf promises). All models are tiny random ones from ``conftest.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from conftest import (DECODER_KINDS, EXACT_KINDS, kinds_and_attentions, logits, make_config, make_inputs, make_model,
                      random_masks, randomize_adapters, task_type)

import apt_hf
from apt_hf.arch import CountModel, base_linear, describe
from apt_hf.prune import gqa_closure

SRC = Path(__file__).resolve().parents[1] / "src"
TOL = 1e-4


def wrap(kind: str, attn: str = "eager", seed: int = 0, **cfg) -> peft.PeftModel:
    """A tiny model of ``kind`` with APT adapters whose factors are random (so they matter)."""
    pm = peft.get_peft_model(make_model(kind, attn, seed=seed), apt_hf.APTConfig(task_type=task_type(kind), **cfg))
    randomize_adapters(pm, seed=seed + 100)
    return pm.eval()


def site_weights(apt) -> dict:
    """Clones of the frozen weights that physical pruning must slice, keyed by (site kind, index, role)."""
    lay, out = apt.layout, {}
    for i, s in enumerate(lay.attentions):
        for role in ("q", "k", "v", "o"):
            mod = getattr(s, role)
            if mod is not None:
                out[("att", i, role)] = base_linear(mod).weight.detach().clone()
        for j, mod in enumerate(s.extra):
            out[("att", i, f"extra{j}")] = base_linear(mod).weight.detach().clone()
    for i, f in enumerate(lay.ffns):
        for role in ("up", "gate", "down"):
            mod = getattr(f, role)
            if mod is not None:
                out[("ffn", i, role)] = base_linear(mod).weight.detach().clone()
    for i, e in enumerate(lay.embeddings):
        out[("emb", i, "w")] = e.weight.detach().clone()
    for i, (module, name, _) in enumerate(lay.hidden_params):
        out[("param", i, name)] = getattr(module, name).detach().clone()
    return out


def rows(heads: torch.Tensor, dh: int) -> torch.Tensor:
    return (heads[:, None] * dh + torch.arange(dh)).reshape(-1)


def expected_heads(mask: torch.Tensor, group: int) -> torch.Tensor:
    """Kept query heads after pruning: mask > 0, each surviving kv group padded to the largest per-group count."""
    keep = mask > 0
    if group == 1:
        return torch.nonzero(keep).flatten()
    k = keep.view(-1, group)
    target = int(k.sum(1).max()) if k.numel() else 0
    out = []
    for j in range(k.shape[0]):
        if k[j].any():
            order = torch.cat([torch.nonzero(k[j]).flatten(), torch.nonzero(~k[j]).flatten()])[:target]
            out.append(torch.sort(order).values + j * group)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


# ------------------------------------------------------------------------------------------------ 1. exactness
def masked_model(kind: str, attn: str):
    """A tiny APT model with random adapters and random binary masks (layer 0: no heads, layer 1: no neurons)."""
    pm = wrap(kind, attn)
    inputs = make_inputs(kind)
    dense = logits(pm, inputs)
    written = random_masks(pm, seed=3)
    ref = logits(pm, inputs)
    assert (ref - dense).abs().max() > 1e-3, "masks had no effect on the output"
    assert float(written["heads"][0].sum()) == 0 and float(written["neurons"][1].sum()) == 0
    return pm, inputs, ref, written


EXPORT_KINDS = EXACT_KINDS


@pytest.mark.parametrize("kind,attn", kinds_and_attentions(EXPORT_KINDS))
def test_export_is_exact(kind, attn, tmp_path):
    pm, inputs, ref, _ = masked_model(kind, attn)
    # (a) export_pruned equals the masked PEFT model; the training model is left untouched.
    exported = apt_hf.export_pruned(pm, tmp_path / "export")
    assert (logits(exported, inputs) - ref).abs().max() <= TOL
    assert (logits(pm, inputs) - ref).abs().max() == 0
    assert not any(".apt_" in n for n, _ in exported.named_parameters())
    n_exported = sum(p.numel() for p in exported.parameters())
    assert n_exported < sum(p.numel() for p in make_model(kind, attn).parameters())
    # (b) load_pruned in the same process gives the same model.
    loaded = apt_hf.load_pruned(tmp_path / "export")
    assert type(loaded) is type(exported)
    assert (logits(loaded, inputs) - ref).abs().max() <= TOL
    assert sum(p.numel() for p in loaded.parameters()) == n_exported


@pytest.mark.parametrize("kind,attn", kinds_and_attentions(DECODER_KINDS))
def test_generation_with_an_emptied_layer_is_exact(kind, attn, tmp_path):
    """Greedy generation with a key/value cache: layer 0 (whose cache length sets the positions) lost every head."""
    pm, inputs, _, _ = masked_model(kind, attn)
    prompt = {k: v[:1] for k, v in inputs.items()}

    def generate(model):
        with torch.no_grad():
            return model.generate(**prompt, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                                  output_logits=True, pad_token_id=0)

    ref = generate(pm)
    for model in (apt_hf.export_pruned(pm, tmp_path / "export"), apt_hf.load_pruned(tmp_path / "export")):
        out = generate(model)
        assert torch.equal(out.sequences, ref.sequences)
        assert max(float((a - b).abs().max()) for a, b in zip(out.logits, ref.logits)) <= TOL


@pytest.mark.parametrize("kind,attn", kinds_and_attentions(EXACT_KINDS))
def test_prune_in_place_is_exact(kind, attn):
    pm, inputs, ref, written = masked_model(kind, attn)
    apt = apt_hf.find_apt_model(pm)
    before = site_weights(apt)
    lay0 = apt.layout
    groups = [s.group_size for s in lay0.attentions]
    dh = [s.head_dim for s in lay0.attentions]
    fused = [s.fused for s in lay0.attentions]  # (query, key/value heads) of a fused q/k/v projection
    full_neurons = [f.num_neurons for f in lay0.ffns]
    n_before = sum(p.numel() for p in pm.parameters())
    count_before = apt_hf.count_params(pm)
    changes = apt.prune_to_masks()
    assert changes and all(c.new.numel() <= c.old.numel() for c in changes)
    assert (logits(pm, inputs) - ref).abs().max() <= TOL
    assert sum(p.numel() for p in pm.parameters()) < n_before
    assert apt_hf.count_params(pm) == count_before

    masks = apt_hf.get_masks(pm)
    hid = torch.nonzero(written["hidden"][0]).flatten()
    assert torch.equal(masks.kept("hidden"), hid) and torch.equal(masks.hidden, torch.ones(len(hid)))
    lay = apt.layout
    for i, m in enumerate(written["heads"]):
        kept = expected_heads(m, groups[i])
        assert torch.equal(masks.kept("heads", i), kept), i
        assert torch.equal(masks.heads[i], m[kept])  # all ones, except GQA padding heads (which stay 0)
        if groups[i] == 1:
            assert torch.equal(masks.heads[i], torch.ones(len(kept)))
        site = lay.attentions[i]
        assert site.num_heads == len(kept)
        o = base_linear(site.o).weight
        assert o.shape == (len(hid), len(kept) * dh[i])
        assert torch.equal(o, before[("att", i, "o")][hid][:, rows(kept, dh[i])])
        if len(kept) == 0:
            assert site.q is None and not site.extra
            continue
        kv = torch.unique(torch.div(kept, groups[i], rounding_mode="floor"))
        q_rows, kv_rows = rows(kept, dh[i]), rows(kv, dh[i])
        if fused[i]:  # one projection, rows [q | k | v] at the unpruned sizes
            q_width, kv_width = (n * dh[i] for n in fused[i])
            want = {"q": torch.cat([q_rows, q_width + kv_rows, q_width + kv_width + kv_rows])}
        else:
            want = {"q": q_rows, "k": kv_rows, "v": kv_rows}
        extra_before = [k for k in before if k[:2] == ("att", i) and k[2].startswith("extra")]
        assert len(site.extra) == len(extra_before)
        for j, mod in enumerate(site.extra):  # DeBERTa-v2's position projections follow the query heads
            assert torch.equal(base_linear(mod).weight, before[("att", i, f"extra{j}")][q_rows][:, hid])
        for role, kept_rows in want.items():
            w = base_linear(getattr(site, role)).weight
            assert torch.equal(w, before[("att", i, role)][kept_rows][:, hid])
        assert site.num_kv_heads == len(kv)
    for i, m in enumerate(written["neurons"]):
        kept = torch.nonzero(m).flatten()
        assert torch.equal(masks.kept("neurons", i), kept) and torch.equal(masks.neurons[i], torch.ones(len(kept)))
        f = lay.ffns[i]
        up_rows = torch.cat([kept, full_neurons[i] + kept]) if f.fused else kept  # fused: both halves
        assert f.num_neurons == len(kept)
        assert torch.equal(base_linear(f.up).weight, before[("ffn", i, "up")][up_rows][:, hid])
        assert torch.equal(base_linear(f.down).weight, before[("ffn", i, "down")][hid][:, kept])
        if f.gate is not None and not f.fused:
            assert torch.equal(base_linear(f.gate).weight, before[("ffn", i, "gate")][kept][:, hid])
    for i, e in enumerate(lay.embeddings):
        assert torch.equal(e.weight, before[("emb", i, "w")][:, hid])
    for i, (module, name, axis) in enumerate(lay.hidden_params):  # e.g. ViT's patch projection and CLS token
        assert torch.equal(getattr(module, name), before[("param", i, name)].index_select(axis, hid))
    for layer in apt.apt_layers().values():  # adapter factors were sliced with their frozen weights
        r = layer.r["default"]
        assert layer.apt_A["default"].shape == (r, layer.in_features)
        assert layer.apt_B["default"].shape == (layer.out_features, r)

    # Pruning again with unchanged masks is a no-op, and the pruned model still trains.
    assert apt.prune_to_masks() == []
    pm.train()
    pm(**inputs).logits.float().pow(2).mean().backward()
    for layer in apt.apt_layers().values():
        b = layer.apt_B["default"]
        assert b.numel() == 0 or b.grad is not None


def test_tied_embeddings_export_is_exact(tmp_path):
    pm = peft.get_peft_model(make_model("llama_mha", tie_word_embeddings=True), apt_hf.APTConfig(task_type="CAUSAL_LM"))
    randomize_adapters(pm)
    random_masks(pm, seed=8)
    inputs = make_inputs("llama_mha")
    ref = logits(pm, inputs)
    apt_hf.export_pruned(pm, tmp_path / "export")
    loaded = apt_hf.load_pruned(tmp_path / "export")
    assert (logits(loaded, inputs) - ref).abs().max() <= TOL
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    apt_hf.find_apt_model(pm).prune_to_masks()
    assert (logits(pm, inputs) - ref).abs().max() <= TOL
    hf = apt_hf.find_apt_model(pm).model
    assert hf.lm_head.weight is hf.model.embed_tokens.weight  # still tied after physical pruning


@pytest.mark.slow  # multi-process (still runs by default; about 5 s of it is the child's imports)
def test_export_reloads_in_fresh_process(tmp_path):
    kind = "llama_gqa"
    pm = wrap(kind, "sdpa")
    random_masks(pm, seed=5)
    inputs = make_inputs(kind)
    ref = logits(pm, inputs)
    apt_hf.export_pruned(pm, tmp_path / "export")
    torch.save(inputs, tmp_path / "inputs.pt")
    script = (
        "import sys, torch, apt_hf\n"
        "d = sys.argv[1]\n"
        "m = apt_hf.load_pruned(d + '/export')\n"
        "inputs = torch.load(d + '/inputs.pt')\n"
        "with torch.no_grad():\n"
        "    out = m(**inputs).logits.float() * inputs['attention_mask'][..., None]\n"
        "torch.save(out, d + '/out.pt')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(SRC), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert out.shape == ref.shape and (out - ref).abs().max() <= TOL


# ------------------------------------------------------------------------------------------------ 2. PEFT round trip
@pytest.mark.parametrize("kind", ["bert", "llama_gqa", "llama_cls", "phi3"])
def test_peft_round_trip_after_growth_and_pruning(kind, tmp_path):
    pm = peft.get_peft_model(make_model(kind, seed=7), apt_hf.APTConfig(task_type=task_type(kind)))
    apt = apt_hf.find_apt_model(pm)
    layers = apt.apt_layers()
    names = sorted(layers)
    last = [n for n in names if ".2." in n]  # layer 2 keeps heads and neurons; layer 0 loses all heads
    grown = {names[0]: 12, last[0]: 13, last[-1]: 20}
    for name, r in grown.items():
        layers[name].grow_rank("default", r)
    randomize_adapters(pm, seed=11)
    with torch.no_grad():  # the task head is trained in full (modules_to_save): make it differ from the base
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.3)
    random_masks(pm, seed=13)
    apt.prune_to_masks()
    masks = apt_hf.get_masks(pm)
    masks.neurons[0][0] = 0.5  # a fractional mask value must survive the round trip too
    inputs = make_inputs(kind)
    pm.eval()
    ref = logits(pm, inputs)
    pm.save_pretrained(tmp_path / "adapter")

    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    present = sorted(apt.apt_layers())
    assert names[0] not in present  # its attention was removed with all its heads
    assert set(present) <= set(cfg["rank_pattern"]) and names[0] not in cfg["rank_pattern"]
    for name in present:
        assert cfg["rank_pattern"][name] == grown.get(name, 8), name

    reloaded = peft.PeftModel.from_pretrained(make_model(kind, seed=7), tmp_path / "adapter").eval()
    assert (logits(reloaded, inputs) - ref).abs().max() <= 1e-5
    re_apt = apt_hf.find_apt_model(reloaded)
    saved = dict(masks.named_buffers())
    loaded = dict(apt_hf.get_masks(reloaded).named_buffers())
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key
    assert sorted(re_apt.apt_layers()) == present
    for name, layer in re_apt.apt_layers().items():
        assert layer.r["default"] == grown.get(name, 8)
        assert layer.scaling["default"] == 2.0
    assert apt_hf.count_params(reloaded) == apt_hf.count_params(pm)
    assert re_apt.n_params == apt.n_params

    # The adapter does not fit a base model of a different shape.
    for bad in ({"num_hidden_layers": 2}, {"hidden_size": 16, "intermediate_size": 24}):
        with pytest.raises(ValueError, match="base model|trained on"):
            peft.PeftModel.from_pretrained(make_model(kind, seed=7, **bad), tmp_path / "adapter")


def test_adapter_on_wider_base_model_raises_value_error(tmp_path):
    pm = wrap("bert")
    random_masks(pm, seed=1)
    apt_hf.find_apt_model(pm).prune_to_masks()
    pm.save_pretrained(tmp_path)
    with pytest.raises(ValueError):
        peft.PeftModel.from_pretrained(make_model("bert", hidden_size=48, intermediate_size=64), tmp_path)


# ------------------------------------------------------------------------------------------------ 3. rank growth
def test_rank_growth_keeps_outputs_and_trains_new_params():
    pm = wrap("bert")
    random_masks(pm, seed=2, no_heads_layer=None)
    inputs = make_inputs("bert")
    ref = logits(pm, inputs)
    layers = apt_hf.find_apt_model(pm).apt_layers()
    q = layers["bert.encoder.layer.1.attention.self.query"]
    up = layers["bert.encoder.layer.2.intermediate.dense"]
    frozen = layers["bert.encoder.layer.0.attention.self.value"]
    a_old, b_old = q.apt_A["default"].detach().clone(), q.apt_B["default"].detach().clone()
    for p in (frozen.apt_A["default"], frozen.apt_B["default"]):
        p.requires_grad_(False)

    changes = q.grow_rank("default", 13)
    assert len(changes) == 2 and all(c.new.requires_grad for c in changes)
    up.grow_rank("default", 24)
    frozen.grow_rank("default", 10)
    assert q.grow_rank("default", 13) == [] and q.grow_rank("default", 5) == []

    assert (logits(pm, inputs) - ref).abs().max() <= 1e-6
    a, b = q.apt_A["default"], q.apt_B["default"]
    assert a.shape == (13, 32) and b.shape == (32, 13) and q.r["default"] == 13
    assert torch.equal(a[:8], a_old) and torch.equal(b[:, :8], b_old)
    assert torch.equal(b[:, 8:], torch.zeros(32, 5)) and bool((a[8:] != 0).all())
    for layer in (q, up, frozen):
        assert layer.scaling["default"] == 2.0  # lora_alpha / initial r, never the grown rank
    assert up.apt_A["default"].shape == (24, 32) and up.apt_B["default"].shape == (48, 24)
    assert not frozen.apt_A["default"].requires_grad and not frozen.apt_B["default"].requires_grad

    params = {id(p) for p in pm.parameters() if p.requires_grad}
    assert id(a) in params and id(b) in params and id(up.apt_A["default"]) in params
    pm.train()
    out = pm(**inputs).logits
    out.pow(2).sum().backward()
    assert b.grad is not None and b.grad[:, 8:].abs().sum() > 0  # the new rank columns get gradient
    assert a.grad is not None


# ------------------------------------------------------------------------------------------------ 4. counting
def b3_formula(d: int, heads: int, neurons: int, dh: int, n_layers: int) -> int:
    """Spec B.3 (BERT/RoBERTa): d'(4 H' d_h + 2 N' + 6 L) + 3 H' d_h + N'."""
    return d * (4 * heads * dh + 2 * neurons + 6 * n_layers) + 3 * heads * dh + neurons


def main_params(pm) -> int:
    """The true number of 'main' parameters: every encoder-layer parameter except the APT factors."""
    encoder = apt_hf.find_apt_model(pm).model.base_model.encoder
    return sum(p.numel() for n, p in encoder.named_parameters() if ".apt_" not in n)


def test_count_params_roberta_base():
    import transformers

    config = transformers.RobertaConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                        intermediate_size=3072)
    with torch.device("meta"):  # shapes only: the B.3 count from the layout, without allocating 125M weights
        meta = transformers.RobertaForSequenceClassification(config)
    layout = describe(meta)
    full = CountModel.from_layout(layout).count([torch.ones(12, dtype=torch.bool)] * 12,
                                                [torch.ones(3072, dtype=torch.bool)] * 12,
                                                torch.ones(768, dtype=torch.bool))
    assert full == b3_formula(768, 144, 12 * 3072, 64, 12) == 85_054_464
    assert sum(p.numel() for p in meta.roberta.encoder.parameters()) == 85_054_464
    heads, neurons = CountModel.from_layout(layout).block_costs(768)
    assert heads[0] == 196_800 and neurons[0] == 1_537  # spec B.3 table
    assert CountModel.from_layout(layout).hidden_cost([torch.ones(12, dtype=torch.bool)] * 12,
                                                      [torch.ones(3072, dtype=torch.bool)] * 12) == 110_664

    torch.manual_seed(0)
    pm = peft.get_peft_model(transformers.RobertaForSequenceClassification(config), apt_hf.APTConfig(task_type="SEQ_CLS"))
    apt = apt_hf.find_apt_model(pm)
    assert apt_hf.count_params(pm) == apt.n_params == 85_054_464
    assert main_params(pm) == 85_054_464
    adapter = sum(p.numel() for layer in apt.apt_layers().values() for store in (layer.apt_A, layer.apt_B)
                  for p in store.values())
    assert len(apt.apt_layers()) == 36 and adapter == 663_552  # spec E.2


def test_count_params_bert_matches_formula_and_true_count():
    pm = wrap("bert")
    apt = apt_hf.find_apt_model(pm)
    cfg = make_config("bert")
    dh, L = cfg.hidden_size // cfg.num_attention_heads, cfg.num_hidden_layers
    full = b3_formula(cfg.hidden_size, cfg.num_attention_heads * L, cfg.intermediate_size * L, dh, L)
    assert apt_hf.count_params(pm) == apt.n_params == main_params(pm) == full

    written = random_masks(pm, seed=4)
    masks = apt_hf.get_masks(pm)
    masks.heads[2][0] = 0.3  # fractional values still count as kept
    h, n = sum(int((m > 0).sum()) for m in masks.heads), sum(int((m > 0).sum()) for m in masks.neurons)
    d = int((masks.hidden > 0).sum())
    expected = b3_formula(d, h, n, dh, L)
    assert expected < full and apt_hf.count_params(pm) == expected
    assert apt.n_params == full  # the reference total is the original model's

    masks.heads[2].copy_((masks.heads[2] > 0).float())
    apt.prune_to_masks()
    assert apt_hf.count_params(pm) == main_params(pm) == expected
    assert written["heads"][0].sum() == 0 and len(masks.heads[0]) == 0


def test_count_params_llama_gqa_is_exact():
    pm = wrap("llama_gqa")
    apt = apt_hf.find_apt_model(pm)

    def true_main() -> int:
        core = apt.model.base_model
        return sum(p.numel() for n, p in core.named_parameters() if ".apt_" not in n and "embed_tokens" not in n)

    assert apt_hf.count_params(pm) == apt.n_params == true_main()
    masks = apt_hf.get_masks(pm)
    masks.heads[0] = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1.])  # one whole kv group removed
    masks.heads[1] = torch.tensor([1, 0, 1, 0, 0, 1, 0, 1.])  # two query heads per group kept
    masks.neurons[2][:30] = 0
    masks.hidden[::4] = 0
    expected = apt_hf.count_params(pm)
    apt.prune_to_masks()
    assert apt_hf.count_params(pm) == true_main() == expected < apt.n_params


def counted_numel(layout) -> int:
    """The real number of parameters in the tensors spec B.3 counts: every attention projection (DeBERTa-v2's
    position projections too), FFN matrix and counted norm (weights and biases), read off the modules."""
    mods = [m for s in layout.attentions for m in (s.q, s.k, s.v, s.o, *s.extra) if m is not None]
    mods += [m for f in layout.ffns for m in (f.up, f.gate, f.down) if m is not None]
    mods = list({id(m): m for m in mods}.values())  # a fused projection (Phi-3's qkv_proj, gate_up_proj) once
    total = sum(t.numel() for m in mods for t in (base_linear(m).weight, base_linear(m).bias) if t is not None)
    return total + sum(t.numel() for n in layout.counted_norms for t in (getattr(n, "weight", None),
                                                                         getattr(n, "bias", None)) if t is not None)


@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_count_params_is_the_real_count(kind):
    """count_params equals the parameters the counted tensors really hold: dense, and after physical pruning of random
    masks (a layer without heads, one without neurons, a quarter of the hidden dimensions)."""
    pm = wrap(kind)
    apt = apt_hf.find_apt_model(pm)
    assert apt_hf.count_params(pm) == apt.n_params == counted_numel(apt.layout)
    random_masks(pm, seed=4)
    masks = apt_hf.get_masks(pm)
    for i, site in enumerate(apt.layout.attentions):  # obey the grouped-query rule, as APT's search does: no padding
        kept = gqa_closure(masks.heads[i] > 0, site.group_size)
        masks.heads[i] = torch.zeros(masks.heads[i].numel()).index_fill_(0, kept, 1.0)
    expected = apt_hf.count_params(pm)
    apt.prune_to_masks()
    assert apt_hf.count_params(pm) == counted_numel(apt.layout) == expected < apt.n_params


def test_count_params_on_meta_device_needs_no_weights():
    """A LLaMA-2-7B-shaped model built on the meta device: counting reads shapes and masks, never weights."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=32)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    pm = peft.get_peft_model(model, apt_hf.APTConfig(task_type="CAUSAL_LM"))
    assert next(pm.parameters()).is_meta
    main = sum(p.numel() for n, p in model.model.named_parameters() if ".apt_" not in n and "embed_tokens" not in n)
    assert apt_hf.count_params(pm) == apt_hf.find_apt_model(pm).n_params == main == 6_476_271_616  # spec B.3
    masks = apt_hf.get_masks(pm)
    masks.heads[0][:8] = 0  # 8 heads of layer 0: 8 * 4 * 4096 * 128 parameters
    assert apt_hf.count_params(pm) == main - 8 * 4 * 4096 * 128


# ------------------------------------------------------------------------------------------------ 5. config
@pytest.mark.parametrize("field,value", [
    ("r", 0), ("target_sparsity", 1.2), ("target_sparsity", -0.1), ("mask_decay", 0), ("max_rank", 4),
    ("pruning_start", -5), ("pruning_end", 1.5), ("lora_alpha", 0),
])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=rf"APTConfig\.{field}="):
        apt_hf.APTConfig(**{field: value})


VOCAB_GPT2 = 50


def gpt2():
    import transformers

    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB_GPT2,
                                                                n_positions=16, bos_token_id=0, eos_token_id=0))



def test_unsupported_architecture_with_explicit_linear_targets():
    with pytest.raises(ValueError, match=r"(?s)gpt2.*Supported:.*bert.*llama"):
        peft.get_peft_model(gpt2(), apt_hf.APTConfig(task_type="CAUSAL_LM", target_modules=["lm_head"]))


@pytest.mark.parametrize("targets", [None, ["c_attn"]])
def test_unsupported_architecture_names_supported_list(targets):
    with pytest.raises(ValueError, match=r"(?s)gpt2.*bert.*llama"):
        peft.get_peft_model(gpt2(), apt_hf.APTConfig(task_type="CAUSAL_LM", target_modules=targets))


def test_target_modules_matching_nothing():
    with pytest.raises(ValueError, match="target"):
        peft.get_peft_model(make_model("bert"), apt_hf.APTConfig(task_type="SEQ_CLS", target_modules=["nope_proj"]))


# ------------------------------------------------------------------------------------------------ 6. masks API
def test_mask_assignment_checks_shape_and_edits_take_effect():
    pm = wrap("llama_mha")
    masks = apt_hf.get_masks(pm)
    with pytest.raises(ValueError, match="shape"):
        masks.heads[0] = torch.ones(7)
    with pytest.raises(ValueError, match="shape"):
        masks.neurons[1] = torch.ones(3, 80)
    with pytest.raises(IndexError):
        masks.heads[3]
    assert len(masks.heads) == len(masks.neurons) == 3 and masks.hidden.shape == (64,)

    inputs = make_inputs("llama_mha")
    base = logits(pm, inputs)
    assert torch.equal(logits(pm, inputs), base)  # full masks, cached as full
    masks.heads[1][2] = 0.0  # in place, right after a forward that cached "full"
    after_head = logits(pm, inputs)
    assert (after_head - base).abs().max() > 1e-4
    masks.heads[1].fill_(1.0)
    assert (logits(pm, inputs) - base).abs().max() <= 1e-6
    masks.neurons[0][:5] = 0.0
    after_neuron = logits(pm, inputs)
    assert (after_neuron - base).abs().max() > 1e-4
    masks.neurons[0] = torch.ones(80)  # item assignment copies into the same buffer
    assert (logits(pm, inputs) - base).abs().max() <= 1e-6
    masks.hidden[3] = 0.0
    assert (logits(pm, inputs) - base).abs().max() > 1e-4
    masks.hidden.fill_(1.0)
    assert (logits(pm, inputs) - base).abs().max() <= 1e-6


# ------------------------------------------------------------------------------------------------ 7. export errors
@pytest.fixture
def export_dir(tmp_path):
    pm = wrap("bert")
    random_masks(pm, seed=9)
    apt_hf.export_pruned(pm, tmp_path / "export")
    return pm, tmp_path / "export"


def test_export_refuses_non_empty_folder(export_dir):
    pm, path = export_dir
    with pytest.raises(FileExistsError, match="overwrite"):
        apt_hf.export_pruned(pm, path)
    apt_hf.export_pruned(pm, path, overwrite=True)
    assert apt_hf.load_pruned(path) is not None


def test_load_pruned_missing_files(export_dir):
    _, path = export_dir
    os.remove(path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        apt_hf.load_pruned(path)
    os.remove(path / "apt_structure.json")
    with pytest.raises(FileNotFoundError, match="apt_structure.json"):
        apt_hf.load_pruned(path)
    with pytest.raises(FileNotFoundError):
        apt_hf.load_pruned(path / "does_not_exist")


@pytest.mark.parametrize("edit", [
    lambda r: r.update(heads=[4, 4, 4], kv_heads=[4, 4, 4]),
    lambda r: r.update(hidden_size=r["hidden_size"] - 3),
    lambda r: r.update(neurons=[n + 1 for n in r["neurons"]]),
    lambda r: r.update(neurons=r["neurons"][:-1]),
    lambda r: r.update(heads=[5] * 3, kv_heads=[5] * 3),
    lambda r: r.pop("kv_heads"),
])
def test_load_pruned_wrong_structure(export_dir, edit):
    _, path = export_dir
    record = json.loads((path / "apt_structure.json").read_text())
    edit(record)
    (path / "apt_structure.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="corrupted"):
        apt_hf.load_pruned(path)


def test_load_pruned_invalid_json(export_dir):
    _, path = export_dir
    (path / "apt_structure.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        apt_hf.load_pruned(path)


# ------------------------------------------------------------------------------------------------ 8. bf16
@pytest.mark.parametrize("kind", ["bert", "llama_gqa"])
def test_bf16_autocast_masked_forward(kind):
    pm = wrap(kind)
    random_masks(pm, seed=6)
    masks = apt_hf.get_masks(pm)
    masks.heads[2].mul_(0.5)  # fractional values, as inside a mask-decay window
    masks.hidden[torch.nonzero(masks.hidden > 0).flatten()[:3]] = 0.5
    inputs = make_inputs(kind)
    ref = logits(pm, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = logits(pm, inputs)
    assert out.shape == ref.shape and bool(torch.isfinite(out).all())
    assert (out - ref).abs().max() <= 0.1 * ref.abs().max() + 0.05
    pm.to(torch.bfloat16)  # a model held in bf16 outright
    out16 = logits(pm, inputs)
    assert bool(torch.isfinite(out16).all()) and (out16 - ref).abs().max() <= 0.1 * ref.abs().max() + 0.05
