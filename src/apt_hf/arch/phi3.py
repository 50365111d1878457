"""Phi-3 decoders (spec A.2, A.4, B.3; grouped-query attention, fused projections).

Pre-norm layers like LLaMA's (``input_layernorm`` -> ``self_attn`` -> residual sum -> ``post_attention_layernorm``
-> ``mlp`` -> residual sum; ``model.norm`` ends the stack; every RMSNorm over the residual stream is counted), but
with fused projections: ``self_attn.qkv_proj`` holds the query, key and value rows one after the other, and
``mlp.gate_up_proj`` the gate rows then the up rows (both halves follow the neurons). The attention splits its fused
output at ``self.config.num_attention_heads * head_dim`` and ``self.num_key_value_heads * head_dim``, so a pruned
attention gets a :class:`~apt_hf.runtime.ConfigView` with its own query-head count, and its key/value head count and
group size as attributes; the site reads them back from there.

Shipped with every export of this family (as ``apt_arch_phi3.py``): imports only torch, transformers and the runtime.
"""

from __future__ import annotations

from torch import nn

from ..runtime import ArchSpec, AttentionSite, FFNSite, Layout, find_readers, heads_setter


def layout(hf: nn.Module) -> Layout:
    core, config = hf.base_model, hf.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attns, ffns, norms, firsts, seconds = [], [], [], [], []
    for layer in core.layers:
        sa = layer.self_attn
        qkv = getattr(sa, "qkv_proj", None)  # None once every head is gone
        fused = (sa.config.num_attention_heads, sa.num_key_value_heads) if qkv is not None else None
        attns.append(AttentionSite(layer, "self_attn", qkv, qkv, qkv, sa.o_proj, head_dim, "self", fused))
        ffns.append(FFNSite(layer.mlp.gate_up_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj, fused=True))
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
        firsts.append(layer.input_layernorm)
        seconds.append(layer.post_attention_layernorm)
    norms.append(core.norm)
    return Layout(SPEC, core.embed_tokens.embedding_dim, attns, ffns, [core.embed_tokens], [core.embed_tokens],
                  norms, norms, find_readers(hf, SPEC.readers),
                  attention_sums=[(n, "in") for n in seconds], ffn_sums=[(n, "in") for n in firsts[1:] + [core.norm]])


SPEC = ArchSpec(
    family="phi3",
    model_types=("phi3",),
    layout=layout,
    set_heads=heads_setter(group_attr="num_key_value_groups", kv_count_attrs=("num_key_value_heads",),
                           config_count_attrs=("num_attention_heads",)),
    target_modules=("qkv_proj",),
    kind="decoder",
    readers=("lm_head", "score", "qa_outputs"),
    norm="rms",
    kurtosis=True,
)
SPECS = (SPEC,)
