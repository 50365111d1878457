"""The architecture registry (issue 14): every family trains to its target with a stock Trainer, every family module
ships with exports, and the dispatcher names the supported families.

Exactness of masked vs physically pruned vs reloaded models for each family is covered by the parametrized tests of
test_foundation.py (EXACT_KINDS, DECODER_KINDS) and test_stock_loading.py (a fresh process without apt_hf).
"""

from __future__ import annotations

import dataclasses

import peft
import pytest
import torch
import transformers
from conftest import IMAGE_KINDS, ImageTask, TokenTask, make_config
from transformers import Trainer, TrainingArguments

import apt_hf
from apt_hf.arch import SPECS, UnsupportedArchitectureError, spec_for
from apt_hf.remote import arch_file, shipped_arch_source

# kind -> sequence-classification class of the same config (TokenTask / ImageTask are classification tasks)
SEQ_CLS = {"xlmr": "XLMRobertaForSequenceClassification", "qwen3": "Qwen3ForSequenceClassification",
           "gemma2": "Gemma2ForSequenceClassification", "gemma3": "Gemma3TextForSequenceClassification",
           "distilbert": "DistilBertForSequenceClassification", "vit": "ViTForImageClassification",
           "phi3": "Phi3ForSequenceClassification", "modernbert": "ModernBertForSequenceClassification",
           "deberta_v2": "DebertaV2ForSequenceClassification", "deberta_v3": "DebertaV2ForSequenceClassification"}
TARGET = 0.4


def classifier(kind: str) -> transformers.PreTrainedModel:
    """The kind's tiny config with a wider FFN: with few, coarse blocks (a GQA head row is ~3 % of this model) the
    last event can only land within 1 % if fine-grained blocks (neurons) remain to fill the gap."""
    wide = {"hidden_dim": 160} if kind == "distilbert" else {"intermediate_size": 160}
    config = make_config(kind, num_labels=2, **wide)
    torch.manual_seed(0)
    return getattr(transformers, SEQ_CLS[kind])(config)


@pytest.mark.parametrize("kind", sorted(SEQ_CLS))
def test_stock_trainer_reaches_the_target_density(kind, tmp_path):
    """Stock Trainer + APTCallback, 40 steps, 4 pruning events: the final structure counts within 1 % below the
    target density, and the pruned model still classifies."""
    pm = peft.get_peft_model(classifier(kind), apt_hf.APTConfig(
        task_type="SEQ_CLS", target_sparsity=1 - TARGET, pruning_start=4, pruning_end=32, sparsity_warmup=4,
        num_pruning_events=4, mask_decay_window=4, distillation=False))
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=8, max_steps=40, learning_rate=1e-3,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    task = ImageTask if kind in IMAGE_KINDS else TokenTask
    Trainer(model=pm, args=args, train_dataset=task(n=128), callbacks=[apt_hf.APTCallback()]).train()
    apt = apt_hf.find_apt_model(pm)
    density = apt_hf.count_params(pm) / apt.n_params
    assert 0.99 * TARGET <= density <= TARGET, density
    real = sum(p.numel() for n, p in pm.named_parameters() if ".apt_" not in n)
    assert real < sum(p.numel() for p in classifier(kind).parameters())  # removed physically
    batch = task(n=4)[:4]
    with torch.no_grad():
        out = pm(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert out.shape == (4, 2) and torch.isfinite(out).all()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.family)
def test_every_family_module_ships_with_exports(spec):
    """An export carries its family's module with the one runtime import pointed at the runtime copy."""
    source = shipped_arch_source(spec)
    assert "from .apt_pruned_runtime import " in source and "from ..runtime" not in source
    assert arch_file(spec).startswith("apt_arch_") and spec.model_types


def test_dispatch_is_by_model_type_and_names_the_supported_families():
    assert spec_for(make_config("qwen3")).family == "llama"
    assert spec_for(make_config("gemma3")).family == "gemma"
    assert spec_for({"model_type": "apt_pruned_xlm-roberta"}).family == "bert"  # an export's config
    with pytest.raises(UnsupportedArchitectureError, match=r"(?s)'gpt2'.*bert \(bert, roberta.*gemma \(gemma2"):
        spec_for({"model_type": "gpt2"})


def test_a_match_test_narrows_a_spec():
    """A spec's optional match test on the config (the PEFT-style dispatcher's extension point) can refuse a variant
    its model_type covers."""
    bert = spec_for(make_config("bert"))
    narrowed = dataclasses.replace(bert, match=lambda config: getattr(config, "num_hidden_layers", 0) > 3)
    assert bert.matches(make_config("bert")) and not narrowed.matches(make_config("bert"))
    assert narrowed.matches(make_config("bert", num_hidden_layers=4))


@pytest.mark.parametrize("kind,cls", [("vit", "ViTForMaskedImageModeling"), ("modernbert", "ModernBertForMaskedLM"),
                                      ("deberta_v3", "DebertaV2ForMaskedLM")])
