"""Vision Transformers: ViT image classifiers and backbones (spec A.2, A.4, B.3).

Pre-norm layers (``vit.layers``): ``layernorm_before`` -> ``attention`` (q/k/v/o_proj, o inside the core) ->
residual sum -> ``layernorm_after`` -> ``mlp`` (fc1/fc2) -> residual sum; ``vit.layernorm`` ends the stack and the
classifier reads its first position (the CLS token). Every LayerNorm over the residual stream is counted (spec B.3).
The residual stream starts at ``vit.embeddings``: the patch projection (a convolution whose output channels are the
hidden width), the CLS token and the position embeddings (and a mask token, when the model has one) all lie along
the hidden width, and the hidden mask acts on the embeddings' output. Attention cores read their head counts from
the projections' shapes. ``ViTForMaskedImageModeling`` is refused: its convolutional decoder reads the hidden width.

Shipped with every export of this family (as ``apt_arch_vit.py``): imports only torch, transformers and the runtime.
"""

from __future__ import annotations

from torch import nn

from ..runtime import ArchSpec, AttentionSite, FFNSite, Layout, find_readers, heads_setter


def layout(hf: nn.Module) -> Layout:
    if hasattr(hf, "decoder"):
        raise ValueError(f"apt_hf prunes ViT image classifiers and backbones, not {type(hf).__name__}: its "
                         "convolutional decoder reads the hidden width. Prune a ViTForImageClassification or ViTModel.")
    core, config = hf.base_model, hf.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attns, ffns, norms, befores, afters = [], [], [], [], []
    for layer in core.layers:
        att = layer.attention
        q, k, v = (getattr(att, n, None) for n in ("q_proj", "k_proj", "v_proj"))
        attns.append(AttentionSite(layer, "attention", q, k, v, att.o_proj, head_dim, "self"))
        ffns.append(FFNSite(layer.mlp.fc1, None, layer.mlp.fc2))
        norms += [layer.layernorm_before, layer.layernorm_after]
        befores.append(layer.layernorm_before)
        afters.append(layer.layernorm_after)
    norms.append(core.layernorm)
    emb = core.embeddings
    projection = emb.patch_embeddings.projection
    hidden_params = [(projection, "weight", 0), (projection, "bias", 0), (emb, "cls_token", 2),
                     (emb, "position_embeddings", 2)]
    if getattr(emb, "mask_token", None) is not None:
        hidden_params.append((emb, "mask_token", 2))
    return Layout(SPEC, config.hidden_size, attns, ffns, [], [emb], norms, norms, find_readers(hf, SPEC.readers),
                  attention_sums=[(n, "in") for n in afters],
                  ffn_sums=[(n, "in") for n in befores[1:] + [core.layernorm]], hidden_params=hidden_params)


SPEC = ArchSpec(
    family="vit",
    model_types=("vit",),
    layout=layout,
    set_heads=heads_setter(count_attrs=("num_attention_heads",)),
    target_modules=("q_proj", "v_proj", "fc1"),
    kind="encoder",
    readers=("classifier", "pooler.dense"),
    norm="layer",
    first_token_classifier=True,
)
SPECS = (SPEC,)
