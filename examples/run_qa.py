#!/usr/bin/env python
# Copyright 2024 The apt_hf authors. Licensed under the Apache License, Version 2.0.
"""Fine-tune an extractive question-answering model on SQuAD-format data with APT, LoRA or full fine-tuning.

The paper's SQuAD v2.0 setting (spec H, Table 2: RoBERTa-base, 60 % sparsity, self-distillation with the KL averaged
over the start and end logits, spec F.3). Data: SQuAD v1.1/v2.0 JSON files (``--train_file``, ``--validation_file``)
or, with network access (``HF_HUB_OFFLINE=0``), a Hub dataset in the ``squad_v2`` layout (``--dataset_name``).
Contexts longer than ``--max_seq_length`` are split into overlapping windows (``--doc_stride``); evaluation picks the
best span over an example's windows (or no answer, SQuAD v2) and reports the official exact match and F1, overall and
for answerable / unanswerable questions. On a GPU with a Hub checkpoint::

    HF_HUB_OFFLINE=0 python examples/run_qa.py --model_name_or_path FacebookAI/roberta-base \\
        --dataset_name rajpurkar/squad_v2 --method apt --target_sparsity 0.6 --num_train_epochs 2 \\
        --per_device_train_batch_size 32 --eval_strategy steps --eval_steps 2000 --output_dir outputs/squad_apt

Offline (CPU), the default model is all-MiniLM-L6-v2 of the ``demo`` extra. The same command runs under
``accelerate launch examples/run_qa.py ...``. APT's pruned model is exported to ``<output_dir>/pruned_model``
(``apt_hf.load_pruned``); the schedule options are those of ``examples/run_glue.py``.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForQuestionAnswering,
    EvalPrediction,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

EXAMPLES = Path(__file__).resolve().parent
sys.path.insert(0, str(EXAMPLES))  # utils_examples.py, beside this script, also when this file is imported by path
from utils_examples import (AdapterArguments, APTArguments, EvalClock, InputError, adapt_model,  # noqa: E402
                            build_apt_config, default_learning_rate, exit_on_bad_input, export_folder, kept_params_row,
                            load_config_and_tokenizer, minilm_path, optimizer_steps, pruned_size, save_summary,
                            setup_logging)

import apt_hf  # noqa: E402  (found by utils_examples in a source checkout)
from apt_hf.arch import SPECS, find_spec  # noqa: E402
from apt_hf.squad import SquadDataError, best_answers, load_squad, squad_v2_scores  # noqa: E402

logger = logging.getLogger(__name__)

TRAINING_DEFAULTS = dict(output_dir="outputs/run_qa", learning_rate=None, per_device_train_batch_size=32,
                         per_device_eval_batch_size=64, warmup_steps=0.06, logging_steps=10, save_strategy="no",
                         report_to="none")


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "Model folder or Hub id (Hub ids need HF_HUB_OFFLINE=0). Default: the offline all-MiniLM-L6-v2 "
                "checkpoint of the `demo` extra (its QA head starts untrained)."})
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "Tokenizer, if not the model's."})


@dataclass
class DataArguments:
    train_file: Optional[str] = field(default=None, metadata={"help": "SQuAD-format JSON training file."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "SQuAD-format JSON evaluation file."})
    dataset_name: Optional[str] = field(default=None, metadata={
        "help": "Hub dataset in the squad_v2 layout (e.g. rajpurkar/squad_v2); needs HF_HUB_OFFLINE=0."})
    version_2_with_negative: bool = field(default=True, metadata={
        "help": "Questions may have no answer (SQuAD v2.0): the model may predict the empty answer."})
    max_seq_length: int = field(default=384, metadata={"help": "Tokens per window (question + context)."})
    doc_stride: int = field(default=128, metadata={"help": "Overlap in tokens between windows of a long context."})
    max_answer_length: int = field(default=30, metadata={"help": "Longest answer span, in tokens."})
    n_best_size: int = field(default=20, metadata={"help": "Start/end candidates per window in post-processing."})
    null_score_diff_threshold: float = field(default=0.0, metadata={
        "help": "Predict no answer when the null score beats the best span by more than this."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Train on the first N questions."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Evaluate on the first N questions."})


# ---------------------------------------------------------------------------------------------------- data
def load_records(data_args: DataArguments) -> tuple[list[dict], list[dict]]:
    """Training and evaluation records from SQuAD JSON files, or from a Hub dataset when online."""
    if data_args.dataset_name:
        if data_args.train_file or data_args.validation_file:
            raise InputError("pass either --dataset_name or --train_file/--validation_file, not both")
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise InputError(f"--dataset_name {data_args.dataset_name} needs the Hugging Face Hub, but HF_HUB_OFFLINE="
                             f"{os.environ['HF_HUB_OFFLINE']}; set HF_HUB_OFFLINE=0 or pass SQuAD-format JSON files")
        raw = datasets.load_dataset(data_args.dataset_name)
        return [dict(r) for r in raw["train"]], [dict(r) for r in raw["validation"]]
    if not data_args.train_file or not data_args.validation_file:
        raise InputError("--train_file and --validation_file (SQuAD-format JSON) are required without --dataset_name")
    return load_squad(data_args.train_file), load_squad(data_args.validation_file)


def prepare_features(tokenizer, records: list[dict], max_length: int, stride: int) -> tuple[list[dict], list[dict]]:
    """Tokenised windows of question + context with the answer's token span (the first token, usually [CLS], for
    no answer or an answer outside the window), and per window the example id and the context offsets (``None``
    outside the context) for post-processing."""
    question_first = tokenizer.padding_side == "right"
    questions = [r["question"].lstrip() for r in records]
    contexts = [r["context"] for r in records]
    enc = tokenizer(questions if question_first else contexts, contexts if question_first else questions,
                    truncation="only_second" if question_first else "only_first", max_length=max_length,
                    stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length")
    context_id = 1 if question_first else 0
    features, meta = [], []
    for i, offsets in enumerate(enc["offset_mapping"]):
        record = records[enc["overflow_to_sample_mapping"][i]]
        sequence = enc.sequence_ids(i)
        in_context = [k for k, s in enumerate(sequence) if s == context_id]
        start = end = 0
        answers = record["answers"]
        if answers["text"] and in_context:
            first_char = answers["answer_start"][0]
            last_char = first_char + len(answers["text"][0])
            lo, hi = in_context[0], in_context[-1]
            if offsets[lo][0] <= first_char and offsets[hi][1] >= last_char:  # the answer lies in this window
                start = next(k for k in in_context if offsets[k][1] > first_char)
                end = next(k for k in reversed(in_context) if offsets[k][0] < last_char)
        feature = {key: enc[key][i] for key in enc if key not in ("offset_mapping", "overflow_to_sample_mapping")}
        features.append({**feature, "start_positions": start, "end_positions": end})
        meta.append({"example_id": record["id"],
                     "offset_mapping": [o if sequence[k] == context_id else None for k, o in enumerate(offsets)]})
    return features, meta


def check_qa_model(config, method: str) -> None:
    model_type = getattr(config, "model_type", None)
    if type(config) not in AutoModelForQuestionAnswering._model_mapping:
        raise InputError(f"model_type={model_type!r} has no extractive question-answering head in transformers; "
                         "use an encoder such as BERT or RoBERTa")
    spec = find_spec(config)
    if method == "apt" and (spec is None or "qa_outputs" not in spec.readers):  # the QA head reads the hidden width
        supported = [t for s in SPECS if "qa_outputs" in s.readers for t in s.model_types]
        raise InputError(f"--method apt prunes the QA models of apt_hf's families with a known QA head "
                         f"({', '.join(supported)}); model_type={model_type!r} is not one (--method lora or ft work "
                         "with any QA model)")


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The rows of the end-of-run table."""
    rows = [("method", summary["method"]), ("exact / f1", f"{summary['exact']:.2f} / {summary['f1']:.2f}")]
    for part in ("HasAns", "NoAns"):
        if f"{part}_f1" in summary["eval_scores"]:
            rows.append((f"{part} exact / f1", f"{summary['eval_scores'][f'{part}_exact']:.2f} / "
                                               f"{summary['eval_scores'][f'{part}_f1']:.2f}"))
    rows.append(kept_params_row(summary))
    if summary.get("export_dir"):
        rows.append(("exported to", summary["export_dir"]))
    return rows


