"""The model card (README.md) of a pruned export: what was kept, how to load it, how it was trained (spec G)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pipelines import SUPPORTED_TASKS

from . import runtime

# auto class -> pipeline task, for the card's loading example
_TASKS = {"AutoModelForSequenceClassification": "text-classification", "AutoModelForCausalLM": "text-generation",
          "AutoModelForTokenClassification": "token-classification",
          "AutoModelForQuestionAnswering": "question-answering", "AutoModelForMaskedLM": "fill-mask"}


def unpruned_model(config, stock: type) -> nn.Module:
    """The unpruned architecture of a pruned model's config, built on the meta device (no memory, no weights)."""
    drop = (runtime.RECORD_KEY, "apt_training", "auto_map", "model_type", "architectures")
    plain = stock.config_class.from_dict({k: v for k, v in config.to_dict().items() if k not in drop})
    with torch.device("meta"):
        return stock._from_config(plain)


def _site_names(layout: runtime.Layout) -> tuple[list[str], list[str]]:
    """Row labels of the attention and FFN tables: ``layer i`` in a one-stack model, else e.g. ``decoder 1
    cross-attention``."""
    attns, ffns = [""] * len(layout.attentions), [""] * len(layout.ffns)
    for stack in layout.layer_stacks():
        where = "layer" if stack.name == "main" else stack.name
        for j, (att, ffn) in enumerate(stack.layers):
            for i in att:
                kind = "" if stack.name == "main" else f" {layout.attentions[i].kind}-attention"
                attns[i] = f"{where} {j}{kind}"
            for i in ffn:
                ffns[i] = f"{where} {j}"
    return attns, ffns


def model_card(model: nn.Module, stock: type, has_tokenizer: bool) -> str:
    """Markdown model card of a pruned model (an ``AptPruned`` class with ``config.apt_pruned`` and ``auto_map``)."""
    from . import __version__

    config, record = model.config, getattr(model.config, runtime.RECORD_KEY)
    full = unpruned_model(config, stock)
    full_layout = model.apt_spec.layout(full)
    n_full, n_kept = sum(p.numel() for p in full.parameters()), sum(p.numel() for p in model.parameters())
    heads = [a for a in config.auto_map if a.startswith("AutoModelFor") and a != "AutoModelForPreTraining"]
    auto = next((a for a in heads if a in _TASKS), heads[0] if heads else "AutoModel")
    task = _TASKS.get(auto, "feature-extraction" if auto == "AutoModel" else None)
    has_pipeline = has_tokenizer and task in SUPPORTED_TASKS
    training = getattr(config, "apt_training", None) or {}
    base = training.get("base_model")
    attn_names, ffn_names = _site_names(full_layout)
    lines = [
        "---", "library_name: transformers", "tags:", "- apt_hf", "- pruned", "---", "",
        f"# {stock.__name__} pruned with APT", "",
        (f"`{base}`" if base else "A model") +
        f" after APT (Adaptive Pruning and Tuning, Zhao, Hajishirzi & Cao, ICML 2024), exported by apt_hf "
        f"{__version__}. Attention heads, FFN neurons and hidden dimensions were removed physically, so each layer has "
        "its own size.", "",
        f"- parameters: {n_kept:,} of the unpruned architecture's {n_full:,} ({100 * n_kept / n_full:.1f} %)",
        f"- hidden width: {record['hidden_size']} of {full_layout.hidden_size}",
    ]
    if "density" in training:
        lines.append(f"- density (APT's count of the prunable parameters, spec B.3): {training['density']:.4f}")
    lines += ["", "| attention | heads kept | key/value heads kept |", "|---|---|---|"]
    lines += [f"| {name} | {h} of {s.num_heads} | {kv} of {s.num_kv_heads} |"
              for name, h, kv, s in zip(attn_names, record["heads"], record["kv_heads"], full_layout.attentions)]
    lines += ["", "| FFN | neurons kept |", "|---|---|"]
    lines += [f"| {name} | {n} of {f.num_neurons} |"
              for name, n, f in zip(ffn_names, record["neurons"], full_layout.ffns)]
    lines += [
        "", "## Loading", "", "With transformers alone (apt_hf not needed):", "", "```python",
        f"from transformers import {auto}" + (", pipeline" if has_pipeline else ""), "",
        f'model = {auto}.from_pretrained("path/to/this/folder", trust_remote_code=True)',
    ]
    if has_pipeline:
        lines.append(f'pipe = pipeline("{task}", model="path/to/this/folder", trust_remote_code=True)')
    lines += [
        "```", "",
        "`trust_remote_code=True` runs this folder's `modeling_apt_pruned.py` and `apt_pruned_runtime.py` (read "
        "them first; they need only torch and transformers): they subclass the stock transformers classes and resize "
        "each layer to the sizes recorded in config.json before the weights load, and refuse weights that are missing "
        "or of another shape. Without it transformers refuses this folder. Do not load it with a stock class (e.g. "
        f"`{stock.__name__}.from_pretrained`): that builds the unpruned sizes, and `ignore_mismatched_sizes=True` "
        "would replace the pruned weights with random ones.", "",
        "With apt_hf (runs no code from this folder): `apt_hf.load_pruned(\"path/to/this/folder\")`.",
    ]
    if training:
        lines += ["", "## Training", ""] + ([f"- base model: `{base}`"] if base else [])
        lines.append("APT settings (`apt_hf.APTConfig`):")
        lines += [f"- {key}: `{value}`" for key, value in sorted(training.get("apt_config", {}).items())]
    return "\n".join(lines) + "\n"
