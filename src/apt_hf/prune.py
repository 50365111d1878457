"""Physical removal of heads, neurons and hidden dimensions (spec A.4 "physical pruning", K.4).

Every function takes indices *relative to the current physical structure*, edits the modules in place and returns
the list of :class:`~apt_hf.layer.ParamChange` records that optimizer surgery needs (spec K.6).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .arch import AttentionSite, FFNSite, Layout, base_linear
from .layer import APTLinear, ParamChange, replace_param, select_linear
from .masks import APTMasks
from .runtime import check_group_rule, heads_by_group, set_hidden_width


def _select(module: nn.Module, out_idx: Optional[torch.Tensor], in_idx: Optional[torch.Tensor],
            changes: list[ParamChange]) -> None:
    if isinstance(module, APTLinear):
        module.select(out_idx, in_idx, changes)
    else:
        select_linear(module, out_idx, in_idx, changes)


def _rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def kv_groups(site: AttentionSite, heads: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Key/value heads that serve the kept query ``heads``, and the new query heads per group.

    Under grouped-query attention every surviving group must keep the same number of query heads
    (:func:`apt_hf.runtime.check_group_rule`); a violation raises ``ValueError`` (use :func:`gqa_closure` to repair a
    mask first).
    """
    return check_group_rule(heads, site.group_size)


def gqa_closure(keep: torch.Tensor, group_size: int) -> torch.Tensor:
    """Smallest superset of the kept heads that obeys the group rule: pad each surviving group up to the largest
    per-group count with its lowest-indexed dropped heads (their masks stay 0, so outputs are unchanged)."""
    if group_size == 1 or keep.numel() == 0:
        return torch.nonzero(keep).flatten()
    k = heads_by_group(keep, group_size)
    per_group = k.sum(1)
    target = int(per_group.max())
    out = []
    for j in range(k.shape[0]):
        if per_group[j] == 0:
            continue
        kept = torch.nonzero(k[j]).flatten()
        dropped = torch.nonzero(~k[j]).flatten()[: target - len(kept)]
        out.append(torch.sort(torch.cat([kept, dropped])).values + j * group_size)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def prune_heads(layout: Layout, i: int, heads: torch.Tensor, changes: list[ParamChange]) -> None:
    """Keep only query ``heads`` (sorted, physical indices) of attention site ``i``."""
    site = layout.attentions[i]
    if site.q is None:
        return
    heads = heads.to(torch.long)
    kv, new_group = kv_groups(site, heads)
    dh = site.head_dim
    q_rows, kv_rows = _rows(heads, dh), _rows(kv, dh)
    if site.fused:
        _select(site.q, site.qkv_rows(q_rows, kv_rows), None, changes)
    else:
        _select(site.q, q_rows, None, changes)
        _select(site.k, kv_rows, None, changes)
        _select(site.v, kv_rows, None, changes)
    for module in site.extra:
        _select(module, q_rows, None, changes)
    _select(site.o, None, q_rows, changes)
    spec = layout.spec
    original = None
    if spec.kept_heads is not None:  # the original indices of the heads kept, for a family that records them
        current = spec.kept_heads(site.core)
        original = [current[int(h)] for h in heads.tolist()]
    spec.set_heads(layout, i, len(heads), new_group, original)


def prune_neurons(site: FFNSite, neurons: torch.Tensor, changes: list[ParamChange]) -> None:
    """Keep only ``neurons`` (physical indices) of an FFN: up/gate rows (both halves of a fused one), down columns."""
    neurons = neurons.to(torch.long)
    _select(site.up, site.up_rows(neurons), None, changes)
    if site.gate is not None and not site.fused:
        _select(site.gate, neurons, None, changes)
    _select(site.down, None, neurons, changes)


