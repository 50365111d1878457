#!/usr/bin/env python
# Copyright 2024 The apt_hf authors. Licensed under the Apache License, Version 2.0.
"""Fine-tune a T5-family model for abstractive summarization with APT, LoRA or full fine-tuning; ROUGE at evaluation.

The paper's CNN/DailyMail setting (spec H.2, Table 2: T5-base lm-adapt, adapters on q/v of every attention and on
the gated FFN, self-distillation with the KL per target token, ``0.1 L_pred + 0.9 L_layer``, spec F.3). Data: JSON
Lines (or a JSON list) with a source text column and a summary column. The offline default is DialogSum
(``../shared/data/summarization/dialogsum``): its 500 dev dialogues train, its 500 test dialogues evaluate, each
against its three reference summaries (columns ``summary1..3``: a record without ``--summary_column`` but with
``<column>1``, ``<column>2``, ... is scored against all of them, ROUGE taking the best). Evaluation generates
summaries (``--predict_with_generate``, on by default) and reports ROUGE-1/2/L/Lsum F-measures (``rouge_score``,
Porter stemming; Lsum splits sentences at ``.``, ``!`` and ``?``). No T5 checkpoint ships offline; on a GPU with
Hub access::

    HF_HUB_OFFLINE=0 python examples/run_summarization.py --model_name_or_path google/t5-base-lm-adapt \\
        --method apt --target_sparsity 0.6 --num_train_epochs 16 --per_device_train_batch_size 16 \\
        --learning_rate 1e-4 --eval_strategy epoch --output_dir outputs/dialogsum_apt

The same command runs under ``accelerate launch examples/run_summarization.py ...``. APT's pruned model is exported
to ``<output_dir>/pruned_model`` (``apt_hf.load_pruned``); the schedule options are those of
``examples/run_glue.py``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSeq2SeqLM,
    DataCollatorForSeq2Seq,
    EvalPrediction,
    HfArgumentParser,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    set_seed,
)

EXAMPLES = Path(__file__).resolve().parent
sys.path.insert(0, str(EXAMPLES))  # utils_examples.py, beside this script, also when this file is imported by path
from utils_examples import (AdapterArguments, APTArguments, EvalClock, InputError, adapt_model,  # noqa: E402
                            build_apt_config, default_learning_rate, exit_on_bad_input, export_folder, kept_params_row,
                            load_config_and_tokenizer, optimizer_steps, pruned_size, save_summary, setup_logging)

import apt_hf  # noqa: E402  (found by utils_examples in a source checkout)
from apt_hf.arch import SPECS, find_spec  # noqa: E402

logger = logging.getLogger(__name__)

DIALOGSUM = EXAMPLES.parent.parent / "shared" / "data" / "summarization" / "dialogsum"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
TRAINING_DEFAULTS = dict(output_dir="outputs/run_summarization", learning_rate=None, per_device_train_batch_size=16,
                         per_device_eval_batch_size=16, warmup_steps=0.06, logging_steps=10, save_strategy="no",
                         report_to="none", predict_with_generate=True, generation_max_length=128)


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "T5-family model folder or Hub id (Hub ids need HF_HUB_OFFLINE=0), e.g. google/t5-base-lm-adapt."})
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "Tokenizer, if not the model's."})


@dataclass
class DataArguments:
    train_file: str = field(default=str(DIALOGSUM / "dialogsum.dev.jsonl"), metadata={
        "help": "JSON Lines (or JSON list) training file."})
    validation_file: str = field(default=str(DIALOGSUM / "dialogsum.test.jsonl"), metadata={
        "help": "JSON Lines (or JSON list) evaluation file."})
    text_column: str = field(default="dialogue", metadata={"help": "Column with the text to summarize."})
    summary_column: str = field(default="summary", metadata={
        "help": "Column with the reference summary (or numbered columns <name>1, <name>2, ... for several)."})
    source_prefix: str = field(default="summarize: ", metadata={"help": "Prefix of every source text (T5)."})
    max_source_length: int = field(default=512, metadata={"help": "Source tokens kept."})
    max_target_length: int = field(default=128, metadata={"help": "Target tokens kept (training labels)."})
    num_beams: int = field(default=1, metadata={"help": "Beams of the generation at evaluation."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Train on the first N records."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Evaluate on the first N records."})


class APTSeq2SeqTrainer(apt_hf.APTTrainer, Seq2SeqTrainer):
    """APT's pruning, tuning and self-distillation with ``Seq2SeqTrainer``'s generation at evaluation."""


# ---------------------------------------------------------------------------------------------------- data
def load_rows(path: str, text_column: str, summary_column: str) -> list[dict[str, Any]]:
    """Records ``{"source", "references"}`` of a JSON Lines / JSON list file; problems name the file, record and
    column."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"data file not found: {file}")
    text = file.read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise InputError(f"{file} is neither JSON Lines nor a JSON list ({err})") from None
    if not rows:
        raise InputError(f"{file} holds no record")
    out = []
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or text_column not in row:
            raise InputError(f"{file}: record {i} lacks the text column '{text_column}' (--text_column); it has "
                             f"{sorted(row) if isinstance(row, dict) else type(row).__name__}")
        numbered = [row[f"{summary_column}{k}"] for k in range(1, 100) if f"{summary_column}{k}" in row]
        references = [row[summary_column]] if summary_column in row else numbered
        if not references:
            raise InputError(f"{file}: record {i} lacks the summary column '{summary_column}' (or {summary_column}1, "
                             f"...; --summary_column); it has {sorted(row)}")
        if not all(isinstance(t, str) and t.strip() for t in [row[text_column], *references]):
            raise InputError(f"{file}: record {i} has an empty or non-text '{text_column}' or summary")
        out.append({"source": row[text_column], "references": references})
    return out


