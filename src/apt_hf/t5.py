"""T5 after physical head pruning (spec A.4, K.2): which original heads each attention keeps.

T5 shares one relative position bias (computed by block 0 over all heads) across blocks, so every pruned T5
attention records the *original* indices of the heads it keeps and slices the shared bias to them; the attention
classes that do this live in :mod:`apt_hf.runtime` (they ship with every export). This module composes a pruning
step's indices with the ones already recorded; the export writes them to ``t5_kept_heads``.
"""

from __future__ import annotations

import torch
from torch import nn

from .runtime import EmptyT5Attention, PrunedT5Attention, t5_kept_heads

__all__ = ["EmptyT5Attention", "PrunedT5Attention", "t5_kept_heads", "t5_original_indices"]


def t5_original_indices(module: nn.Module, heads: torch.Tensor) -> list[int]:
    """Original indices of the heads ``heads`` (indices into ``module``'s *current* heads)."""
    current = t5_kept_heads(module)
    return [current[int(h)] for h in heads.tolist()]
