"""Self-distillation pieces (spec F, K.7): losses, teacher-layer sampling and mapping, the shared-weight teacher.

The teacher is the student's own frozen backbone with a frozen snapshot of the trainable tensors (adapter
factors, task head, ``Tr``): during the teacher's forward pass the snapshot is swapped into the trainable
parameters' storage and swapped back afterwards, so the backbone is never copied (spec F.1, J.11).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .arch import Layout
from .layer import APTLinear, ParamChange
from .masks import APTMasks


# ---------------------------------------------------------------------------------------------- losses
def prediction_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                    token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``T^2 KL(p_t || p_s)`` (spec F.3).

    For ``(batch, classes)`` logits the KL is averaged over the batch; for ``(batch, tokens, vocab)`` logits it is
    averaged over the tokens where ``token_mask`` is true (the per-target-length form of seq2seq and causal LMs).
    A regression head (``(batch, 1)`` outputs, e.g. STS-B) has no distribution to match: a softmax over one output is
    1, so the KL would be 0 whatever the outputs. There the loss is the mean squared error between the student's and
    the teacher's outputs (beyond spec F.3, which names only the KL).
    """
    if student_logits.dim() == 2 and student_logits.shape[-1] == 1:
        return F.mse_loss(student_logits.float(), teacher_logits.float())
    t = temperature
    log_ps = F.log_softmax(student_logits.float() / t, dim=-1)
    log_pt = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    if kl.dim() > 1 and token_mask is not None:
        mask = token_mask.to(kl.dtype)
        return t * t * (kl * mask).sum() / mask.sum().clamp_min(1.0)
    return t * t * kl.mean()


def prediction_logits(output) -> list[torch.Tensor]:
    """The logits the prediction loss compares (spec F.3): ``logits``, or for extractive QA the start and the end
    logits (the loss is then the mean of their two KL terms)."""
    logits = getattr(output, "logits", None)
    if logits is not None:
        return [logits]
    spans = [getattr(output, name, None) for name in ("start_logits", "end_logits")]
    if all(s is not None for s in spans):
        return spans
    raise ValueError(f"{type(output).__name__} has neither `logits` nor `start_logits`/`end_logits`; APT's "
                     "prediction-distillation loss cannot compare it (set APTConfig.distill_pred_weight=0).")


def gives_one_answer(logits: torch.Tensor, tolerance: float = 1e-6) -> bool:
    """Whether a batch of sequence-level outputs is a constant prediction (beyond spec F.1,
    ``APTConfig.skip_constant_teacher``): every example gets the same class (``[batch, classes]``) or the same score
    (regression, ``[batch, 1]``). Per-token logits (``[batch, tokens, vocab]``) and a batch of one are never judged."""
    if logits.dim() != 2 or logits.shape[0] < 2:
        return False
    if logits.shape[1] == 1:
        return bool((logits.max() - logits.min()).abs() <= tolerance)
    answers = logits.argmax(dim=-1)
    return bool((answers == answers[0]).all())


def next_token_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions of causal-LM logits that predict a target token: position ``i`` predicts label ``i + 1``, so the
    mask is ``labels[:, 1:] != -100`` shifted left by one (the last position predicts nothing)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


def sample_teacher_layers(num_layers: int, num_blocks: int, generator: Optional[torch.Generator] = None) -> list[int]:
    """One layer drawn uniformly from each of ``num_blocks`` contiguous blocks of the layers (spec F.3)."""
    if num_layers <= 0:
        return []
    blocks = min(num_blocks, num_layers)
    edges = [round(i * num_layers / blocks) for i in range(blocks + 1)]
    return [int(torch.randint(lo, hi, (1,), generator=generator)) for lo, hi in zip(edges[:-1], edges[1:])]


def layer_candidates(teacher_layer: int, alive: Sequence[bool]) -> list[int]:
    """Student layers teacher layer ``i`` may map to (spec F.3 "mapping"): ``i`` if it survives, otherwise the
    nearest surviving layers below and above (the caller keeps the one with the smaller MSE)."""
    if alive[teacher_layer]:
        return [teacher_layer]
    below = next((j for j in range(teacher_layer - 1, -1, -1) if alive[j]), None)
    above = next((j for j in range(teacher_layer + 1, len(alive)) if alive[j]), None)
    return [j for j in (below, above) if j is not None]