# ---------------------------------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = HfArgumentParser((ModelArguments, DataArguments, AdapterArguments, APTArguments, TrainingArguments),
                              prog=Path(__file__).name)
    parser.set_defaults(**TRAINING_DEFAULTS)
    model_args, data_args, method_args, apt_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    default_learning_rate(training_args, method_args.method)

    # Check every input before a model is built; a problem ends the run with one message.
    with exit_on_bad_input(parser, SquadDataError):
        train_records, eval_records = load_records(data_args)
        train_records = train_records[:data_args.max_train_samples] if data_args.max_train_samples else train_records
        eval_records = eval_records[:data_args.max_eval_samples] if data_args.max_eval_samples else eval_records
        if not data_args.version_2_with_negative:
            unanswerable = next((r["id"] for r in train_records + eval_records if not r["answers"]["text"]), None)
            if unanswerable is not None:
                raise InputError(f"question {unanswerable!r} has no answer (SQuAD v2.0 data); drop "
                                 "--version_2_with_negative False")
        if data_args.doc_stride >= data_args.max_seq_length:
            raise InputError(f"--doc_stride {data_args.doc_stride} must be smaller than --max_seq_length "
                             f"{data_args.max_seq_length}")
        model_path = model_args.model_name_or_path or minilm_path()
        config, tokenizer = load_config_and_tokenizer(model_path, model_args.tokenizer_name)
        check_qa_model(config, method_args.method)
        if not tokenizer.is_fast:
            raise InputError(f"{type(tokenizer).__name__} is a slow tokenizer; answer spans need the character "
                             "offsets of a fast (tokenizers-backed) tokenizer")
        train_features, _ = prepare_features(tokenizer, train_records, data_args.max_seq_length, data_args.doc_stride)
        eval_features, eval_meta = prepare_features(tokenizer, eval_records, data_args.max_seq_length,
                                                    data_args.doc_stride)
        total_steps = optimizer_steps(len(train_features), training_args)
        apt_config = None
        if method_args.method == "apt":
            apt_config = build_apt_config(apt_args, method_args, total_steps)
            apt_config.task_type = "QUESTION_ANS"
            apt_config.target_modules = list(find_spec(config).target_modules)
        export_dir = export_folder(method_args, training_args.output_dir, checked=method_args.method == "apt")

    setup_logging(logger, training_args, f"method {method_args.method}, {len(train_records)} train questions "
                                         f"({len(train_features)} windows), {len(eval_records)} eval questions "
                                         f"({len(eval_features)} windows), {total_steps} optimizer steps")
    set_seed(training_args.seed)

    model = AutoModelForQuestionAnswering.from_pretrained(model_path, config=config)
    original_params = apt_hf.count_params(model)
    model = adapt_model(model, method_args, apt_config, "QUESTION_ANS",
                        list(find_spec(config).target_modules if find_spec(config) else ["query", "value"]))

    def compute_metrics(p: EvalPrediction) -> dict[str, float]:
        start_logits, end_logits = p.predictions[:2]
        answers = best_answers(eval_records, eval_meta, start_logits, end_logits, data_args.n_best_size,
                               data_args.max_answer_length, data_args.null_score_diff_threshold,
                               data_args.version_2_with_negative)
        return squad_v2_scores(eval_records, answers)

    if method_args.method == "apt" and training_args.metric_for_best_model is None:
        training_args.metric_for_best_model, training_args.greater_is_better = "f1", True  # teacher refresh (F.1)
    trainer_cls = apt_hf.APTTrainer if method_args.method == "apt" else Trainer
    clock = EvalClock("f1")
    trainer = trainer_cls(model=model, args=training_args, train_dataset=datasets.Dataset.from_list(train_features),
                          eval_dataset=datasets.Dataset.from_list(eval_features), processing_class=tokenizer,
                          data_collator=default_data_collator, compute_metrics=compute_metrics, callbacks=[clock])
    train_result = trainer.train()
    trainer.log_metrics("train", train_result.metrics)
    eval_metrics = trainer.evaluate()
    trainer.log_metrics("eval", eval_metrics)
    scores = {k.removeprefix("eval_"): v for k, v in eval_metrics.items()
              if k.removeprefix("eval_").removeprefix("HasAns_").removeprefix("NoAns_") in ("exact", "f1", "total")}

    summary: dict[str, Any] = {
        "method": method_args.method, "model": model_path, "exact": scores["exact"], "f1": scores["f1"],
        "eval_scores": scores, "eval_loss": eval_metrics.get("eval_loss"),
        "train_runtime_s": train_result.metrics.get("train_runtime"), "train_time_s": clock.train_time(),
        "optimizer_steps": trainer.state.global_step, "eval_history": clock.history,
        "log_history": trainer.state.log_history, "kept_params": original_params, "original_params": original_params,
        "density": 1.0, "export_dir": None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if trainer.is_world_process_zero():
        if method_args.method == "apt":
            summary.update(pruned_size(model))
            apt_hf.export_pruned(model, export_dir, tokenizer=tokenizer, overwrite=True)
            summary["export_dir"] = str(export_dir)
        save_summary(summary, training_args.output_dir, "run_qa", summary_rows(summary))
    return summary


if __name__ == "__main__":
    main()
