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

Logging: the callback's figures (``apt/*``) are added to every training log. A Trainer registers the ``report_to``
integrations (TensorBoard, W&B, ...) before user callbacks, so at train start the callback moves them to just
after itself, and they log the figures too; evaluation results are left alone. Routine events log at
INFO; WARNING is kept for things that need attention.

Under DistributedDataParallel (with :class:`~apt_hf.APTTrainer` only) salience and adapter importance are averaged
over processes, masks and grown adapter rows are broadcast from rank 0, and the DDP wrapper is rebuilt after each
event (see :mod:`apt_hf.distributed`); FSDP, DeepSpeed and other setups are refused at train start.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, Callable, Iterator, Optional

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from . import checkpoint, distributed
from .config import APTConfig
from .model import APTModel, find_apt_model
from .optim import apply_param_changes, drop_params
from .pretune import calibration_batches, gather_static_salience
from .prune import kept_after
from .salience import ImportanceTracker, SalienceCollector
from .schedule import Plan, adapter_budget, as_steps, gate_opens, gated_plan, mask_step, resolve_plan
from .search import fill_budget, search_kept, swap_to_budget
from .tuning import adapter_size, grow_ranks, live_widths, plan_rank_growth

logger = logging.getLogger(__name__)
STATE_NAME = "pruning"  # this callback's entry in the checkpoint's APT training state (apt_hf.checkpoint)
# Evaluations (at distinct steps) after the last pruning event with one unchanged dev metric that mark a pruned model
# as a likely constant predictor; three, so that a metric repeated by chance on a small dev set rarely triggers it.
END_CHECK_EVALUATIONS = 3


def eval_metric_key(metric: str) -> str:
    """The key of ``metric`` (``TrainingArguments.metric_for_best_model``) in evaluation logs: ``eval_<metric>``."""
    return metric if metric.startswith("eval_") else f"eval_{metric}"


def constant_dev_metric(log_history: list[dict], metric: Optional[str], since: Optional[int] = None,
                        at_least: int = 2) -> Optional[tuple[float, int]]:
    """``(value, evaluations)`` when ``metric`` (``TrainingArguments.metric_for_best_model``) has had exactly the same
    value at every evaluation in ``log_history`` (after step ``since``, if given), at ``at_least`` or more distinct
    steps: the mark of a model that predicts one class (a constant accuracy, F1 or Matthews correlation). ``None``
    otherwise, or without a metric."""
    if not metric:
        return None
    key = eval_metric_key(metric)
    found = {h.get("step", i): h[key] for i, h in enumerate(log_history)
             if key in h and (since is None or h.get("step", i) > since)}
    values = list(found.values())
    if len(values) < at_least or any(v != values[0] for v in values):
        return None
    return values[0], len(values)


class TrainingDivergedError(RuntimeError):
    """Gradients stayed non-finite for too many optimizer steps: the run diverged and APT stops it."""


def is_training_log(logs: dict) -> bool:
    """Whether ``logs`` reports training progress (a step's loss or the run's summary), where ``apt/*`` figures
    belong; evaluation and prediction metrics are not padded with them."""
    return "loss" in logs or "train_loss" in logs


def _calling_handler(callback: TrainerCallback) -> Optional[CallbackHandler]:
    """The ``CallbackHandler`` whose ``call_event`` is running ``callback`` now, or None.

    transformers hands callbacks the model, optimizer, ... but no reference to the handler that orders them, so it
    is read from the calling frames (``call_event``'s ``self``); nothing is patched.
    """
    frame = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, CallbackHandler) and any(c is callback for c in owner.callbacks):
            return owner
        frame = frame.f_back
    return None


