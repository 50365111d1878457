"""T5 physical pruning is exact (spec A.4, K.2): masked PEFT model == exported/reloaded == pruned in place.

T5 shares one relative position bias (computed by block 0 over all heads) across blocks, and the decoder's first
cross-attention hands a zero bias on; these tests prune different heads in different blocks, every head of the
block-0 self-attentions that own ``relative_attention_bias``, every head of a cross-attention and every neuron of
an FFN, and compare logits and greedy generations.
"""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import apt_hf  # noqa: E402
from apt_hf.export import STRUCTURE_FILE  # noqa: E402
from apt_hf.arch.t5 import EmptyT5Attention, PrunedT5Attention  # noqa: E402

H = 4  # heads per attention site
TOL = 1e-4

# Head-site order (arch.py): enc0, enc1, dec0.self, dec0.cross, dec1.self, dec1.cross.
# Each scenario: kept heads per site (None: random non-empty), FFN index with every neuron removed.
SCENARIOS = {
    # the two block-0 self-attentions that own relative_attention_bias lose every head; dec1.cross too
    "bias_owners_empty": ([[], None, [], None, None, []], 1),
    # block 0 keeps some heads, later blocks keep other ones; the first cross-attention (zero-bias creator) is empty
    "different_heads_per_block": ([[1, 3], [0, 2], [0, 3], [], [1, 2], [2]], 3),
}


def _model(ffn: str, attn: str) -> transformers.T5ForConditionalGeneration:
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, num_heads=H, d_ff=64, num_layers=2,
                                   num_decoder_layers=2, feed_forward_proj=ffn, dropout_rate=0.0,
                                   relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    config._attn_implementation = attn
    return transformers.T5ForConditionalGeneration(config).eval()


def _masked_peft(ffn: str, attn: str, scenario: str, seed: int = 0):
    torch.manual_seed(seed)
    pm = peft.get_peft_model(_model(ffn, attn), apt_hf.APTConfig(task_type="SEQ_2_SEQ_LM"))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    pm.eval()
    heads, empty_ffn = SCENARIOS[scenario]
    masks = apt_hf.get_masks(pm)
    assert len(masks.heads) == len(heads) and len(masks.neurons) == 4
    g = torch.Generator().manual_seed(seed + 1)
    for i, kept in enumerate(heads):
        if kept is None:
            m = (torch.rand(H, generator=g) > 0.5).float()
            m[torch.randint(H, (1,), generator=g)] = 1.0
        else:
            m = torch.zeros(H)
            m[kept] = 1.0
        masks.heads[i] = m
    for i in range(len(masks.neurons)):
        n = masks.neurons[i].numel()
        masks.neurons[i] = torch.zeros(n) if i == empty_ffn else (torch.rand(n, generator=g) > 0.4).float()
    masks.hidden[::5] = 0
    return pm


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 7)
    return {"input_ids": torch.randint(2, 64, (2, 7), generator=g),
            "decoder_input_ids": torch.randint(2, 64, (2, 5), generator=g)}


def _generate(model, inputs):
    """Greedy, 5 new tokens; pad/eos suppressed so the decoded tokens differ (repeated pads hide position bias)."""
    return model.generate(input_ids=inputs["input_ids"], max_new_tokens=5, do_sample=False, suppress_tokens=[0, 1],
                          return_dict_in_generate=True, output_logits=True)


def _assert_same_generation(out, ref) -> None:
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.logits) == len(ref.logits) == 5
    for a, b in zip(out.logits, ref.logits):
        assert (a - b).abs().max() < TOL


def _kept(masks) -> list[list[int]]:
    return [torch.nonzero(m > 0).flatten().tolist() for m in masks.heads]


