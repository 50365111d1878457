"""Step schedules of APT: pruning events, density targets, adapter budget, distillation weight, mask moves.

Every function here is pure (no model, no global state).  Steps are optimizer steps
(spec K.8).  Section references are to ``APT_SPEC.md``:

* D.2 -- event steps and the cubic density target with a warm-up plateau;
* D.3 -- the mask-decay window before each event;
* D.1 step 5 -- the +/- ``decay`` mask move and the hard 0/1 at the event;
* E.2 -- the linear adapter-parameter budget;
* F.3 -- the distillation weight ``mu``;
* F.2 -- the learning-rate factor of the post-distillation fine-tuning;
* :func:`resolve_plan` -- all of the above turned into concrete steps for one run (:class:`Plan`);
* :func:`gated_plan`, :func:`gate_opens` -- beyond the spec: the plan moved later until the dev metric shows that the
  model has started to learn (``APTConfig.pruning_start_gate``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import TYPE_CHECKING, Optional, Union

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .config import APTConfig

__all__ = [
    "pruning_event_steps",
    "target_density",
    "adapter_budget",
    "distill_mu",
    "post_distill_lr_factor",
    "decay_window_start",
    "mask_step",
    "Plan",
    "resolve_plan",
    "gated_plan",
    "gate_opens",
]

# Longest automatic mask-decay window (spec D.3: the reference moves masks during the 200 steps before an event).
MAX_AUTO_DECAY_WINDOW = 200


def _check_window(start: int, end: int) -> None:
    if start < 0:
        raise ValueError(f"start must be >= 0 (got {start}); pass the first step of the pruning window.")
    if end <= start:
        raise ValueError(
            f"end must be greater than start (got start={start}, end={end}); "
            "make the pruning window at least one step long."
        )


def pruning_event_steps(start: int, end: int, num_events: int) -> list[int]:
    """Steps at which pruning/tuning events happen (spec D.2).

    This is the integer-truncated ``linspace(start, end, num_events + 1)`` with its first
    point (``start`` itself) dropped, so exactly ``num_events`` steps are returned and the
    last one is ``end``.  The points are computed in exact integer arithmetic,
    ``start + floor(k * (end - start) / num_events)`` for ``k = 1 .. num_events``.  This is
    the mathematically exact truncation; ``int(numpy.linspace(...))`` (the reference code)
    can be one step lower in rare cases where its float result lands just below an integer
    (e.g. 64405.99999999999), never for the SST-2 / MNLI schedules.

    Example (SST-2, spec D.2): ``pruning_event_steps(200, 6315, 10)`` gives
    ``[811, 1423, 2034, 2646, 3257, 3869, 4480, 5092, 5703, 6315]``.

    Raises:
        ValueError: if ``start < 0``, ``end <= start`` or ``num_events < 1``.
    """
    _check_window(start, end)
    if num_events < 1:
        raise ValueError(f"num_events must be >= 1 (got {num_events}); ask for at least one pruning event.")
    span = end - start
    return [start + (k * span) // num_events for k in range(1, num_events + 1)]


def target_density(step: int, *, start: int, end: int, warmup_steps: int, final_density: float,
                   initial_density: float = 1.0) -> float:
    """Target density (fraction of parameters kept) at ``step`` (spec D.2, J.1, D.6).

    ``rho(t) = min(rho_0, rho_T + (rho_0 - rho_T) * ((end - t) / (end - t_w)) ** 3)`` with
    ``t_w = start + warmup_steps``.  Returns exactly ``initial_density`` (``rho_0``) for ``step <= t_w``
    (the warm-up plateau) and exactly ``final_density`` for ``step >= end``.  ``rho_0`` is 1, or the
    density reached by pre-tuning pruning (spec D.6: the cubic schedule then starts from it).

    Raises:
        ValueError: if ``start < 0``, ``warmup_steps < 0``, ``final_density`` is not in
            ``(0, 1]``, ``initial_density`` is not in ``[final_density, 1]``, or
            ``end <= start + warmup_steps`` (the warm-up would swallow the whole pruning
            window, leaving no step at which density can decrease).
    """
    if start < 0:
        raise ValueError(f"start must be >= 0 (got {start}); pass the first step of the pruning window.")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0 (got {warmup_steps}); use 0 for no sparsity warm-up.")
    if not (0.0 < final_density <= 1.0) or math.isnan(final_density):
        raise ValueError(
            f"final_density must be in (0, 1] (got {final_density}); it is the fraction of "
            "parameters KEPT, e.g. 0.4 for 60% sparsity."
        )
    if not final_density - 1e-9 <= initial_density <= 1.0:
        raise ValueError(
            f"initial_density must be in [final_density, 1] (got {initial_density} with final_density "
            f"{final_density}); pre-tuning pruning cannot go below the final target."
        )
    t_w = start + warmup_steps
    if end <= t_w:
        raise ValueError(
            f"end ({end}) must be greater than start + warmup_steps ({start} + {warmup_steps} = {t_w}); "
            "shorten the sparsity warm-up or extend the pruning window."
        )
    if step <= t_w:
        return float(initial_density)
    if step >= end:
        return float(final_density)
    remaining = (end - step) / (end - t_w)
    return min(initial_density, final_density + max(0.0, initial_density - final_density) * remaining**3)


def adapter_budget(step: int, *, start: int, end: int, initial: int, ratio: float) -> int:
    """Adapter-parameter budget ``Delta(t)`` at ``step`` (spec E.2).

    Linear from ``initial`` at ``start`` to ``ratio * initial`` at ``end``, constant
    outside ``[start, end]``; the floor of the exact value is returned.  For RoBERTa SST-2
    (``initial = 663552``, ``ratio = 4``) the values at the ten events are about 1.30, 1.60,
    ..., 4.00 times ``initial``.

    Raises:
        ValueError: if ``start < 0``, ``end <= start``, ``initial < 0`` or ``ratio`` is not a
            positive finite number.
    """
    _check_window(start, end)
    if initial < 0:
        raise ValueError(f"initial must be >= 0 (got {initial}); pass the initial number of adapter parameters.")
    if not math.isfinite(ratio) or ratio <= 0:
        raise ValueError(f"ratio must be a positive finite number (got {ratio}); the paper uses 4.0.")
    frac = Fraction(min(max(step, start), end) - start, end - start)
    value = initial * (1 + (Fraction(ratio) - 1) * frac)
    return math.floor(value)


def distill_mu(step: int, *, start: int, end: int, cap: float = 1.0) -> float:
    """Distillation weight ``mu = min(cap, max(0, (t - t_s) / (t_e - t_s)))`` (spec F.3, where ``cap`` is 1).

    The total loss is ``mu * L_distill + (1 - mu) * L_task``; ``mu`` rises linearly over the
    pruning window and stays at ``cap`` afterwards (``APTConfig.distill_mu_max``).

    Raises:
        ValueError: if ``start < 0``, ``end <= start`` or ``cap`` is not in (0, 1].
    """
    _check_window(start, end)
    if not 0.0 < cap <= 1.0:
        raise ValueError(f"cap must be in (0, 1] (got {cap}); 1.0 is the paper's ramp.")
    return min(cap, max(0.0, (step - start) / (end - start)))


def post_distill_lr_factor(step: int, *, end: int, total: int, warmup_ratio: float = 0.06) -> float:
    """Learning-rate factor (of the peak) for optimizer step ``step`` after distillation (spec F.2).

    The post-distillation phase is steps ``end + 1 .. total``, ``P = total - end`` of them, and gets a fresh
    schedule: linear warm-up over ``W = ceil(warmup_ratio * P)`` steps, then linear decay to 0, i.e. transformers'
    ``get_linear_schedule_with_warmup`` evaluated at ``c = step - end - 1``: ``c / W`` while ``c < W``, then
    ``(P - c) / (P - W)``.  The caller multiplies by the peak rate and ``post_distill_lr_ratio``.

    Raises:
        ValueError: if ``step`` is not in ``end + 1 .. total`` or ``warmup_ratio`` is not in ``[0, 1)``.
    """
    if not end < step <= total:
        raise ValueError(f"step {step} is outside the post-distillation phase (steps {end + 1} to {total}).")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1) (got {warmup_ratio}); the reference uses 0.06.")
    phase, c = total - end, step - end - 1
    warmup = math.ceil(warmup_ratio * phase)
    if c < warmup:
        return c / warmup
    return max(0.0, (phase - c) / (phase - warmup))


def decay_window_start(event_step: int, previous_event_step: int | None, window: int, first_start: int) -> int:
    """First step of the mask-decay window that precedes ``event_step`` (spec D.3).

    Masks move during the last ``window`` steps before each event, but a window never
    opens before the previous event (or, for the first event, before ``first_start``, the
    start of the pruning window): ``max(event_step - window, previous_event_step or first_start)``.

    Raises:
        ValueError: if ``window < 0``, if ``previous_event_step >= event_step``, or if
            ``first_start > event_step`` (the window would open after its own event).
    """
    if window < 0:
        raise ValueError(f"window must be >= 0 (got {window}); the reference uses 200 steps.")
    if previous_event_step is not None:
        if previous_event_step >= event_step:
            raise ValueError(
                f"previous_event_step ({previous_event_step}) must be smaller than event_step ({event_step}); "
                "pass the events in increasing order."
            )
        floor = previous_event_step
    else:
        if first_start > event_step:
            raise ValueError(
                f"first_start ({first_start}) must not exceed event_step ({event_step}); "
                "the first event must lie inside the pruning window."
            )
        floor = first_start
    return max(event_step - window, floor)


def mask_step(mask: torch.Tensor, keep: torch.Tensor, decay: float, hard: bool) -> torch.Tensor:
    """One mask move towards the kept set (spec D.1 step 5).

    Kept entries become ``min(1, m + decay)``, the others ``max(0, m - decay)``.  With
    ``hard=True`` (the last update before an event) kept entries become exactly 1 and the
    others exactly 0.  Returns a new tensor with ``mask``'s dtype and device; ``mask`` is
    not modified.

    Raises:
        ValueError: if ``keep`` is not a bool tensor of ``mask``'s shape, or ``decay`` is
            negative or not finite.
    """
    if keep.dtype != torch.bool:
        raise ValueError(f"keep must be a bool tensor (got dtype {keep.dtype}); pass e.g. `scores > threshold`.")
    if keep.shape != mask.shape:
        raise ValueError(
            f"keep has shape {tuple(keep.shape)} but mask has shape {tuple(mask.shape)}; they must match."
        )
    if not math.isfinite(decay) or decay < 0:
        raise ValueError(f"decay must be a finite number >= 0 (got {decay}); the reference uses 0.01.")
    keep = keep.to(mask.device)
    if hard:
        return keep.to(mask.dtype)
    up = torch.clamp(mask + decay, max=1.0)
    down = torch.clamp(mask - decay, min=0.0)
    return torch.where(keep, up, down).to(mask.dtype)


def as_steps(value: Union[int, float], total: int) -> int:
    """A schedule setting as optimizer steps: an int is a step count, a float a fraction of ``total``."""
    return int(round(value * total)) if isinstance(value, float) else int(value)


def auto_decay_window(start: int, end: int, num_events: int) -> int:
    """Default mask-decay window: half the steps between two events, at most 200 (spec D.3's value), so masks
    move gradually in any run length and the window never reaches back to the previous event."""
    return min(MAX_AUTO_DECAY_WINDOW, (end - start) // num_events // 2)


@dataclass(frozen=True)
class Plan:
    """The pruning and distillation schedule of one run, in optimizer steps (spec D.2, D.3, F.2)."""

    start: int
    end: int
    warmup: int
    events: tuple[int, ...]
    windows: tuple[int, ...]  # first step of the mask-decay window before each event
    final_density: float
    initial_density: float = 1.0  # below 1 after pre-tuning pruning (spec D.6)
    # Distillation runs over steps [distill_start, distill_end) (spec F.2); None when the run does not distil.
    distill_start: Optional[int] = None
    distill_end: Optional[int] = None

    def target(self, step: int) -> float:
        return target_density(step, start=self.start, end=self.end, warmup_steps=self.warmup,
                              final_density=self.final_density, initial_density=self.initial_density)

    def prunes(self, step: int) -> bool:
        """Whether the event at ``step`` prunes: its target is below the density training starts from."""
        return self.target(step) < self.initial_density

    @property
    def first_real_event(self) -> Optional[int]:
        """The first event that prunes (None if nothing is pruned)."""
        return next((e for e in self.events if self.prunes(e)), None)


def resolve_plan(cfg: APTConfig, max_steps: int, distill: bool = True) -> Plan:
    """Turn the config's step counts / fractions into concrete steps for a run of ``max_steps`` (spec D.2-D.3, F.2).

    ``distill`` says whether the trainer self-distils (``APTTrainer`` does, a stock ``Trainer`` does not); with it
    and ``cfg.distillation`` the distillation window is resolved and checked as well. Every problem raises
    ``ValueError`` naming the setting to change and the run length.
    """
    start, end = as_steps(cfg.pruning_start, max_steps), as_steps(cfg.pruning_end, max_steps)
    warmup = as_steps(cfg.sparsity_warmup, max_steps)
    if end > max_steps:
        raise ValueError(f"APT's last pruning event is at step {end} but the run has only {max_steps} optimizer steps, "
                         "so the schedule would never finish; lower APTConfig.pruning_end or train longer.")
    if end <= start + warmup:
        raise ValueError(f"APT's pruning schedule for a run of {max_steps} optimizer steps has the window [{start}, "
                         f"{end}], which leaves no steps after the {warmup}-step sparsity warm-up; the target could "
                         "never drop below 1. Lower pruning_start/sparsity_warmup, raise pruning_end or train longer.")
    if end - start < cfg.num_pruning_events:
        raise ValueError(f"APT's pruning schedule for a run of {max_steps} optimizer steps has the window [{start}, "
                         f"{end}], shorter than num_pruning_events={cfg.num_pruning_events}; use fewer events or a "
                         "longer window.")
    events = tuple(pruning_event_steps(start, end, cfg.num_pruning_events))
    window = cfg.mask_decay_window
    if window is None:
        window = auto_decay_window(start, end, cfg.num_pruning_events)
    windows = tuple(decay_window_start(e, events[i - 1] if i else None, window, start) for i, e in enumerate(events))
    final = 1.0 - cfg.target_sparsity
    plan = Plan(start, end, warmup, events, windows, final, max(final, cfg.pretune_density))
    first = plan.first_real_event
    if not (distill and cfg.distillation and cfg.adaptive_pruning) or first is None:
        return plan
    distill_end = as_steps(cfg.pruning_end if cfg.distill_end is None else cfg.distill_end, max_steps)
    if distill_end <= first + 1:
        raise ValueError(f"APTConfig.distill_end resolves to step {distill_end} of this run's {max_steps} optimizer "
                         f"steps, not after the first real pruning event (step {first}), so the distillation "
                         "schedule is empty; raise distill_end or set distillation=False.")
    return replace(plan, distill_start=first + 1, distill_end=distill_end)


def gated_plan(cfg: APTConfig, max_steps: int, open_step: int, distill: bool = True) -> Plan:
    """The plan of a run whose pruning window opens at ``open_step`` instead of ``pruning_start`` (beyond spec D.2;
    ``APTConfig.pruning_start_gate``). Every planned step from ``pruning_start`` on (window end, warm-up length,
    ``distill_end``) is mapped linearly from ``[pruning_start, max_steps]`` onto ``[open_step, max_steps]``, so
    pruning, distillation and the recovery keep their shares of the steps that are left. ``open_step`` at or before
    the planned start gives the planned schedule."""
    start = as_steps(cfg.pruning_start, max_steps)
    if open_step <= start:
        return resolve_plan(cfg, max_steps, distill)
    if open_step >= max_steps:
        raise ValueError(f"APT's pruning window cannot open at step {open_step} of a {max_steps}-step run.")
    scale = Fraction(max_steps - open_step, max_steps - start)

    def moved(value: Union[int, float]) -> int:
        return open_step + int(round((as_steps(value, max_steps) - start) * scale))

    changes: dict = dict(pruning_start=open_step, pruning_end=moved(cfg.pruning_end),
                         sparsity_warmup=int(round(as_steps(cfg.sparsity_warmup, max_steps) * scale)))
    if cfg.distill_end is not None:
        changes["distill_end"] = moved(cfg.distill_end)
    try:
        return resolve_plan(replace(cfg, **changes), max_steps, distill)
    except ValueError as err:
        raise ValueError(f"APTConfig.pruning_start_gate: with the pruning window opening at step {open_step}, {err} "
                         "Lower pruning_end (the latest opening step) or train longer.") from None


def gate_opens(value: float, baseline: float, delta: float, greater_is_better: bool = True) -> bool:
    """Whether a dev metric ``value`` beats the untrained model's ``baseline`` by at least ``delta`` (in the metric's
    better direction): the condition of ``APTConfig.pruning_start_gate``."""
    gain = value - baseline if greater_is_better else baseline - value
    return gain >= delta
