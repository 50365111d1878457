"""The APT adapter layer: frozen ``W`` plus ``s * B A`` with a rank that can grow (spec A.1, A.3, E.3)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


@dataclass
class ParamChange:
    """One parameter replaced by a reshaped one.

    ``index[d]`` lists which positions of ``old`` along dimension ``d`` survive (``None``: all); they land, in
    order, at the start of ``new`` along that dimension, and any remaining positions of ``new`` are fresh (zero
    optimizer state). Pruning selects, rank growth pads; both are described this way (spec K.6).

    ``old`` is the replaced parameter itself when it is trainable (the optimizer state and the distillation
    snapshot are found through it); a frozen one is recorded as a storage-free (meta) tensor of its shape and
    dtype, so that its memory is released as soon as its module lets go of it, not after the whole event.
    """

    old: torch.Tensor
    new: nn.Parameter
    index: tuple[Optional[torch.Tensor], ...]


def released(old: torch.Tensor) -> torch.Tensor:
    """What a :class:`ParamChange` keeps of a replaced parameter (see there)."""
    return old if old.requires_grad else torch.empty(old.shape, dtype=old.dtype, device="meta")


def replace_param(module: nn.Module, name: str, data: torch.Tensor, index: tuple, changes: list[ParamChange]) -> None:
    """Swap ``module.<name>`` for a new Parameter holding ``data``, keeping ``requires_grad``; record the change."""
    old = getattr(module, name)
    new = nn.Parameter(data.contiguous(), requires_grad=old.requires_grad)
    setattr(module, name, new)
    changes.append(ParamChange(released(old), new, index))


def select_linear(
    linear: nn.Linear, out_idx: Optional[torch.Tensor], in_idx: Optional[torch.Tensor], changes: list[ParamChange]
) -> None:
    """Keep only rows ``out_idx`` and columns ``in_idx`` of a plain ``nn.Linear`` (in place)."""
    w = linear.weight.data
    if out_idx is not None:
        w = w.index_select(0, out_idx.to(w.device))
    if in_idx is not None:
        w = w.index_select(1, in_idx.to(w.device))
    replace_param(linear, "weight", w, (out_idx, in_idx), changes)
    if linear.bias is not None and out_idx is not None:
        replace_param(linear, "bias", linear.bias.data.index_select(0, out_idx.to(w.device)), (out_idx,), changes)
    linear.out_features, linear.in_features = w.shape


class APTLinear(nn.Module, BaseTunerLayer):
    """``y = W x + b + s * B (A dropout(x))`` around a frozen ``nn.Linear`` (spec A.1).

    ``A`` is ``r x in`` (Kaiming-uniform, a = sqrt(5)), ``B`` is ``out x r`` (zeros), ``s = alpha / r0`` with ``r0``
    the initial rank, fixed for life so that growing the rank never changes the output (spec E.3.6). The input and
    output structural masks of the paper act on activations (see ``masks.py``); physical pruning calls
    :meth:`select` to drop rows/columns of ``W`` and of the factors together.
    """

    adapter_layer_names = ("apt_A", "apt_B")
    other_param_names = ("r", "scaling", "apt_dropout")

    def __init__(
        self,
        base_layer: nn.Linear,
        adapter_name: str,
        r: int,
        scaling: float,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(
                f"APT adapters wrap torch.nn.Linear layers only, got {type(base_layer).__name__}; "
                "remove this module from target_modules."
            )
        self.base_layer = base_layer
        self.apt_A = nn.ParameterDict()
        self.apt_B = nn.ParameterDict()
        self.apt_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, scaling, dropout)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def update_layer(self, adapter_name: str, r: int, scaling: float, dropout: float) -> None:
        if self.r:
            raise ValueError(
                "APT models hold a single adapter; got a second one "
                f"({adapter_name!r} besides {next(iter(self.r))!r}). Train one APT adapter per model."
            )
        weight = self.base_layer.weight
        a = torch.empty(r, self.in_features, device=weight.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.apt_A[adapter_name] = nn.Parameter(a.to(weight.dtype if weight.is_floating_point() else torch.float32))
        self.apt_B[adapter_name] = nn.Parameter(torch.zeros(self.out_features, r, device=weight.device, dtype=a.dtype))
        self.apt_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r[adapter_name] = r
        self.scaling[adapter_name] = scaling
        self.set_adapter(adapter_name)

    # ---------------------------------------------------------------- forward / merge
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s * B A``, shaped like ``W``."""
        return self.scaling[adapter_name] * (self.apt_B[adapter_name] @ self.apt_A[adapter_name])

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.apt_A:
                continue
            a, b = self.apt_A[name], self.apt_B[name]
            h = self.apt_dropout[name](x.to(a.dtype))
            result = result + (F.linear(F.linear(h, a), b) * self.scaling[name]).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        for name in adapter_names or self.active_adapters:
            if name in self.merged_adapters or name not in self.apt_A:
                continue
            weight = self.base_layer.weight
            merged = weight.data + self.delta_weight(name).detach().to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"Merging adapter {name!r} into {type(self.base_layer).__name__} gives non-finite weights.")
            weight.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight = self.base_layer.weight
            weight.data = weight.data - self.delta_weight(name).detach().to(weight.dtype)

    # ---------------------------------------------------------------- structure changes
    def grow_rank(self, adapter_name: str, new_r: int) -> list[ParamChange]:
        """Append ``new_r - r`` Kaiming-uniform rows to ``A`` and zero columns to ``B``; output unchanged (E.3.6)."""
        old_r = self.r[adapter_name]
        if new_r <= old_r:
            return []
        a_old, b_old = self.apt_A[adapter_name], self.apt_B[adapter_name]
        extra = torch.empty(new_r - old_r, a_old.shape[1], device=a_old.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(extra, a=math.sqrt(5))
        a_new = torch.cat([a_old.data, extra.to(a_old.dtype)], 0)
        b_new = torch.cat([b_old.data, b_old.data.new_zeros(b_old.shape[0], new_r - old_r)], 1)
        changes: list[ParamChange] = []
        rows = torch.arange(old_r, device=a_old.device)
        for store, data, index in ((self.apt_A, a_new, (rows, None)), (self.apt_B, b_new, (None, rows))):
            old = store[adapter_name]
            new = nn.Parameter(data, requires_grad=old.requires_grad)
            store[adapter_name] = new
            changes.append(ParamChange(released(old), new, index))
        self.r[adapter_name] = new_r
        return changes

    def select(
        self, out_idx: Optional[torch.Tensor], in_idx: Optional[torch.Tensor], changes: list[ParamChange]
    ) -> None:
        """Keep rows ``out_idx`` / columns ``in_idx`` of ``W``, ``b`` and of ``B`` / ``A`` alike (spec A.4)."""
        if self.merged:
            raise RuntimeError("Unmerge APT adapters before pruning them physically.")
        select_linear(self.base_layer, out_idx, in_idx, changes)
        for name in list(self.apt_A.keys()):
            if in_idx is not None:
                a = self.apt_A[name]
                old = a
                self.apt_A[name] = nn.Parameter(a.data.index_select(1, in_idx.to(a.device)), requires_grad=a.requires_grad)
                changes.append(ParamChange(released(old), self.apt_A[name], (None, in_idx)))
            if out_idx is not None:
                b = self.apt_B[name]
                self.apt_B[name] = nn.Parameter(b.data.index_select(0, out_idx.to(b.device)), requires_grad=b.requires_grad)
                changes.append(ParamChange(released(b), self.apt_B[name], (out_idx, None)))

    def __repr__(self) -> str:
        ranks = ", ".join(f"{k}: r={v}" for k, v in self.r.items())
        return f"apt.{super().__repr__()[:-1]}  ({ranks})\n)"
