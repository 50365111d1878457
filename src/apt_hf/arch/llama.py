"""LLaMA-style decoders: LLaMA, Mistral, Qwen2, Qwen3 (spec A.2, A.4, B.3; grouped-query attention too).

Pre-norm layers: ``input_layernorm`` -> ``self_attn`` (q/k/v/o_proj, o inside the core) -> residual sum ->
``post_attention_layernorm`` -> gated ``mlp`` (gate/up/down_proj) -> residual sum; ``model.norm`` ends the stack.
Every RMSNorm over the residual stream is counted (spec B.3). Qwen3's per-head ``q_norm`` / ``k_norm`` normalise
over ``head_dim`` with one weight shared by all heads, so removing heads slices nothing there. An attention core
reads its head counts from the projections' shapes except ``num_key_value_groups`` (eager repeat of key/value heads).

Shipped with every export of this family (as ``apt_arch_llama.py``): imports only torch, transformers and the runtime.
"""

from __future__ import annotations

from torch import nn

from ..runtime import ArchSpec, Layout, decoder_layout, heads_setter


def layout(hf: nn.Module) -> Layout:
    return decoder_layout(hf, SPEC, lambda layer: [layer.input_layernorm, layer.post_attention_layernorm],
                          attention_sum=lambda layer: layer.post_attention_layernorm)


SPEC = ArchSpec(
    family="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    layout=layout,
    set_heads=heads_setter(group_attr="num_key_value_groups"),
    target_modules=("q_proj", "v_proj"),
    kind="decoder",
    readers=("lm_head", "score", "qa_outputs"),
    norm="rms",
    kurtosis=True,
)
SPECS = (SPEC,)