def _check_classes(model, kept: list[list[int]]) -> None:
    layout = apt_hf.arch.describe(model)
    for site, k in zip(layout.attentions, kept):
        core = site.core
        if not k:
            assert isinstance(core, EmptyT5Attention)
        elif len(k) < H:
            assert isinstance(core, PrunedT5Attention) and list(core.apt_kept_heads) == k
        assert site.num_heads == len(k)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("ffn", ["relu", "gated-gelu"])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_export_and_load_match_masked(tmp_path, ffn, attn, scenario):
    pm = _masked_peft(ffn, attn, scenario)
    masks = apt_hf.get_masks(pm)
    kept = _kept(masks)
    inputs = _inputs()
    with torch.no_grad():
        y_masked = pm(**inputs).logits
        pruned = apt_hf.export_pruned(pm, tmp_path)
        y_pruned = pruned(**inputs).logits
        loaded = apt_hf.load_pruned(tmp_path, attn_implementation=attn)
        y_loaded = loaded(**inputs).logits
    assert (y_pruned - y_masked).abs().max() < TOL
    assert (y_loaded - y_masked).abs().max() < TOL
    # the training model is untouched by the export
    assert apt_hf.get_masks(pm).heads[0].numel() == H

    # the stock class (shaped to the record) plus the per-site record of kept original heads
    assert isinstance(pruned, transformers.T5ForConditionalGeneration) and type(loaded) is type(pruned)
    record = json.loads((tmp_path / STRUCTURE_FILE).read_text())
    assert record["t5_kept_heads"] == kept
    assert record["heads"] == [len(k) for k in kept]
    assert json.loads((tmp_path / "config.json").read_text())["num_heads"] == H
    assert not any("apt" in k for k in loaded.state_dict())
    assert loaded.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.shape[1] == H
    _check_classes(pruned, kept)
    _check_classes(loaded, kept)
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in _model(ffn, attn).parameters())

    # greedy generation (uses the decoder cache, incl. an empty block-0 self-attention): same tokens, same logits
    with torch.no_grad():
        ref = _generate(pm, inputs)
        for model in (pruned, loaded):
            _assert_same_generation(_generate(model, inputs), ref)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("ffn", ["relu", "gated-gelu"])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_prune_in_place_matches_masked(ffn, attn, scenario):
    pm = _masked_peft(ffn, attn, scenario)
    masks = apt_hf.get_masks(pm)
    kept = _kept(masks)
    inputs = _inputs()
    with torch.no_grad():
        y_masked = pm(**inputs).logits
        ref = _generate(pm, inputs)
        n_before = sum(p.numel() for p in pm.parameters())
        apt = apt_hf.find_apt_model(pm)
        changes = apt.prune_to_masks()
        assert changes
        y_after = pm(**inputs).logits
        assert (y_after - y_masked).abs().max() < TOL
        _assert_same_generation(_generate(pm, inputs), ref)
    assert sum(p.numel() for p in pm.parameters()) < n_before
    assert [masks.kept("heads", i).tolist() for i in range(len(kept))] == kept
    _check_classes(pm, kept)
    # adapters still train after the in-place pruning
    pm.train()
    loss = pm(**inputs, labels=inputs["decoder_input_ids"]).loss
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pm.parameters() if p.requires_grad)


def test_prune_twice_composes_kept_heads(tmp_path):
    """A second in-place pruning composes with the first: kept original heads, export record and outputs."""
    pm = _masked_peft("relu", "eager", "different_heads_per_block")
    masks = apt_hf.get_masks(pm)
    inputs = _inputs()
    apt = apt_hf.find_apt_model(pm)
    with torch.no_grad():
        apt.prune_to_masks()
        # now drop one more head in enc0 (original head 3 of [1, 3]) and dec1.self (original head 1 of [1, 2])
        masks.heads[0] = torch.tensor([1.0, 0.0])
        masks.heads[4] = torch.tensor([0.0, 1.0])
        y_masked = pm(**inputs).logits
        apt.prune_to_masks()
        y_after = pm(**inputs).logits
        assert (y_after - y_masked).abs().max() < TOL
        kept = [masks.kept("heads", i).tolist() for i in range(len(masks.heads))]
        assert kept[0] == [1] and kept[4] == [2]
        loaded_dir = tmp_path / "export"
        apt_hf.export_pruned(pm, loaded_dir)
        assert json.loads((loaded_dir / STRUCTURE_FILE).read_text())["t5_kept_heads"] == kept
        y_loaded = apt_hf.load_pruned(loaded_dir)(**inputs).logits
        assert (y_loaded - y_masked).abs().max() < TOL


def test_corrupted_t5_record_is_rejected(tmp_path):
    pm = _masked_peft("relu", "eager", "different_heads_per_block")
    apt_hf.export_pruned(pm, tmp_path)
    record = json.loads((tmp_path / STRUCTURE_FILE).read_text())
    record["t5_kept_heads"][0] = [1, 7]
    (tmp_path / STRUCTURE_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="t5_kept_heads"):
        apt_hf.load_pruned(tmp_path)