def test_decoders_that_read_an_unpruned_width_are_refused(kind, cls):
    """ViT's masked-image-modeling decoder is a convolution reading the hidden width; ModernBERT's and DeBERTa-v2's
    masked-LM heads multiply by the token embedding but at the head's unpruned width. All are refused at
    get_peft_model, naming the classes that work."""
    with pytest.raises(ValueError, match=f"{cls}.*Prune a "):
        peft.get_peft_model(getattr(transformers, cls)(make_config(kind)), apt_hf.APTConfig())


def test_modernbert_token_classifier_keeps_its_width(tmp_path):
    """ModernBERT's token classifier reads the prediction head's output, not the residual stream: pruning the hidden
    width leaves its input width alone (the generic token-level rule must not apply), and the export is exact."""
    from conftest import logits, make_inputs, random_masks, randomize_adapters

    torch.manual_seed(0)
    model = transformers.ModernBertForTokenClassification(make_config("modernbert")).eval()
    pm = peft.get_peft_model(model, apt_hf.APTConfig(task_type="TOKEN_CLS"))
    randomize_adapters(pm)
    random_masks(pm, seed=3)
    inputs = make_inputs("modernbert")
    ref = logits(pm.eval(), inputs)
    apt_hf.export_pruned(pm, tmp_path / "export")
    loaded = apt_hf.load_pruned(tmp_path / "export")
    assert loaded.classifier.in_features == model.config.hidden_size
    assert loaded.model.embeddings.tok_embeddings.embedding_dim < model.config.hidden_size
    assert ((logits(loaded, inputs) - ref) * inputs["attention_mask"][..., None]).abs().max() <= 1e-4


def test_deberta_with_a_convolution_layer_is_refused():
    """DeBERTa-v2 xlarge/xxlarge add a convolution after the first layer (conv_kernel_size > 0); apt_hf refuses it
    at get_peft_model and says which DeBERTa models work."""
    model = transformers.DebertaV2ForSequenceClassification(make_config("deberta_v2", conv_kernel_size=3))
    with pytest.raises(ValueError, match=r"conv_kernel_size=3.*DeBERTa-v3 models"):
        peft.get_peft_model(model, apt_hf.APTConfig(task_type="SEQ_CLS"))


def _outputs(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """Logits (question answering: start and end logits side by side), padded positions zeroed."""
    with torch.no_grad():
        out = model(**inputs)
    if hasattr(out, "start_logits"):
        return torch.stack([out.start_logits, out.end_logits], -1) * inputs["attention_mask"][..., None]
    return out.logits * inputs["attention_mask"][..., None] if out.logits.dim() == 3 else out.logits


@pytest.mark.parametrize("kind,cls,task,overrides", [
    ("deberta_v2", "DebertaV2ForTokenClassification", "TOKEN_CLS", {}),
    ("deberta_v3", "DebertaV2ForQuestionAnswering", "QUESTION_ANS", {"num_labels": 2}),
    ("deberta_v2", "DebertaV2ForSequenceClassification", "SEQ_CLS", {"embedding_size": 24}),
    ("deberta_v3", "DebertaV2ForSequenceClassification", "SEQ_CLS", {"embedding_size": 24}),
], ids=["v2-token-cls", "v3-qa", "v2-embed-proj", "v3-embed-proj"])
def test_deberta_task_heads_and_embedding_projection_are_exact(kind, cls, task, overrides, tmp_path):
    """DeBERTa's token classifier and QA head read the residual stream at every position (their input columns
    follow the hidden width); with embedding_size != hidden_size the token embeddings keep their width and the rows
    of embed_proj follow the hidden width. Masked, physically pruned and load_pruned outputs agree."""
    from conftest import make_inputs, random_masks, randomize_adapters

    torch.manual_seed(0)
    model = getattr(transformers, cls)(make_config(kind, **overrides)).eval()
    pm = peft.get_peft_model(model, apt_hf.APTConfig(task_type=task))
    randomize_adapters(pm)
    inputs = make_inputs(kind)
    dense = _outputs(pm.eval(), inputs)
    written = random_masks(pm, seed=3)
    ref = _outputs(pm, inputs)
    assert (ref - dense).abs().max() > 1e-3
    apt_hf.export_pruned(pm, tmp_path / "export")
    loaded = apt_hf.load_pruned(tmp_path / "export")
    assert (_outputs(loaded, inputs) - ref).abs().max() <= 1e-4
    apt_hf.find_apt_model(pm).prune_to_masks()
    assert (_outputs(pm, inputs) - ref).abs().max() <= 1e-4
    width = int(written["hidden"][0].sum())
    emb = loaded.deberta.embeddings
    assert emb.LayerNorm.normalized_shape == (width,) and loaded.deberta.encoder.rel_embeddings.embedding_dim == width
    if "embedding_size" in overrides:
        assert emb.word_embeddings.embedding_dim == 24 and emb.embed_proj.weight.shape == (width, 24)
        assert emb.embed_proj.out_features == width
    else:
        assert emb.word_embeddings.embedding_dim == width
    head = loaded.classifier if task == "TOKEN_CLS" else loaded.qa_outputs if task == "QUESTION_ANS" else None
    assert head is None or head.in_features == width
