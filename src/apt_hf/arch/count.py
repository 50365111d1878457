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
    counts k/v per kept key/value group (grouped-query attention) and no biases; for T5 every projection and norm.
    """

    head_dim: tuple[int, ...]
    group_size: tuple[int, ...]
    qkv_bias: tuple[int, ...]
    o_bias: tuple[int, ...]
    ffn_mats: tuple[int, ...]  # 2 (plain) or 3 (gated) matrices per neuron
    ffn_in_bias: tuple[int, ...]  # up (+gate) biases per neuron
    down_bias: tuple[int, ...]
    norm_per_dim: int

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
        )

    def count(self, heads: list[torch.Tensor], neurons: list[torch.Tensor], hidden: torch.Tensor) -> int:
        """Parameters of the structure whose kept blocks are the ``True`` entries (boolean tensors)."""
        d = int(hidden.sum())
        total = self.norm_per_dim * d
        for keep, dh, g, qb, ob in zip(heads, self.head_dim, self.group_size, self.qkv_bias, self.o_bias):
            h = int(keep.sum())
            kv = h if g == 1 else int(kv_heads_kept(keep, g).sum())
            total += d * dh * (2 * h + 2 * kv) + qb * dh * (h + 2 * kv) + ob * d
        for keep, c, ib, db in zip(neurons, self.ffn_mats, self.ffn_in_bias, self.down_bias):
            n = int(keep.sum())
            total += c * n * d + ib * n + db * d
        return total

    def block_costs(self, d: int) -> tuple[list[float], list[float]]:
        """Per-head and per-neuron cost at width ``d`` (spec B.3 "head" and "neuron" rows)."""
        heads = [d * dh * (2 + 2 / g) + qb * dh * (1 + 2 / g)
                 for dh, g, qb in zip(self.head_dim, self.group_size, self.qkv_bias)]
        neurons = [c * d + ib for c, ib in zip(self.ffn_mats, self.ffn_in_bias)]
        return heads, neurons

    def hidden_cost(self, heads: list[torch.Tensor], neurons: list[torch.Tensor]) -> float:
        """Cost of one hidden dimension given the kept heads and neurons (spec B.3 "dimension" row)."""
        one = torch.ones(1, dtype=torch.bool)
        return float(self.count(heads, neurons, one) - self.count(heads, neurons, one[:0]))