def rouge_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Mean ROUGE F-measures (x100) of ``rouge_score`` with stemming, the best over each example's references."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)

    def sentences(text: str) -> str:  # rougeLsum reads one sentence per line
        return "\n".join(s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s)

    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, refs in zip(predictions, references):
        scores = scorer.score_multi([sentences(r) for r in refs], sentences(pred))
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    return {key: 100.0 * value / max(1, len(predictions)) for key, value in totals.items()}


def check_seq2seq_model(config, method: str) -> None:
    model_type = getattr(config, "model_type", None)
    spec = find_spec(config)
    if not getattr(config, "is_encoder_decoder", False) or type(config) not in AutoModelForSeq2SeqLM._model_mapping:
        hint = " (use examples/run_sft.py for decoder-only causal LMs)" if type(config) in \
            transformers.AutoModelForCausalLM._model_mapping and (spec is None or spec.kind == "decoder") else ""
        raise InputError(f"model_type={model_type!r} is not an encoder-decoder (seq2seq) model; summarization "
                         f"needs one such as T5{hint}")
    if method == "apt" and (spec is None or spec.kind != "encoder-decoder"):
        supported = [t for s in SPECS if s.kind == "encoder-decoder" for t in s.model_types]
        raise InputError(f"--method apt prunes the seq2seq models of apt_hf's encoder-decoder families "
                         f"({', '.join(supported)}); model_type={model_type!r} is not one (--method lora or ft work "
                         "with any seq2seq model)")


def encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids cut to ``max_length``, always ending with the end-of-sequence token (as T5's tokenizer does)."""
    eos = tokenizer.eos_token_id
    out = []
    for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]:
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids[:max_length - 1] + [eos]
        out.append(ids)
    return out


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The rows of the end-of-run table."""
    rouge = summary["rouge"]
    rows = [("method", summary["method"]),
            ("ROUGE-1/2/L/Lsum", " / ".join(f"{rouge[k]:.2f}" for k in ROUGE_TYPES) if rouge["rouge1"] is not None
             else "not computed (--predict_with_generate False)"),
            kept_params_row(summary)]
    if summary.get("export_dir"):
        rows.append(("exported to", summary["export_dir"]))
    return rows


# ---------------------------------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = HfArgumentParser((ModelArguments, DataArguments, AdapterArguments, APTArguments, Seq2SeqTrainingArguments),
                              prog=Path(__file__).name)
    parser.set_defaults(**TRAINING_DEFAULTS)
    model_args, data_args, method_args, apt_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    default_learning_rate(training_args, method_args.method)

    # Check every input before a model is built; a problem ends the run with one message.
    with exit_on_bad_input(parser):
        if not model_args.model_name_or_path:
            raise InputError("--model_name_or_path is required: a T5-family checkpoint folder (no T5 ships offline; "
                             "with HF_HUB_OFFLINE=0 a Hub id such as google/t5-base-lm-adapt)")
        train_rows = load_rows(data_args.train_file, data_args.text_column, data_args.summary_column)
        eval_rows = load_rows(data_args.validation_file, data_args.text_column, data_args.summary_column)
        train_rows = train_rows[:data_args.max_train_samples] if data_args.max_train_samples else train_rows
        eval_rows = eval_rows[:data_args.max_eval_samples] if data_args.max_eval_samples else eval_rows
        model_path = model_args.model_name_or_path
        config, tokenizer = load_config_and_tokenizer(model_path, model_args.tokenizer_name)
        check_seq2seq_model(config, method_args.method)
        total_steps = optimizer_steps(len(train_rows), training_args)
        apt_config = None
        if method_args.method == "apt":
            apt_config = build_apt_config(apt_args, method_args, total_steps)
            apt_config.task_type = "SEQ_2_SEQ_LM"
        export_dir = export_folder(method_args, training_args.output_dir, checked=method_args.method == "apt")

    setup_logging(logger, training_args, f"method {method_args.method}, {len(train_rows)} train / {len(eval_rows)} "
                                         f"eval records, {total_steps} optimizer steps")
    set_seed(training_args.seed)

    model = AutoModelForSeq2SeqLM.from_pretrained(model_path, config=config)
    original_params = apt_hf.count_params(model)
    model = adapt_model(model, method_args, apt_config, "SEQ_2_SEQ_LM", ["q", "v"])

    def features(rows: list[dict]) -> datasets.Dataset:
        sources = encode(tokenizer, [data_args.source_prefix + r["source"] for r in rows], data_args.max_source_length)
        targets = encode(tokenizer, [r["references"][0] for r in rows], data_args.max_target_length)
        return datasets.Dataset.from_dict({"input_ids": sources, "attention_mask": [[1] * len(s) for s in sources],
                                           "labels": targets})

    def compute_metrics(p: EvalPrediction) -> dict[str, float]:
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        preds = np.where(preds != -100, preds, tokenizer.pad_token_id)
        texts = [t.strip() for t in tokenizer.batch_decode(preds, skip_special_tokens=True)]
        out = rouge_scores(texts, [r["references"] for r in eval_rows])
        out["gen_len"] = float(np.mean([np.count_nonzero(row != tokenizer.pad_token_id) for row in preds]))
        return out

    trainer_cls = APTSeq2SeqTrainer if method_args.method == "apt" else Seq2SeqTrainer
    clock = EvalClock("rougeL")
    trainer = trainer_cls(model=model, args=training_args, train_dataset=features(train_rows),
                          eval_dataset=features(eval_rows), processing_class=tokenizer,
                          data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
                          compute_metrics=compute_metrics if training_args.predict_with_generate else None,
                          callbacks=[clock])
    train_result = trainer.train()
    trainer.log_metrics("train", train_result.metrics)
    eval_metrics = trainer.evaluate(num_beams=data_args.num_beams)
    trainer.log_metrics("eval", eval_metrics)

    summary: dict[str, Any] = {
        "method": method_args.method, "model": model_path, "train_file": data_args.train_file,
        "validation_file": data_args.validation_file, "eval_loss": eval_metrics.get("eval_loss"),
        "rouge": {k: eval_metrics.get(f"eval_{k}") for k in ROUGE_TYPES}, "gen_len": eval_metrics.get("eval_gen_len"),
        "train_runtime_s": train_result.metrics.get("train_runtime"), "train_time_s": clock.train_time(),
        "optimizer_steps": trainer.state.global_step, "eval_history": clock.history,
        "log_history": trainer.state.log_history, "kept_params": original_params, "original_params": original_params,
        "density": 1.0, "export_dir": None, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if trainer.is_world_process_zero():
        if method_args.method == "apt":
            summary.update(pruned_size(model))
            apt_hf.export_pruned(model, export_dir, tokenizer=tokenizer, overwrite=True)
            summary["export_dir"] = str(export_dir)
        save_summary(summary, training_args.output_dir, "run_summarization", summary_rows(summary))
    return summary


if __name__ == "__main__":
    main()