def prune_hidden(layout: Layout, dims: torch.Tensor, changes: list[ParamChange]) -> None:
    """Keep only hidden ``dims``: embeddings, norms, every reader's columns and every writer's rows."""
    dims = dims.to(torch.long)
    tied: dict[int, nn.Parameter] = {}
    for emb in layout.embeddings:
        old = emb.weight
        replace_param(emb, "weight", old.data.index_select(1, dims.to(old.device)), (None, dims), changes)
        emb.embedding_dim = len(dims)
        tied[id(old)] = emb.weight
    for module in layout.embedding_outputs:  # T5: encoder/decoder embed_tokens share the pruned `shared` weight
        if isinstance(module, nn.Embedding) and id(module.weight) in tied:
            module.weight = tied[id(module.weight)]
            module.embedding_dim = len(dims)
    for module, name, axis in layout.hidden_params:
        p = getattr(module, name)
        index = tuple(dims if a == axis % p.dim() else None for a in range(p.dim()))
        replace_param(module, name, p.data.index_select(axis, dims.to(p.device)), index, changes)
        set_hidden_width(module, name, axis, len(dims))
    for norm in layout.norms:
        for name in ("weight", "bias"):
            p = getattr(norm, name, None)
            if isinstance(p, nn.Parameter):
                replace_param(norm, name, p.data.index_select(0, dims.to(p.device)), (dims,), changes)
        if hasattr(norm, "normalized_shape"):
            norm.normalized_shape = (len(dims),)
    for module in layout.hidden_readers:
        weight = base_linear(module).weight
        if id(weight) in tied:  # an output embedding tied to an input embedding: reuse the pruned tensor
            base_linear(module).weight = tied[id(weight)]
            base_linear(module).in_features = len(dims)
            continue
        _select(module, None, dims, changes)
    for module in layout.hidden_writers:
        _select(module, dims, None, changes)
    for module in layout.transforms:
        _select(module, dims, dims, changes)


def kept_after(masks: APTMasks, layout: Layout) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Physical indices to keep: mask > 0, with GQA groups padded by :func:`gqa_closure`."""
    heads = [gqa_closure(masks.heads[i] > 0, s.group_size) for i, s in enumerate(layout.attentions)]
    neurons = [torch.nonzero(m > 0).flatten() for m in masks.neurons]
    hidden = torch.nonzero(masks.hidden > 0).flatten()
    return heads, neurons, hidden


def apply_structure(layout: Layout, masks: APTMasks, heads: list[Optional[torch.Tensor]],
                    neurons: list[Optional[torch.Tensor]], hidden: Optional[torch.Tensor]) -> list[ParamChange]:
    """Physically keep the given (current-relative) indices and shrink masks and kept-index records alike."""
    changes: list[ParamChange] = []
    for i, idx in enumerate(heads):
        if idx is None or len(idx) == masks.heads[i].numel():
            continue
        idx = idx.to(torch.long).cpu()
        prune_heads(layout, i, idx, changes)
        masks.set_buffer(f"heads_{i}", masks.heads[i][idx.to(masks.heads[i].device)].clone())
        masks.set_buffer(f"kept_heads_{i}", masks.kept("heads", i)[idx.to(masks.heads[i].device)].clone())
    for i, idx in enumerate(neurons):
        if idx is None or len(idx) == masks.neurons[i].numel():
            continue
        idx = idx.to(torch.long).cpu()
        prune_neurons(layout.ffns[i], idx, changes)
        masks.set_buffer(f"neurons_{i}", masks.neurons[i][idx.to(masks.neurons[i].device)].clone())
        masks.set_buffer(f"kept_neurons_{i}", masks.kept("neurons", i)[idx.to(masks.neurons[i].device)].clone())
    if hidden is not None and len(hidden) != masks.hidden.numel():
        hidden = hidden.to(torch.long).cpu()
        prune_hidden(layout, hidden, changes)
        masks.set_buffer("hidden", masks.hidden[hidden.to(masks.hidden.device)].clone())
        masks.set_buffer("kept_hidden", masks.kept_hidden[hidden.to(masks.hidden.device)].clone())
    return changes


def fold_unit_masks(layout: Layout, masks: APTMasks) -> None:
    """Multiply head and neuron mask values into the output/down projection columns and set the masks to 1.

    Exact for any mask values, because those masks scale the projections' inputs; used at export so that no
    mask hook is needed afterwards (e.g. for GQA padding heads whose mask stays 0).
    """
    with torch.no_grad():
        for i, site in enumerate(layout.attentions):
            m = masks.heads[i]
            if m.numel() and not masks.is_full(m):
                w = base_linear(site.o).weight
                w.mul_(m.repeat_interleave(site.head_dim).to(w.dtype))
                m.fill_(1.0)
        for i, site in enumerate(layout.ffns):
            m = masks.neurons[i]
            if m.numel() and not masks.is_full(m):
                w = base_linear(site.down).weight
                w.mul_(m.to(w.dtype))
                m.fill_(1.0)