def layer_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
               teacher_layers: Sequence[int], alive: Sequence[bool], transform: nn.Module,
               normalize: bool = False) -> torch.Tensor:
    """``sum_i MSE(Tr(h_s^{phi(i)}), h_t^i)`` over the drawn teacher layers (spec F.3, F.4)."""
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    for i in teacher_layers:
        target = teacher_hidden[i].float()
        if normalize:
            target = _rms_normalize(target)
        losses = []
        for j in layer_candidates(i, alive):
            h = transform(student_hidden[j])
            losses.append(F.mse_loss((_rms_normalize(h.float()) if normalize else h.float()), target))
        if losses:
            total = total + min(losses, key=lambda v: float(v.detach()))
    return total


def _rms_normalize(h: torch.Tensor) -> torch.Tensor:
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


def alive_layers(layout: Layout, masks: Optional[APTMasks] = None) -> dict[str, list[bool]]:
    """Per stack, whether each layer still has heads in every attention and neurons in its FFN (spec F.3).

    With ``masks``, a block counts only if its mask is > 0, so a layer whose blocks are all zero-masked but still
    physically present (held back during distillation) is not alive."""
    if masks is None:
        att = [s.num_heads > 0 for s in layout.attentions]
        ffn = [f.num_neurons > 0 for f in layout.ffns]
    else:
        att = [bool((m > 0).any()) for m in masks.heads]
        ffn = [bool((m > 0).any()) for m in masks.neurons]
    return {stack.name: [all(att[i] for i in a) and all(ffn[j] for j in f) for a, f in stack.layers]
            for stack in layout.layer_stacks()}


def make_transform(hidden: int, rank: int, scaling: float, device=None, dtype=None) -> APTLinear:
    """``Tr``: a frozen identity ``d x d`` map plus a trainable LoRA (``B = 0``, so ``Tr(x) = x`` at start; F.4)."""
    base = nn.Linear(hidden, hidden, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(torch.eye(hidden, device=device, dtype=dtype))
    base.weight.requires_grad_(False)
    return APTLinear(base, "default", r=rank, scaling=scaling)


# ---------------------------------------------------------------------------------------------- snapshots
class ParamSnapshot:
    """Frozen copies of a set of parameters (by identity), carried across physical pruning (spec F.1, F.2)."""

    def __init__(self) -> None:
        self.snapshot: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}

    @property
    def ready(self) -> bool:
        return bool(self.snapshot)

    def take(self, params: Sequence[nn.Parameter]) -> None:
        """Copy the current values of ``params``."""
        self.snapshot = {id(p): (p, p.detach().clone()) for p in params}

    def clear(self) -> None:
        self.snapshot = {}

    def restore(self) -> list[nn.Parameter]:
        """Copy the saved values back into their parameters (same shapes required); returns those parameters."""
        restored = []
        with torch.no_grad():
            for param, value in self.snapshot.values():
                if param.shape != value.shape:
                    raise RuntimeError(f"cannot restore a snapshot of shape {tuple(value.shape)} into a parameter of "
                                       f"shape {tuple(param.shape)}: the structure changed since it was taken.")
                param.copy_(value)
                restored.append(param)
        return restored

    def follow(self, changes: Sequence[ParamChange]) -> None:
        """Carry the snapshot across physical pruning: slice dims that were selected; ignore rank growth."""
        for change in changes:
            entry = self.snapshot.pop(id(change.old), None)
            if entry is None:
                continue
            value = entry[1]
            for dim, index in enumerate(change.index):
                if index is None or value.dim() <= dim:
                    continue
                if value.shape[dim] == change.old.shape[dim] and change.new.shape[dim] == len(index):
                    value = value.index_select(dim, index.to(value.device))
            self.snapshot[id(change.new)] = (change.new, value)

    def state_dict(self, names: dict[int, str]) -> dict[str, torch.Tensor]:
        return {names[i]: v for i, (_, v) in self.snapshot.items() if i in names}

    def load_state_dict(self, state: dict[str, torch.Tensor], params: dict[str, nn.Parameter]) -> None:
        """Load a saved snapshot by parameter name; names or shapes this model cannot hold are refused."""
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise ValueError(f"The saved distillation snapshot has tensors for {unknown[:5]} (and {len(unknown)} in "
                             "all) that this model does not have; it was saved from another model.")
        for n, v in state.items():
            if v.dim() != params[n].dim() or any(a > b for a, b in zip(v.shape, params[n].shape)):
                raise ValueError(f"The saved distillation snapshot's {n} has shape {tuple(v.shape)}, larger than this "
                                 f"model's {tuple(params[n].shape)} (a snapshot may only lag behind in rank); it was "
                                 "saved from another model.")
        self.snapshot = {id(params[n]): (params[n], v.to(params[n].device)) for n, v in state.items()}


