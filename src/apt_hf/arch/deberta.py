"""DeBERTa-v2 and DeBERTa-v3 encoders (spec A.2, A.4, B.3; disentangled relative attention).

Post-norm layers as in BERT: ``attention.self`` (``DisentangledSelfAttention``) holds ``query_proj`` / ``key_proj``
/ ``value_proj``, ``attention.output`` the output projection and the LayerNorm of the attention's residual sum,
``intermediate.dense`` / ``output.dense`` the FFN and ``output.LayerNorm`` its sum; an emptied core returns a
zero-width context and the output projection adds its bias. The relative-position terms project the shared
embeddings ``encoder.rel_embeddings`` (columns over the hidden width) per head: through ``query_proj`` / ``key_proj``
when ``share_att_key`` (v3), else through ``pos_query_proj`` / ``pos_key_proj`` (v2), whose rows follow the heads
(``AttentionSite.extra``) and are counted with them. The core reads its head count and width from
``num_attention_heads`` / ``all_head_size`` and scales by the head size, which pruning leaves alone. When
``norm_rel_ebd`` names ``layer_norm``, ``encoder.LayerNorm`` normalises the relative embeddings (a masked norm, not
in the spec B.3 count, like the embeddings' LayerNorm); otherwise the hidden mask acts on the ``rel_embeddings``
argument of every attention. With ``embedding_size != hidden_size`` the token embeddings keep their width and the
rows of ``embed_proj`` follow the hidden width. Sequence classifiers read the first position through
``pooler.dense`` (a d x d map: only its input columns follow the hidden width). Refused: the convolution layer
(``conv_kernel_size > 0``, the DeBERTa-v2 xlarge/xxlarge checkpoints) and ``DebertaV2ForMaskedLM`` (its head reads
the token embedding at the head's unpruned width).

Shipped with every export of this family (as ``apt_arch_deberta.py``): imports only torch, transformers and the
runtime.
"""

from __future__ import annotations

from torch import nn

from ..runtime import ArchSpec, AttentionSite, FFNSite, Layout, find_readers, heads_setter


def _refuse(hf: nn.Module) -> None:
    config = hf.config
    if hasattr(hf, "cls") or hasattr(hf, "lm_predictions"):
        raise ValueError(f"apt_hf prunes DeBERTa-v2 encoders and classifiers, not {type(hf).__name__}: its "
                         "prediction head multiplies by the token embedding, whose width pruning changes, at the "
                         "head's unpruned width. Prune a DebertaV2ForSequenceClassification (or another task class) "
                         "or DebertaV2Model.")
    if getattr(config, "conv_kernel_size", 0) > 0:
        raise ValueError(f"apt_hf does not prune DeBERTa-v2 models with a convolution layer (conv_kernel_size="
                         f"{config.conv_kernel_size}, as in microsoft/deberta-v2-xlarge and -xxlarge): its d x d x k "
                         "kernel is not in apt_hf's parameter count, whose cost per hidden dimension is linear in the "
                         "width. DeBERTa-v3 models (conv_kernel_size=0) are supported.")


def layout(hf: nn.Module) -> Layout:
    _refuse(hf)
    core, config = hf.base_model, hf.config
    head_dim = getattr(config, "attention_head_size", None) or config.hidden_size // config.num_attention_heads
    attns, ffns, norms = [], [], []
    for layer in core.encoder.layer:
        att = layer.attention
        q, k, v, pos_k, pos_q = (getattr(att.self, n, None)
                                 for n in ("query_proj", "key_proj", "value_proj", "pos_key_proj", "pos_query_proj"))
        extra = tuple(m for m in (pos_k, pos_q) if m is not None)
        attns.append(AttentionSite(att, "self", q, k, v, att.output.dense, head_dim, "self", extra=extra))
        ffns.append(FFNSite(layer.intermediate.dense, None, layer.output.dense))
        norms += [att.output.LayerNorm, layer.output.LayerNorm]
    emb, enc = core.embeddings, core.encoder
    if emb.embed_proj is None:
        embeddings = [m for m in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings)
                      if m is not None]
        hidden_params = []
    elif type(emb.embed_proj) is nn.Linear:
        embeddings, hidden_params = [], [(emb.embed_proj, "weight", 0)]
    else:
        raise ValueError(f"embeddings.embed_proj is a {type(emb.embed_proj).__name__}: apt_hf slices its rows with "
                         "the hidden width and cannot carry an adapter there; leave it out of target_modules.")
    rel_norm, rel_kwargs = [], []
    if enc.relative_attention:
        embeddings.append(enc.rel_embeddings)
        if "layer_norm" in enc.norm_rel_ebd:
            rel_norm = [enc.LayerNorm]
        else:
            rel_kwargs = [(layer.attention, "rel_embeddings") for layer in enc.layer]
    return Layout(SPEC, emb.LayerNorm.normalized_shape[0], attns, ffns, embeddings, [],
                  [emb.LayerNorm] + rel_norm + norms, norms, find_readers(hf, SPEC.readers),
                  attention_sums=[(n, "in") for n in norms[0::2]], ffn_sums=[(n, "in") for n in norms[1::2]],
                  hidden_params=hidden_params, hidden_kwargs=rel_kwargs)


SPEC = ArchSpec(
    family="deberta-v2",
    model_types=("deberta-v2",),
    layout=layout,
    set_heads=heads_setter(count_attrs=("num_attention_heads",), width_attrs=("all_head_size",), o_inside=False),
    target_modules=("query_proj", "value_proj", "intermediate.dense"),
    kind="encoder",
    readers=("pooler.dense", "qa_outputs"),
    norm="layer",
    first_token_classifier=True,
)
SPECS = (SPEC,)
