"""`APTConfig`: the adapter, pruning, tuning and distillation settings of APT (spec A, D, E, F, H, K)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional, Union

from peft import PeftConfig

APT_PEFT_TYPE = "APT"

# Default adapter placement per architecture (spec A.2).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "bert": ["query", "value", "intermediate.dense"],
    "roberta": ["query", "value", "intermediate.dense"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "t5": ["q", "v", "wi_0", "wi"],
}

_INT_FIELDS = ("r", "num_pruning_events", "mask_decay_window", "max_rank", "distill_num_layers", "transform_rank",
               "pretune_batches")
_REAL_FIELDS = ("lora_alpha", "lora_dropout", "target_sparsity", "pruning_start", "pruning_end", "sparsity_warmup",
                "mask_decay", "salience_beta", "tuning_budget_ratio", "distill_end", "distill_temperature",
                "distill_pred_weight", "distill_layer_weight", "post_distill_lr_ratio", "pretune_density")


@dataclass
class APTConfig(PeftConfig):
    """Configuration of an APT adapter model (a PEFT tuner type of its own).

    Adapter (spec A):
        r: initial adapter rank (spec H.1: 8).
        lora_alpha: adapter alpha; the scale ``lora_alpha / r`` is fixed from the initial rank and never
            changes when a rank grows (spec E.3.6), so 16 gives ``s = 2``.
        lora_dropout: dropout on the adapter input.
        target_modules: names (suffixes) or a regex of the linear layers that get adapters. ``None`` picks the
            per-architecture default of spec A.2: query/value/FFN-up for BERT/RoBERTa, q/v of every attention kind
            plus the gated-FFN gate for T5, q_proj/v_proj for LLaMA-family models.
        rank_pattern: the current rank of each adapted module, by module name. Filled automatically when the
            adapter is saved, so that grown adapters reload at their grown rank.
        modules_to_save: extra modules trained in full and saved (PEFT fills the task head for ``task_type``).

    Adaptive pruning (spec D, K.4):
        target_sparsity: fraction of the original model's parameters (spec B.3 count) removed at the end of
            pruning, in [0, 1). 0.6 keeps 40 %.
        pruning_start: first optimizer step of the pruning window (spec H.1: 200). A float in (0, 1) is read as a
            fraction of the run's total optimizer steps.
        pruning_end: last optimizer step of the pruning window, where the final target is reached. A float in
            (0, 1] is a fraction of the total optimizer steps (spec: 3 of 40 epochs = 0.075).
        sparsity_warmup: steps after ``pruning_start`` during which the target stays at density 1 (spec D.2: one
            epoch). A float in [0, 1) is a fraction of the total optimizer steps.
        num_pruning_events: number of discrete pruning/tuning events in the window (spec D.2: 10).
        mask_decay_window: optimizer steps before each event in which masks move by ``mask_decay`` (spec D.3: 200).
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

    Adaptive tuning (spec E, K.5):
        adaptive_tuning: switch for rank growth (``False`` is the paper's "w/o A_T" ablation).
        max_rank: rank cap of any adapter (spec H.1: 64).
        tuning_budget_ratio: the adapter budget grows linearly over the pruning window from 1x to this multiple
            of the initial adapter size (spec E.2: 4.0).

    Self-distillation (spec F, K.7; used by ``APTTrainer``):
        distillation: switch (``False`` is the paper's "w/o D_S" ablation).
        distill_end: optimizer step (int) or fraction of training (float) at which distillation ends; it starts the
            step after the first event whose target is < 1. Spec: 20 of 40 epochs after ~1.26 epochs = 0.53.
        distill_temperature: temperature ``T`` of ``T^2 KL(p_t || p_s)`` (spec F.3: 2/3).
        distill_pred_weight: ``a_pred``; ``None`` picks the spec's per-task value: 1.0 for classification/QA
            (0.1 x 10 in the reference), 0.1 for seq2seq and causal LM (KL per target token).
        distill_layer_weight: ``a_layer`` (spec F.3: 0.9).
        distill_num_layers: teacher layers drawn each step, one from each contiguous block (spec F.3: 4).
        transform_rank: LoRA rank of the layer transformation ``Tr`` (identity + LoRA, spec F.4: 8).
        post_distill_lr_ratio: peak learning-rate factor of the task-loss fine-tuning after distillation, which gets
            a fresh schedule: 6 % warm-up, then linear decay to the end of training (spec F.2: 0.1).
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
    pruning_start: Union[int, float] = field(default=200, metadata={"help": "First step of the pruning window."})
    pruning_end: Union[int, float] = field(default=0.075, metadata={"help": "Step (or fraction) of the last event."})
    sparsity_warmup: Union[int, float] = field(default=0.025, metadata={"help": "Steps at density 1 after start."})
    num_pruning_events: int = field(default=10, metadata={"help": "Number of pruning/tuning events."})
    mask_decay_window: int = field(default=200, metadata={"help": "Steps before an event in which masks move."})
    mask_decay: float = field(default=0.01, metadata={"help": "Mask step per optimizer step in a window."})
    salience_beta: float = field(default=0.85, metadata={"help": "EMA factor of salience and importance."})
    use_kurtosis: Optional[bool] = field(default=None, metadata={"help": "Outlier-aware kurtosis term."})
    adaptive_pruning: bool = field(default=True, metadata={"help": "Prune (False = 'w/o A_P')."})
    pretune_density: float = field(default=1.0, metadata={"help": "Density of pre-tuning pruning (1 = off, D.6)."})
    pretune_batches: int = field(default=64, metadata={"help": "Calibration batches of pre-tuning pruning."})
    # Adaptive tuning.
    adaptive_tuning: bool = field(default=True, metadata={"help": "Grow ranks (False = 'w/o A_T')."})
    max_rank: int = field(default=64, metadata={"help": "Rank cap of any adapter."})
    tuning_budget_ratio: float = field(default=4.0, metadata={"help": "Final adapter budget / initial size."})
    # Self-distillation.
    distillation: bool = field(default=True, metadata={"help": "Self-distill (False = 'w/o D_S'); APTTrainer only."})
    distill_end: Union[int, float] = field(default=0.53, metadata={"help": "Step (or fraction) distillation ends."})
    distill_temperature: float = field(default=2.0 / 3.0, metadata={"help": "KL temperature T (spec F.3)."})
    distill_pred_weight: Optional[float] = field(default=None, metadata={"help": "a_pred; None = per task."})
    distill_layer_weight: float = field(default=0.9, metadata={"help": "a_layer (spec F.3)."})
    distill_num_layers: int = field(default=4, metadata={"help": "Teacher layers drawn per step, one per block."})
    transform_rank: int = field(default=8, metadata={"help": "Rank of the layer transformation Tr's LoRA."})
    post_distill_lr_ratio: float = field(default=0.1, metadata={"help": "LR factor after distillation (F.2)."})

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
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise bad(name, value, "use an integer")
        for name in _REAL_FIELDS:
            value = getattr(self, name)
            if value is None and name == "distill_pred_weight":
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
        if self.mask_decay_window < 0:
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
        if not 0.0 < self.post_distill_lr_ratio <= 1.0:
            raise bad("post_distill_lr_ratio", self.post_distill_lr_ratio, "use a factor in (0, 1]")
        if isinstance(self.distill_end, bool) or self.distill_end < 0 or (
                isinstance(self.distill_end, float) and self.distill_end > 1.0):
            raise bad("distill_end", self.distill_end, "use a step count (int) or a fraction of training (float <= 1)")
        if not 1.0 - self.target_sparsity - 1e-9 <= self.pretune_density <= 1.0:
            raise bad("pretune_density", self.pretune_density,
                      f"use a density in [1 - target_sparsity, 1] = [{1.0 - self.target_sparsity:g}, 1]; 1 switches "
                      "pre-tuning pruning off")
        if self.pretune_density < 1.0 and not self.adaptive_pruning:
            raise bad("pretune_density", self.pretune_density, "pre-tuning pruning needs adaptive_pruning=True")
        if self.pretune_batches < 1:
            raise bad("pretune_batches", self.pretune_batches, "use at least 1 calibration batch (spec: 64)")
        if self.tuning_budget_ratio < 1.0:
            raise bad("tuning_budget_ratio", self.tuning_budget_ratio, "use a ratio >= 1 (the spec uses 4.0)")

    @property
    def scaling(self) -> float:
        """The fixed adapter scale ``s = lora_alpha / r`` (spec A.1)."""
        return self.lora_alpha / self.r
