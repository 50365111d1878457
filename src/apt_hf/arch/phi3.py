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

from ..runtime import ArchSpec, AttentionSite, FFNSite, Layout, decoder_layout, heads_setter


def fused_attention(layer: nn.Module, head_dim: int) -> AttentionSite:
    sa = layer.self_attn
    qkv = getattr(sa, "qkv_proj", None)  # None once every head is gone
    fused = (sa.config.num_attention_heads, sa.num_key_value_heads) if qkv is not None else None
    return AttentionSite(layer, "self_attn", qkv, qkv, qkv, sa.o_proj, head_dim, "self", fused)


def fused_ffn(layer: nn.Module) -> FFNSite:
    return FFNSite(layer.mlp.gate_up_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj, fused=True)


def layout(hf: nn.Module) -> Layout:
    return decoder_layout(hf, SPEC, lambda layer: [layer.input_layernorm, layer.post_attention_layernorm],
                          attention_sum=lambda layer: layer.post_attention_layernorm, attention=fused_attention,
                          ffn=fused_ffn)


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
