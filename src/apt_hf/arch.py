"""Architecture descriptions: where heads, neurons and hidden dimensions live, and the spec B.3 count.

``describe(model)`` unwraps a PEFT model and returns the :class:`~apt_hf.runtime.Layout` of the transformers model
inside (``apt_hf.runtime.layout_of``, shared with exported models): every attention site, FFN site, hidden-dimension
embedding, norm and task-head reader, with direct module references. Supported: BERT, RoBERTa, LLaMA-family (MHA
and grouped-query attention: LLaMA, Mistral, Qwen2) and T5 (encoder self-attention, decoder self- and
cross-attention, plain or gated FFN), and their exports pruned by apt_hf.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .runtime import FAMILIES, AttentionSite, FFNSite, Layout, base_linear, layout_of, stock_model_type

__all__ = ["FAMILIES", "AttentionSite", "FFNSite", "Layout", "base_linear", "describe", "family_of", "CountModel",
           "UnsupportedArchitectureError"]


class UnsupportedArchitectureError(ValueError):
    """The model is not one apt_hf knows how to prune."""


def family_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = stock_model_type(getattr(config, "model_type", None))
    if model_type not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"apt_hf does not support model_type={model_type!r} ({type(model).__name__}). Supported: "
            f"{', '.join(sorted(FAMILIES))}. Open an issue with the architecture you need."
        )
    return FAMILIES[model_type]


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel / PEFT tuner, or the model itself."""
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, BaseTuner):
        return model.model
    inner = getattr(model, "base_model", None)
    return inner.model if isinstance(inner, BaseTuner) else model


def describe(model: nn.Module) -> Layout:
    """Return the :class:`Layout` of a transformers model (PEFT-wrapped or not)."""
    hf = _hf_model(model)
    return layout_of(hf, family_of(hf))


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
            kv = h if g == 1 else int(keep.view(-1, g).any(1).sum()) if keep.numel() else 0
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
