"""T5 encoder-decoders (and T5 encoders alone): spec A.2, A.4, B.3, K.2.

Each block is a list of sub-layers (``layer[0]`` self-attention, decoder ``layer[1]`` cross-attention, last the FFN
``DenseReluDense``, plain ``wi`` or gated ``wi_0``/``wi_1``), each returning its own residual sum. Every T5LayerNorm
(an RMS norm) over the residual stream is counted (spec B.3). Head-site order: the encoder self-attentions, then for
each decoder block its self-attention followed by its cross-attention; the two stacks are distilled separately with
RMS-normalised hidden states (spec F.3).

T5 shares one relative position bias (computed by block 0 over all heads) across blocks, so every pruned T5
attention records the *original* indices of the heads it keeps (exports: ``t5_kept_heads``) and slices the shared
bias to them, with the attention classes below.

Shipped with every export of this family (as ``apt_arch_t5.py``): imports only torch, transformers and the runtime.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.t5.modeling_t5 import T5Attention

from ..runtime import ArchSpec, AttentionSite, FFNSite, Layout, Stack, cache_argument, find_readers


def layout(hf: nn.Module) -> Layout:
    config = hf.config
    attns, ffns, norms, att_sums, ffn_sums = [], [], [], [], []

    def add_attention(layer: nn.Module, core_name: str, kind: str) -> None:
        a = getattr(layer, core_name)
        q, k, v = (getattr(a, n, None) for n in ("q", "k", "v"))
        attns.append(AttentionSite(layer, core_name, q, k, v, a.o, config.d_kv, kind))
        att_sums.append((layer, "out"))

    def add_ffn(layer: nn.Module) -> None:
        d = layer.DenseReluDense
        ffns.append(FFNSite(d.wi_1, d.wi_0, d.wo) if hasattr(d, "wi_0") else FFNSite(d.wi, None, d.wo))
        ffn_sums.append((layer, "out"))

    for block in hf.encoder.block:
        add_attention(block.layer[0], "SelfAttention", "self")
        add_ffn(block.layer[1])
        norms += [block.layer[0].layer_norm, block.layer[1].layer_norm]
    n_enc = len(hf.encoder.block)
    stacks = [Stack("encoder", [([i], [i]) for i in range(n_enc)], "encoder_hidden_states")]
    if hasattr(hf, "decoder"):
        for block in hf.decoder.block:
            add_attention(block.layer[0], "SelfAttention", "self")
            add_attention(block.layer[1], "EncDecAttention", "cross")
            add_ffn(block.layer[2])
            norms += [block.layer[0].layer_norm, block.layer[1].layer_norm, block.layer[2].layer_norm]
        norms.append(hf.decoder.final_layer_norm)
        stacks.append(Stack("decoder", [([n_enc + 2 * j, n_enc + 2 * j + 1], [n_enc + j])
                                        for j in range(len(hf.decoder.block))], "decoder_hidden_states"))
    else:
        stacks = [Stack("main", stacks[0].layers)]
    norms.append(hf.encoder.final_layer_norm)
    outputs = [hf.encoder.embed_tokens] + ([hf.decoder.embed_tokens] if hasattr(hf, "decoder") else [])
    unique_outputs = list({id(m): m for m in outputs}.values())
    return Layout(SPEC, hf.shared.embedding_dim, attns, ffns, [hf.shared], unique_outputs, norms, norms,
                  find_readers(hf, SPEC.readers), stacks=stacks, attention_sums=att_sums, ffn_sums=ffn_sums)


# ---------------------------------------------------------------------------------------------- attention classes
# T5 computes its relative position bias once, in the first block's self-attention (``relative_attention_bias``,
# one column per head), and hands the (1, H, q, k) tensor to every later block; the decoder's first cross-attention
# likewise creates a zero bias that later cross-attentions reuse. Once blocks keep different heads, each block needs
# the rows of *its* heads, while the tensor handed on must stay over all H original heads. The two subclasses below
# do that; they are installed by swapping the class of the existing module, so state-dict keys stay stock T5's.
KEPT_HEADS_ATTR = "apt_kept_heads"  # original indices of the heads a T5 attention keeps (a tuple of ints)


def _original_heads(module: T5Attention) -> int:
    return int(module.config.num_heads)


def _select_heads(module: nn.Module, bias: torch.Tensor) -> torch.Tensor:
    """Rows of a bias over all original heads that belong to this module's kept heads."""
    if bias.shape[1] == 1:  # broadcast bias
        return bias
    if bias.shape[1] != _original_heads(module):
        raise ValueError(f"T5 position bias has {bias.shape[1]} heads; expected the model's "
                         f"{_original_heads(module)} original heads (or 1).")
    return bias.index_select(1, torch.tensor(getattr(module, KEPT_HEADS_ATTR), device=bias.device))


