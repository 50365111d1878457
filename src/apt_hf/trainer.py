"""`APTTrainer`: a `transformers.Trainer` with APT's callback and the self-distillation loss (spec F, K.7).

Phases (spec F.2), all in optimizer steps: plain tuning -> distillation from the step after the first event whose
target density is < 1 until ``distill_end`` (``L = mu L_distill + (1 - mu) L_task``, mu linear over the pruning
window, spec F.3) -> at ``distill_end``, with evaluation data, the best student evaluated after the last pruning
event is reloaded (its trainable tensors: adapters, task head, ``Tr``; the backbone is frozen), and the optimizer
state is reset -> task-loss fine-tuning of the pruned model with a fresh schedule (spec F.2: 6 % warm-up, then linear
decay) peaking at ``post_distill_lr_ratio`` x the learning rate, on the same optimizer. ``Trainer.train()`` is not
altered.

Under DistributedDataParallel, ``APTTrainer`` hands the callback a ``rebuild_wrapper`` that re-initialises the
Trainer's DDP wrapper in place after every event that replaced parameters (see :mod:`apt_hf.distributed`).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from transformers import Trainer, TrainerCallback

from . import checkpoint, distributed
from .callback import APTCallback, eval_metric_key, is_training_log
from .distill import (ParamSnapshot, Teacher, alive_layers, default_pred_weight, gives_one_answer, layer_loss,
                      next_token_mask, prediction_logits, prediction_loss, sample_teacher_layers)
from .model import APTModel, find_apt_model
from .optim import reset_state
from .schedule import Plan, distill_mu, post_distill_lr_factor

logger = logging.getLogger(__name__)
STATE_NAME = "distillation"  # this callback's entry in the checkpoint's APT training state (apt_hf.checkpoint)


def improves(value: float, loss: Optional[float], best: Optional[float], best_loss: Optional[float],
             greater: bool) -> bool:
    """Whether an evaluation beats the record ``best`` (spec F.1: a teacher refresh needs a better dev metric).

    Beyond the spec, an exact tie is broken by the eval loss: accuracy, F1 or Matthews correlation stay flat while a
    young model predicts the majority class, and with ties refused such a run would distil from that first teacher
    to the end."""
    if best is None or (value > best if greater else value < best):
        return True
    return value == best and None not in (loss, best_loss) and loss < best_loss


def _unwrap(obj, attr: str):
    while hasattr(obj, attr) and not hasattr(obj, "param_groups" if attr == "optimizer" else "base_lrs"):
        obj = getattr(obj, attr)
    return obj


class DistillCallback(TrainerCallback):
    """Distillation phases, teacher refreshes (spec F.1), the reload of the best pruned student at the end of
    distillation and the post-distillation learning-rate schedule (F.2).

    The teacher snapshot, the best post-pruning student and the refresh bookkeeping are saved inside every
    checkpoint's adapter file while distillation runs (:mod:`apt_hf.checkpoint`); after ``distill_end`` no teacher is
    saved or needed."""

    def __init__(self, apt_callback: APTCallback, has_eval: bool) -> None:
        self.apt_callback = apt_callback
        self.teacher = Teacher()
        self.enabled = False
        self.start = self.end = self.last_event = 0
        self.refresh_steps: set[int] = set()
        self.best: Optional[float] = None
        self.best_loss: Optional[float] = None  # eval loss of the current teacher, for ties of the metric
        # Spec F.2 step 3: the best student evaluated after the last pruning event, reloaded at distill_end.
        self.best_student = ParamSnapshot()
        self.best_student_metric: Optional[float] = None
        self.best_student_loss: Optional[float] = None
        self.best_student_step: Optional[int] = None
        self._awaiting_eval = False
        self._awaiting_final = False
        self._has_eval = has_eval
        self.model = None

    @property
    def apt(self) -> APTModel:
        return self.apt_callback.apt

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        cfg, plan = self.apt_callback.config, self.apt_callback.plan
        self.enabled = plan.distill_start is not None  # the callback resolved (and checked) the distillation window
        if not self.enabled:
            if cfg.distillation and cfg.adaptive_pruning:  # e.g. target_sparsity=0: no distillation phase (spec F.2)
                logger.warning("APT distillation skipped: no pruning event has a target density below 1.")
            return control
        self._follow_plan(plan)
        if self._follow_plan not in self.apt_callback.plan_listeners:  # APTConfig.pruning_start_gate moves the plan
            self.apt_callback.plan_listeners.append(self._follow_plan)
        self._has_eval = self._has_eval and args.eval_strategy != "no"
        if not self._has_eval:
            logger.warning("APT distillation without evaluation: the teacher is refreshed at the start of every "
                           "mask-decay window whose target is < 1 (the latest model), instead of only when the dev "
                           "metric improves, and no best checkpoint is reloaded at distill_end.")
        elif args.metric_for_best_model is None:
            logger.warning("APT distillation: TrainingArguments.metric_for_best_model is unset, so teacher refreshes "
                           "and the best-checkpoint reload are judged on the eval loss; spec F.1 judges on the task's "
                           "dev metric (set metric_for_best_model, e.g. 'accuracy').")
        for listener in (self.teacher.follow, self.best_student.follow):
            if listener not in self.apt_callback.change_listeners:
                self.apt_callback.change_listeners.append(listener)
        # Spec D.4.2 / D.5: while distilling, pruned blocks stay physically present (zero-masked in the student, seen
        # by the mask-bypassing teacher) until the next teacher refresh or the end of distillation, so the teacher
        # keeps the structure its adapter snapshot was trained and validated with.
        self.apt_callback.hold_removal = lambda step: self.enabled and self.start - 1 <= step < self.end
        self.model = model
        step = state.global_step
        saved = self.apt_callback.resumed.get(STATE_NAME)
        if saved is not None:
            self.load_state_dict(saved)
        elif min(self.refresh_steps, default=self.start) <= step < self.end:
            raise checkpoint.CheckpointError(
                f"The run resumes at step {step}, after the distillation teacher was first taken and before "
                f"distill_end (step {self.end}), but the checkpoint carries no teacher; without it distillation would "
                "silently run with no teacher. Resume from a checkpoint saved by apt_hf.APTTrainer with "
                "distillation on, or set APTConfig.distillation=False.")
        checkpoint.register(self.apt, STATE_NAME, self)
        return control

    def _follow_plan(self, plan: Plan) -> None:
        """Take the distillation window, teacher-refresh steps and last event from the callback's plan (spec F.1,
        F.2); called again when the plan moves (``APTConfig.pruning_start_gate``)."""
        self.start, self.end = plan.distill_start, plan.distill_end
        real = [k for k, e in enumerate(plan.events) if plan.prunes(e)]
        self.refresh_steps = {plan.windows[k] for k in real if plan.windows[k] < self.end}
        if self.apt_callback.config.teacher_refresh == "never":  # only the first teacher is taken
            self.refresh_steps = {min(self.refresh_steps, default=self.start - 1)}
        self.last_event = plan.events[-1]

    def state_dict(self) -> dict[str, Any]:
        """Teacher and best post-pruning student (only while distillation can still use them) and the bookkeeping;
        a detached teacher also records its structure, so that resuming can rebuild it."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        during = self.apt_callback.step < self.end
        state = {"teacher": self.teacher.state_dict(names) if during else {}, "best": self.best,
                 "best_loss": self.best_loss, "refreshes": self.teacher.refreshes,
                 "best_student": self.best_student.state_dict(names) if self.apt_callback.step <= self.end else {},
                 "best_student_metric": self.best_student_metric, "best_student_loss": self.best_student_loss,
                 "best_student_step": self.best_student_step}
        if during and self.teacher.model is not None:
            state["teacher_structure"] = self.teacher.structure()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = dict(self.model.named_parameters())
        if state["teacher"] and state.get("teacher_structure") is None:  # (a detached one: see prepare_resume)
            self.teacher.load_state_dict(state["teacher"], params)
        self.best, self.teacher.refreshes = state["best"], state["refreshes"]
        self.best_loss = state.get("best_loss")
        self.best_student.load_state_dict(state.get("best_student", {}), params)
        self.best_student_metric = state.get("best_student_metric")
        self.best_student_loss = state.get("best_student_loss")
        self.best_student_step = state.get("best_student_step")

    def prepare_resume(self, saved: Optional[dict[str, Any]], model) -> None:
        """Before the checkpoint's weights are loaded (the model is still unpruned): re-create a teacher that had
        been detached from the model when the checkpoint was saved."""
        if saved and saved.get("teacher_structure") is not None:
            self.teacher.rebuild(model, saved["teacher_structure"], saved["teacher"])

    def active(self, step: int) -> bool:
        return self.enabled and self.teacher.ready and self.start <= step < self.end

    def _detach_teacher(self, model, optimizer) -> None:
        """After an event with no teacher refresh left before ``distill_end`` (e.g. the last event), the teacher
        moves into its own frozen mask-free copy of the model and the held blocks are removed from the student, so
        the student stops computing zero-masked blocks (beyond the reference, which prunes the student virtually).
        Costs a copy of the model as it stands (at most the teacher's density) until distillation ends."""
        names = {id(p): n for n, p in model.named_parameters()}
        with self.apt_callback.salience_paused():
            copy = self.apt.mask_free_copy(model)
        self.teacher.detach(copy, names)
        self.apt_callback.remove_pruned(optimizer)
        logger.info("APT distillation: teacher detached into its own copy of the model (no refresh before "
                    "distill_end); the held blocks are removed from the student.")

    def _refresh(self, model, optimizer) -> None:
        self.apt_callback.remove_pruned(optimizer)  # the new teacher is the pruned student (spec F.1)
        self.teacher.refresh([p for p in model.parameters() if p.requires_grad])
        logger.info("APT distillation: teacher refreshed (#%d).", self.teacher.refreshes)

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if not self.enabled:
            return control
        step = state.global_step
        if step in self.refresh_steps:
            if self._has_eval and self.apt_callback.config.teacher_refresh != "latest":
                control.should_evaluate, self._awaiting_eval = True, True
            else:
                self._refresh(model, optimizer)
        if (self.apt_callback.held is not None and step in self.apt_callback.plan.events and step < self.end
                and not any(step < r < self.end for r in self.refresh_steps)):
            self._detach_teacher(model, optimizer)
        if step == self.end:
            if self._has_eval:  # spec F.2 step 3: evaluate, reload the best post-pruning student (on_evaluate)
                control.should_evaluate, self._awaiting_final = True, True
            else:
                self._end_distillation(step, model, optimizer)
        if self.end <= step < state.max_steps:
            self._set_post_distill_lr(step + 1, state.max_steps, args, optimizer, lr_scheduler)
        return control

    def _set_post_distill_lr(self, step: int, total: int, args, optimizer, lr_scheduler) -> None:
        """Spec F.2: after distillation, peak LR x ``post_distill_lr_ratio`` with a fresh 6 % warm-up and linear
        decay to the end of training. Set after the Trainer's own scheduler step, so it is the rate the next
        optimizer step uses (and the one checkpoints save); whatever scheduler the Trainer built keeps running
        underneath and is overridden here each step."""
        factor = self.apt_callback.config.post_distill_lr_ratio * post_distill_lr_factor(step, end=self.end,
                                                                                         total=total)
        groups = _unwrap(optimizer, "optimizer").param_groups
        for group in groups:  # initial_lr: each group's peak, recorded by torch's LR schedulers
            group["lr"] = group.get("initial_lr", args.learning_rate) * factor
        sched = _unwrap(lr_scheduler, "scheduler")
        if getattr(sched, "_last_lr", None) is not None:  # what Trainer logs as the learning_rate
            sched._last_lr = [group["lr"] for group in groups]

    def _end_distillation(self, step: int, model, optimizer) -> None:
        """Spec F.2: the fine-tuning phase starts from a fresh optimizer state (the reference rebuilds the
        optimizer) on the physically pruned model; the teacher is dropped."""
        reset_state(optimizer, [p for p in model.parameters() if p.requires_grad])
        self.apt_callback.remove_pruned(optimizer)
        self.teacher.release()
        logger.info("APT distillation ended at step %d; fine-tuning with a fresh schedule at %.2fx the peak "
                    "learning rate.", step, self.apt_callback.config.post_distill_lr_ratio)

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if metrics is None:
            return control
        optimizer = kwargs.get("optimizer")
        anytime = (self.enabled and self.apt_callback.config.teacher_refresh == "eval"
                   and self.active(state.global_step) and self.apt_callback.masks_binary())
        if self._awaiting_eval or anytime:
            self._awaiting_eval = False
            value, loss, greater = self._judge(args, metrics)
            if improves(value, loss, self.best, self.best_loss, greater):
                self.best, self.best_loss = value, loss
                self._refresh(model, optimizer)
        if self.enabled and self.last_event <= state.global_step <= self.end:  # the model at its final density
            value, loss, greater = self._judge(args, metrics)
            if improves(value, loss, self.best_student_metric, self.best_student_loss, greater):
                self.best_student.take([p for p in model.parameters() if p.requires_grad])
                self.best_student_metric, self.best_student_loss = value, loss
                self.best_student_step = state.global_step
        if self._awaiting_final:
            self._awaiting_final = False
            self._reload_best_student()
            self._end_distillation(state.global_step, model, optimizer)
        return control

    def _reload_best_student(self) -> None:
        """Spec F.2 step 3: restore the best student evaluated after pruning completed (its trainable tensors; the
        backbone is frozen)."""
        if not self.best_student.ready:
            return
        self.best_student.restore()
        logger.info("APT distillation: reloaded the best student evaluated after the last pruning event (step %d, "
                    "metric %.4f) for the post-distillation fine-tuning.", self.best_student_step,
                    self.best_student_metric)
        self.best_student.clear()

    @staticmethod
    def _judge(args, metrics: dict) -> tuple[float, Optional[float], bool]:
        """The selection metric of an evaluation (``metric_for_best_model``, else the eval loss), the eval loss and
        whether greater is better."""
        name = args.metric_for_best_model or "loss"
        key = eval_metric_key(name)
        value = metrics.get(key)
        if value is None:
            raise KeyError(f"APT distillation needs '{key}' from evaluation; available: {sorted(metrics)}. "
                           "Set TrainingArguments.metric_for_best_model to one of them.")
        greater = args.greater_is_better if args.greater_is_better is not None else not name.endswith("loss")
        return value, metrics.get("eval_loss"), greater

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        if self.enabled:  # a run stopped before distill_end still ends with the pruned blocks removed
            self.apt_callback.remove_pruned(optimizer)
            self.teacher.release()
            checkpoint.unregister(self.apt, STATE_NAME)
        return control


