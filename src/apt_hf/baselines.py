"""Retraining-free structured pruning on APT masks: the paper's "LoRA+Prune" baseline (spec I).

APT's "LoRA+Prune" baseline is the Mask Tuning method of Kwon et al. 2022, *A Fast Post-Training Pruning Framework
for Transformers*: fine-tune (with LoRA), merge, then prune attention heads and FFN neurons of the fine-tuned model
without retraining. Intended flow::

    merged = lora_model.merge_and_unload()
    pm = peft.get_peft_model(merged, apt_hf.APTConfig(task_type="SEQ_CLS", target_modules=["query", "value"]))
    report = apt_hf.baselines.fisher_prune(pm, train_loader, target_density=0.4)
    apt_hf.export_pruned(pm, "out/")      # physically smaller model; tuned mask values are folded in exactly

The APT adapters have ``B = 0``, so wrapping does not change the outputs; only the model's structural masks
(``apt_hf.get_masks(pm)``) are used. Hidden dimensions are never pruned (Kwon et al. prune heads and neurons only).

Phases (each timed in the returned report):

1. **Fisher** (:func:`collect_mask_grads`): gradients of the task loss with respect to one multiplicative variable
   per head (on the input of the attention output projection) and per neuron (on the input of the FFN down
   projection), taken at value 1 on top of the current masks. The diagonal empirical Fisher of a block is the sum
   over gradient rows of the squared gradient. One row per *batch* (``fisher_granularity="batch"``, as in the
   reference code; the batch loss is the model's mean loss) or per *example* (``"example"``, as in the paper's
   formula; one forward/backward per example). The APT mask hooks themselves are *not* used for this: they skip
   the multiplication while a mask is all ones (``APTMasks.is_full``), so a ``requires_grad`` mask would get no
   gradient; temporary hooks of this module provide the variables instead.
2. **Search** (:func:`search_structure`): Kwon et al.'s split search, with their FLOPs/MAC constraint replaced by
   the spec B.3 parameter count: heads and neurons are ranked by Fisher (separately, globally over layers); for
   every number ``h`` of top heads the remaining budget is filled with as many top neurons as fit, and the split
   with the largest kept Fisher (= smallest Fisher of the pruned blocks) wins (ties: larger count). Costs are the
   exact B.3 increments (``CountModel.count`` is additive in heads and neurons at a fixed hidden width), the budget
   is ``target_density * apt.n_params``. Differences: ``h = 0`` is allowed; afterwards, any block that still fits
   is added in descending Fisher-per-parameter order (the reference leaves that slack unused). Grouped-query
   attention: whole key/value groups are the head blocks (Fisher = sum over the group's heads), so the group rule
   of ``prune.kv_groups`` always holds. Blocks whose mask is already 0 stay pruned and are not candidates.
3. **Rearrangement** (:func:`rearrange_layer`, ``rearrange=True``): per layer and block type, the number of pruned
   blocks is fixed and the *set* is re-chosen greedily to minimise the block-diagonal Fisher estimate of the loss
   increase, ``sum_rows (sum_{i pruned} g_row,i)^2`` (cross terms between blocks of the same layer included): start
   from the lowest-Fisher blocks; visiting the other blocks in ascending Fisher order, add each to the pruned set
   and drop the member whose removal leaves the smallest objective. This is the reference algorithm. As all blocks
   of one layer cost the same, the count is unchanged; a GQA layer whose groups differ in cost (after earlier
   pruning) is left as searched.
4. **Mask tuning** (``tune_masks=True``): sites are visited in execution order (attention then FFN of each layer).
   For each site, on ``tune_samples`` calibration examples (the first ones of the Fisher sample), the *teacher*
   (the masks as they were when ``fisher_prune`` was called, normally all ones) and the *student* (new masks,
   earlier sites already tuned) are run up to the site's residual sum (attention/FFN output + residual: the
   post-LN input for BERT, the next norm's input for LLaMA, the sub-layer output for T5). The kept heads' /
   neurons' mask values are multiplied by scales ``s`` solving the least-squares problem
   ``min_s || sum_j s_j a_j - (sum_j a_j + teacher_sum - student_sum) ||^2`` over real (non-padding) tokens, where
   ``a_j`` is block ``j``'s contribution to the output projection (so the student's own residual error is
   corrected too, as in the reference). Normal equations are accumulated in float64 (neurons with the
   ``(W^T W) * (H^T H)`` identity), solved with a small ridge (``ridge * mean(diag)``). Scales are clamped to
   ``scale_range`` (default ``[1e-3, 10]``: a kept block must keep a positive mask because ``mask > 0`` means
   "kept" for counting and export; the reference aborts all later tuning when a scale leaves ``[-10, 10]``), and a
   site's clamped solution is applied only if it lowers that site's objective below the untuned one (otherwise
   the site is listed in ``report["rejected_sites"]``). Differences from the reference: the teacher is the unpruned
   (entry) model rather than their less-pruned intermediate mask, no free constant column, the first layer's
   attention is tuned too, and the forward is re-run from the embeddings for every site, stopping at the site's
   sum (O(L^2) layer passes, no per-layer input cache). As in the reference, a BERT/RoBERTa sequence classifier's
   last FFN matches the first ([CLS]) token only; every other site (and every site of LLaMA / T5 models) matches
   all non-padding tokens (``attention_mask``; T5 decoder sites use ``decoder_attention_mask`` if given).

``export_pruned`` folds head/neuron mask values into the output/down projection columns (``prune.fold_unit_masks``),
so the exported model reproduces the tuned masked model. The fold scales only the base weight: if an output/down
projection carries an APT adapter with non-zero ``B``, tuned values would not be folded into that adapter, so
:func:`fisher_prune` refuses to tune in that case (use ``target_modules`` that exclude those projections).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .arch import base_linear
from .layer import APTLinear
from .model import APTModel, find_apt_model
from .runtime import heads_by_group

__all__ = ["fisher_prune", "collect_mask_grads", "search_structure", "rearrange_layer", "tune_site_masks"]


# ---------------------------------------------------------------------------------------------- batches
def _batch_size(batch: Mapping) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise ValueError("A batch holds no tensor with a batch dimension; pass dict batches like "
                     "{'input_ids': ..., 'attention_mask': ..., 'labels': ...}.")


def _slice(batch: Mapping, start: int, stop: int) -> dict:
    n = _batch_size(batch)
    return {k: (v[start:stop] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v)
            for k, v in batch.items()}


def _to(batch: Mapping, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def take_samples(dataloader: Iterable, num_samples: int) -> list[dict]:
    """The first ``num_samples`` examples of ``dataloader`` as a list of dict batches (the last one cut short)."""
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be a positive number of examples.")
    out, taken = [], 0
    for batch in dataloader:
        if not isinstance(batch, Mapping):
            raise TypeError(f"fisher_prune needs dict batches (input_ids, attention_mask, labels ...), got "
                            f"{type(batch).__name__}; use a collator such as DataCollatorWithPadding.")
        n = _batch_size(batch)
        if taken + n > num_samples:
            batch, n = _slice(batch, 0, num_samples - taken), num_samples - taken
        if n:
            out.append(dict(batch))
            taken += n
        if taken >= num_samples:
            break
    if not out:
        raise ValueError("The dataloader yielded no examples; fisher_prune needs labelled training batches.")
    return out


# ---------------------------------------------------------------------------------------------- phase 1: Fisher
class _GradVars:
    """Temporary multiplicative variables (value 1) on the inputs of every output / down projection."""

    def __init__(self, apt: APTModel) -> None:
        lay = apt.layout
        dev = next(apt.model.parameters()).device
        self.heads = [torch.ones(s.num_heads, device=dev, requires_grad=True) for s in lay.attentions]
        self.neurons = [torch.ones(f.num_neurons, device=dev, requires_grad=True) for f in lay.ffns]
        self.handles = []
        for var, site in zip(self.heads, lay.attentions):
            self.handles.append(site.o.register_forward_pre_hook(self._hook(var, site.head_dim)))
        for var, ffn in zip(self.neurons, lay.ffns):
            self.handles.append(ffn.down.register_forward_pre_hook(self._hook(var, 1)))

    @staticmethod
    def _hook(var: torch.Tensor, repeat: int):
        def hook(module, args):
            x = args[0]
            if x.shape[-1] == 0:
                return None
            v = var.repeat_interleave(repeat) if repeat > 1 else var
            return (x * v.to(x.dtype),) + tuple(args[1:])
        return hook

    def pop_grads(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        out = []
        for group in (self.heads, self.neurons):
            grads = []
            for v in group:
                grads.append(torch.zeros_like(v, dtype=torch.float32) if v.grad is None
                             else v.grad.detach().float().clone())
                v.grad = None
            out.append(grads)
        return out[0], out[1]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def collect_mask_grads(model: nn.Module, batches: list[Mapping], granularity: str = "batch"
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradient rows of the task loss w.r.t. unit head / neuron scales (phase 1).

    Returns ``(head_grads, neuron_grads)``: per attention site a ``[rows, heads]`` tensor and per FFN a
    ``[rows, neurons]`` tensor (float32, CPU), one row per batch or per example (``granularity``). The diagonal
    Fisher is ``grads.pow(2).sum(0)``. Model parameters get no gradients (their ``requires_grad`` is restored).
    """
    if granularity not in ("batch", "example"):
        raise ValueError(f"fisher_granularity={granularity!r}; use 'batch' (reference code) or 'example' (paper).")
    apt = find_apt_model(model)
    device = next(apt.model.parameters()).device
    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()
    for p in params:
        p.requires_grad_(False)
    gv = _GradVars(apt)
    rows_h: list[list[torch.Tensor]] = [[] for _ in gv.heads]
    rows_n: list[list[torch.Tensor]] = [[] for _ in gv.neurons]
    try:
        for batch in batches:
            batch = _to(batch, device)
            pieces = [batch] if granularity == "batch" else [_slice(batch, j, j + 1) for j in range(_batch_size(batch))]
            for piece in pieces:
                out = model(**piece)
                loss = getattr(out, "loss", None)
                if loss is None:
                    raise ValueError("The model returned no loss; the batches must carry labels "
                                     "(fisher_prune uses the task loss for the Fisher information).")
                loss.backward()
                gh, gn = gv.pop_grads()
                for r, g in zip(rows_h, gh):
                    r.append(g.cpu())
                for r, g in zip(rows_n, gn):
                    r.append(g.cpu())
    finally:
        gv.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)
    return [torch.stack(r) for r in rows_h], [torch.stack(r) for r in rows_n]


