"""BERT-style encoders: BERT, RoBERTa, XLM-RoBERTa (spec A.2, A.4, B.3).

Post-norm layers: ``attention.self`` holds query/key/value, ``attention.output`` the output projection and the
LayerNorm of the attention's residual sum; ``intermediate.dense`` / ``output.dense`` the FFN and ``output.LayerNorm``
its sum. The embeddings' LayerNorm normalises the residual stream too but is not in the spec B.3 count. The output
projection lives outside the attention core, so an emptied core returns a zero-width context and the projection adds
its bias.

Shipped with every export of this family (as ``apt_arch_bert.py``): imports only torch, transformers and the runtime.
"""

from __future__ import annotations

from torch import nn

from ..runtime import ArchSpec, AttentionSite, FFNSite, Layout, find_readers, heads_setter


def layout(hf: nn.Module) -> Layout:
    core, config = hf.base_model, hf.config
    head_dim = config.hidden_size // config.num_attention_heads
    attns, ffns, norms = [], [], []
    for layer in core.encoder.layer:
        att = layer.attention
        q, k, v = (getattr(att.self, n, None) for n in ("query", "key", "value"))
        attns.append(AttentionSite(att, "self", q, k, v, att.output.dense, head_dim, "self"))
        ffns.append(FFNSite(layer.intermediate.dense, None, layer.output.dense))
        norms += [att.output.LayerNorm, layer.output.LayerNorm]
    emb = core.embeddings
    embeddings = [m for m in (emb.word_embeddings, getattr(emb, "position_embeddings", None),
                              getattr(emb, "token_type_embeddings", None)) if m is not None]
    return Layout(SPEC, emb.word_embeddings.embedding_dim, attns, ffns, embeddings, [], [emb.LayerNorm] + norms,
                  norms, find_readers(hf, SPEC.readers),
                  attention_sums=[(n, "in") for n in norms[0::2]], ffn_sums=[(n, "in") for n in norms[1::2]])


SPEC = ArchSpec(
    family="bert",
    model_types=("bert", "roberta", "xlm-roberta"),
    layout=layout,
    set_heads=heads_setter(count_attrs=("num_attention_heads",), width_attrs=("all_head_size",), o_inside=False),
    target_modules=("query", "value", "intermediate.dense"),
    kind="encoder",
    readers=("pooler.dense", "classifier.dense", "qa_outputs", "lm_head.dense", "cls.predictions.transform.dense"),
    norm="layer",
    first_token_classifier=True,
)
SPECS = (SPEC,)
