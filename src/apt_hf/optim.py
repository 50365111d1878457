"""Optimizer surgery: keep the Trainer's optimizer when parameter shapes change (spec K.6, HF_STACK_NOTES).

The existing optimizer's param groups receive the new tensors; per-parameter state tensors shaped like the
parameter (Adam's ``exp_avg`` / ``exp_avg_sq``) are sliced for removed rows/columns and zero-padded for new rank
rows; scalar state (``step``) is kept. accelerate's ``AcceleratedOptimizer``, the LR scheduler and the grad
scaler keep working because the optimizer object never changes.
"""

from __future__ import annotations

import torch

from .layer import ParamChange


def remap_state(value: torch.Tensor, change: ParamChange) -> torch.Tensor:
    """Carry one state tensor across a :class:`ParamChange` (selected positions first, fresh positions zero)."""
    if not torch.is_tensor(value) or value.shape != change.old.shape:
        return value
    kept = value
    for dim, index in enumerate(change.index):
        if index is not None:
            kept = kept.index_select(dim, index.to(kept.device))
    out = value.new_zeros(change.new.shape)
    out[tuple(slice(0, n) for n in kept.shape)] = kept
    return out


def _inner(optimizer):
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):  # accelerate's wrapper
        inner = inner.optimizer
    return inner


def drop_params(optimizer, params) -> int:
    """Remove ``params`` (by identity) and their state from ``optimizer``, e.g. the adapters of an attention block
    whose heads were all removed (the module leaves the model); returns how many were found."""
    gone = {id(p) for p in params}
    if optimizer is None or not gone:
        return 0
    inner = _inner(optimizer)
    dropped = 0
    for group in inner.param_groups:
        keep = [p for p in group["params"] if id(p) not in gone]
        dropped += len(group["params"]) - len(keep)
        group["params"] = keep
    for p in [p for p in inner.state if id(p) in gone]:
        del inner.state[p]
    return dropped


def apply_param_changes(optimizer, changes: list[ParamChange]) -> int:
    """Swap changed parameters inside ``optimizer`` (plain or accelerate-wrapped) in place; returns how many."""
    if optimizer is None or not changes:
        return 0
    inner = _inner(optimizer)
    where = {id(p): (g, i) for g in inner.param_groups for i, p in enumerate(g["params"])}
    swapped = 0
    for change in changes:
        slot = where.pop(id(change.old), None)
        if slot is None:
            continue
        group, i = slot
        group["params"][i] = change.new
        where[id(change.new)] = slot
        state = inner.state.pop(change.old, None)
        if state is not None:
            inner.state[change.new] = {k: remap_state(v, change) for k, v in state.items()}
        swapped += 1
    return swapped


def reset_state(optimizer, params) -> int:
    """Forget the optimizer state (Adam moments, step) of ``params``, as a rebuilt optimizer would (spec F.2);
    returns how many parameters had state."""
    if optimizer is None:
        return 0
    inner = _inner(optimizer)
    found = [p for p in params if p in inner.state]
    for p in found:
        del inner.state[p]
    return len(found)