# ---------------------------------------------------------------------------------------------- blocks
@dataclass
class _Units:
    """Prunable blocks of one site: member positions, cost, Fisher, gradient columns."""

    members: list[torch.Tensor]  # per unit, the head / neuron indices it holds (alive only)
    cost: torch.Tensor  # float64 [units]
    fisher: torch.Tensor  # float64 [units]
    grads: torch.Tensor  # float64 [rows, units]


def _site_units(kind: str, i: int, alive: torch.Tensor, grads: torch.Tensor, group: int, cm, const: int,
                heads_empty: list, neurons_empty: list, hidden_keep: torch.Tensor) -> _Units:
    alive = alive.cpu()
    if kind == "h" and group > 1:
        members = [torch.nonzero(row).flatten() + j * group for j, row in enumerate(heads_by_group(alive, group))]
        members = [m for m in members if m.numel()]
    else:
        members = [torch.tensor([j]) for j in torch.nonzero(alive).flatten().tolist()]

    def cost_of(m: torch.Tensor) -> float:
        hs, ns = list(heads_empty), list(neurons_empty)
        keep = torch.zeros_like(alive)
        keep[m] = True
        if kind == "h":
            hs[i] = keep
        else:
            ns[i] = keep
        return float(cm.count(hs, ns, hidden_keep) - const)

    if kind == "h" and group > 1:
        cost = torch.tensor([cost_of(m) for m in members], dtype=torch.float64)
    else:  # every alive head (MHA) or neuron of one site costs the same
        cost = torch.full((len(members),), cost_of(members[0]) if members else 0.0, dtype=torch.float64)
    g = grads.to(torch.float64)
    if not members:
        cols = g.new_zeros(g.shape[0], 0)
    elif kind == "h" and group > 1:
        cols = torch.stack([g[:, m].sum(1) for m in members], 1)
    else:
        cols = g[:, torch.cat(members)]
    return _Units(members, cost, cols.pow(2).sum(0), cols)


