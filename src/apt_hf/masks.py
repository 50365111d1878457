"""Structural masks (spec A.4, K.1): one head mask per attention site, one neuron mask per FFN, one hidden mask.

Values lie in [0, 1]. They act on activations, exactly where the paper's ``m_o`` / ``m_i`` act:

- head mask: each head's slice of the attention context, before the output projection (right for GQA too);
- neuron mask: the FFN intermediate activation, before the down projection;
- hidden mask: the embedding output, every sub-layer output written to the residual stream, every other
  hidden-width input the layout names (``Layout.hidden_kwargs``), and every norm, whose statistics are computed over
  the kept (mask > 0) dimensions only, so that physical removal is exact.

The container also records, per site, which positions of the *original* model are still physically present
(``kept_*``), so that a pruned model can be rebuilt from a fresh base model when it is loaded.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
from torch import nn

from .arch import CountModel, Layout, base_linear
from .runtime import NORM_KINDS


class MaskList:
    """A list view over buffers ``<prefix>_<i>`` of a module; item assignment copies into the buffer."""

    def __init__(self, owner: nn.Module, prefix: str) -> None:
        self._owner, self._prefix = owner, prefix

    def __len__(self) -> int:
        return self._owner._counts[self._prefix]

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self._prefix} mask index {i} out of range for {len(self)} sites")
        return getattr(self._owner, f"{self._prefix}_{i % len(self)}")

    def __setitem__(self, i: int, value: torch.Tensor) -> None:
        target = self[i]
        value = torch.as_tensor(value, dtype=target.dtype, device=target.device)
        if value.shape != target.shape:
            raise ValueError(f"{self._prefix}[{i}] has shape {tuple(target.shape)}; got {tuple(value.shape)}.")
        target.copy_(value)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"MaskList({self._prefix}, sizes={[t.numel() for t in self]})"


class APTMasks(nn.Module):
    """Head, neuron and hidden masks plus the record of kept original positions (saved with the adapter)."""

    def __init__(self, num_heads: list[int], num_neurons: list[int], hidden: int) -> None:
        super().__init__()
        self._counts = {"heads": len(num_heads), "neurons": len(num_neurons)}
        for i, n in enumerate(num_heads):
            self.register_buffer(f"heads_{i}", torch.ones(n))
            self.register_buffer(f"kept_heads_{i}", torch.arange(n))
        for i, n in enumerate(num_neurons):
            self.register_buffer(f"neurons_{i}", torch.ones(n))
            self.register_buffer(f"kept_neurons_{i}", torch.arange(n))
        self.register_buffer("hidden", torch.ones(hidden))
        self.register_buffer("kept_hidden", torch.arange(hidden))
        self._full_cache: dict[int, tuple[int, int, bool]] = {}
        self.bypass = False  # True while a teacher pass runs: masks act as all ones

    @property
    def heads(self) -> MaskList:
        return MaskList(self, "heads")

    @property
    def neurons(self) -> MaskList:
        return MaskList(self, "neurons")

    def kept(self, kind: str, i: Optional[int] = None) -> torch.Tensor:
        """Original-model indices still physically present (``kind`` in heads/neurons/hidden)."""
        return self.kept_hidden if kind == "hidden" else getattr(self, f"kept_{kind}_{i}")

    def set_buffer(self, name: str, value: torch.Tensor) -> None:
        """Replace a buffer by a differently shaped tensor (after physical pruning)."""
        setattr(self, name, value)

    def is_full(self, t: torch.Tensor) -> bool:
        """Whether every entry is 1 (or masks are bypassed), cached on identity and in-place version counter."""
        if self.bypass:
            return True
        key = id(t)
        cached = self._full_cache.get(key)
        if cached is not None and cached[0] == t._version and cached[1] == t.data_ptr():
            return cached[2]
        full = bool((t == 1).all())
        self._full_cache[key] = (t._version, t.data_ptr(), full)
        return full

    def values(self) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """CPU copies of the head, neuron and hidden masks, with one device-to-host transfer."""
        live = [*self.heads, *self.neurons, self.hidden]
        flat = torch.cat([m.detach().reshape(-1) for m in live]).cpu()
        parts = list(flat.split([m.numel() for m in live]))
        n_h = len(self.heads)
        return parts[:n_h], parts[n_h:-1], parts[-1]

    @torch.no_grad()
    def set_values(self, heads: list[torch.Tensor], neurons: list[torch.Tensor], hidden: torch.Tensor) -> None:
        """Write all masks from CPU tensors with one host-to-device transfer, and record which are all ones (from
        the CPU values), so the forward pass's :meth:`is_full` checks need no device synchronisation."""
        live = [*self.heads, *self.neurons, self.hidden]
        new = [*heads, *neurons, hidden]
        for i, (target, value) in enumerate(zip(live, new)):
            if value.shape != target.shape:
                raise ValueError(f"mask {i} has shape {tuple(target.shape)}; got {tuple(value.shape)}.")
        flat = torch.cat([v.reshape(-1).to(live[0].dtype) for v in new]).to(live[0].device)
        for target, value, part in zip(live, new, flat.split([t.numel() for t in live])):
            target.copy_(part.view_as(target))
            self._full_cache[id(target)] = (target._version, target.data_ptr(), bool((value == 1).all()))

    def summary(self) -> dict[str, float]:
        """Kept (mask > 0) heads, neurons and hidden dimensions."""
        return {
            "kept_heads": int(sum(int((m > 0).sum()) for m in self.heads)),
            "kept_neurons": int(sum(int((m > 0).sum()) for m in self.neurons)),
            "kept_hidden": int((self.hidden > 0).sum()),
        }


