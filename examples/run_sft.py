#!/usr/bin/env python
# Copyright 2024 The apt_hf authors. Licensed under the Apache License, Version 2.0.
"""Instruction-tune a causal LM (LLaMA family) with APT, LoRA or LoRA+Prune on Alpaca-format data, fully offline.

The paper's LLaMA setting (spec H.2, Table 3): adapters on q_proj/v_proj, APT at 30 % sparsity, the loss on the
response tokens only. Data is any JSON list (or JSON Lines file) of records with ``instruction``, optional
``input`` and ``output`` (and optional ``history`` turns); every record is rendered with the model's chat template
when it has one (otherwise with the Stanford Alpaca prompt). The last ``--heldout_rows`` records are held out for
the evaluation loss and the response perplexity. The default data is LIMA (``../shared/data/instruct/lima``) and the
default model SmolLM2-135M-Instruct from the ``llm`` extra (``pip install -e .[llm]``), so a CPU run needs no network::

    python examples/run_sft.py --method apt --target_sparsity 0.3 --max_train_samples 200 --max_seq_length 256 \\
        --num_train_epochs 1 --output_dir outputs/sft_apt

The same command runs under ``accelerate launch examples/run_sft.py ...``. APT self-distils while it prunes (spec
F.3 for causal LMs: ``0.1 KL/target-token + 0.9 L_layer``; ``--distillation False`` is "w/o D_S"), can prune before
tuning (spec D.6: ``--pretune_density 0.85``), and its pruned model is exported to ``<output_dir>/pruned_model``
(loads with ``apt_hf.load_pruned``). LoRA's merged model is saved there too, so every method's result can be scored
with ``python -m apt_hf.llm_eval``. ``--eval_tasks paper`` scores it at the end (ARC, HellaSwag, MMLU, TruthfulQA;
``--eval_limit`` for a quick run), and the summary (``<output_dir>/summary.json``) reports generation throughput of
the exported model against the dense one at ``--speed_batch_sizes``.

The schedule options (``--pruning_start``, ``--pruning_end``, ...) are those of ``examples/run_glue.py``.
"""

from __future__ import annotations

import logging
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    DataCollatorForSeq2Seq,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

EXAMPLES = Path(__file__).resolve().parent
REPO_ROOT = EXAMPLES.parent
sys.path.insert(0, str(EXAMPLES))  # utils_examples.py, beside this script, also when this file is imported by path
from utils_examples import (AdapterArguments, APTArguments, EvalClock, InputError, adapt_model,  # noqa: E402
                            build_apt_config, exit_on_bad_input, export_folder, kept_params_row,
                            load_config_and_tokenizer, lora_prune, optimizer_steps, pruned_size, save_summary,
                            setup_logging)

import apt_hf  # noqa: E402  (found by utils_examples in a source checkout)
from apt_hf.arch import SPECS, find_spec  # noqa: E402
from apt_hf.callback import resolve_plan  # noqa: E402
from apt_hf.instruct import InstructDataError, load_instructions, tokenize_example  # noqa: E402
from apt_hf.llm_eval import EvalDataError, evaluate, response_perplexity  # noqa: E402
from apt_hf.offline_models import MissingCheckpointError, smollm2_path  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_TRAIN_FILE = REPO_ROOT.parent / "shared" / "data" / "instruct" / "lima" / "lima.json"
ADAPTER_TARGETS = ["q_proj", "v_proj"]  # APT's and LoRA's adapters on LLaMA (spec A.2)

TRAINING_DEFAULTS = dict(
    output_dir="outputs/run_sft",
    learning_rate=1e-4,  # paper Table 6 (Alpaca)
    per_device_train_batch_size=4,
    per_device_eval_batch_size=4,
    warmup_steps=0.03,
    lr_scheduler_type="cosine",
    logging_steps=10,
    save_strategy="no",
    report_to="none",
)


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Local causal-LM folder. Default: SmolLM2-135M-Instruct from the `llm` extra "
                                        "(converted once from its GGUF file, see apt_hf.offline_models)."})
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "Tokenizer folder, if not the model's."})