# ---------------------------------------------------------------------------------------------- phase 2: search
def search_structure(head_units: list[_Units], neuron_units: list[_Units], budget: float
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Kwon et al.'s head/neuron split search under an additive cost budget (phase 2).

    ``budget`` is what the blocks may cost (the target minus the count of the empty structure). Returns, per
    site, a boolean tensor over its units.
    """
    def flat(units: list[_Units]):
        f = torch.cat([u.fisher for u in units]) if units else torch.zeros(0, dtype=torch.float64)
        c = torch.cat([u.cost for u in units]) if units else torch.zeros(0, dtype=torch.float64)
        return f, c

    fh, ch = flat(head_units)
    fn, cn = flat(neuron_units)
    oh = torch.sort(fh, descending=True, stable=True).indices
    on = torch.sort(fn, descending=True, stable=True).indices
    zero = torch.zeros(1, dtype=torch.float64)
    cum_ch, cum_fh = torch.cat([zero, ch[oh].cumsum(0)]), torch.cat([zero, fh[oh].cumsum(0)])
    cum_cn, cum_fn = torch.cat([zero, cn[on].cumsum(0)]), torch.cat([zero, fn[on].cumsum(0)])
    rem = budget - cum_ch  # budget left for neurons with h top heads
    ok = rem >= 0
    n_fit = torch.searchsorted(cum_cn, rem.clamp_min(0), right=True) - 1  # largest n with cum_cn[n] <= rem
    score = cum_fh + cum_fn[n_fit]
    used = cum_ch + cum_cn[n_fit]
    best, best_key = 0, None
    for h in torch.nonzero(ok).flatten().tolist():
        key = (float(score[h]), float(used[h]))
        if best_key is None or key > best_key:
            best, best_key = h, key
    keep_h = torch.zeros(fh.numel(), dtype=torch.bool)
    keep_n = torch.zeros(fn.numel(), dtype=torch.bool)
    keep_h[oh[:best]] = True
    keep_n[on[: int(n_fit[best])]] = True
    # Fill the slack with any block that still fits, best Fisher per parameter first (beyond the reference).
    left = budget - float(used[best])
    cand = [(float(fh[j] / ch[j]) if ch[j] > 0 else math.inf, 0, j) for j in torch.nonzero(~keep_h).flatten().tolist()]
    cand += [(float(fn[j] / cn[j]) if cn[j] > 0 else math.inf, 1, j) for j in torch.nonzero(~keep_n).flatten().tolist()]
    cand.sort(key=lambda t: -t[0])
    for _, kind, j in cand:
        c = float(ch[j] if kind == 0 else cn[j])
        if c <= left:
            left -= c
            (keep_h if kind == 0 else keep_n)[j] = True

    def split(keep: torch.Tensor, units: list[_Units]) -> list[torch.Tensor]:
        return list(torch.split(keep, [len(u.members) for u in units])) if units else []

    return split(keep_h, head_units), split(keep_n, neuron_units)


# ---------------------------------------------------------------------------------------------- phase 3: rearrange
@torch.no_grad()
def rearrange_layer(keep: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Greedy re-choice of one layer's pruned set at a fixed size (phase 3).

    ``keep``: boolean over the layer's units; ``grads``: ``[rows, units]`` gradient rows. Minimises
    ``sum_rows (sum_{i pruned} g_row,i)^2`` greedily, as described in the module docstring.
    """
    n = keep.numel()
    p = n - int(keep.sum())
    if p == 0 or p == n:
        return keep.clone()
    g = grads.to(torch.float64)
    sq = g.pow(2).sum(0)
    order = torch.sort(sq, stable=True).indices.tolist()
    pruned = torch.zeros(n, dtype=torch.bool)
    pruned[order[:p]] = True
    s = g[:, pruned].sum(1)  # running sum of the pruned set's gradient columns
    for u in order[p:]:
        pruned[u] = True
        s = s + g[:, u]
        # ||s - g_j||^2 = ||s||^2 - 2 s.g_j + ||g_j||^2: drop the member j that leaves the smallest value
        score = (sq - 2.0 * (s @ g)).masked_fill(~pruned, math.inf)
        j = int(torch.argmin(score))
        pruned[j] = False
        s = s - g[:, j]
    return ~pruned


def _objective(keep: torch.Tensor, grads: torch.Tensor) -> float:
    return float(grads.to(torch.float64)[:, ~keep].sum(1).pow(2).sum())


# ---------------------------------------------------------------------------------------------- phase 4: tuning
class _Stop(Exception):
    """Raised by a capture hook to end a forward pass early."""


def _effective_weight(module: nn.Module) -> torch.Tensor:
    w = base_linear(module).weight.detach().float()
    if isinstance(module, APTLinear) and not module.disable_adapters and not module.merged:
        for name in module.active_adapters:
            if name in module.apt_A:
                w = w + module.delta_weight(name).detach().float()
    return w


def _adapter_active(module: nn.Module) -> bool:
    if not isinstance(module, APTLinear) or module.disable_adapters:
        return False
    return any(name in module.apt_B and bool(module.apt_B[name].detach().abs().sum() > 0)
               for name in module.active_adapters)


def _sum_points(apt: APTModel) -> tuple[list, list, list[tuple[str, int]], list[tuple[str, int]]]:
    """Where each site's residual sum is visible (the layout's ``attention_sums`` / ``ffn_sums``: module, 'in' =
    first input / 'out' = first output), the execution order (("a", i) = attention i, ("f", i) = FFN i) and which
    sites are in a decoder stack of an encoder-decoder model (for the choice of the token mask)."""
    lay = apt.layout
    if len(lay.attention_sums) != len(lay.attentions) or len(lay.ffn_sums) != len(lay.ffns):
        raise NotImplementedError(f"The {lay.family!r} architecture spec does not say where its residual sums are; "
                                  "mask tuning cannot run on it (pass tune_masks=False).")
    order, dec = [], []
    for stack in lay.layer_stacks():
        for att, ffn in stack.layers:
            sites = [("a", i) for i in att] + [("f", j) for j in ffn]
            order += sites
            if stack.name == "decoder":
                dec += sites
    return lay.attention_sums, lay.ffn_sums, order, dec


def _run_to(model: nn.Module, batch: dict, point: tuple[nn.Module, str], extra: Optional[nn.Module] = None
            ) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """Forward ``batch`` until ``point`` is reached; return the residual sum there (and ``extra``'s input/output)."""
    store: dict[str, Any] = {}
    handles = []
    if extra is not None:
        def grab(module, args, output):
            store["x"], store["y"] = args[0].detach(), output.detach()
        handles.append(extra.register_forward_hook(grab))
    module, where = point
    if where == "in":
        def stop_in(mod, args):
            store["sum"] = args[0].detach()
            raise _Stop
        handles.append(module.register_forward_pre_hook(stop_in))
    else:
        def stop_out(mod, args, output):
            store["sum"] = (output[0] if isinstance(output, (tuple, list)) else output).detach()
            raise _Stop
        handles.append(module.register_forward_hook(stop_out))
    try:
        model(**batch)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if "sum" not in store:
        raise RuntimeError("The forward pass never reached the residual sum of a pruned site; mask tuning does "
                           "not understand this model's layer structure (pass tune_masks=False).")
    return store["sum"], ((store["x"], store["y"]) if extra is not None else None)


def _set_masks(masks, values: tuple[list[torch.Tensor], list[torch.Tensor]]) -> None:
    with torch.no_grad():
        for i, v in enumerate(values[0]):
            masks.heads[i].copy_(v)
        for i, v in enumerate(values[1]):
            masks.neurons[i].copy_(v)


@torch.no_grad()
def tune_site_masks(apt: APTModel, batches: list[dict], kind: str, i: int, teacher, student, point,
                    decoder: bool, ridge: float = 1e-6, scale_range: tuple[float, float] = (1e-3, 10.0),
                    first_token_only: bool = False) -> bool:
    """Least-squares rescaling of one site's kept mask values (phase 4); returns whether it was applied.

    ``teacher`` / ``student``: ``(head values, neuron values)`` lists; ``student`` is updated in place.
    """
    lay, masks = apt.layout, apt.masks
    model = apt.model
    device = next(model.parameters()).device
    if kind == "a":
        site = lay.attentions[i]
        proj, dh, cur = site.o, site.head_dim, student[0][i]
    else:
        proj, dh, cur = lay.ffns[i].down, 1, student[1][i]
    kept = torch.nonzero(cur > 0).flatten()
    k = kept.numel()
    if k == 0:
        return False
    w = _effective_weight(proj)  # [d, in]
    hm = masks.hidden.detach().float().to(w.device)
    hm = None if bool((hm == 1).all()) else hm
    if kind == "a":
        w_units = w.view(w.shape[0], -1, dh)[:, kept.to(w.device)]  # [d, k, dh]
    else:
        w_units = w[:, kept.to(w.device)]  # [d, k]
        if hm is not None:
            w_units = w_units * hm[:, None]
        gram_w = (w_units.T @ w_units).double()
    ata = torch.zeros(k, k, dtype=torch.float64, device=w.device)
    atb = torch.zeros(k, dtype=torch.float64, device=w.device)
    for batch in batches:
        batch = _to(batch, device)
        _set_masks(masks, teacher)
        t_sum, _ = _run_to(model, batch, point)
        _set_masks(masks, student)
        s_sum, cap = _run_to(model, batch, point, extra=proj)
        x = cap[0]
        valid = None
        key = "decoder_attention_mask" if decoder else "attention_mask"
        am = batch.get(key)
        if isinstance(am, torch.Tensor) and tuple(am.shape) == tuple(x.shape[:2]):
            valid = am.bool()
        if first_token_only:
            valid = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
            valid[:, 0] = True
        x = x.float().reshape(-1, x.shape[-1]) if valid is None else x.float()[valid]
        delta = (t_sum.float() - s_sum.float())
        delta = delta.reshape(-1, delta.shape[-1]) if valid is None else delta[valid]
        if kind == "a":
            ctx = x.view(x.shape[0], -1, dh)[:, kept.to(x.device)]  # [N, k, dh]
            a = torch.einsum("nkc,dkc->knd", ctx, w_units)  # [k, N, d]
            if hm is not None:
                a = a * hm
            target = a.sum(0) + delta
            ata += torch.einsum("knd,jnd->kj", a, a).double()
            atb += torch.einsum("knd,nd->k", a, target).double()
        else:
            hval = x[:, kept.to(x.device)]  # [N, k]
            target = hval @ w_units.T + delta  # [N, d]
            ata += gram_w * (hval.T @ hval).double()
            atb += ((target @ w_units) * hval).sum(0).double()
    _set_masks(masks, student)
    eye = torch.eye(k, dtype=torch.float64, device=ata.device)
    lam = ridge * float(ata.diagonal().mean().clamp_min(1e-30))
    try:
        s = torch.linalg.solve(ata + lam * eye, atb)
    except RuntimeError:
        s = torch.linalg.lstsq(ata + lam * eye, atb.unsqueeze(1)).solution.squeeze(1)
    if not bool(torch.isfinite(s).all()):
        return False
    s = s.clamp(scale_range[0], scale_range[1])
    ones = torch.ones_like(s)

    def objective(v: torch.Tensor) -> float:
        return float(v @ ata @ v - 2.0 * (v @ atb))

    if not objective(s) < objective(ones):
        return False
    new = cur.clone()
    new[kept] = new[kept] * s.to(new.device, new.dtype)
    cur.copy_(new)
    _set_masks(masks, student)
    return True


# ---------------------------------------------------------------------------------------------- driver
def fisher_prune(model: nn.Module, dataloader: Iterable, target_density: float, num_samples: int = 2048,
                 rearrange: bool = True, tune_masks: bool = True, *, fisher_granularity: str = "batch",
                 tune_samples: Optional[int] = None, scale_range: tuple[float, float] = (1e-3, 10.0),
                 ridge: float = 1e-6) -> dict[str, Any]:
    """Retraining-free head/neuron pruning of an APT-wrapped model (Kwon et al. 2022; spec I "LoRA+Prune").

    Args:
        model: a PeftModel / APTModel with APT masks (``peft.get_peft_model(merged, apt_hf.APTConfig(...))``).
        dataloader: labelled training batches (dicts the model accepts, with ``labels``); only the first
            ``num_samples`` examples are read, once, and reused for every phase.
        target_density: kept fraction of the spec B.3 count of the original model (``apt.n_params``), in (0, 1].
        num_samples: examples for the Fisher information (reference: 2048).
        rearrange: run the per-layer greedy mask rearrangement (phase 3).
        tune_masks: run the least-squares mask tuning (phase 4); mask values of kept blocks may leave 1.
        fisher_granularity: ``"batch"`` (one gradient row per batch, reference code) or ``"example"`` (paper).
        tune_samples: examples (the first ones of the sample) used for mask tuning; ``None`` = all of them.
        scale_range: clamp of the tuning scales (see module docstring).
        ridge: relative ridge of the least-squares solves.

    Returns a report: ``time_fisher_s``, ``time_search_s``, ``time_rearrange_s``, ``time_tune_s``,
    ``time_total_s``, ``num_samples``, ``kept_heads`` / ``kept_neurons`` (totals), ``total_heads`` /
    ``total_neurons`` (candidates before pruning), their per-layer lists, ``budget``, ``count`` (B.3),
    ``n_params``, ``density`` (``count / n_params``), ``rearranged_blocks`` (blocks moved by phase 3),
    ``tuned_sites`` / ``rejected_sites``, ``head_fisher`` / ``neuron_fisher`` (per-site CPU tensors).

    Raises:
        ValueError: no APT masks; a target outside (0, 1]; a target below the count of the structure without any
            head or neuron ("impossible"); batches without labels.
        NotImplementedError: mask tuning on an architecture whose residual sums it cannot locate.
    """
    t0 = time.perf_counter()
    apt = find_apt_model(model)
    if not isinstance(target_density, (int, float)) or not math.isfinite(target_density) \
            or not 0.0 < float(target_density) <= 1.0:
        raise ValueError(f"target_density={target_density!r} must be a fraction in (0, 1] of the original "
                         "model's parameter count (0.4 keeps 40 %).")
    masks, lay, cm = apt.masks, apt.layout, apt.count_model()
    hidden = masks.hidden
    if bool(((hidden > 0) & (hidden < 1)).any()):
        raise ValueError("The hidden-dimension mask holds fractional values; set it to 0/1 before fisher_prune.")
    hidden_keep = (hidden > 0).cpu()
    alive_h = [(m > 0).cpu() for m in masks.heads]
    alive_n = [(m > 0).cpu() for m in masks.neurons]
    heads_empty = [torch.zeros_like(a) for a in alive_h]
    neurons_empty = [torch.zeros_like(a) for a in alive_n]
    const = int(cm.count(heads_empty, neurons_empty, hidden_keep))
    budget = float(target_density) * float(apt.n_params)
    if const > budget:
        raise ValueError(f"target is impossible: target_density={target_density} allows {budget:.0f} parameters, "
                         f"but the structure without any head or neuron (embedding-side norms, biases, kept hidden "
                         f"dimensions) already counts {const} (density {const / apt.n_params:.4f}); raise the "
                         "target (fisher_prune never prunes hidden dimensions).")
    if tune_masks:
        for s in lay.attentions:
            if _adapter_active(s.o):
                raise ValueError("An attention output projection carries an APT adapter with non-zero B; export would "
                                 "not fold tuned mask values into it. Leave output projections out of target_modules "
                                 "or pass tune_masks=False.")
        for f in lay.ffns:
            if _adapter_active(f.down):
                raise ValueError("An FFN down projection carries an APT adapter with non-zero B; export would not "
                                 "fold tuned mask values into it. Leave down projections out of target_modules or "
                                 "pass tune_masks=False.")
    teacher = ([m.detach().clone() for m in masks.heads], [m.detach().clone() for m in masks.neurons])
    batches = take_samples(dataloader, num_samples)
    used = sum(_batch_size(b) for b in batches)

    # 1. Fisher information
    t = time.perf_counter()
    head_grads, neuron_grads = collect_mask_grads(model, batches, fisher_granularity)
    time_fisher = time.perf_counter() - t

    # 2. search
    t = time.perf_counter()
    head_units = [_site_units("h", i, alive_h[i], head_grads[i], cm.group_size[i], cm, const, heads_empty,
                              neurons_empty, hidden_keep) for i in range(len(alive_h))]
    neuron_units = [_site_units("n", i, alive_n[i], neuron_grads[i], 1, cm, const, heads_empty, neurons_empty,
                                hidden_keep) for i in range(len(alive_n))]
    keep_h, keep_n = search_structure(head_units, neuron_units, budget - const)
    time_search = time.perf_counter() - t

    # 3. rearrangement (per layer, per block type, fixed pruned count)
    t = time.perf_counter()
    moved = 0
    if rearrange:
        for units, keeps in ((head_units, keep_h), (neuron_units, keep_n)):
            for j, (u, k) in enumerate(zip(units, keeps)):
                if k.numel() < 2 or u.cost.numel() == 0 or not bool((u.cost == u.cost[0]).all()):
                    continue
                new = rearrange_layer(k, u.grads)
                if _objective(new, u.grads) <= _objective(k, u.grads):
                    moved += int((new & ~k).sum())
                    keeps[j] = new
    time_rearrange = time.perf_counter() - t

    def to_mask(alive: torch.Tensor, units: _Units, keep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        m = torch.zeros(alive.numel(), dtype=like.dtype)
        chosen = [mem for mem, kk in zip(units.members, keep.tolist()) if kk]
        if chosen:
            m[torch.cat(chosen)] = 1.0
        return m.to(like.device)

    student = ([to_mask(alive_h[i], head_units[i], keep_h[i], masks.heads[i]) for i in range(len(alive_h))],
               [to_mask(alive_n[i], neuron_units[i], keep_n[i], masks.neurons[i]) for i in range(len(alive_n))])
    _set_masks(masks, student)
    count = int(apt.count_params())
    if count > budget:  # cannot happen with exact additive costs; guard against a count model change
        raise RuntimeError(f"internal error: searched structure counts {count} > budget {budget:.0f}.")

    # 4. mask tuning
    t = time.perf_counter()
    tuned, rejected = 0, []
    if tune_masks:
        att_pts, ffn_pts, order, dec = _sum_points(apt)
        # BERT-style classifiers read only the first token of the last layer (reference: ``cls_only``)
        cls_last = lay.spec.first_token_classifier and type(apt.model).__name__.endswith("ForSequenceClassification")
        tune_batches = batches if tune_samples is None else take_samples(batches, tune_samples)
        was_training = model.training
        model.eval()
        try:
            for kind, i in order:
                point = att_pts[i] if kind == "a" else ffn_pts[i]
                if tune_site_masks(apt, tune_batches, kind, i, teacher, student, point, (kind, i) in dec,
                                   ridge=ridge, scale_range=scale_range,
                                   first_token_only=cls_last and (kind, i) == order[-1]):
                    tuned += 1
                elif bool(((student[0][i] if kind == "a" else student[1][i]) > 0).any()):
                    rejected.append(f"{'attention' if kind == 'a' else 'ffn'}[{i}]")
        finally:
            _set_masks(masks, student)
            model.train(was_training)
    time_tune = time.perf_counter() - t

    count = int(apt.count_params())
    return {
        "time_fisher_s": time_fisher, "time_search_s": time_search, "time_rearrange_s": time_rearrange,
        "time_tune_s": time_tune, "time_total_s": time.perf_counter() - t0,
        "num_samples": used, "fisher_granularity": fisher_granularity,
        "kept_heads": int(sum(int((m > 0).sum()) for m in masks.heads)),
        "kept_neurons": int(sum(int((m > 0).sum()) for m in masks.neurons)),
        "total_heads": int(sum(int(a.sum()) for a in alive_h)),
        "total_neurons": int(sum(int(a.sum()) for a in alive_n)),
        "kept_heads_per_layer": [int((m > 0).sum()) for m in masks.heads],
        "kept_neurons_per_layer": [int((m > 0).sum()) for m in masks.neurons],
        "budget": budget, "count": count, "n_params": int(apt.n_params), "density": count / apt.n_params,
        "target_density": float(target_density), "rearranged_blocks": moved,
        "tuned_sites": tuned, "rejected_sites": rejected,
        "head_fisher": [g.pow(2).sum(0) for g in head_grads],
        "neuron_fisher": [g.pow(2).sum(0) for g in neuron_grads],
    }