class Teacher(ParamSnapshot):
    """The self-distillation teacher (spec F.1): a frozen snapshot of the trainable tensors of a model that shares
    its frozen backbone, or, once detached, a frozen mask-free copy of the model with that snapshot in it."""

    def __init__(self) -> None:
        super().__init__()
        self.refreshes = 0
        self.model: Optional[nn.Module] = None  # the detached copy
        self.names: list[str] = []  # its parameters that hold the snapshot (trainable in the student)

    @property
    def ready(self) -> bool:
        return bool(self.snapshot) or self.model is not None

    def refresh(self, params: Sequence[nn.Parameter]) -> None:
        """Copy the current values of ``params`` (the trainable tensors) as the new teacher."""
        self.model, self.names = None, []
        self.take(params)
        self.refreshes += 1

    def detach(self, copy: nn.Module, names: dict[int, str]) -> None:
        """Move the teacher into ``copy``: a mask-free deep copy of the model (see ``APTModel.mask_free_copy``) taken
        while it still holds every block the teacher was snapshotted with. The snapshot goes into the copy's
        parameters, which are frozen; the student may then drop the blocks only the teacher needed."""
        params = dict(copy.named_parameters())
        self.names = [names[i] for i in self.snapshot]
        for i, (_, value) in self.snapshot.items():
            params[names[i]].data = value
        self.model = copy.requires_grad_(False).eval()
        self.snapshot = {}

    def release(self) -> None:
        """Drop the teacher (end of distillation)."""
        self.model, self.names, self.snapshot = None, [], {}

    def state_dict(self, names: dict[int, str]) -> dict[str, torch.Tensor]:
        if self.model is None:
            return super().state_dict(names)
        params = dict(self.model.named_parameters())
        return {n: params[n].detach() for n in self.names}

    def structure(self) -> Optional[dict[str, torch.Tensor]]:
        """The detached copy's mask buffers (its record of kept original positions, ``kept_*``, with the masks that
        record is checked against); ``None`` if attached."""
        from .model import find_apt_model  # (model.py imports this module)

        if self.model is None:
            return None
        return {k: v.clone() for k, v in find_apt_model(self.model).masks.state_dict().items()}

    def rebuild(self, root: nn.Module, structure: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
        """Re-create a detached teacher when training resumes: copy ``root`` (still the unpruned model), prune the
        copy to ``structure`` and load the teacher's tensors ``values`` (by parameter name)."""
        from .model import find_apt_model

        copy = find_apt_model(root).mask_free_copy(root)
        copy_apt = find_apt_model(copy)
        try:
            copy_apt.restore_structure({f"apt_masks.{k}": v for k, v in structure.items()})
        except ValueError as err:
            raise ValueError(f"Cannot rebuild the detached distillation teacher: {err} Resume from a fresh "
                             "(unpruned) base model with the APT adapter added, as apt_hf.APTTrainer "
                             "expects.") from None
        params = dict(copy.named_parameters())
        self.names = list(values)
        for name, value in values.items():
            params[name].data = value.to(params[name].device, params[name].dtype)
        self.model = copy.requires_grad_(False).eval()
        self.snapshot = {}

    def outputs(self, model: nn.Module, masks: APTMasks, inputs: dict):
        """The teacher's forward pass on ``inputs`` (no grad, eval mode, hidden states returned)."""
        if self.model is not None:
            with torch.no_grad():
                return self.model(**inputs, output_hidden_states=True)
        was = model.training
        model.eval()
        try:
            with torch.no_grad(), self.active(masks):
                return model(**inputs, output_hidden_states=True)
        finally:
            model.train(was)

    @contextlib.contextmanager
    def active(self, masks: Optional[APTMasks] = None) -> Iterator[None]:
        """Swap the snapshot into the parameters (and bypass the masks) for the teacher's forward pass."""
        saved = []
        for param, value in self.snapshot.values():
            saved.append((param, param.data))
            param.data = value.to(param.device, param.dtype)
        previous = masks.bypass if masks is not None else False
        if masks is not None:
            masks.bypass = True
        try:
            yield
        finally:
            for param, data in saved:
                param.data = data
            if masks is not None:
                masks.bypass = previous


def default_pred_weight(task: str) -> float:
    """``a_pred`` per task family (spec F.3): 1.0 for classification/QA, 0.1 for seq2seq and causal LMs."""
    task = getattr(task, "value", task)  # peft.TaskType: str() gives 'TaskType.CAUSAL_LM' on Python >= 3.11
    return 0.1 if task in ("SEQ_2_SEQ_LM", "CAUSAL_LM") else 1.0


__all__ = ["ParamSnapshot", "Teacher", "alive_layers", "default_pred_weight", "gives_one_answer", "layer_candidates",
           "layer_loss", "make_transform", "next_token_mask", "prediction_logits", "prediction_loss",
           "sample_teacher_layers"]