class APTCallback(TrainerCallback):
    """Adaptive pruning and tuning for a Trainer whose model was wrapped with ``get_peft_model(.., APTConfig())``.

    Its state (events done, salience and importance EMAs, held blocks) is saved inside every checkpoint's adapter
    file and restored from the checkpoint the Trainer resumes (:mod:`apt_hf.checkpoint`).

    Args:
        config: the APT settings; ``None`` reads them from the model's adapter config at train start.
        adapter_name: the APT adapter to manage.
        max_nonfinite_steps: stop the run with :class:`TrainingDivergedError` after this many consecutive optimizer
            steps whose gradients are not finite (a diverged run; fp16 overflow skips only a step or two).
    """

    def __init__(self, config: Optional[APTConfig] = None, adapter_name: str = "default",
                 max_nonfinite_steps: int = 20) -> None:
        if max_nonfinite_steps < 1:
            raise ValueError(f"APTCallback(max_nonfinite_steps={max_nonfinite_steps}) must be >= 1.")
        self.config, self.adapter_name, self.max_nonfinite_steps = config, adapter_name, max_nonfinite_steps
        self.apt: Optional[APTModel] = None
        self.plan: Optional[Plan] = None
        self.collector: Optional[SalienceCollector] = None
        self.importance: Optional[ImportanceTracker] = None
        self.initial_adapter_size: Optional[int] = None
        self.events_done = 0
        self.salience_skipped = 0
        self.nonfinite_streak = 0  # consecutive optimizer steps with non-finite gradients
        self.salience_step = 0  # last step whose salience was folded into the EMA
        self.step = 0  # last finished optimizer step (recorded with the state, checked on resume)
        self.resumed: dict[str, Any] = {}  # the training state the resumed checkpoint carried, by component
        self._pending: dict[str, float] = {}
        self.change_listeners: list = []  # called with the ParamChange list of every event (e.g. the teacher)
        self.plan_listeners: list[Callable[[Plan], None]] = []  # called with the new plan when the gate moves it
        # APTConfig.pruning_start_gate: the untrained model's dev metric and the step the window opened at.
        self.gate_baseline: Optional[float] = None
        self.gate_opened: Optional[int] = None
        # Set by APTTrainer's distillation: whether physical removal at the event of a given step is held back.
        self.hold_removal: Callable[[int], bool] = lambda step: False
        self.held: Optional[tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]] = None  # alive blocks
        # Set by APTTrainer, whose DistillCallback self-distils; a stock Trainer ignores APTConfig.distillation.
        self.self_distilling = False
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
        if args.load_best_model_at_end and cfg.adaptive_pruning and cfg.target_sparsity > 0:
            raise ValueError(
                "TrainingArguments(load_best_model_at_end=True) cannot be used with APT pruning: the best checkpoint "
                "usually predates later pruning events, and its structure can no longer be loaded into the pruned "
                "model. Set load_best_model_at_end=False. To use a saved checkpoint, load it onto a fresh base model "
                "with peft.PeftModel.from_pretrained(base, checkpoint) (the pruned structure is rebuilt) and export "
                "that with apt_hf.export_pruned.")
        self.plan = resolve_plan(cfg, state.max_steps, distill=self.self_distilling)
        if cfg.distillation and cfg.adaptive_pruning and not self.self_distilling:
            # A warning, not an error: distillation=True is APTConfig's default, and pruning and tuning are complete
            # without it (the paper's "w/o D_S" setting, the better one in short runs: README, Results).
            logger.warning("APTConfig.distillation=True, but self-distillation needs apt_hf.APTTrainer: this Trainer "
                           "prunes and tunes without it. Train with apt_hf.APTTrainer, or set distillation=False to "
                           "silence this warning.")
        self._log_before_integrations()
        use_kurtosis = cfg.use_kurtosis if cfg.use_kurtosis is not None else self.apt.layout.spec.kurtosis
        self.collector = SalienceCollector(self.apt.layout, cfg.salience_beta, use_kurtosis)
        self.importance = ImportanceTracker(cfg.salience_beta)
        self.initial_adapter_size = adapter_size(self.apt.apt_layers(), self.adapter_name)
        self.step = self.salience_step = state.global_step
        self._resume(state.global_step)
        if cfg.pruning_start_gate is not None and cfg.adaptive_pruning:
            self._check_gate_args(args)
            # Until the gate opens, the plan is the one that opens at the latest step (pruning_end).
            opened = self.gate_opened if self.gate_opened is not None else self.plan.end
            self.plan = gated_plan(cfg, state.max_steps, opened, distill=self.self_distilling)
        if state.global_step == 0 and cfg.adaptive_pruning and self.plan.initial_density < 1.0:
            self._pretune(args, model, optimizer, kwargs.get("train_dataloader"))
        checkpoint.register(self.apt, STATE_NAME, self)
        logger.info("APT schedule: events at %s, windows from %s, final density %.3f", list(self.plan.events),
                    list(self.plan.windows), self.plan.final_density)
        self._pending.update(self.stats())
        return control

    def _log_before_integrations(self) -> None:
        """Move the ``report_to`` integrations (TensorBoard, W&B, ...) that precede this callback to just after it,
        so that they log the ``apt/*`` figures :meth:`on_log` adds. The order of every other callback, and of this
        one relative to them, is kept. Safe inside ``call_event``'s loop: only callbacks already called move, to
        positions that are already past."""
        from transformers.integrations import INTEGRATION_TO_CALLBACK

        handler = _calling_handler(self)
        if handler is None:
            logger.warning("APTCallback could not find the Trainer's callback list; its apt/* figures reach "
                           "state.log_history and later callbacks, but maybe not the report_to integrations. "
                           "apt_hf.APTTrainer adds them to every log.")
            return
        callbacks = handler.callbacks
        index = next(i for i, c in enumerate(callbacks) if c is self)
        integrations = tuple(INTEGRATION_TO_CALLBACK.values())
        moved = [c for c in callbacks[:index] if isinstance(c, integrations)]
        for callback in moved:
            callbacks.remove(callback)
        index = next(i for i, c in enumerate(callbacks) if c is self)
        callbacks[index + 1:index + 1] = moved

    def _pretune(self, args, model, optimizer, train_dataloader) -> None:
        """Spec D.6: static salience over ``pretune_batches`` random training batches, one hard search at
        ``pretune_density``, physical removal; the EMA of training then starts afresh on the pruned model."""
        cfg, apt = self.config, self.apt
        if train_dataloader is None:
            raise ValueError("APTConfig.pretune_density < 1 needs the training dataloader at train start; use a "
                             "transformers Trainer (or APTTrainer) with a train_dataset.")
        batches = calibration_batches(train_dataloader.dataset, train_dataloader.collate_fn,
                                      args.per_device_train_batch_size, cfg.pretune_batches, args.seed,
                                      train_dataloader)
        collector = self.collector
        counted = gather_static_salience(model, collector, batches, args.device)
        if counted == 0:
            raise ValueError("Pre-tuning pruning got no usable calibration batch (empty dataset, or every loss "
                             "gradient was not finite).")
        before = [p for p in apt.parameters() if p.requires_grad]
        self._move_masks(self.plan.initial_density, hard=True)
        changes = self._remove_masked()
        self._commit(optimizer, before, changes)
        self.collector = SalienceCollector(apt.layout, cfg.salience_beta, collector.use_kurtosis)
        self.initial_adapter_size = adapter_size(apt.apt_layers(), self.adapter_name)
        stats = self.stats()
        self._pending.update(stats, **{"apt/pretune_batches": counted})
        logger.info("APT pre-tuning pruning (static salience over %d batches): target density %.4f, kept %.4f (%d "
                    "params), heads %d, neurons %d, hidden %d", counted, self.plan.initial_density,
                    stats["apt/density"], stats["apt/params"], stats["apt/heads"], stats["apt/neurons"],
                    stats["apt/hidden"])

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
        if ok:
            self.nonfinite_streak, self.salience_step = 0, step
            return control
        self.salience_skipped += 1
        self.nonfinite_streak += 1
        logger.warning("APT: non-finite gradients at step %d; salience and importance left unchanged.", step)
        if self.nonfinite_streak >= self.max_nonfinite_steps:
            raise TrainingDivergedError(
                f"APT stopped the run at step {step}: gradients were not finite for {self.nonfinite_streak} "
                "consecutive optimizer steps, so the model has diverged (NaN/inf weights or loss) and further pruning "
                "would act on stale salience. Resume from an earlier checkpoint with a lower learning rate (or bf16 "
                "instead of fp16); raise APTCallback(max_nonfinite_steps=...) if the overflows are expected.")
        return control

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = self.step = state.global_step
        if (self.config.pruning_start_gate is not None and self.config.adaptive_pruning and self.gate_opened is None
                and step >= self.plan.start):
            self.gate_opened = self.plan.start  # the latest opening step: the plan already starts here
            logger.warning("APT: the dev metric never beat the untrained model's by APTConfig.pruning_start_gate=%g "
                           "before step %d (pruning_end); the pruning window opens there anyway, so the model still "
                           "reaches its target density. The model may not be learning: check the learning rate, or "
                           "train longer.", self.config.pruning_start_gate, self.plan.start)
        k = next((i for i, e in enumerate(self.plan.events) if e >= step), None)
        if k is None or k < self.events_done:
            return control
        event = self.plan.events[k]
        target = self.plan.target(event)
        prune_now = self.config.adaptive_pruning and self.plan.prunes(event)
        if prune_now and self.plan.windows[k] <= step < event:
            self._move_masks(target, hard=False)
        if step == event:
            if prune_now and event == self.plan.first_real_event:
                self._warn_if_untrained(event, state.log_history, args.metric_for_best_model)
            self._event(k, target, optimizer, prune_now)
            control.should_log = True
        return control

    # ------------------------------------------------------------------------------------------ pruning gate
    def _check_gate_args(self, args) -> None:
        """APTConfig.pruning_start_gate judges the dev metric against the untrained model's: it needs evaluations,
        a metric and the evaluation at step 0."""
        missing = [what for what, ok in (
            ("eval_strategy='steps' (or 'epoch') with an eval_dataset", args.eval_strategy != "no"),
            ("metric_for_best_model (e.g. 'accuracy')", args.metric_for_best_model is not None),
            ("eval_on_start=True (the untrained model's metric is the gate's baseline)", args.eval_on_start)) if not ok]
        if missing:
            raise ValueError(f"APTConfig.pruning_start_gate={self.config.pruning_start_gate} opens the pruning window "
                             "when the dev metric has moved, so TrainingArguments needs " + "; ".join(missing)
                             + ". Set them, or pruning_start_gate=None to prune from pruning_start.")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        cfg = self.config
        if cfg is None or cfg.pruning_start_gate is None or not cfg.adaptive_pruning or self.gate_opened is not None:
            return control
        name = args.metric_for_best_model
        key = eval_metric_key(name)
        if not metrics or key not in metrics:
            raise ValueError(f"APTConfig.pruning_start_gate: the evaluation at step {state.global_step} has no {key!r} "
                             f"(it has {sorted(metrics or {})}); set metric_for_best_model to one of these.")
        step, value = state.global_step, float(metrics[key])
        if self.gate_baseline is None:  # the evaluation at step 0 (eval_on_start)
            self.gate_baseline = value
            return control
        greater = args.greater_is_better if args.greater_is_better is not None else True
        if step < self.plan.start and gate_opens(value, self.gate_baseline, cfg.pruning_start_gate, greater):
            self._open_gate(max(step, as_steps(cfg.pruning_start, state.max_steps)), state.max_steps)
            logger.info("APT: the dev metric %s = %g beats the untrained model's %g by >= %g at step %d; the pruning "
                        "window opens at step %d (events at %s).", name, value, self.gate_baseline,
                        cfg.pruning_start_gate, step, self.gate_opened, list(self.plan.events))
        return control

    def _open_gate(self, step: int, max_steps: int) -> None:
        """Move the plan to open at ``step`` and tell the components that follow it (the distillation schedule)."""
        self.gate_opened = step
        self.plan = gated_plan(self.config, max_steps, step, distill=self.self_distilling)
        for listener in self.plan_listeners:
            listener(self.plan)
        self._pending["apt/pruning_start"] = float(step)

    @staticmethod
    def _warn_if_untrained(event: int, log_history: list[dict], metric: Optional[str]) -> None:
        """Warn when the first pruning event comes while the dev metric has not moved yet (beyond spec D)."""
        constant = constant_dev_metric(log_history, metric)
        if constant is not None:
            logger.warning(
                "APT's first pruning event (step %d) comes while the dev metric %s has been %g at all %d evaluations "
                "so far: the model may still predict a constant, and salience measured now does not reflect the task "
                "(it can end as a constant model). Start pruning later (APTConfig.pruning_start / sparsity_warmup, or "
                "pruning_start_gate to wait until the dev metric moves) or train longer.", event, metric, constant[0], constant[1])

    @contextlib.contextmanager
    def salience_paused(self) -> Iterator[None]:
        """Salience hooks removed inside the block (e.g. while the model is deep-copied), re-attached after."""
        attached = self.collector is not None and bool(self.collector._handles)
        if attached:
            self.collector.detach()
        try:
            yield
        finally:
            if attached:
                self.collector.attach(self.apt.layout)

    def masks_binary(self) -> bool:
        """Whether every mask is exactly 0 or 1 (outside a mask-decay window)."""
        m = self.apt.masks
        return all(bool(((t == 0) | (t == 1)).all()) for t in [*m.heads, *m.neurons, m.hidden])

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
        if self.held is not None:
            keep_h = [k & a for k, a in zip(keep_h, alive_h)]
            keep_n = [k & a for k, a in zip(keep_n, alive_n)]
            keep_d = keep_d & alive_d
        if hard:  # the count lands within 1 % below the budget where the blocks allow it (beyond spec D.1)
            densities = ([s / c for s, c in zip(s_heads, head_cost)],
                         [s / c for s, c in zip(s_neurons, neuron_cost)], s_hidden / hidden_cost)
            allowed = self.held
            kept = fill_budget(cm, (keep_h, keep_n, keep_d), densities, budget, allowed)
            keep_h, keep_n, keep_d = swap_to_budget(cm, kept, densities, budget, allowed=allowed)
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
        logger.info("APT: held-back blocks removed physically: %d params, heads %d, neurons %d, hidden %d.",
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
        stale = self.plan.events[k] - max(self.salience_step, self.plan.start)
        if prune_now and stale > max(1, (self.plan.events[k] - self.plan.windows[k]) // 2):
            logger.warning("APT event %d at step %d acts on salience last updated at step %d (%d steps ago): the "
                           "gradients of the steps since were not finite. Check the loss for divergence.", k + 1,
                           self.plan.events[k], self.salience_step, stale)
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
        logger.info("APT event %d/%d at step %d: target density %.4f, kept %.4f (%d params), heads %d, neurons %d, "
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
        if logs is not None and is_training_log(logs) and not any(k.startswith("apt/") for k in logs):
            extra = self.pop_logs()
            logs.update(extra)
            if state.log_history:
                state.log_history[-1].update(extra)
        return control

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs besides weights and optimizer (saved in the adapter file)."""
        return {
            "step": self.step,
            "events_done": self.events_done,
            "salience": self.collector.state_dict() if self.collector else None,
            "importance": dict(self.importance.scores) if self.importance else {},
            "initial_adapter_size": self.initial_adapter_size,
            "salience_skipped": self.salience_skipped,
            "salience_step": self.salience_step,
            "held": list(self.held) if self.held is not None else None,
            "gate_baseline": self.gate_baseline,
            "gate_opened": self.gate_opened,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events_done = state["events_done"]
        if state.get("salience") is not None:
            self.collector.load_state_dict(state["salience"])
        self.importance.scores = dict(state.get("importance", {}))
        self.initial_adapter_size = state["initial_adapter_size"]
        self.salience_skipped = state.get("salience_skipped", 0)
        self.salience_step = state.get("salience_step", self.step)
        held = state.get("held")
        self.held = (list(held[0]), list(held[1]), held[2]) if held is not None else None
        self.gate_baseline, self.gate_opened = state.get("gate_baseline"), state.get("gate_opened")

    def _resume(self, step: int) -> None:
        """Restore the state that came with the checkpoint the Trainer loaded (apt_hf.checkpoint)."""
        loaded = checkpoint.take(self.apt)
        if step == 0:  # a fresh run (an adapter loaded for further training starts a new schedule)
            self.resumed = {}
            return
        mine = (loaded or {}).get(STATE_NAME)
        if mine is None:
            raise checkpoint.CheckpointError(
                f"The run resumes at step {step}, but the checkpoint the Trainer loaded carries no APT training state, "
                "so the pruning schedule, salience and held blocks cannot be restored. Resume from a checkpoint "
                "written by a run with APTCallback / APTTrainer (by this apt_hf release).")
        if mine.get("step") != step:
            raise checkpoint.CheckpointError(
                f"The checkpoint's APT training state was saved at step {mine.get('step')}, but the Trainer resumes at "
                f"step {step} (trainer_state.json): the adapter file and the trainer state come from different "
                "checkpoints. Resume from one complete checkpoint folder.")
        self.load_state_dict(mine)
        self.resumed = loaded

    def on_train_end(self, args, state, control, **kwargs):
        if self.apt is not None:  # a final save_pretrained after training carries no training state
            checkpoint.unregister(self.apt, STATE_NAME)
        if self.plan is not None and self.config.adaptive_pruning and self.events_done == len(self.plan.events):
            self._warn_if_constant_at_end(self.plan.events[-1], state.log_history, args.metric_for_best_model)
        return control

    @staticmethod
    def _warn_if_constant_at_end(last_event: int, log_history: list[dict], metric: Optional[str]) -> None:
        """Warn when the dev metric has not moved since the last pruning event: the pruned model may be a constant
        predictor, which no later evaluation would reveal as such (beyond spec G)."""
        constant = constant_dev_metric(log_history, metric, since=last_event, at_least=END_CHECK_EVALUATIONS)
        if constant is not None:
            logger.warning(
                "APT's pruned model had the same dev metric %s = %g at all %d evaluations after the last pruning event "
                "(step %d): it may predict a constant (the majority class). Check its predictions before using it; "
                "if so, prune later in the run or less (APTConfig.pruning_start / pruning_end / target_sparsity) or "
                "train longer.", metric, constant[0], constant[1], last_event)
