"""`APTCallback`: adaptive pruning and adaptive tuning inside a stock `transformers.Trainer` (spec C, D, E, K.3-K.6).

Per optimizer step (Trainer order, HF_STACK_NOTES): gradients of the step are ready at ``on_pre_optimizer_step``,
where block salience and adapter importance are folded into their EMAs (skipped when not finite); shapes change
only at ``on_step_end``. In the ``mask_decay_window`` steps before each pruning event the masks move by
``mask_decay`` toward the salience-density search result; at the event they are set to exactly 0/1, the pruned
structure is removed physically, the top adapters grow, and the optimizer is updated in place.

While self-distillation runs (``APTTrainer``), physical removal is held back (spec D.4.2, D.5): the student keeps
zero masks, the teacher (which bypasses masks) keeps the structure it was validated with, and the held blocks are
removed when the teacher is refreshed or distillation ends (:meth:`APTCallback.remove_pruned`). Held blocks cannot
be selected again, so the outcome is the same as removing them at the event.

Under DistributedDataParallel (with :class:`~apt_hf.APTTrainer` only) salience and adapter importance are averaged
over processes, masks and grown adapter rows are broadcast from rank 0, and the DDP wrapper is rebuilt after each
event (see :mod:`apt_hf.distributed`); FSDP, DeepSpeed and other setups are refused at train start.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from transformers import TrainerCallback

from . import distributed
from .config import APTConfig
from .model import APTModel, find_apt_model
from .optim import apply_param_changes, drop_params
from .prune import kept_after
from .salience import ImportanceTracker, SalienceCollector
from .schedule import adapter_budget, decay_window_start, mask_step, pruning_event_steps, target_density
from .search import fill_budget, search_kept
from .tuning import adapter_size, grow_ranks, live_widths, plan_rank_growth

logger = logging.getLogger(__name__)
STATE_FILE = "apt_state.pt"


@dataclass(frozen=True)
class Plan:
    """The pruning schedule of one run, in optimizer steps."""

    start: int
    end: int
    warmup: int
    events: tuple[int, ...]
    windows: tuple[int, ...]  # first step of the mask-decay window before each event
    final_density: float

    def target(self, step: int) -> float:
        return target_density(step, start=self.start, end=self.end, warmup_steps=self.warmup,
                              final_density=self.final_density)


def _steps(value: float, total: int) -> int:
    return int(round(value * total)) if isinstance(value, float) else int(value)


def resolve_plan(cfg: APTConfig, max_steps: int) -> Plan:
    """Turn the config's step counts / fractions into concrete steps for a run of ``max_steps`` (spec D.2-D.3)."""
    start, end = _steps(cfg.pruning_start, max_steps), _steps(cfg.pruning_end, max_steps)
    warmup = _steps(cfg.sparsity_warmup, max_steps)
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
    windows = tuple(decay_window_start(e, events[i - 1] if i else None, cfg.mask_decay_window, start)
                    for i, e in enumerate(events))
    return Plan(start, end, warmup, events, windows, 1.0 - cfg.target_sparsity)