class APTTrainer(Trainer):
    """Trainer for APT models: pruning/tuning callback, self-distillation loss, ``apt/*`` figures in every log.

    Adds an :class:`APTCallback` (reading the model's ``APTConfig``) unless one is passed, and a
    :class:`DistillCallback`. ``compute_loss`` adds ``mu * (a_pred L_pred + a_layer L_layer)`` during distillation.
    ``log`` merges the callback's sparsity / rank / loss figures before the ``report_to`` integrations see them.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.apt_callback is None:
            self.add_callback(APTCallback())
        self.apt_callback.rebuild_wrapper = self._rebuild_ddp_wrapper
        self.apt_callback.self_distilling = True
        self.distiller = DistillCallback(self.apt_callback, has_eval=self.eval_dataset is not None)
        self.add_callback(self.distiller)
        self._distill_logs: dict[str, list[float]] = {}

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train`` with the checkpoint checked first: ``True`` picks the newest *complete* checkpoint in
        ``output_dir`` (skipping, with a warning, folders a crash left half-written), and a folder must be complete
        and readable. Masks, pruned shapes and ranks come back when PEFT loads the adapter; the callbacks' state
        (salience, events, teacher) travels in the same file (:mod:`apt_hf.checkpoint`)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = checkpoint.last_resumable_checkpoint(self.args.output_dir, logger)
            logger.info("APT: resuming from %s", resume_from_checkpoint)
        elif isinstance(resume_from_checkpoint, str):
            checkpoint.check_resumable(resume_from_checkpoint)
        if isinstance(resume_from_checkpoint, str):
            saved = checkpoint.read_training_state(resume_from_checkpoint) or {}
            self.distiller.prepare_resume(saved.get(STATE_NAME), self.model)
        self._keep_transform_out_of_ddp()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ------------------------------------------------------------------------------------------ DDP
    def _outside_ddp_params(self) -> list:
        """Trainable parameters used outside the wrapped forward: the distillation transform (apt_hf.distributed)."""
        transform = getattr(find_apt_model(self.model), "apt_transform", None)
        return [] if transform is None else [p for p in transform.parameters() if p.requires_grad]

    def _keep_transform_out_of_ddp(self) -> None:
        if distributed.world_size() == 1 or self.model is None:
            return
        transform = getattr(find_apt_model(self.model), "apt_transform", None)
        if transform is not None:
            distributed.exclude_from_ddp(self.model, list(transform.parameters()))
            distributed.broadcast_([p.data for p in transform.parameters()])

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if distributed.world_size() > 1 and self.accelerator.sync_gradients:
            distributed.average_gradients(self._outside_ddp_params())  # what DDP does for the other parameters
        return loss

    def _rebuild_ddp_wrapper(self, dry_run: bool = False) -> None:
        """Re-initialise the DDP wrapper in place for the current parameters (no-op in one process).

        ``self.model_wrapped``, ``accelerator._models`` and the training loop's local ``model`` all hold this same
        object, so they stay valid (apt_hf.distributed explains why not a new wrapper)."""
        if distributed.world_size() == 1:
            return
        ddp = distributed.find_ddp(self.model_wrapped)
        if ddp is None:
            raise distributed.UnsupportedParallelismError(
                f"APT is running in {distributed.world_size()} processes but the Trainer's model is wrapped in "
                f"{type(self.model_wrapped).__name__}, not DistributedDataParallel. Supported: {distributed.SUPPORTED}.")
        if dry_run:
            distributed.check_rewrappable(ddp)
            return
        handler = getattr(self.accelerator, "ddp_handler", None)
        distributed.rewrap_ddp(ddp, handler.register_comm_hook if handler is not None else None)

    @property
    def apt_callback(self) -> Optional[APTCallback]:
        return next((c for c in self.callback_handler.callbacks if isinstance(c, APTCallback)), None)

    # ------------------------------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        step = self.state.global_step + 1
        if not (model.training and self.distiller.active(step)):
            self.loss_is_scaled_for_ga = None
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.loss_is_scaled_for_ga = False  # a mean loss: Trainer divides by the accumulation steps
        apt, cfg, plan = self.distiller.apt, self.apt_callback.config, self.apt_callback.plan
        teacher = self.distiller.teacher.outputs(model, apt.masks, inputs)
        student = model(**inputs, output_hidden_states=True)
        task = student.loss
        pred, layer = self._distill_losses(student, teacher, inputs, apt, cfg)
        a_pred = cfg.distill_pred_weight if cfg.distill_pred_weight is not None else default_pred_weight(
            cfg.task_type)
        mu = distill_mu(step, start=plan.start, end=plan.end, cap=cfg.distill_mu_max)
        logs = {}
        if cfg.skip_constant_teacher:  # no distillation from a teacher that gives this whole batch one answer
            constant = gives_one_answer(prediction_logits(teacher)[0].detach())
            mu, logs["apt/teacher_one_answer"] = (0.0 if constant else mu), float(constant)
        loss = mu * (a_pred * pred + cfg.distill_layer_weight * layer) + (1 - mu) * task
        logs.update({"apt/mu": mu, "loss_task": task, "loss_pred": pred, "loss_layer": layer})
        for key, value in logs.items():
            self._distill_logs.setdefault(key, []).append(float(value.detach() if torch.is_tensor(value) else value))
        return (loss, student) if return_outputs else loss

    def _distill_losses(self, student, teacher, inputs, apt: APTModel, cfg) -> tuple[torch.Tensor, torch.Tensor]:
        labels = inputs.get("labels")
        pairs = list(zip(prediction_logits(student), prediction_logits(teacher)))
        token_mask = None
        if pairs[0][0].dim() == 3:  # per-token logits: KL per target token (spec F.3, seq2seq / causal LM)
            if labels is not None and labels.shape == pairs[0][0].shape[:2]:
                causal = type(apt.model).__name__.endswith("ForCausalLM")
                token_mask = next_token_mask(labels) if causal else labels != -100
            else:
                token_mask = inputs.get("attention_mask")
        # extractive QA: the mean of the start- and the end-position KL (spec F.3)
        pred = sum(prediction_loss(s, t, cfg.distill_temperature, token_mask) for s, t in pairs) / len(pairs)
        alive = alive_layers(apt.layout, apt.masks)
        transform = getattr(apt, "apt_transform", None) or torch.nn.Identity()
        normalize = apt.layout.spec.distill_normalize
        stacks = [(getattr(student, s.hidden_states)[1:], getattr(teacher, s.hidden_states)[1:], alive[s.name],
                   normalize) for s in apt.layout.layer_stacks()]
        layer = pred.new_zeros(())
        generator = torch.Generator().manual_seed(self.args.seed * 1_000_003 + self.state.global_step)  # resumable
        for s_hidden, t_hidden, stack_alive, normalize in stacks:
            chosen = sample_teacher_layers(len(t_hidden), cfg.distill_num_layers, generator)
            layer = layer + layer_loss(s_hidden, t_hidden, chosen, stack_alive, transform, normalize) / len(stacks)
        return pred, layer

    # ------------------------------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        callback = self.apt_callback
        if callback is not None and is_training_log(logs):
            logs = {**logs, **callback.pop_logs()}
            for key, values in self._distill_logs.items():
                logs[key] = sum(values) / len(values)
            self._distill_logs = {}
        super().log(logs, *args, **kwargs)
