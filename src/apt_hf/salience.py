"""Outlier-aware block salience (spec C.1, C.2, K.3) and adapter importance (spec C.2 "adapter sensitivity", E.3).

Hooks keep only batch-and-token sums of |activation| and |gradient| per block (never full activations); the
product is taken per micro-batch, summed over the micro-batches of one optimizer step, optionally extended by the
kurtosis term and folded into an EMA once per optimizer step. Pure math lives in the small functions at the top.

Per-step cost (issue 17): the scores (and the kurtosis mean activations) of a step reach the host in one transfer;
the kurtosis term reads each frozen weight only through its column power sums, computed once per weight version,
so it costs O(d) per step instead of O(d^2).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import distributed
from .arch import Layout, base_linear
from .layer import APTLinear


# ---------------------------------------------------------------------------------------------- pure math
def abs_sum(t: torch.Tensor) -> torch.Tensor:
    """``sum_{batch,tokens} |t|`` per last-axis coordinate, accumulated in float32 (no float copy of ``t``)."""
    return t.detach().abs().sum(tuple(range(t.dim() - 1)), dtype=torch.float32)


def product_of_sums(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """``[sum_{batch,tokens} |grad|] * [sum_{batch,tokens} |act|]`` per last-axis coordinate (spec C.1)."""
    return abs_sum(activation) * abs_sum(gradient)


def column_power_sums(weight: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """``P[k - 1, j] = sum_i W[i, j] ** k`` for ``k = 1..4``, in float64 on the CPU (rows in chunks, so the float64
    copy never exceeds ``chunk_rows`` rows). Everything the kurtosis of ``O = W * x`` needs from ``W``."""
    sums = torch.zeros(4, weight.shape[1], dtype=torch.float64, device=weight.device)
    for rows in weight.detach().split(chunk_rows):
        w = rows.double()
        p = w.clone()
        for k in range(4):
            sums[k] += p.sum(0)
            if k < 3:
                p.mul_(w)
    return sums.cpu()


def grouped_kurtosis(power_sums: torch.Tensor, x: torch.Tensor, group: int, rows: int) -> torch.Tensor:
    """Fisher (excess) kurtosis ``m4 / m2^2 - 3`` (population moments, scipy's default) of the entries of
    ``O = W * x`` (``x`` scales column ``j``) over each group of ``group`` consecutive columns and all ``rows`` rows,
    from the column power sums of ``W`` (:func:`column_power_sums`): ``O(d)`` work per call instead of ``O(d^2)``.

    A group whose entries are all equal (e.g. ``x = 0``) has kurtosis 0; float32 result."""
    x = x.detach().to(torch.float64).cpu()
    n = rows * group
    raw = [(power_sums[k] * x.pow(k + 1)).view(-1, group).sum(1) / n for k in range(4)]  # E[O^k]
    mu, m2_raw, m3_raw, m4_raw = raw
    m2 = m2_raw - mu * mu
    m4 = m4_raw - 4 * mu * m3_raw + 6 * mu * mu * m2_raw - 3 * mu.pow(4)
    flat = m2 <= 1e-10 * m2_raw  # all entries (numerically) equal: cancellation leaves rounding noise
    return torch.where(flat, torch.zeros_like(m2), m4 / torch.where(flat, torch.ones_like(m2), m2).pow(2) - 3.0).float()


def excess_kurtosis(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Fisher (excess) kurtosis ``m4 / m2^2 - 3`` along ``dim`` with population moments (scipy's default)."""
    x = x.float()
    centred = x - x.mean(dim, keepdim=True)
    m2 = centred.pow(2).mean(dim)
    m4 = centred.pow(4).mean(dim)
    return torch.where(m2 > 0, m4 / m2.clamp_min(1e-30).pow(2) - 3.0, torch.zeros_like(m2))


def outlier_term(kurtosis: torch.Tensor) -> torch.Tensor:
    """``sqrt(max(K, 0))`` (spec C.1)."""
    return kurtosis.clamp_min(0).sqrt()


def ema(previous: torch.Tensor, current: torch.Tensor, beta: float) -> torch.Tensor:
    """``beta * previous + (1 - beta) * current`` (spec C.1, Algorithm 1)."""
    return previous * beta + current * (1.0 - beta)


def head_kurtosis(o_weight: torch.Tensor, mean_context: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Kurtosis per head of ``O = W_o[:, head] * x_bar[head]`` over its ``d x d_h`` entries (J.7 fixed)."""
    return grouped_kurtosis(column_power_sums(o_weight), mean_context, head_dim, o_weight.shape[0])


def column_kurtosis(weight: torch.Tensor, mean_input: torch.Tensor) -> torch.Tensor:
    """Kurtosis of each column ``j`` of ``O = W[:, j] * x_bar_j`` over the output axis (neurons, dimensions)."""
    return grouped_kurtosis(column_power_sums(weight), mean_input, 1, weight.shape[0])


def row_kurtosis(weight: torch.Tensor, mean_input: torch.Tensor) -> torch.Tensor:
    """Kurtosis of each row ``i`` of ``O = W * x_bar`` over the input axis: the hidden dimension ``i`` a residual
    writer (attention output or FFN down projection) writes to (spec C.2)."""
    return excess_kurtosis(weight.float() * mean_input.float())


def to_host(tensors: list[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
    """float32 CPU copies of ``tensors`` (``None`` stays ``None``) with one device-to-host transfer, not one per
    tensor (each would wait for the device)."""
    present = [t for t in tensors if t is not None]
    if not present:
        return list(tensors)
    devices = {t.device for t in present}
    if len(devices) > 1:  # a model spread over several devices: one transfer per tensor
        return [None if t is None else t.detach().float().cpu() for t in tensors]
    flat = torch.cat([t.detach().reshape(-1).float() for t in present]).cpu()
    parts = iter(flat.split([t.numel() for t in present]))
    return [None if t is None else next(parts).view(t.shape) for t in tensors]


# ---------------------------------------------------------------------------------------------- collector
class SalienceCollector:
    """Hooks that gather block salience for one :class:`~apt_hf.arch.Layout` (spec C.2).

    Probe points: the input of each attention output projection (heads), the input of each FFN down projection
    (neurons), and for hidden dimensions the input of every attention q projection and FFN up projection plus the
    final norm output, summed. Call :meth:`end_step` once per optimizer step (after backward, before the
    optimizer step): it folds the step's scores into the EMA unless they are not finite. With ``static = True``
    (pre-tuning pruning, spec D.6) the scores are summed instead.
    """

    def __init__(self, layout: Layout, beta: float, use_kurtosis: bool) -> None:
        self.layout, self.beta, self.use_kurtosis = layout, beta, use_kurtosis
        self.static = False  # pre-tuning pruning (spec D.6): sum the step scores instead of the EMA
        self.ema_heads = [torch.zeros(s.num_heads) for s in layout.attentions]
        self.ema_neurons = [torch.zeros(f.num_neurons) for f in layout.ffns]
        self.ema_hidden = torch.zeros(layout.hidden_size if not layout.hidden_writers
                                      else base_linear(layout.hidden_writers[0]).out_features)
        self._handles: list = []
        self._sums: dict[int, tuple[tuple, torch.Tensor]] = {}  # column power sums of frozen weights, by identity
        self._reset_step()

    # -- state
    def _reset_step(self) -> None:
        self.step_heads: list[Optional[torch.Tensor]] = [None] * len(self.layout.attentions)
        self.step_neurons: list[Optional[torch.Tensor]] = [None] * len(self.layout.ffns)
        self.step_hidden: Optional[torch.Tensor] = None
        self.mean_context: list[Optional[torch.Tensor]] = [None] * len(self.layout.attentions)
        self.mean_inter: list[Optional[torch.Tensor]] = [None] * len(self.layout.ffns)
        self.mean_hidden_in: dict[int, torch.Tensor] = {}

    def state_dict(self) -> dict:
        return {"heads": self.ema_heads, "neurons": self.ema_neurons, "hidden": self.ema_hidden}

    def load_state_dict(self, state: dict) -> None:
        self.ema_heads = [t.clone() for t in state["heads"]]
        self.ema_neurons = [t.clone() for t in state["neurons"]]
        self.ema_hidden = state["hidden"].clone()

    # -- hooks
    def attach(self, layout: Layout) -> None:
        self.detach()
        self.layout = layout

        def add(store: str, i: Optional[int], reduce_heads: int = 0):
            def on_tensor(t: torch.Tensor) -> None:
                if not (torch.is_grad_enabled() and t.requires_grad):
                    return
                act = abs_sum(t)
                if self.use_kurtosis and store in ("heads", "neurons"):
                    mean = t.detach().mean(tuple(range(t.dim() - 1)), dtype=torch.float32)
                    getattr(self, "mean_context" if store == "heads" else "mean_inter")[i] = mean

                def on_grad(g: torch.Tensor) -> None:
                    score = act * abs_sum(g)
                    if reduce_heads:
                        score = score.view(-1, reduce_heads).sum(1)
                    self._accumulate(store, i, score)

                t.register_hook(on_grad)
            return on_tensor

        def pre(fn):
            return lambda module, args: fn(args[0]) if args and isinstance(args[0], torch.Tensor) else None

        for i, site in enumerate(layout.attentions):
            if site.q is not None:
                self._handles.append(site.o.register_forward_pre_hook(pre(add("heads", i, site.head_dim))))
                self._handles.append(site.q.register_forward_pre_hook(pre(add("hidden", None))))
        for i, site in enumerate(layout.ffns):
            self._handles.append(site.down.register_forward_pre_hook(pre(add("neurons", i))))
            self._handles.append(site.up.register_forward_pre_hook(pre(add("hidden", None))))
        final = layout.norms[-1]
        self._handles.append(final.register_forward_hook(lambda m, a, out: add("hidden", None)(out)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _accumulate(self, store: str, i: Optional[int], score: torch.Tensor) -> None:
        if store == "hidden":
            self.step_hidden = score if self.step_hidden is None else self.step_hidden + score
            return
        bucket = self.step_heads if store == "heads" else self.step_neurons
        bucket[i] = score if bucket[i] is None else bucket[i] + score

    # -- per optimizer step
    def _power_sums(self, weight: torch.Tensor) -> torch.Tensor:
        """Column power sums of a frozen weight, recomputed only when it changes (pruning, merging, in-place
        edits), so the kurtosis term costs ``O(d)`` per step instead of ``O(d^2)``."""
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype)
        cached = self._sums.get(id(weight))
        if cached is None or cached[0] != key:
            cached = (key, column_power_sums(weight))
            self._sums[id(weight)] = cached
        return cached[1]

    def _kurtosis_terms(self, mean_context: list[Optional[torch.Tensor]], mean_inter: list[Optional[torch.Tensor]]
                        ) -> tuple[list[Optional[torch.Tensor]], list[Optional[torch.Tensor]], torch.Tensor]:
        """Outlier terms of heads, neurons and hidden dimensions; a dimension's is summed over the attention-output
        and FFN-down projections of every layer (spec C.1, C.2, K.3). Heads and neurons come from cached column
        power sums (``O(d)`` per step); a hidden dimension's row of ``W * x_bar`` is computed in full."""
        heads, neurons, hidden = [], [], torch.zeros_like(self.ema_hidden)
        live = set()
        for site, mean in zip(self.layout.attentions, mean_context):
            w = base_linear(site.o).weight
            live.add(id(w))
            heads.append(None if mean is None else outlier_term(
                grouped_kurtosis(self._power_sums(w), mean, site.head_dim, w.shape[0])))
            if mean is not None:
                hidden += self._row_term(w, mean)
        for site, mean in zip(self.layout.ffns, mean_inter):
            w = base_linear(site.down).weight
            live.add(id(w))
            neurons.append(None if mean is None else outlier_term(grouped_kurtosis(self._power_sums(w), mean, 1,
                                                                                   w.shape[0])))
            if mean is not None:
                hidden += self._row_term(w, mean)
        self._sums = {k: v for k, v in self._sums.items() if k in live}  # weights replaced by pruning
        return heads, neurons, hidden

    @staticmethod
    def _row_term(weight: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return outlier_term(row_kurtosis(weight, mean.to(weight.device))).cpu()

    def _reduce_over_processes(self) -> None:
        """Replace this step's scores (and kurtosis mean activations) by their mean over processes (one collective;
        a no-op in one process). See :mod:`apt_hf.distributed` for why the mean."""
        if distributed.world_size() == 1:
            return
        n_h, n_n = len(self.step_heads), len(self.step_neurons)
        tensors = [*self.step_heads, *self.step_neurons, self.step_hidden]
        sizes = [e.numel() for e in self.ema_heads] + [e.numel() for e in self.ema_neurons] + [self.ema_hidden.numel()]
        if self.use_kurtosis:
            tensors += [*self.mean_context, *self.mean_inter]
            sizes += [base_linear(s.o).in_features for s in self.layout.attentions]
            sizes += [base_linear(f.down).in_features for f in self.layout.ffns]
        out = distributed.mean_over_ranks(tensors, sizes)
        self.step_heads, self.step_neurons, self.step_hidden = out[:n_h], out[n_h:n_h + n_n], out[n_h + n_n]
        if self.use_kurtosis:
            rest = out[n_h + n_n + 1:]
            self.mean_context, self.mean_inter = rest[:n_h], rest[n_h:]

    def end_step(self) -> bool:
        """Fold this optimizer step's scores into the EMA; returns False (and drops them) if any is not finite.

        Under DDP the scores are first averaged over processes (a collective: every rank calls this at the same
        optimizer steps), so every rank folds identical values and skips the same steps. Scores and kurtosis means
        reach the host in one transfer."""
        self._reduce_over_processes()
        n_h, n_n = len(self.step_heads), len(self.step_neurons)
        slots = [*self.step_heads, *self.step_neurons, self.step_hidden]
        if self.use_kurtosis:
            slots += [*self.mean_context, *self.mean_inter]
        host = to_host(slots)
        heads, neurons, hidden = host[:n_h], host[n_h:n_h + n_n], host[n_h + n_n]
        parts = [t for t in heads + neurons + [hidden] if t is not None]
        if not parts:
            self._reset_step()
            return True
        if not bool(torch.isfinite(torch.cat(parts)).all()):
            self._reset_step()
            return False
        if self.use_kurtosis:
            means = host[n_h + n_n + 1:]
            k_heads, k_neurons, k_hidden = self._kurtosis_terms(means[:n_h], means[n_h:])
        else:
            k_heads, k_neurons, k_hidden = [None] * n_h, [None] * n_n, 0

        def fold(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
            return previous + current if self.static else ema(previous, current, self.beta)

        for i, s in enumerate(heads):
            if s is not None and s.shape == self.ema_heads[i].shape:
                self.ema_heads[i] = fold(self.ema_heads[i], s + (k_heads[i] if k_heads[i] is not None else 0))
        for i, s in enumerate(neurons):
            if s is not None and s.shape == self.ema_neurons[i].shape:
                self.ema_neurons[i] = fold(self.ema_neurons[i], s + (k_neurons[i] if k_neurons[i] is not None else 0))
        if hidden is not None and hidden.shape == self.ema_hidden.shape:
            self.ema_hidden = fold(self.ema_hidden, hidden + k_hidden)
        self._reset_step()
        return True

    def reindex(self, heads: list[Optional[torch.Tensor]], neurons: list[Optional[torch.Tensor]],
                hidden: Optional[torch.Tensor]) -> None:
        """Drop the EMA entries of physically removed blocks (spec C.2 "accumulation")."""
        self.ema_heads = [e if idx is None else e[idx] for e, idx in zip(self.ema_heads, heads)]
        self.ema_neurons = [e if idx is None else e[idx] for e, idx in zip(self.ema_neurons, neurons)]
        if hidden is not None:
            self.ema_hidden = self.ema_hidden[hidden]


# ---------------------------------------------------------------------------------------------- adapters
def adapter_sensitivity(layer: APTLinear, adapter_name: str = "default") -> Optional[torch.Tensor]:
    """Per rank row ``k``: ``|sum_j A_kj * dL/dA_kj|`` (spec C.2, J.8), float32 on ``A``'s device; ``None``
    without a gradient."""
    a = layer.apt_A[adapter_name]
    if a.grad is None:
        return None
    return (a.detach().float() * a.grad.detach().float()).sum(1).abs()


class ImportanceTracker:
    """EMA of adapter sensitivity per adapter layer; importance is its mean over rank rows (spec E.3.2)."""

    def __init__(self, beta: float) -> None:
        self.beta = beta
        self.scores: dict[str, torch.Tensor] = {}

    def update(self, layers: dict[str, APTLinear]) -> bool:
        """Fold this step's sensitivities into the EMA (one device-to-host transfer for all adapters); returns False
        and changes nothing if any is not finite."""
        names = list(layers)
        host = to_host([adapter_sensitivity(layers[n]) for n in names])
        fresh = {n: v for n, v in zip(names, host) if v is not None}
        if fresh and not bool(torch.isfinite(torch.cat(list(fresh.values()))).all()):
            return False
        for name, value in fresh.items():
            prev = self.scores.get(name)
            self.scores[name] = value * (1 - self.beta) if prev is None or prev.shape != value.shape else ema(
                prev, value, self.beta)
        return True

    def importance(self) -> dict[str, float]:
        return {name: float(v.mean()) if v.numel() else 0.0 for name, v in self.scores.items()}

    def reset(self) -> None:
        self.scores.clear()