# ---------------------------------------------------------------------------------------------- masked norms
class MaskedNormMixin:
    """Norm over the residual stream that uses only kept (mask > 0) dimensions for its statistics (spec A.4).

    Its kind (``apt_norm_kind``, from the family's :attr:`~apt_hf.runtime.ArchSpec.norm`) says what it computes:
    ``layer`` (LayerNorm), ``rms`` (``y * w``) or ``rms_one_plus`` (``y * (1 + w)``, Gemma)."""

    apt_masks: APTMasks

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        masks = self.__dict__["apt_masks"]
        m = masks.hidden
        if masks.is_full(m):
            return super().forward(x)
        kind = self.__dict__["apt_norm_kind"]
        keep = (m > 0).to(torch.float32)
        n = keep.sum().clamp_min(1.0)
        xf = x.to(torch.float32) * keep
        eps = getattr(self, "eps", None)
        if eps is None:
            eps = getattr(self, "variance_epsilon", 1e-6)
        if kind == "layer":
            mean = xf.sum(-1, keepdim=True) / n
            centred = (xf - mean) * keep
            var = centred.pow(2).sum(-1, keepdim=True) / n
            y = centred * torch.rsqrt(var + eps)
        else:
            var = xf.pow(2).sum(-1, keepdim=True) / n
            y = xf * torch.rsqrt(var + eps)
        weight = getattr(self, "weight", None)
        bias = getattr(self, "bias", None)
        if weight is not None:
            y = y * (weight.to(torch.float32) + (1.0 if kind == "rms_one_plus" else 0.0))
        if bias is not None:
            y = y + bias.to(torch.float32)
        out_dtype = weight.dtype if weight is not None and weight.dtype in (torch.float16, torch.bfloat16) else x.dtype
        return (y * m.to(torch.float32)).to(out_dtype)


_MASKED_CLASSES: dict[type, type] = {}


