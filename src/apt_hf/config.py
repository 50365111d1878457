"""`APTConfig`: the adapter, pruning, tuning and distillation settings of APT (spec A, D, E, F, H, K)."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Union

from peft import PeftConfig

if TYPE_CHECKING:  # pragma: no cover
    from .schedule import Plan

# The PEFT type names the package: PEFT looks it up in a dict that only `import apt_hf` fills, so a process without
# apt_hf fails with `KeyError: 'APT (pip install apt_hf; import apt_hf)'`, the only text PEFT shows (issue 16).
APT_PEFT_TYPE = "APT (pip install apt_hf; import apt_hf)"
LEGACY_PEFT_TYPES = ("APT",)  # adapters saved by earlier releases
ADAPTER_CARD_SECTION = """## APT adapter (apt_hf)

This adapter was trained with apt_hf (APT, Adaptive Pruning and Tuning). Loading it needs that package:
`pip install apt_hf`, then `import apt_hf` before `PeftModel.from_pretrained` or
`AutoPeftModel...from_pretrained` (the import registers the APT tuner type with PEFT; without it PEFT stops with
`KeyError: 'APT (pip install apt_hf; import apt_hf)'`). The adapter records which attention heads, FFN neurons and
hidden dimensions were pruned, and loading rebuilds that structure on the base model. `model.disable_adapter()` then
runs the pruned base model, not the original dense one. For a model that loads without apt_hf, export it with
`apt_hf.export_pruned(model, folder)` (or `model.merge_and_unload().save_pretrained(folder)`).
"""

TEACHER_REFRESH = ("window", "eval", "never", "latest")  # see APTConfig.teacher_refresh
_INT_FIELDS = ("r", "num_pruning_events", "mask_decay_window", "max_rank", "distill_num_layers", "transform_rank",
               "pretune_batches")
_REAL_FIELDS = ("lora_alpha", "lora_dropout", "target_sparsity", "pruning_start", "pruning_end", "sparsity_warmup",
                "mask_decay", "salience_beta", "tuning_budget_ratio", "distill_end", "distill_temperature",
                "distill_pred_weight", "distill_layer_weight", "distill_mu_max", "post_distill_lr_ratio",
                "pretune_density", "pruning_start_gate")
_OPTIONAL_FIELDS = ("mask_decay_window", "distill_end", "distill_pred_weight", "pruning_start_gate")  # None = derived from other fields

# The paper's schedule (spec D.2, D.3, F.2, H.1, H.2: RoBERTa/T5 GLUE scripts, 40 epochs): window from step 200 to
# epoch 3 with a one-epoch sparsity warm-up, 10 events, 200-step mask-decay windows, distillation for 20 epochs
# after the first real event, and spec F.1's teacher whatever it answers. Fractions are of a 40-epoch run.
PAPER_EPOCHS = 40
PAPER_SCHEDULE = dict(pruning_start=200, pruning_end=3 / PAPER_EPOCHS, sparsity_warmup=1 / PAPER_EPOCHS,
                      num_pruning_events=10, mask_decay_window=200, distill_end=0.53, post_distill_lr_ratio=0.1,
                      skip_constant_teacher=False)
PAPER_DISTILL_EPOCHS = 20


@dataclass
class APTConfig(PeftConfig):
    """Configuration of an APT adapter model (a PEFT tuner type of its own).

    Adapter (spec A):
        r: initial adapter rank (spec H.1: 8).
        lora_alpha: adapter alpha; the scale ``lora_alpha / r`` is fixed from the initial rank and never
            changes when a rank grows (spec E.3.6), so 16 gives ``s = 2``.
        lora_dropout: dropout on the adapter input.
        target_modules: names (suffixes) or a regex of the linear layers that get adapters. ``None`` picks the
            family's default of spec A.2 (``ArchSpec.target_modules`` in :mod:`apt_hf.arch`): query/value/FFN-up for
            BERT/RoBERTa, q/v of every attention kind plus the gated-FFN gate for T5, q_proj/v_proj for LLaMA-family
            models.
        rank_pattern: the current rank of each adapted module, by module name. Filled automatically when the
            adapter is saved, so that grown adapters reload at their grown rank.
        modules_to_save: extra modules trained in full and saved (PEFT fills the task head for ``task_type``).

    Adaptive pruning (spec D, K.4). The schedule defaults are fractions of the run, so they fit any run length; they
    are the settings the README's benchmarks use for 2-4 epoch fine-tunes: prune between 5 % and 60 % of training in
    5 events, self-distil while pruning, and fine-tune the pruned model for the last 40 %. The paper's own schedule
    (absolute steps of a 40-epoch run) is :meth:`APTConfig.paper_preset`.
        target_sparsity: fraction of the original model's parameters (spec B.3 count) removed at the end of
            pruning, in [0, 1). 0.6 keeps 40 %.
        pruning_start: first optimizer step of the pruning window. An int is a step count; a float in [0, 1] is a
            fraction of the run's total optimizer steps (default 0.05; paper: step 200).
        pruning_end: last optimizer step of the pruning window, where the final target is reached; int steps or a
            fraction (default 0.6; paper: 3 of 40 epochs = 0.075).
        sparsity_warmup: steps after ``pruning_start`` during which the target stays at density 1; int steps or a
            fraction (default 0.05; paper, spec D.2: one epoch = 0.025).
        num_pruning_events: number of discrete pruning/tuning events in the window (default 5; paper: 10).
        mask_decay_window: optimizer steps before each event in which masks move by ``mask_decay``. ``None``
            (default) takes half the steps between two events, at most 200; paper (spec D.3): 200.
        mask_decay: mask step per optimizer step inside a decay window (spec D.1: 0.01).
        salience_beta: EMA factor of block salience and adapter importance (spec C.1: 0.85).
        use_kurtosis: add ``sqrt(max(Kurt, 0))`` of the activation-weighted weights (spec C.1). ``None`` turns it
            on for decoder-only LMs and off for encoders, as in the reference results (spec K.3).
        adaptive_pruning: switch for pruning (``False`` is the paper's "w/o A_P" ablation).
        pretune_density: pre-tuning pruning (spec D.6, the paper's LLaMA setting): before the first training step,
            static salience (summed, with the kurtosis term when ``use_kurtosis``) is gathered over
            ``pretune_batches`` random training batches, the model is pruned physically to this density in one shot,
            and the cubic schedule then runs from it to ``1 - target_sparsity``. 1.0 (default) switches it off;
            ``1 - target_sparsity`` prunes straight to the target before tuning.
        pretune_batches: calibration batches (of the training batch size) for pre-tuning pruning (spec H.2: 64).
        pruning_start_gate: beyond the spec: hold the pruning window until the model has started to learn the task.
            ``None`` (default, the paper) opens it at ``pruning_start``. A number ``delta`` opens it at the first
            evaluation from ``pruning_start`` on whose dev metric (``TrainingArguments.metric_for_best_model``)
            beats the untrained model's (the evaluation at step 0: ``eval_on_start=True``) by at least ``delta``,
            e.g. 0.05 accuracy; at the latest it opens at ``pruning_end``, with a warning. The rest of the schedule
            (window end, warm-up, ``distill_end``) moves with it and keeps its share of the steps left. Against
            pruning a model that still predicts a constant: its salience does not reflect the task (README, issue
            13: CoLA and STS-B). A CoLA diagnostic (README) did not help: an untrained head can score below a
            constant model, and at 3 epochs the adapters had not learned by the latest opening.

    Adaptive tuning (spec E, K.5):
        adaptive_tuning: switch for rank growth (``False`` is the paper's "w/o A_T" ablation).
        max_rank: rank cap of any adapter (spec H.1: 64).
        tuning_budget_ratio: the adapter budget grows linearly over the pruning window from 1x to this multiple
            of the initial adapter size (spec E.2: 4.0).

    Self-distillation (spec F, K.7; used by ``APTTrainer``):
        distillation: switch (``False`` is the paper's "w/o D_S" ablation).
        distill_end: optimizer step (int) or fraction of training (float) at which distillation ends; it starts the
            step after the first event whose target is < 1. ``None`` (default) ends it with the pruning window
            (``pruning_end``): in a short run the teacher is an early snapshot, and distilling from it after the
            window caps the student at the teacher's accuracy (README, Results). Paper: 20 epochs after the first
            real event, about 0.53 of a 40-epoch run.
        distill_temperature: temperature ``T`` of ``T^2 KL(p_t || p_s)`` (spec F.3: 2/3).
        distill_pred_weight: ``a_pred``; ``None`` picks the spec's per-task value: 1.0 for classification/QA
            (0.1 x 10 in the reference), 0.1 for seq2seq and causal LM (KL per target token).
        distill_layer_weight: ``a_layer`` (spec F.3: 0.9).
        distill_num_layers: teacher layers drawn each step, one from each contiguous block (spec F.3: 4).
        distill_mu_max: cap of the distillation weight ``mu`` (spec F.3 ramps it to 1, so the task loss's weight
            ``1 - mu`` reaches 0 at the end of the pruning window). Beyond the spec: a cap below 1 keeps the task loss
            in the student's objective for the whole distillation phase. Default 1.0 (the paper): 0.5, tried against
            the first cause of the diagnosis in the README (issue 13), lost on SST-2 (0.8693 against 0.8750).
        transform_rank: LoRA rank of the layer transformation ``Tr`` (identity + LoRA, spec F.4: 8).
        post_distill_lr_ratio: peak learning-rate factor of the task-loss fine-tuning after distillation, which gets
            a fresh schedule: 6 % warm-up, then linear decay to the end of training. Spec F.2 uses 0.1 after a
            20-epoch distillation phase (``paper_preset`` keeps it); the default 1.0 was chosen on SST-2 and MRPC
            (README, issue 13), where a short recovery at 0.1x leaves the pruned student under-trained.
        teacher_refresh: when the teacher snapshot is replaced by the current student. ``"window"`` (spec F.1): at
            the start of each mask-decay window of a real event, if the dev metric beats the teacher's. Beyond the
            spec: ``"eval"`` also at any other evaluation during distillation (masks at 0/1) that beats it, so the
            teacher is always the best model evaluated so far; ``"never"``: the first teacher (the dense model at
            the first window) is kept; ``"latest"``: at every window start, whatever the metric (what runs without
            evaluation data do).
        skip_constant_teacher: beyond the spec: in a training step whose teacher gives every example of the batch the
            same class (or the same score), the student takes only the task loss (``mu = 0``; logged as
            ``apt/teacher_one_answer``). Against the collapse found in the README's benchmark (issue 13): a first
            teacher taken while the model still predicts the majority class is kept (its score is hard to beat
            early), and distilling from it pulls the student to a constant model. Default True, chosen on SST-2 and
            MRPC by a rule fixed before its seed-43 runs (README); ``paper_preset`` keeps the paper's False.
    """

    r: int = field(default=8, metadata={"help": "Initial adapter rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "Adapter alpha; scale = lora_alpha / r (fixed)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules that get APT adapters; None = per-architecture default (spec A.2)."}
    )
    rank_pattern: dict[str, int] = field(
        default_factory=dict, metadata={"help": "Current rank per adapted module (filled on save)."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules trained in full and saved (e.g. the task head)."}
    )
    # Adaptive pruning.
    target_sparsity: float = field(default=0.6, metadata={"help": "Fraction of n_params removed at the end."})
    pruning_start: Union[int, float] = field(default=0.05, metadata={"help": "Step (or fraction) the window opens."})
    pruning_end: Union[int, float] = field(default=0.6, metadata={"help": "Step (or fraction) of the last event."})
    sparsity_warmup: Union[int, float] = field(default=0.05, metadata={"help": "Steps at density 1 after start."})
    num_pruning_events: int = field(default=5, metadata={"help": "Number of pruning/tuning events."})
    mask_decay_window: Optional[int] = field(
        default=None, metadata={"help": "Steps before an event in which masks move; None = min(200, gap // 2)."})
    mask_decay: float = field(default=0.01, metadata={"help": "Mask step per optimizer step in a window."})
    salience_beta: float = field(default=0.85, metadata={"help": "EMA factor of salience and importance."})
    use_kurtosis: Optional[bool] = field(default=None, metadata={"help": "Outlier-aware kurtosis term."})
    adaptive_pruning: bool = field(default=True, metadata={"help": "Prune (False = 'w/o A_P')."})
    pretune_density: float = field(default=1.0, metadata={"help": "Density of pre-tuning pruning (1 = off, D.6)."})
    pretune_batches: int = field(default=64, metadata={"help": "Calibration batches of pre-tuning pruning."})
    pruning_start_gate: Optional[float] = field(
        default=None, metadata={"help": "Open the pruning window once the dev metric beats step 0's by this much."})
    # Adaptive tuning.
    adaptive_tuning: bool = field(default=True, metadata={"help": "Grow ranks (False = 'w/o A_T')."})
    max_rank: int = field(default=64, metadata={"help": "Rank cap of any adapter."})
    tuning_budget_ratio: float = field(default=4.0, metadata={"help": "Final adapter budget / initial size."})
    # Self-distillation.
    distillation: bool = field(default=True, metadata={"help": "Self-distill (False = 'w/o D_S'); APTTrainer only."})
    distill_end: Optional[Union[int, float]] = field(
        default=None, metadata={"help": "Step (or fraction) distillation ends; None = pruning_end."})
    distill_temperature: float = field(default=2.0 / 3.0, metadata={"help": "KL temperature T (spec F.3)."})
    distill_pred_weight: Optional[float] = field(default=None, metadata={"help": "a_pred; None = per task."})
    distill_layer_weight: float = field(default=0.9, metadata={"help": "a_layer (spec F.3)."})
    distill_num_layers: int = field(default=4, metadata={"help": "Teacher layers drawn per step, one per block."})
    distill_mu_max: float = field(default=1.0, metadata={"help": "Cap of the distillation weight mu (spec F.3: 1)."})
    transform_rank: int = field(default=8, metadata={"help": "Rank of the layer transformation Tr's LoRA."})
    post_distill_lr_ratio: float = field(default=1.0, metadata={"help": "LR factor after distillation (F.2: 0.1)."})
    teacher_refresh: str = field(default="window", metadata={"help": "When the teacher is refreshed: window (spec "
                                                                      "F.1), eval, never or latest."})
    skip_constant_teacher: bool = field(default=True, metadata={"help": "No distillation in a step whose teacher "
                                                                         "gives the whole batch one answer."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = APT_PEFT_TYPE
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = sorted(self.target_modules)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field and how to fix it."""

        def bad(name: str, value: object, want: str) -> ValueError:
            return ValueError(f"APTConfig.{name}={value!r} is invalid: {want}.")

        # Types first, so that strings, bools, NaN and inf never reach (or slip through) the range checks below.
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_FIELDS:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise bad(name, value, "use an integer")
        for name in _REAL_FIELDS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_FIELDS:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise bad(name, value, "use a finite number")
        if not isinstance(self.r, int) or self.r < 1:
            raise bad("r", self.r, "use a positive integer rank such as 8")
        if self.lora_alpha <= 0:
            raise bad("lora_alpha", self.lora_alpha, "use a positive value (16 gives scale 2 at r=8)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise bad("lora_dropout", self.lora_dropout, "use a probability in [0, 1)")
        if not 0.0 <= self.target_sparsity < 1.0:
            raise bad("target_sparsity", self.target_sparsity, "use a fraction in [0, 1); 0.6 keeps 40 % of n_params")
        for name in ("pruning_start", "pruning_end", "sparsity_warmup"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise bad(name, value, "use a non-negative step count (int) or a fraction of training (float < 1)")
            if isinstance(value, float) and value > 1.0:
                raise bad(name, value, "a float is a fraction of the total steps and must be <= 1; pass an int for steps")
        if self.num_pruning_events < 1:
            raise bad("num_pruning_events", self.num_pruning_events, "use at least 1 event")
        if self.mask_decay_window is not None and self.mask_decay_window < 0:
            raise bad("mask_decay_window", self.mask_decay_window, "use a non-negative number of steps")
        if not 0.0 < self.mask_decay <= 1.0:
            raise bad("mask_decay", self.mask_decay, "use a step size in (0, 1]; the spec uses 0.01")
        if not 0.0 <= self.salience_beta < 1.0:
            raise bad("salience_beta", self.salience_beta, "use an EMA factor in [0, 1); the spec uses 0.85")
        if self.max_rank < self.r:
            raise bad("max_rank", self.max_rank, f"it must be >= r ({self.r})")
        if self.distill_temperature <= 0:
            raise bad("distill_temperature", self.distill_temperature, "use a positive temperature (spec: 2/3)")
        if self.distill_pred_weight is not None and self.distill_pred_weight < 0:
            raise bad("distill_pred_weight", self.distill_pred_weight, "use a weight >= 0, or None for the task default")
        if self.distill_layer_weight < 0:
            raise bad("distill_layer_weight", self.distill_layer_weight, "use a weight >= 0 (spec: 0.9)")
        for name in ("distill_num_layers", "transform_rank"):
            if getattr(self, name) < 1:
                raise bad(name, getattr(self, name), "use a positive integer")
        if not 0.0 < self.distill_mu_max <= 1.0:
            raise bad("distill_mu_max", self.distill_mu_max, "use a cap in (0, 1]; 1.0 is the paper's ramp")
        if not 0.0 < self.post_distill_lr_ratio <= 1.0:
            raise bad("post_distill_lr_ratio", self.post_distill_lr_ratio, "use a factor in (0, 1]")
        if self.distill_end is not None and (self.distill_end < 0 or (
                isinstance(self.distill_end, float) and self.distill_end > 1.0)):
            raise bad("distill_end", self.distill_end, "use a step count (int) or a fraction of training (float <= 1)")
        if self.teacher_refresh not in TEACHER_REFRESH:
            raise bad("teacher_refresh", self.teacher_refresh, f"use one of {', '.join(TEACHER_REFRESH)}")
        if not 1.0 - self.target_sparsity - 1e-9 <= self.pretune_density <= 1.0:
            raise bad("pretune_density", self.pretune_density,
                      f"use a density in [1 - target_sparsity, 1] = [{1.0 - self.target_sparsity:g}, 1]; 1 switches "
                      "pre-tuning pruning off")
        if not isinstance(self.skip_constant_teacher, bool):
            raise bad("skip_constant_teacher", self.skip_constant_teacher, "use True or False")
        if self.pruning_start_gate is not None and self.pruning_start_gate < 0:
            raise bad("pruning_start_gate", self.pruning_start_gate, "use a gain of the dev metric >= 0 (e.g. 0.05), "
                      "or None to open the pruning window at pruning_start")
        if self.pretune_density < 1.0 and not self.adaptive_pruning:
            raise bad("pretune_density", self.pretune_density, "pre-tuning pruning needs adaptive_pruning=True")
        if self.pretune_batches < 1:
            raise bad("pretune_batches", self.pretune_batches, "use at least 1 calibration batch (spec: 64)")
        if self.tuning_budget_ratio < 1.0:
            raise bad("tuning_budget_ratio", self.tuning_budget_ratio, "use a ratio >= 1 (the spec uses 4.0)")

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """PEFT's config save, plus a section in the adapter's model card saying that loading needs apt_hf."""
        super().save_pretrained(save_directory, **kwargs)
        card = os.path.join(save_directory, "README.md")
        text = open(card).read() if os.path.exists(card) else ""
        if ADAPTER_CARD_SECTION not in text:
            with open(card, "w") as f:
                f.write(text.rstrip() + ("\n\n" if text.strip() else "") + ADAPTER_CARD_SECTION)

    @classmethod
    def paper_preset(cls, steps_per_epoch: Optional[int] = None, **overrides) -> "APTConfig":
        """The paper's schedule (spec D.2, D.3, F.2, H.1, H.2), for runs as long as the paper's (40 epochs).

        Without ``steps_per_epoch`` the epoch-based settings are fractions of a 40-epoch run (``pruning_end``
        0.075, ``sparsity_warmup`` 0.025, ``distill_end`` 0.53). With it they are the reference scripts' step
        counts for any run length: ``pruning_end = 3 E``, ``sparsity_warmup = E``, and distillation lasts ``20 E``
        steps from the step after the first real pruning event (SST-2, E = 2105: events 811 ... 6315, distillation
        steps 2647-44747), the recovery after distillation peaks at 0.1x the learning rate
        (``post_distill_lr_ratio``), and the student distils from a teacher that gives a batch one answer too
        (``skip_constant_teacher=False``).
        Every other field keeps its default (the paper's values too) unless ``overrides``
        name it.
        The paper trains 40 epochs; a run shorter than about 21 epochs cannot fit this schedule (use the defaults).
        """
        settings = {**PAPER_SCHEDULE, **overrides}
        if steps_per_epoch is not None:
            if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
                raise ValueError(f"steps_per_epoch={steps_per_epoch!r} is invalid: use the number of optimizer steps "
                                 "per epoch (a positive integer), or None for fractions of a 40-epoch run.")
            from .schedule import resolve_plan

            epoch_based = {"pruning_end": 3 * steps_per_epoch, "sparsity_warmup": steps_per_epoch}
            settings = {**PAPER_SCHEDULE, **epoch_based, **overrides}
            if "distill_end" not in overrides:  # 20 epochs from the step after the first real event (spec F.2)
                plan = resolve_plan(cls(**{**settings, "distill_end": None}), PAPER_EPOCHS * steps_per_epoch,
                                    distill=False)
                first = plan.first_real_event if plan.first_real_event is not None else plan.end
                settings["distill_end"] = first + 1 + PAPER_DISTILL_EPOCHS * steps_per_epoch
        return cls(**settings)

    def resolve_schedule(self, total_steps: int, distill: bool = True) -> "Plan":
        """The concrete schedule of a run of ``total_steps`` optimizer steps: event steps, mask-decay windows,
        density targets and, when ``distillation`` is on and the trainer self-distils (``distill``: ``APTTrainer``
        does, a stock ``Trainer`` does not), the distillation window. Raises ``ValueError`` naming the setting to
        change when the schedule does not fit the run: the check ``APTCallback`` makes at train start, available
        before a model is built. With ``pruning_start_gate`` the plan that opens at the latest step (``pruning_end``)
        is checked as well."""
        from .schedule import gated_plan, resolve_plan

        plan = resolve_plan(self, total_steps, distill)
        if self.pruning_start_gate is not None and self.adaptive_pruning:
            gated_plan(self, total_steps, plan.end, distill)
        return plan

    @property
    def scaling(self) -> float:
        """The fixed adapter scale ``s = lora_alpha / r`` (spec A.1)."""
        return self.lora_alpha / self.r