class PrunedT5Attention(T5Attention):
    """A ``T5Attention`` that keeps only the heads ``apt_kept_heads`` (original indices) of the model: it uses its
    rows of an incoming (or self-computed, or created zero) position bias and hands the full bias on."""

    def compute_bias(self, query_length, key_length, device=None, past_seen_tokens=0):
        full = super().compute_bias(query_length, key_length, device=device, past_seen_tokens=past_seen_tokens)
        self.__dict__["_apt_full_bias"] = full
        return _select_heads(self, full)

    def forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None, **kwargs):
        incoming = position_bias
        self.__dict__["_apt_full_bias"] = None
        if incoming is not None:
            position_bias = _select_heads(self, incoming)
        try:
            out, used, weights = super().forward(hidden_states, mask=mask, key_value_states=key_value_states,
                                                 position_bias=position_bias, **kwargs)
            if incoming is not None:
                full = incoming
            elif self.__dict__["_apt_full_bias"] is not None:
                full = self.__dict__["_apt_full_bias"]
            else:  # a zero bias created for this block's heads: hand on zeros over all original heads
                full = used.new_zeros((used.shape[0], _original_heads(self), *used.shape[2:]))
                full.requires_grad_(used.requires_grad)
        finally:
            self.__dict__["_apt_full_bias"] = None
        return out, full, weights


class EmptyT5Attention(T5Attention):
    """A ``T5Attention`` with no heads left: outputs ``o`` of nothing (zeros), still provides the shared position
    bias when it owns ``relative_attention_bias`` (or creates the zero cross-attention bias), and in a decoder
    self-attention keeps its cache layer's length right (a one-element placeholder per position), which generation
    and block 0's relative positions read."""

    def forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None, **kwargs):
        batch, q_len = hidden_states.shape[:2]
        is_cross = key_value_states is not None
        key_length = key_value_states.shape[1] if is_cross else q_len
        past_seen = 0
        cache = cache_argument(kwargs)
        if cache is not None and not is_cross:
            if isinstance(cache, EncoderDecoderCache):
                cache = cache.self_attention_cache
            past_seen = cache.get_seq_length(self.layer_idx)
            placeholder = hidden_states.new_zeros(batch, 1, q_len, 1)
            keys, _ = cache.update(placeholder, placeholder, self.layer_idx)
            key_length = keys.shape[-2]
        if position_bias is None:
            if self.has_relative_attention_bias:
                position_bias = self.compute_bias(q_len, key_length, device=hidden_states.device,
                                                  past_seen_tokens=past_seen)
            else:
                position_bias = hidden_states.new_zeros((1, _original_heads(self), q_len, key_length))
        out = self.o(hidden_states.new_zeros(*hidden_states.shape[:-1], 0))
        return out, position_bias, None


def t5_kept_heads(module: nn.Module) -> list[int]:
    """Original head indices still present in a T5 attention core (all of them if it was never pruned)."""
    if isinstance(module, EmptyT5Attention):
        return []
    kept = getattr(module, KEPT_HEADS_ATTR, None)
    return list(range(int(module.n_heads))) if kept is None else list(kept)


def set_heads(layout: Layout, i: int, num_heads: int, group_size: int = 1,
              original: Optional[list[int]] = None) -> None:
    """Make T5 attention ``i`` match projections that now hold ``num_heads`` heads, the original heads
    ``original``; an emptied one becomes an :class:`EmptyT5Attention` (it still provides the shared bias)."""
    site = layout.attentions[i]
    core = site.core
    if num_heads == 0:
        for name in ("q", "k", "v"):
            if name in core._modules:
                delattr(core, name)
        core.__class__ = EmptyT5Attention
        site.q = site.k = site.v = None
    elif not isinstance(core, PrunedT5Attention):
        core.__class__ = PrunedT5Attention
    core.n_heads, core.inner_dim = num_heads, num_heads * site.head_dim
    setattr(core, KEPT_HEADS_ATTR, tuple(int(h) for h in original))


SPEC = ArchSpec(
    family="t5",
    model_types=("t5",),
    layout=layout,
    set_heads=set_heads,
    target_modules=("q", "v", "wi_0", "wi"),
    kind="encoder-decoder",
    readers=("lm_head",),
    norm="rms",
    distill_normalize=True,
    head_index_key="t5_kept_heads",
    kept_heads=t5_kept_heads,
)
SPECS = (SPEC,)