def make_norm_masked(norm: nn.Module, masks: APTMasks, kind: str) -> None:
    """Turn ``norm`` into its masked subclass of ``kind`` (see :class:`MaskedNormMixin`) in place (parameters and
    state-dict keys unchanged)."""
    if kind not in NORM_KINDS:
        raise ValueError(f"Unknown norm kind {kind!r}; an ArchSpec's norm is one of {NORM_KINDS}.")
    norm.__dict__["apt_norm_kind"] = kind
    cls = type(norm)
    if issubclass(cls, MaskedNormMixin):
        norm.__dict__["apt_masks"] = masks
        return
    if cls not in _MASKED_CLASSES:
        _MASKED_CLASSES[cls] = type(f"Masked{cls.__name__}", (MaskedNormMixin, cls), {})
    norm.__class__ = _MASKED_CLASSES[cls]
    norm.__dict__["apt_masks"] = masks


def make_norm_plain(norm: nn.Module) -> None:
    """Undo :func:`make_norm_masked`."""
    if isinstance(norm, MaskedNormMixin):
        norm.__class__ = [c for c in type(norm).__mro__ if c is not MaskedNormMixin and c is not type(norm)][0]
        norm.__dict__.pop("apt_masks", None)
        norm.__dict__.pop("apt_norm_kind", None)


# ---------------------------------------------------------------------------------------------- hooks
def _scale_last(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return x * m.to(x.dtype)


def install_mask_hooks(layout: Layout, masks: APTMasks) -> list[torch.utils.hooks.RemovableHandle]:
    """Register the forward (pre-)hooks that apply the masks; returns the handles."""
    handles = []

    def head_hook(i: int, head_dim: int) -> Callable:
        def hook(module, args):
            m = masks.heads[i]
            if masks.is_full(m) or args[0].shape[-1] == 0:
                return None
            return (_scale_last(args[0], m.repeat_interleave(head_dim)),) + tuple(args[1:])
        return hook

    def neuron_hook(i: int) -> Callable:
        def hook(module, args):
            m = masks.neurons[i]
            if masks.is_full(m):
                return None
            return (_scale_last(args[0], m),) + tuple(args[1:])
        return hook

    def hidden_out_hook(module, args, output):
        m = masks.hidden
        if masks.is_full(m):
            return None
        return _scale_last(output, m)

    def hidden_kwarg_hook(keyword: str) -> Callable:
        def hook(module, args, kwargs):
            m, x = masks.hidden, kwargs.get(keyword)
            if masks.is_full(m) or x is None:
                return None
            return args, {**kwargs, keyword: _scale_last(x, m)}
        return hook

    for i, site in enumerate(layout.attentions):
        handles.append(site.o.register_forward_pre_hook(head_hook(i, site.head_dim)))
    for i, site in enumerate(layout.ffns):
        handles.append(site.down.register_forward_pre_hook(neuron_hook(i)))
    for module in layout.hidden_writers + layout.embedding_outputs:
        handles.append(module.register_forward_hook(hidden_out_hook))
    for module, keyword in layout.hidden_kwargs:
        handles.append(module.register_forward_pre_hook(hidden_kwarg_hook(keyword), with_kwargs=True))
    for norm in layout.norms:
        make_norm_masked(norm, masks, layout.spec.norm)
    return handles


def remove_mask_hooks(layout: Layout, handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()
    for norm in layout.norms:
        make_norm_plain(norm)


def dense_count(layout: Layout) -> int:
    """Spec B.3 parameter count of every head, neuron and hidden dimension the model has now."""
    heads, neurons, hidden = sizes_of(layout)
    ones = [torch.ones(n, dtype=torch.bool) for n in (*heads, *neurons, hidden)]
    return CountModel.from_layout(layout).count(ones[:len(heads)], ones[len(heads):-1], ones[-1])


def sizes_of(layout: Layout) -> tuple[list[int], list[int], int]:
    """Current physical numbers of heads per attention site, neurons per FFN, and hidden width."""
    return ([s.num_heads for s in layout.attentions], [f.num_neurons for f in layout.ffns],
            base_linear(layout.hidden_writers[0]).out_features if layout.hidden_writers else layout.hidden_size)