@dataclass
class DataArguments:
    train_file: str = field(default=str(DEFAULT_TRAIN_FILE), metadata={
        "help": "Alpaca-format JSON list or JSON Lines file (instruction, optional input, output)."})
    heldout_rows: int = field(default=50, metadata={"help": "The last N records are held out for evaluation."})
    max_seq_length: int = field(default=512, metadata={"help": "Examples are cut to this many tokens."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Train on the first N records only."})
    max_eval_samples: Optional[int] = field(default=None, metadata={
        "help": "Evaluate on the first N held-out records."})


@dataclass
class MethodArguments(AdapterArguments):
    method: str = field(default="apt", metadata={"help": "apt, lora or lora_prune (LoRA, then retraining-free Fisher "
                                                 "pruning to the same density).",
                                                 "choices": ["apt", "lora", "lora_prune"]})
    export_dir: Optional[str] = field(default=None, metadata={
        "help": "Where the pruned (APT, LoRA+Prune) or merged (LoRA) model is saved. Default <output_dir>/"
                "pruned_model, replaced on every run; a folder you name must be empty unless --overwrite_export."})
    prune_samples: int = field(default=256, metadata={"help": "lora_prune: examples for the Fisher information."})
    pretune_density: float = field(default=1.0, metadata={"help": "APT: prune to this density before tuning "
                                                                  "(spec D.6; 1 = off)."})
    pretune_batches: int = field(default=64, metadata={"help": "APT: calibration batches of pre-tuning pruning."})
    eval_tasks: str = field(default="", metadata={"help": "Score the exported model with apt_hf.llm_eval: 'paper', "
                                                        "'all' or task names (empty: skip)."})
    eval_limit: Optional[int] = field(default=None, metadata={"help": "First N examples per task (per MMLU subject)."})
    eval_task_limits: str = field(default="", metadata={"help": "Per-task limits overriding --eval_limit, e.g. "
                                                                "mmlu=2."})
    eval_data_dir: Optional[str] = field(default=None, metadata={"help": "apt_hf.llm_eval data folder."})
    speed_new_tokens: int = field(default=32, metadata={"help": "Generated tokens per timed generation; 0 skips "
                                                                "the throughput measurement."})
    speed_batch_sizes: str = field(default="1,8", metadata={"help": "Batch sizes of the generation throughput."})
    speed_repeats: int = field(default=3, metadata={"help": "Timed generations per model and batch size (median)."})


# ---------------------------------------------------------------------------------------------------- helpers
def check_causal_lm(config, method: str) -> None:
    """One-line refusal of models this script cannot instruction-tune."""
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise InputError(f"{model_type} is an encoder-decoder model; run_sft.py tunes decoder-only causal LMs (use "
                         "examples/run_summarization.py for seq2seq models)")
    spec = find_spec(config)
    if type(config) not in AutoModelForCausalLM._model_mapping or (spec is not None and spec.kind != "decoder"):
        raise InputError(f"model_type={model_type!r} is not a decoder-only causal LM; run_sft.py needs one (LLaMA, "
                         "Mistral, Qwen2, ...)")
    if method in ("apt", "lora_prune") and spec is None:
        supported = [t for s in SPECS if s.kind == "decoder" for t in s.model_types]
        raise InputError(f"--method {method} prunes the causal LMs of apt_hf's decoder families ({', '.join(supported)}"
                         f"); model_type={model_type!r} is not one (--method lora works with any causal LM)")


def default_model_path() -> str:
    try:
        return str(smollm2_path())
    except MissingCheckpointError as err:
        raise InputError(f"no --model_name_or_path given and {err}") from None


@torch.no_grad()
def generation_throughput(models: list[torch.nn.Module], tokenizer, prompts: list[str], batch_size: int,
                          new_tokens: int, repeats: int) -> list[float]:
    """Generated tokens per second (median over ``repeats``) of each model: greedy decoding of exactly
    ``new_tokens`` tokens for the first ``batch_size`` prompts, left-padded. Models take turns, so a busy machine
    slows them alike."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer([prompts[i % len(prompts)] for i in range(batch_size)], return_tensors="pt", padding=True,
                          add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id)
    times: list[list[float]] = [[] for _ in models]
    for model in models:
        model.eval().generate(**batch, **kwargs)  # warm-up
    for _ in range(repeats):
        for model, record in zip(models, times):
            start = time.perf_counter()
            model.generate(**batch, **kwargs)
            record.append(time.perf_counter() - start)
    return [batch_size * new_tokens / statistics.median(t) for t in times]


def speed_prompts(tokenizer, records: list[dict], max_tokens: int = 64) -> list[str]:
    """Generation prompts from held-out instructions (chat template when there is one), cut to ``max_tokens``."""
    from apt_hf.instruct import prompt_and_response

    out = []
    for record in records:
        prompt, _ = prompt_and_response(tokenizer, record)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        out.append(tokenizer.decode(ids[-max_tokens:]))
    return out


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The rows of the end-of-run table."""
    rows = [("method", summary["method"]), ("held-out eval loss", f"{summary['eval_loss']:.4f}"),
            ("held-out response perplexity", f"{summary['perplexity']:.3f}"), kept_params_row(summary)]
    for b, ratio in (summary.get("generation_speedup") or {}).items():
        rows.append((f"generation speed-up, batch {b}", f"{ratio:.2f}x ({summary['dense_tokens_per_s'][b]:.1f} -> "
                                                        f"{summary['exported_tokens_per_s'][b]:.1f} tokens/s)"))
    if summary.get("llm_eval", {}).get("average") is not None:
        rows.append(("llm_eval average", f"{summary['llm_eval']['average']:.4f}"))
    rows.append(("exported to", summary["export_dir"]))
    return rows


# ---------------------------------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    # 1. Arguments (the APT schedule options are those of every example; the paper's LLaMA sparsity is 30 %).
    parser = HfArgumentParser((ModelArguments, DataArguments, MethodArguments, APTArguments, TrainingArguments),
                              prog=Path(__file__).name)
    parser.set_defaults(**TRAINING_DEFAULTS, target_sparsity=0.3)
    model_args, data_args, method_args, apt_args, training_args = parser.parse_args_into_dataclasses(args=argv)

    # 2. Check every input before a model is built; a problem ends the run with one message.
    with exit_on_bad_input(parser, InstructDataError, EvalDataError, ValueError):
        records = load_instructions(data_args.train_file)
        if not 0 < data_args.heldout_rows < len(records):
            raise InputError(f"--heldout_rows {data_args.heldout_rows} must be between 1 and the number of records "
                             f"minus one ({len(records) - 1} for {data_args.train_file})")
        train_records, eval_records = records[:-data_args.heldout_rows], records[-data_args.heldout_rows:]
        if data_args.max_train_samples is not None:
            train_records = train_records[:data_args.max_train_samples]
        if data_args.max_eval_samples is not None:
            eval_records = eval_records[:data_args.max_eval_samples]
        if not train_records or not eval_records:
            raise InputError("--max_train_samples and --max_eval_samples must leave at least one record")
        model_path = model_args.model_name_or_path or default_model_path()
        config, tokenizer = load_config_and_tokenizer(model_path, model_args.tokenizer_name)
        check_causal_lm(config, method_args.method)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        train_examples = [e for e in (tokenize_example(tokenizer, r, data_args.max_seq_length) for r in train_records)
                          if e is not None]
        eval_examples = [e for e in (tokenize_example(tokenizer, r, data_args.max_seq_length) for r in eval_records)
                         if e is not None]
        if not train_examples or not eval_examples:
            raise InputError(f"--max_seq_length {data_args.max_seq_length} leaves no response token in the "
                             f"{'training' if not train_examples else 'held-out'} records; raise it")
        total_steps = optimizer_steps(len(train_examples), training_args)
        apt_config = None
        if method_args.method == "apt":
            apt_config = build_apt_config(apt_args, method_args, total_steps)
            apt_config.task_type = "CAUSAL_LM"
            apt_config.target_modules = list(ADAPTER_TARGETS)
            apt_config.pretune_density, apt_config.pretune_batches = (method_args.pretune_density,
                                                                      method_args.pretune_batches)
            try:
                apt_config.validate()
            except ValueError as err:
                raise InputError(f"--{str(err).split('APTConfig.', 1)[-1]}") from None
            plan = resolve_plan(apt_config, total_steps)
            if apt_config.distillation and not any(plan.prunes(e) for e in plan.events):
                raise InputError(f"--pretune_density {method_args.pretune_density} already reaches the final density, "
                                 "so no pruning event is left to self-distil over; pass --distillation False")
        export_dir = export_folder(method_args, training_args.output_dir, checked=True)  # every method exports
        speed_sizes = [int(b) for b in method_args.speed_batch_sizes.split(",") if b.strip()]
        if method_args.speed_new_tokens and (not speed_sizes or min(speed_sizes) < 1):
            raise InputError(f"--speed_batch_sizes {method_args.speed_batch_sizes!r} must list positive batch sizes")
        if method_args.eval_tasks:
            from apt_hf.llm_eval import parse_task_limits, resolve_tasks

            eval_limits = {**{n: method_args.eval_limit for n in resolve_tasks(method_args.eval_tasks)},
                           **parse_task_limits(method_args.eval_task_limits)}

    # 3. Logging (as in the transformers examples).
    setup_logging(logger, training_args, f"method {method_args.method}, {len(train_examples)} train / "
                                         f"{len(eval_examples)} held-out examples, {total_steps} optimizer steps, "
                                         f"chat template: {bool(getattr(tokenizer, 'chat_template', None))}")
    set_seed(training_args.seed)

    # 4. Model and method.
    model = AutoModelForCausalLM.from_pretrained(model_path, config=config)
    original_params = apt_hf.count_params(model)
    model = adapt_model(model, method_args, apt_config, "CAUSAL_LM", ADAPTER_TARGETS)
    train_dataset = datasets.Dataset.from_list(train_examples)
    eval_dataset = datasets.Dataset.from_list(eval_examples)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    # 5. Train (loss on response tokens only: the prompt's labels are -100).
    trainer_cls = apt_hf.APTTrainer if method_args.method == "apt" else Trainer
    clock = EvalClock("loss")
    trainer = trainer_cls(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                          processing_class=tokenizer, data_collator=collator, callbacks=[clock])
    train_result = trainer.train()
    if method_args.method == "lora_prune":  # LoRA+Prune: merge, then retraining-free structured pruning (Kwon 2022)
        model = lora_prune(trainer, model, "CAUSAL_LM", "q_proj", apt_args.target_sparsity, method_args.prune_samples,
                           logger)
    train_time = clock.train_time()
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainer.log_metrics("train", train_result.metrics)
    eval_metrics = trainer.evaluate()
    trainer.log_metrics("eval", eval_metrics)

    # 6. Export, held-out perplexity, optional benchmark scores and generation throughput; the summary.
    summary: dict[str, Any] = {
        "method": method_args.method, "model": model_path, "train_file": data_args.train_file,
        "train_examples": len(train_examples), "heldout_examples": len(eval_examples),
        "max_seq_length": data_args.max_seq_length, "optimizer_steps": trainer.state.global_step,
        "train_runtime_s": train_result.metrics.get("train_runtime"), "train_time_s": train_time,
        "peak_rss_mb": peak_rss_mb, "eval_loss": eval_metrics["eval_loss"], "eval_history": clock.history,
        "log_history": trainer.state.log_history, "kept_params": original_params,
        "original_params": original_params, "density": 1.0, "export_dir": str(export_dir),
        "target_sparsity": apt_args.target_sparsity if method_args.method != "lora" else 0.0,
    }
    if trainer.is_world_process_zero():
        if method_args.method == "lora":
            exported = model.merge_and_unload().eval()
            export_dir.mkdir(parents=True, exist_ok=True)
            exported.save_pretrained(export_dir)
            tokenizer.save_pretrained(export_dir)
        else:  # the tokenizer is part of the export, so a rerun's overwrite=True replaces it too
            summary.update(pruned_size(model))
            exported = apt_hf.export_pruned(model, export_dir, tokenizer=tokenizer, overwrite=True)
        summary["perplexity"] = response_perplexity(exported, tokenizer, eval_records, data_args.max_seq_length,
                                                    training_args.per_device_eval_batch_size)["perplexity"]
        if method_args.eval_tasks:
            summary["llm_eval"] = evaluate(exported, tokenizer, method_args.eval_tasks, method_args.eval_data_dir,
                                           eval_limits, log=logger.warning)
        if method_args.speed_new_tokens:
            dense = AutoModelForCausalLM.from_pretrained(model_path).eval()
            prompts = speed_prompts(tokenizer, eval_records)
            dense_tps, exported_tps, speedup = {}, {}, {}
            for b in speed_sizes:
                d, e = generation_throughput([dense, exported], tokenizer, prompts, b, method_args.speed_new_tokens,
                                             method_args.speed_repeats)
                dense_tps[b], exported_tps[b], speedup[b] = d, e, e / d
            summary.update(dense_tokens_per_s=dense_tps, exported_tokens_per_s=exported_tps,
                           generation_speedup=speedup, speed_new_tokens=method_args.speed_new_tokens)
        save_summary(summary, training_args.output_dir, "run_sft", summary_rows(summary))
    return summary


if __name__ == "__main__":
    main()
