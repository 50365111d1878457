"""Gemma decoders: Gemma 2 and Gemma 3 text (spec A.2, A.4, B.3; grouped-query attention).

Like LLaMA (q/k/v/o_proj inside ``self_attn``, gated ``mlp``), with four RMSNorms per layer: ``input_layernorm``
before and ``post_attention_layernorm`` after the attention, ``pre_feedforward_layernorm`` before and
``post_feedforward_layernorm`` after the FFN; the residual sums are the inputs of ``pre_feedforward_layernorm`` and of
the next layer's ``input_layernorm`` (or ``model.norm``). Every Gemma RMSNorm scales by ``1 + w`` (norm kind
``rms_one_plus``), so a masked norm computes ``y * (1 + w)`` over the kept dimensions. The embedding is scaled by
``sqrt(config.hidden_size)``, a constant of the unpruned config that pruning leaves alone; attention and final-logit
soft-capping and sliding-window layers read nothing pruning changes. Gemma 3's per-head ``q_norm`` / ``k_norm``
normalise over ``head_dim`` with one weight shared by all heads, so removing heads slices nothing there.

Shipped with every export of this family (as ``apt_arch_gemma.py``): imports only torch, transformers and the runtime.
"""

from __future__ import annotations

from torch import nn

from ..runtime import ArchSpec, Layout, decoder_layout, heads_setter


def layer_norms(layer: nn.Module) -> list[nn.Module]:
    return [layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
            layer.post_feedforward_layernorm]


def layout(hf: nn.Module) -> Layout:
    return decoder_layout(hf, SPEC, layer_norms, attention_sum=lambda layer: layer.pre_feedforward_layernorm)


SPEC = ArchSpec(
    family="gemma",
    model_types=("gemma2", "gemma3_text"),
    layout=layout,
    set_heads=heads_setter(group_attr="num_key_value_groups"),
    target_modules=("q_proj", "v_proj"),
    kind="decoder",
    readers=("lm_head", "score", "qa_outputs"),
    norm="rms_one_plus",
    kurtosis=True,
)
SPECS = (SPEC,)