class APTCallback(TrainerCallback):
    """Adaptive pruning and tuning for a Trainer whose model was wrapped with ``get_peft_model(.., APTConfig())``.

    Args:
        config: the APT settings; ``None`` reads them from the model's adapter config at train start.
        adapter_name: the APT adapter to manage.
    """

    def __init__(self, config: Optional[APTConfig] = None, adapter_name: str = "default") -> None:
        self.config, self.adapter_name = config, adapter_name
        self.apt: Optional[APTModel] = None
        self.plan: Optional[Plan] = None
        self.collector: Optional[SalienceCollector] = None
        self.importance: Optional[ImportanceTracker] = None
        self.initial_adapter_size: Optional[int] = None
        self.events_done = 0
        self.salience_skipped = 0
        self._pending: dict[str, float] = {}
        self._restored: Optional[dict] = None
        self.change_listeners: list = []  # called with the ParamChange list of every event (e.g. the teacher)
        # Set by APTTrainer's distillation: whether physical removal at the event of a given step is held back.
        self.hold_removal: Callable[[int], bool] = lambda step: False
        self.held: Optional[tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]] = None  # alive blocks
        # Set by APTTrainer: rebuilds the DDP wrapper after parameters were replaced (``dry_run=True`` only checks
        # that it can). Without it, multi-process training is refused (a callback cannot reach the wrapper).
        self.rebuild_wrapper: Optional[Callable[..., None]] = None

    # ------------------------------------------------------------------------------------------ setup
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        distributed.check_supported(args, model, has_rebuilder=self.rebuild_wrapper is not None)
        if distributed.world_size() > 1:
            self.rebuild_wrapper(dry_run=True)
        self.apt = find_apt_model(model)
        cfg = self.config or self.apt.peft_config[self.adapter_name]
        if not isinstance(cfg, APTConfig):
            raise ValueError(f"APTCallback needs an APTConfig; the model's adapter config is {type(cfg).__name__}.")
        self.config = cfg
        if not self.apt.apt_layers():
            raise ValueError("The model has no APT adapter layers; check APTConfig.target_modules.")
        self.plan = resolve_plan(cfg, state.max_steps)
        use_kurtosis = cfg.use_kurtosis if cfg.use_kurtosis is not None else self.apt.layout.family == "llama"
        self.collector = SalienceCollector(self.apt.layout, cfg.salience_beta, use_kurtosis)
        self.importance = ImportanceTracker(cfg.salience_beta)
        self.initial_adapter_size = adapter_size(self.apt.apt_layers(), self.adapter_name)
        restored = self._restored or self._find_checkpoint_state(args, state)
        if restored is not None:
            self.load_state_dict(restored)
        logger.info("APT schedule: events at %s, windows from %s, final density %.3f", list(self.plan.events),
                    list(self.plan.windows), self.plan.final_density)
        self._pending.update(self.stats())
        return control

    def _collecting(self, step: int) -> bool:
        """Salience/importance are gathered from the window start until the last event (spec C.2)."""
        return self.plan.start < step <= self.plan.events[-1]

    def _ensure_hooks(self, next_step: int) -> None:
        want = self.config.adaptive_pruning and self._collecting(next_step)
        attached = bool(self.collector._handles)
        if want and not attached:
            self.collector.attach(self.apt.layout)
        elif attached and not want:
            self.collector.detach()

    def on_step_begin(self, args, state, control, **kwargs):
        self._ensure_hooks(state.global_step + 1)
        return control

    # ------------------------------------------------------------------------------------------ per step
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        step = state.global_step + 1
        if not self._collecting(step):
            self.collector._reset_step()
            return control
        ok = self.collector.end_step() if self.config.adaptive_pruning else True
        if ok and self.config.adaptive_tuning:
            ok = self.importance.update(self.apt.apt_layers())
        if not ok:
            self.salience_skipped += 1
            logger.warning("APT: non-finite gradients at step %d; salience and importance left unchanged.", step)
        return control

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step
        k = next((i for i, e in enumerate(self.plan.events) if e >= step), None)
        if k is None or k < self.events_done:
            return control
        event = self.plan.events[k]
        target = self.plan.target(event)
        prune_now = self.config.adaptive_pruning and target < 1.0
        if prune_now and self.plan.windows[k] <= step < event:
            self._move_masks(target, hard=False)
        if step == event:
            self._event(k, target, optimizer, prune_now)
            control.should_log = True
        return control

    def _density(self) -> float:
        return self.apt.count_params() / self.apt.n_params

    def _move_masks(self, target: float, hard: bool) -> None:
        apt, masks, col = self.apt, self.apt.masks, self.collector
        cm = apt.count_model()
        layout = apt.layout
        now_h, now_n, now_d = masks.values()  # the search runs on the CPU: one transfer, not one per mask
        head_cost, neuron_cost = cm.block_costs(int((now_d > 0).sum()))
        hidden_cost = cm.hidden_cost([m > 0 for m in now_h], [m > 0 for m in now_n])
        budget = target * apt.n_params
        s_heads, s_neurons, s_hidden = col.ema_heads, col.ema_neurons, col.ema_hidden
        if self.held is not None:  # blocks pruned at an earlier event but not yet removed score 0 and stay out
            alive_h, alive_n, alive_d = self.held
            s_heads = [e * a for e, a in zip(s_heads, alive_h)]
            s_neurons = [e * a for e, a in zip(s_neurons, alive_n)]
            s_hidden = s_hidden * alive_d
        keep_h, keep_n, keep_d = search_kept(s_heads, s_neurons, s_hidden, cm.count,
                                             head_cost, neuron_cost, hidden_cost, budget,
                                             head_groups=[s.group_size for s in layout.attentions])
        if hard:
            densities = ([s / c for s, c in zip(s_heads, head_cost)],
                         [s / c for s, c in zip(s_neurons, neuron_cost)], s_hidden / hidden_cost)
            keep_h, keep_n, keep_d = fill_budget(cm, (keep_h, keep_n, keep_d), densities, budget)
        if self.held is not None:
            keep_h = [k & a for k, a in zip(keep_h, alive_h)]
            keep_n = [k & a for k, a in zip(keep_n, alive_n)]
            keep_d = keep_d & alive_d
        decay = self.config.mask_decay
        masks.set_values([mask_step(m, k, decay, hard) for m, k in zip(now_h, keep_h)],
                         [mask_step(m, k, decay, hard) for m, k in zip(now_n, keep_n)],
                         mask_step(now_d, keep_d, decay, hard))
        # The search is deterministic and its inputs were averaged over processes, so ranks agree already; rank 0's
        # masks are made authoritative anyway (no-op in one process).
        distributed.broadcast_([*masks.heads, *masks.neurons, masks.hidden])

    def _remove_masked(self) -> list:
        """Physically remove every block whose mask is 0 and drop its salience entries (spec K.4)."""
        apt = self.apt
        heads, neurons, hidden = kept_after(apt.masks, apt.layout)
        heads = [None if len(h) == m.numel() else h for h, m in zip(heads, apt.masks.heads)]
        neurons = [None if len(n) == m.numel() else n for n, m in zip(neurons, apt.masks.neurons)]
        hidden = None if len(hidden) == apt.masks.hidden.numel() else hidden
        changes = apt.apply_structure(heads, neurons, hidden)
        self.collector.reindex(heads, neurons, hidden)
        self.held = None
        return changes

    def remove_pruned(self, optimizer) -> None:
        """Remove the blocks held back during distillation (no-op if none).

        Called by the distillation callback right before a teacher refresh and when distillation ends (spec D.5)."""
        if self.held is None:
            return
        before = [p for p in self.apt.parameters() if p.requires_grad]
        changes = self._remove_masked()
        self._commit(optimizer, before, changes)
        stats = self.stats()
        self._pending.update(stats)
        logger.warning("APT: held-back blocks removed physically: %d params, heads %d, neurons %d, hidden %d.",
                       stats["apt/params"], stats["apt/heads"], stats["apt/neurons"], stats["apt/hidden"])

    def _commit(self, optimizer, before: list, changes: list) -> None:
        """Optimizer surgery, DDP re-wrap and listeners after parameters were replaced or removed (spec K.6)."""
        apply_param_changes(optimizer, changes)
        alive = {id(p) for p in self.apt.parameters()}  # modules removed whole (an attention with no head left)
        drop_params(optimizer, [p for p in before + [c.new for c in changes] if id(p) not in alive])
        if changes and self.rebuild_wrapper is not None:
            self.rebuild_wrapper()
        for listener in self.change_listeners:
            listener(changes)
        if changes and self.collector._handles:
            self.collector.attach(self.apt.layout)

    def _event(self, k: int, target: float, optimizer, prune_now: bool) -> None:
        apt, cfg = self.apt, self.config
        before = [p for p in apt.parameters() if p.requires_grad]  # frozen weights: freed as they are replaced
        changes = []
        if prune_now:
            self._move_masks(target, hard=True)
            if self.hold_removal(self.plan.events[k]):
                m = apt.masks
                self.held = ([(h > 0).cpu() for h in m.heads], [(n > 0).cpu() for n in m.neurons], (m.hidden > 0).cpu())
            else:
                changes += self._remove_masked()
        if cfg.adaptive_tuning:
            layers = apt.apt_layers()
            budget = adapter_budget(self.plan.events[k], start=self.plan.start, end=self.plan.end,
                                    initial=self.initial_adapter_size, ratio=cfg.tuning_budget_ratio)
            widths = live_widths(layers, apt.layout, apt.masks)
            sizes = {n: (widths[n], l.r[self.adapter_name]) for n, l in layers.items()}
            importance = distributed.mean_dict_over_ranks(self.importance.importance(), list(layers))
            plan = plan_rank_growth(sizes, importance, budget, cfg.max_rank)
            grown = grow_ranks(layers, plan, self.adapter_name)
            distributed.broadcast_([c.new.data for c in grown])  # new rows of A are random: use rank 0's
            changes += grown
            self.importance.reset()
        self._commit(optimizer, before, changes)
        self.events_done = k + 1
        stats = self.stats()
        self._pending.update(stats, **{"apt/event": k + 1})
        logger.warning("APT event %d/%d at step %d: target density %.4f, kept %.4f (%d params), heads %d, neurons %d, "
                       "hidden %d, adapter params %d, mean rank %.2f", k + 1, len(self.plan.events),
                       self.plan.events[k], target, stats["apt/density"], stats["apt/params"], stats["apt/heads"],
                       stats["apt/neurons"], stats["apt/hidden"], stats["apt/adapter_params"], stats["apt/mean_rank"])

    # ------------------------------------------------------------------------------------------ visibility
    def stats(self) -> dict[str, float]:
        """Sparsity, structure and rank figures logged through ``Trainer.log``."""
        apt = self.apt
        layers = apt.apt_layers()
        ranks = [l.r[self.adapter_name] for l in layers.values()]
        summary = apt.masks.summary()
        step_target = next((self.plan.target(e) for e in self.plan.events[self.events_done:]), self.plan.final_density)
        return {
            "apt/target_density": step_target if self.config.adaptive_pruning else 1.0,
            "apt/density": self._density(),
            "apt/params": apt.count_params(),
            "apt/heads": summary["kept_heads"],
            "apt/neurons": summary["kept_neurons"],
            "apt/hidden": summary["kept_hidden"],
            "apt/adapter_params": adapter_size(layers, self.adapter_name, live_widths(layers, apt.layout, apt.masks)),
            "apt/mean_rank": sum(ranks) / max(1, len(ranks)),
            "apt/salience_skipped": self.salience_skipped,
        }

    def pop_logs(self) -> dict[str, float]:
        """Figures gathered since the last log (refreshed with the current state)."""
        if self.apt is None:
            return {}
        out = {**self._pending, **self.stats()}
        self._pending = {}
        return out

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and not any(k.startswith("apt/") for k in logs):
            extra = self.pop_logs()
            logs.update(extra)
            if state.log_history:
                state.log_history[-1].update(extra)
        return control

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "events_done": self.events_done,
            "salience": self.collector.state_dict() if self.collector else None,
            "importance": dict(self.importance.scores) if self.importance else {},
            "initial_adapter_size": self.initial_adapter_size,
            "salience_skipped": self.salience_skipped,
            "held": self.held,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events_done = state["events_done"]
        if state.get("salience") is not None:
            self.collector.load_state_dict(state["salience"])
        self.importance.scores = dict(state.get("importance", {}))
        self.initial_adapter_size = state["initial_adapter_size"]
        self.salience_skipped = state.get("salience_skipped", 0)
        self.held = state.get("held")

    def restore_from(self, checkpoint_dir: str) -> None:
        """Use the APT state saved in ``checkpoint_dir`` when training (re)starts (called by ``APTTrainer.train``)."""
        path = os.path.join(checkpoint_dir, STATE_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{checkpoint_dir} has no {STATE_FILE}: it was not saved with APTCallback, so the "
                                    "salience and schedule state cannot be resumed. Resume from an APT checkpoint.")
        self._restored = torch.load(path, weights_only=False)

    @staticmethod
    def _find_checkpoint_state(args, state) -> Optional[dict]:
        """Fallback for a stock Trainer: the checkpoint of the resumed step inside ``output_dir``."""
        if state.global_step == 0:
            return None
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"Resuming at step {state.global_step} but {path} is missing, so APT's masks "
                                    "schedule and salience cannot be restored. Resume with apt_hf.APTTrainer or from a "
                                    "checkpoint saved with APTCallback.")
        return torch.load(path, weights_only=False)

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if args.should_save and os.path.isdir(folder):  # under DDP the state is identical on every rank
            torch.save(self.state_dict(), os.path.join(folder, STATE_FILE))
        return control
