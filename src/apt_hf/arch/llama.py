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

from ..runtime import ArchSpec, AttentionSite, FFNSite, Layout, find_readers, heads_setter


def layout(hf: nn.Module) -> Layout:
    core, config = hf.base_model, hf.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attns, ffns, norms, firsts, seconds = [], [], [], [], []
    for layer in core.layers:
        sa = layer.self_attn
        q, k, v = (getattr(sa, n, None) for n in ("q_proj", "k_proj", "v_proj"))
        attns.append(AttentionSite(layer, "self_attn", q, k, v, sa.o_proj, head_dim, "self"))
        ffns.append(FFNSite(layer.mlp.up_proj, layer.mlp.gate_proj, layer.mlp.down_proj))
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
        firsts.append(layer.input_layernorm)
        seconds.append(layer.post_attention_layernorm)
    norms.append(core.norm)
    return Layout(SPEC, core.embed_tokens.embedding_dim, attns, ffns, [core.embed_tokens], [core.embed_tokens],
                  norms, norms, find_readers(hf, SPEC.readers),
                  attention_sums=[(n, "in") for n in seconds], ffn_sums=[(n, "in") for n in firsts[1:] + [core.norm]])


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
