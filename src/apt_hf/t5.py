"""T5 attention after physical head pruning: per-block slices of the shared position bias (spec A.4, K.2).

T5 computes its relative position bias once, in the first block's self-attention (``relative_attention_bias``, one
column per head), and hands the ``(1, H, q, k)`` tensor to every later block; the decoder's first cross-attention
likewise creates a zero bias that the later cross-attentions reuse. Once blocks keep different heads, each block
needs the bias rows of *its* heads, while the tensor handed on must stay over all ``H`` original heads.

Two small subclasses of the stock ``T5Attention`` do this, installed by swapping the class of the existing module
(state-dict keys stay those of stock T5, so the model still saves as a stock T5 checkpoint):

- :class:`PrunedT5Attention` keeps the original indices of its heads in the non-persistent buffer
  ``apt_kept_heads``. It slices an incoming bias to those heads, and hands the full bias on; a bias it computes
  itself (block 0 keeps ``relative_attention_bias`` over all original heads) or creates (zeros) is likewise used
  sliced and handed on in full.
- :class:`EmptyT5Attention` stands in for an attention whose heads are all gone: its output is ``o`` of a
  zero-width input (zeros), it still produces the full bias for later blocks when it is the one that owns
  ``relative_attention_bias`` (or creates the zero cross-attention bias), and in a decoder self-attention it keeps
  its cache layer's length right (a one-element placeholder per position), which generation and block 0's
  relative positions read.

After :func:`apt_hf.export_pruned` the kept original head indices of every site are written to
``apt_structure.json`` (:func:`kept_heads`) and re-installed by :func:`apt_hf.load_pruned`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.t5.modeling_t5 import T5Attention

KEPT_BUFFER = "apt_kept_heads"


def cache_argument(kwargs: dict):
    """The key/value cache handed to an attention module: ``cache`` since transformers 5.24, ``past_key_values``
    before (the attention classes of both releases are called with one or the other)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def _original_heads(module: T5Attention) -> int:
    return int(module.config.num_heads)


def kept_heads(module: nn.Module) -> list[int]:
    """Original head indices still present in a T5 attention core (all of them if it was never pruned)."""
    if isinstance(module, EmptyT5Attention):
        return []
    kept = getattr(module, KEPT_BUFFER, None)
    if kept is None:
        return list(range(int(module.n_heads)))
    return [int(i) for i in kept.tolist()]


def _select_heads(module: nn.Module, bias: torch.Tensor) -> torch.Tensor:
    """Rows of a bias over all original heads that belong to this module's kept heads."""
    kept = getattr(module, KEPT_BUFFER)
    if bias.shape[1] == 1:  # broadcast bias
        return bias
    if bias.shape[1] != _original_heads(module):
        raise ValueError(f"T5 position bias has {bias.shape[1]} heads; expected the model's "
                         f"{_original_heads(module)} original heads (or 1).")
    return bias.index_select(1, kept.to(bias.device))


class PrunedT5Attention(T5Attention):
    """A ``T5Attention`` that keeps only the heads ``apt_kept_heads`` (original indices) of the model."""

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
    """A ``T5Attention`` with no heads left: outputs ``o`` of nothing, still provides the shared position bias."""

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
            # A one-element placeholder per position keeps this layer's cache length (an empty tensor reads as 0).
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


def _set_kept(module: T5Attention, kept: torch.Tensor) -> None:
    param = next(module.o.parameters(), None)
    kept = kept.to(device=param.device if param is not None else None, dtype=torch.long)
    if KEPT_BUFFER in module._buffers:
        module._buffers[KEPT_BUFFER] = kept
    else:
        module.register_buffer(KEPT_BUFFER, kept, persistent=False)


def prune_attention(module: T5Attention, heads: torch.Tensor, head_dim: int) -> nn.Module:
    """Record that ``module`` keeps only ``heads`` (indices into its *current* heads); its projections are pruned
    by the caller. Returns the module now in place (the same object, class swapped)."""
    heads = heads.to(torch.long).cpu()
    current = torch.tensor(kept_heads(module), dtype=torch.long)
    kept = current[heads]
    n = len(kept)
    if n == 0:
        for name in ("q", "k", "v"):
            if name in module._modules:
                delattr(module, name)
        module.__class__ = EmptyT5Attention
    elif not isinstance(module, PrunedT5Attention):
        module.__class__ = PrunedT5Attention
    module.n_heads, module.inner_dim = n, n * head_dim
    _set_kept(module, kept)
    return module

