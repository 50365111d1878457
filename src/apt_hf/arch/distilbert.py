"""DistilBERT encoders (spec A.2, A.4, B.3).

Post-norm layers under ``transformer.layer``: ``attention`` holds q_lin/k_lin/v_lin and the output projection
``out_lin`` (inside the core, so an emptied attention keeps it and outputs its bias), ``sa_layer_norm`` normalises
the attention's residual sum, ``ffn`` (lin1/lin2) and ``output_layer_norm`` the FFN's. The embeddings' LayerNorm
normalises the residual stream too but is not in the spec B.3 count. The sequence classifier reads the first
position through ``pre_classifier`` (a d x d map whose output is not the residual stream, so only its input columns
follow the hidden width).

Shipped with every export of this family (as ``apt_arch_distilbert.py``): imports only torch, transformers and the
runtime.
"""

from __future__ import annotations

from torch import nn

from ..runtime import ArchSpec, AttentionSite, FFNSite, Layout, find_readers, heads_setter


def layout(hf: nn.Module) -> Layout:
    core, config = hf.base_model, hf.config
    head_dim = config.dim // config.n_heads
    attns, ffns, norms = [], [], []
    for layer in core.transformer.layer:
        att = layer.attention
        q, k, v = (getattr(att, n, None) for n in ("q_lin", "k_lin", "v_lin"))
        attns.append(AttentionSite(layer, "attention", q, k, v, att.out_lin, head_dim, "self"))
        ffns.append(FFNSite(layer.ffn.lin1, None, layer.ffn.lin2))
        norms += [layer.sa_layer_norm, layer.output_layer_norm]
    emb = core.embeddings
    return Layout(SPEC, emb.word_embeddings.embedding_dim, attns, ffns,
                  [emb.word_embeddings, emb.position_embeddings], [], [emb.LayerNorm] + norms, norms,
                  find_readers(hf, SPEC.readers),
                  attention_sums=[(n, "in") for n in norms[0::2]], ffn_sums=[(n, "in") for n in norms[1::2]])


SPEC = ArchSpec(
    family="distilbert",
    model_types=("distilbert",),
    layout=layout,
    set_heads=heads_setter(count_attrs=("n_heads",)),
    target_modules=("q_lin", "v_lin", "lin1"),
    kind="encoder",
    readers=("pre_classifier", "qa_outputs", "vocab_transform"),
    norm="layer",
    first_token_classifier=True,
)
SPECS = (SPEC,)
