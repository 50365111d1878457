"""ModernBERT encoders (spec A.2, A.4, B.3; fused projections).

Pre-norm layers: ``attn_norm`` (layer 0: none, the embeddings' LayerNorm serves) -> ``attn`` (fused ``Wqkv`` whose
rows are the query, key and value heads one after the other, output projection ``Wo`` inside the core) -> residual
sum -> ``mlp_norm`` -> ``mlp`` (fused GLU ``Wi``: input rows then gate rows, both halves follow the neurons; ``Wo``)
-> residual sum; ``final_norm`` ends the stack. Every LayerNorm over the residual stream is counted (spec B.3), the
embeddings' too. Attention cores read their head counts from ``Wqkv``'s shape. The task heads read the residual
stream through ``head.dense`` (a d x d map whose output is not the residual stream, so only its input columns follow
the hidden width); the classifier reads the head's output. ``ModernBertForMaskedLM`` is refused: its decoder shares
the token embedding but reads the head's unpruned width.

Shipped with every export of this family (as ``apt_arch_modernbert.py``): imports only torch, transformers and the
runtime.
"""

from __future__ import annotations

from torch import nn

from ..runtime import ArchSpec, AttentionSite, FFNSite, Layout, base_linear, find_readers, heads_setter


def layout(hf: nn.Module) -> Layout:
    if hasattr(hf, "decoder"):
        raise ValueError(f"apt_hf prunes ModernBERT encoders and classifiers, not {type(hf).__name__}: its decoder "
                         "shares the token embedding, whose width pruning changes, but reads the head's unpruned "
                         "width. Prune a ModernBertForSequenceClassification (or another task class) or "
                         "ModernBertModel.")
    core, config = hf.base_model, hf.config
    head_dim = config.hidden_size // config.num_attention_heads
    attns, ffns, norms, att_sums, ffn_sums = [], [], [], [], []
    for layer in core.layers:
        att = layer.attn
        qkv = getattr(att, "Wqkv", None)  # None once every head is gone
        n = base_linear(qkv).out_features // (3 * head_dim) if qkv is not None else 0
        attns.append(AttentionSite(layer, "attn", qkv, qkv, qkv, att.Wo, head_dim, "self", (n, n) if n else None))
        ffns.append(FFNSite(layer.mlp.Wi, layer.mlp.Wi, layer.mlp.Wo, fused=True))
        if isinstance(layer.attn_norm, nn.LayerNorm):
            norms.append(layer.attn_norm)
            ffn_sums.append((layer.attn_norm, "in"))  # (the previous layer's FFN sum)
        norms.append(layer.mlp_norm)
        att_sums.append((layer.mlp_norm, "in"))
    norms = [core.embeddings.norm] + norms + [core.final_norm]
    ffn_sums.append((core.final_norm, "in"))
    classifier = getattr(hf, "classifier", None)  # reads the head's output (PEFT may wrap it: all its copies)
    skip = {id(m) for m in classifier.modules()} if isinstance(classifier, nn.Module) else set()
    readers = [m for m in find_readers(hf, SPEC.readers) if id(m) not in skip]
    return Layout(SPEC, core.embeddings.tok_embeddings.embedding_dim, attns, ffns, [core.embeddings.tok_embeddings],
                  [], norms, norms, readers, attention_sums=att_sums, ffn_sums=ffn_sums)


SPEC = ArchSpec(
    family="modernbert",
    model_types=("modernbert",),
    layout=layout,
    set_heads=heads_setter(),
    target_modules=("Wqkv", "Wi"),
    kind="encoder",
    readers=("head.dense",),
    norm="layer",
)
SPECS = (SPEC,)
