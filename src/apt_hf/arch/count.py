"""The spec B.3 parameter count of a :class:`~apt_hf.runtime.Layout` (any family: it reads the layout's modules)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..runtime import Layout, base_linear, kv_heads_kept


# ---------------------------------------------------------------------------------------------- counting (B.3)
def _has_bias(module: Optional[nn.Module]) -> int:
    return int(module is not None and base_linear(module).bias is not None)


def _norm_params_per_dim(norm: nn.Module) -> int:
    return int(getattr(norm, "weight", None) is not None) + int(getattr(norm, "bias", None) is not None)


@dataclass(frozen=True)
class CountModel:
    """Constants of the spec B.3 parameter count of one layout, so that counts of kept sets are cheap.

    The count is exact for the "main" parameters (everything except embeddings, adapters, masks and task heads):
    for BERT/RoBERTa it equals the reference formula ``d'(4 H' d_h + 2 N' + 6 L) + 3 H' d_h + N'``; for LLaMA it
    counts k/v per kept key/value group (grouped-query attention) and no biases; for T5 every projection and norm;
    for DeBERTa-v2 also the per-head position projections (``AttentionSite.extra``).
    """

    head_dim: tuple[int, ...]
    group_size: tuple[int, ...]
    qkv_bias: tuple[int, ...]
    o_bias: tuple[int, ...]
    ffn_mats: tuple[int, ...]  # 2 (plain) or 3 (gated) matrices per neuron
    ffn_in_bias: tuple[int, ...]  # up (+gate) biases per neuron
    down_bias: tuple[int, ...]
    norm_per_dim: int
    extra_mats: tuple[int, ...]  # further per-query-head projections (AttentionSite.extra)
    extra_bias: tuple[int, ...]  # how many of them have biases

    @classmethod
    def from_layout(cls, layout: Layout) -> "CountModel":
        a, f = layout.attentions, layout.ffns
        return cls(
            head_dim=tuple(s.head_dim for s in a),
            group_size=tuple(s.group_size for s in a),
            qkv_bias=tuple(_has_bias(s.q) for s in a),
            o_bias=tuple(_has_bias(s.o) for s in a),
            ffn_mats=tuple(3 if s.gate is not None else 2 for s in f),
            ffn_in_bias=tuple(_has_bias(s.up) + _has_bias(s.gate) for s in f),
            down_bias=tuple(_has_bias(s.down) for s in f),
            norm_per_dim=sum(_norm_params_per_dim(n) for n in layout.counted_norms),
            extra_mats=tuple(len(s.extra) for s in a),
            extra_bias=tuple(sum(_has_bias(m) for m in s.extra) for s in a),
        )

    def count(self, heads: list[torch.Tensor], neurons: list[torch.Tensor], hidden: torch.Tensor) -> int:
        """Parameters of the structure whose kept blocks are the ``True`` entries (boolean tensors)."""
        d = int(hidden.sum())
        total = self.norm_per_dim * d
        for keep, dh, g, qb, ob, e, eb in zip(heads, self.head_dim, self.group_size, self.qkv_bias, self.o_bias,
                                              self.extra_mats, self.extra_bias):
            h = int(keep.sum())
            kv = h if g == 1 else int(kv_heads_kept(keep, g).sum())
            total += d * dh * (2 * h + 2 * kv) + qb * dh * (h + 2 * kv) + ob * d + (e * d + eb) * dh * h
        for keep, c, ib, db in zip(neurons, self.ffn_mats, self.ffn_in_bias, self.down_bias):
            n = int(keep.sum())
            total += c * n * d + ib * n + db * d
        return total

    def query_heads_cost(self, i: int, d: int, size: int = 1, kv: bool = True) -> tuple[int, int]:
        """Parameters of ``size`` query heads of attention ``i`` at width ``d`` (q, o and the extra projections;
        with ``kv`` also one key/value head each), and what they add to the cost of one hidden dimension (the head
        terms of :meth:`count`)."""
        dh, mats = self.head_dim[i], 2 + self.extra_mats[i] + (2 if kv else 0)
        biases = self.qkv_bias[i] * (3 if kv else 1) + self.extra_bias[i]
        return size * (d * dh * mats + biases * dh), size * dh * mats

    def block_costs(self, d: int) -> tuple[list[float], list[float]]:
        """Per-head and per-neuron cost at width ``d`` (spec B.3 "head" and "neuron" rows)."""
        heads = [self.query_heads_cost(i, d, kv=False)[0] + (d * 2 + qb * 2) * dh / g
                 for i, (dh, g, qb) in enumerate(zip(self.head_dim, self.group_size, self.qkv_bias))]
        neurons = [c * d + ib for c, ib in zip(self.ffn_mats, self.ffn_in_bias)]
        return heads, neurons

    def hidden_cost(self, heads: list[torch.Tensor], neurons: list[torch.Tensor]) -> float:
        """Cost of one hidden dimension given the kept heads and neurons (spec B.3 "dimension" row)."""
        one = torch.ones(1, dtype=torch.bool)
        return float(self.count(heads, neurons, one) - self.count(heads, neurons, one[:0]))
