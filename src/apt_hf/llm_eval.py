"""Offline evaluation of causal LMs in the manner of lm-evaluation-harness (the paper's Table 3 metrics, spec I.2).

Multiple-choice tasks are scored by log-likelihood: every answer choice is a continuation of the question prompt,
its log-likelihood is the sum of its tokens' log-probabilities, the highest one is the prediction (``acc``), and
``acc_norm`` divides each log-likelihood by the choice's length in characters first (the harness's length
normalisation). Prompts follow the harness's task definitions:

* ``arc_easy``, ``arc_challenge``: ``"Question: {question}\\nAnswer:"``, choices ``" {text}"``; acc, acc_norm.
* ``hellaswag``: ``"{activity}: {context}"``, choices ``" {ending}"``; acc, acc_norm. The offline copy is a text
  version whose context does not capitalise ``ctx_b`` (shared/data/README.md), so scores are close to but not
  exactly the harness's.
* ``truthfulqa_mc1``/``truthfulqa_mc2``: the six-question QA primer of the TruthfulQA paper, then
  ``"Q: {question}\\nA:"``; mc1 = accuracy of the single true answer, mc2 = normalised probability mass of the true
  answers.
* ``mmlu``: ``"The following are multiple choice questions (with answers) about {subject}.\\n\\n"``, optionally
  ``num_fewshot`` solved examples from the subject's dev split, then ``"{question}\\nA. ...\\nD. ...\\nAnswer:"``;
  choices ``" A"`` ... ``" D"``; acc, averaged over all questions.

The paper's columns (ARC = arc_challenge acc_norm, HellaSwag acc_norm, MMLU acc, TruthfulQA mc2) form the
``average``. Every task also reports its chance level, so small models near chance can be compared above it.
Perplexity over the response tokens of held-out instruction data (:mod:`apt_hf.instruct`) is the fifth figure.

Works on any model that maps ``input_ids``/``attention_mask`` to ``logits``: a dense transformers model, an APT model
while it trains (masks applied) and an exported pruned model (``apt_hf.load_pruned``). Command line::

    python -m apt_hf.llm_eval --model PATH [--adapter PATH] [--tasks paper] [--limit 100] [--output results.json]
"""

from __future__ import annotations

import argparse
import copy
import csv
import inspect
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F

from .instruct import IGNORE_INDEX, load_instructions, tokenize_example

EVAL_DIR_ENV = "APT_HF_EVAL_DIR"
# The TruthfulQA paper's QA primer (sylinrl/TruthfulQA, presets.py, Apache-2.0), used by the harness for MC1/MC2.
TRUTHFULQA_PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)
LETTERS = "ABCDE"


class EvalDataError(ValueError):
    """A missing or malformed evaluation file, named with what to do."""


@dataclass
class Example:
    """One multiple-choice question: the prompt, the choice strings (without the leading space) and the indices of
    the correct choices (one, except TruthfulQA MC2)."""

    context: str
    choices: list[str]
    gold: list[int]


@dataclass
class Task:
    name: str
    files: str  # path under the evaluation folder, for error messages
    load: Callable[[Path, int], list[Example]]
    metrics: tuple[str, ...]
    paper_metric: Optional[str] = None  # the column of Table 3 this task gives, if any


# ---------------------------------------------------------------------------------------------- task files
def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise EvalDataError(f"evaluation file not found: {path}; pass --data_dir (or set ${EVAL_DIR_ENV}) to the "
                            "folder holding arc/, hellaswag/, mmlu/ and truthfulqa/")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_arc(path: Path, _: int = 0) -> list[Example]:
    """ARC in AI2's JSONL release format (numeric labels 1-5 are kept as given; the answer key indexes them)."""
    out = []
    for row in _read_jsonl(path):
        labels = [c["label"] for c in row["question"]["choices"]]
        key = row["answerKey"]
        if key not in labels and key in "12345" and LETTERS[int(key) - 1] in labels:
            key = LETTERS[int(key) - 1]
        out.append(Example(f"Question: {row['question']['stem']}\nAnswer:",
                           [c["text"] for c in row["question"]["choices"]], [labels.index(key)]))
    return out


def _clean_hellaswag(text: str) -> str:
    """The harness's HellaSwag clean-up (WikiHow bracket artefacts, double spaces)."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def load_hellaswag(path: Path, _: int = 0) -> list[Example]:
    """The text copy: six lines per task (context, gold label, four endings)."""
    if not path.is_file():
        raise EvalDataError(f"evaluation file not found: {path}")
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise EvalDataError(f"{path} has {len(lines)} lines, not a multiple of 6 (context, label, 4 endings)")
    return [Example(_clean_hellaswag(lines[i]), [_clean_hellaswag(e) for e in lines[i + 2:i + 6]], [int(lines[i + 1])])
            for i in range(0, len(lines), 6)]


def _load_truthfulqa(path: Path, key: str) -> list[Example]:
    if not path.is_file():
        raise EvalDataError(f"evaluation file not found: {path}")
    out = []
    for row in json.loads(path.read_text(encoding="utf-8")):
        targets = row[key]
        out.append(Example(f"{TRUTHFULQA_PRIMER}\n\nQ: {row['question']}\nA:", list(targets),
                           [i for i, v in enumerate(targets.values()) if v == 1]))
    return out


def _mmlu_question(row: Sequence[str]) -> str:
    options = "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, row[1:5]))
    return f"{row[0].strip()}{options}\nAnswer:"


def load_mmlu(folder: Path, num_fewshot: int = 0) -> dict[str, list[Example]]:
    """MMLU by subject: ``test/<subject>_test.csv``, few-shot examples from ``dev/<subject>_dev.csv`` (first n)."""
    files = sorted((folder / "test").glob("*_test.csv"))
    if not files:
        raise EvalDataError(f"no MMLU test files (test/*_test.csv) under {folder}")
    subjects = {}
    for file in files:
        subject = file.name.removesuffix("_test.csv")
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        shots = ""
        if num_fewshot:
            dev = folder / "dev" / f"{subject}_dev.csv"
            if not dev.is_file():
                raise EvalDataError(f"--num_fewshot {num_fewshot} needs {dev}")
            with dev.open(encoding="utf-8", newline="") as f:
                rows = list(csv.reader(f))[:num_fewshot]
            shots = "".join(f"{_mmlu_question(r)} {r[5].strip()}\n\n" for r in rows)
        with file.open(encoding="utf-8", newline="") as f:
            subjects[subject] = [Example(header + shots + _mmlu_question(r), list(LETTERS[:4]),
                                         [LETTERS.index(r[5].strip())]) for r in csv.reader(f)]
    return subjects


TASKS: dict[str, Task] = {
    "arc_easy": Task("arc_easy", "arc/ARC-Easy-Test.jsonl", lambda d, k: load_arc(d / "arc/ARC-Easy-Test.jsonl"),
                     ("acc", "acc_norm")),
    "arc_challenge": Task("arc_challenge", "arc/ARC-Challenge-Test.jsonl",
                          lambda d, k: load_arc(d / "arc/ARC-Challenge-Test.jsonl"), ("acc", "acc_norm"), "acc_norm"),
    "hellaswag": Task("hellaswag", "hellaswag/hellaswag_val_full.txt",
                      lambda d, k: load_hellaswag(d / "hellaswag/hellaswag_val_full.txt"), ("acc", "acc_norm"),
                      "acc_norm"),
    "mmlu": Task("mmlu", "mmlu/", lambda d, k: load_mmlu(d / "mmlu", k), ("acc",), "acc"),
    "truthfulqa_mc1": Task("truthfulqa_mc1", "truthfulqa/mc_task.json",
                           lambda d, k: _load_truthfulqa(d / "truthfulqa/mc_task.json", "mc1_targets"), ("acc",)),
    "truthfulqa_mc2": Task("truthfulqa_mc2", "truthfulqa/mc_task.json",
                           lambda d, k: _load_truthfulqa(d / "truthfulqa/mc_task.json", "mc2_targets"), ("acc",),
                           "acc"),
}
PAPER_TASKS = ("arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2")


def default_data_dir() -> Optional[Path]:
    """``$APT_HF_EVAL_DIR``, else ``shared/data/eval`` next to a source checkout, else ``None``."""
    env = os.environ.get(EVAL_DIR_ENV)
    if env:
        return Path(env)
    guess = Path(__file__).resolve().parents[3] / "shared" / "data" / "eval"
    return guess if guess.is_dir() else None


def resolve_tasks(spec: Union[str, Sequence[str]]) -> list[str]:
    """``"paper"`` (the four Table 3 tasks), ``"all"``, or a comma-separated list of task names."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for name in (n.strip() for n in names if n.strip()):
        expanded = list(PAPER_TASKS) if name == "paper" else list(TASKS) if name == "all" else [name]
        for n in expanded:
            if n not in TASKS:
                raise EvalDataError(f"unknown task {n!r}; choose from {', '.join(TASKS)}, 'paper' or 'all'")
            if n not in out:
                out.append(n)
    if not out:
        raise EvalDataError("no task given")
    return out


# ---------------------------------------------------------------------------------------------- scoring
def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids as the harness makes them: whitespace at the end of the context moves to
    the continuation, the pair is encoded whole and split where the context's own encoding ends (no special
    tokens)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return whole[:len(ctx)], whole[len(ctx):]


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _cache_name(model: torch.nn.Module) -> str:
    """The forward argument that takes a key/value cache: ``cache`` from transformers 5.24, ``past_key_values``
    before (HF_STACK_NOTES, version drift)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _context_scores(model: torch.nn.Module, context: tuple[int, ...], continuations: list[tuple[int, ...]],
                    batch_size: int, pad: int, device: torch.device) -> list[float]:
    """Log-likelihood of each continuation after one shared context: the context runs once and its key/value cache
    serves every continuation (in chunks of ``batch_size`` rows, right-padded), so answer choices that share a long
    prompt (TruthfulQA's primer, HellaSwag's passage) do not recompute it."""
    out = model(input_ids=torch.tensor([context], device=device), use_cache=True)
    past = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    first = F.log_softmax(out.logits[0, -1].float(), dim=-1)
    scores = [float(first[c[0]]) for c in continuations]
    longer = [i for i, c in enumerate(continuations) if len(c) > 1]
    for start in range(0, len(longer), batch_size):
        chunk = longer[start:start + batch_size]
        width = max(len(continuations[i]) - 1 for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), len(context) + width), dtype=torch.long)
        mask[:, :len(context)] = 1
        for row, i in enumerate(chunk):
            fed = continuations[i][:-1]  # each fed token predicts the next continuation token
            ids[row, :len(fed)] = torch.tensor(fed)
            mask[row, len(context):len(context) + len(fed)] = 1
        cache = copy.deepcopy(past)
        cache.batch_repeat_interleave(len(chunk))
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **{_cache_name(model): cache}).logits
        for row, i in enumerate(chunk):
            target = torch.tensor(continuations[i][1:], device=device)
            rows = F.log_softmax(logits[row, :len(target)].float(), dim=-1)
            scores[i] += float(rows.gather(-1, target[:, None]).sum())
    return scores


@torch.no_grad()
def loglikelihoods(model: torch.nn.Module, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 8,
                   max_length: int = 2048) -> list[float]:
    """Sum of log-probabilities of each continuation given its context (lm-eval's ``loglikelihood`` request).

    Context and continuation are cut from the left to ``max_length + 1`` tokens together, as the harness does;
    requests with the same (cut) context share one pass over it (:func:`_context_scores`), so MMLU's four one-token
    answers cost one forward pass and multiple-choice prompts are read once per question."""
    was_training = model.training
    model.eval()
    device = _model_device(model)
    keys = []
    for context, continuation in requests:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont:
            raise EvalDataError(f"continuation {continuation!r} encodes to no token")
        full = (ctx + cont)[-(max_length + 1):]
        if len(full) <= len(cont):
            raise EvalDataError(f"context {context[:40]!r}... leaves no token before the continuation within "
                                f"max_length {max_length}; raise max_length")
        keys.append((tuple(full[:len(full) - len(cont)]), tuple(cont)))
    wanted: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for ctx, cont in keys:
        if cont not in wanted.setdefault(ctx, []):
            wanted[ctx].append(cont)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores: dict[tuple[tuple[int, ...], tuple[int, ...]], float] = {}
    try:
        for ctx, conts in wanted.items():
            for cont, score in zip(conts, _context_scores(model, ctx, conts, batch_size, pad, device)):
                scores[(ctx, cont)] = score
    finally:
        model.train(was_training)
    return [scores[key] for key in keys]


def score_examples(examples: Sequence[Example], lls: Sequence[Sequence[float]], task: str) -> dict[str, float]:
    """acc (and acc_norm, or mc2) of scored examples, and the chance level of each metric."""
    acc = acc_norm = mc2 = chance = 0.0
    for ex, ll in zip(examples, lls):
        ll = torch.tensor(ll, dtype=torch.float64)
        lengths = torch.tensor([float(len(c)) for c in ex.choices], dtype=torch.float64)
        acc += float(int(ll.argmax()) in ex.gold)
        acc_norm += float(int((ll / lengths).argmax()) in ex.gold)
        p = torch.exp(ll - ll.max())
        mc2 += float(p[ex.gold].sum() / p.sum())
        chance += len(ex.gold) / len(ex.choices)  # a uniform guess (mc2: uniform probabilities)
    n = max(1, len(examples))
    out = {"acc": (mc2 if task == "truthfulqa_mc2" else acc) / n, "chance_acc": chance / n, "n": len(examples)}
    if task in ("arc_easy", "arc_challenge", "hellaswag"):
        out.update(acc_norm=acc_norm / n, chance_acc_norm=chance / n)
    return out


def evaluate_task(model: torch.nn.Module, tokenizer, task: str, data_dir: Union[str, os.PathLike],
                  limit: Optional[int] = None, num_fewshot: int = 0, batch_size: int = 8,
                  max_length: int = 2048) -> dict[str, float]:
    """Score one task; ``limit`` takes the first N examples (per subject for MMLU, as the harness does per subtask)."""
    spec = TASKS[task]
    if num_fewshot and task != "mmlu":
        raise EvalDataError(f"--num_fewshot is supported for mmlu only (its dev split is here); {task} runs 0-shot")
    loaded = spec.load(Path(data_dir), num_fewshot)
    groups = loaded if isinstance(loaded, dict) else {task: loaded}
    examples = [ex for group in groups.values() for ex in (group[:limit] if limit else group)]
    requests = [(ex.context, " " + choice) for ex in examples for choice in ex.choices]
    flat = loglikelihoods(model, tokenizer, requests, batch_size, max_length)
    lls, k = [], 0
    for ex in examples:
        lls.append(flat[k:k + len(ex.choices)])
        k += len(ex.choices)
    return score_examples(examples, lls, task)


@torch.no_grad()
def response_perplexity(model: torch.nn.Module, tokenizer, records: Sequence[dict], max_length: int = 1024,
                        batch_size: int = 4) -> dict[str, float]:
    """Perplexity over the response tokens of instruction records (rendered as in training, :mod:`apt_hf.instruct`):
    ``exp`` of the mean negative log-likelihood per response token."""
    was_training = model.training
    model.eval()
    device = _model_device(model)
    examples = [e for e in (tokenize_example(tokenizer, r, max_length) for r in records) if e is not None]
    if not examples:
        raise EvalDataError(f"none of the {len(records)} perplexity records has a response token within "
                            f"{max_length} tokens (the prompt fills the cut); raise the maximum length or use "
                            "other records")
    examples.sort(key=lambda e: len(e["input_ids"]), reverse=True)
    total, count = 0.0, 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = examples[start:start + batch_size]
            width = len(batch[0]["input_ids"])
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, e in enumerate(batch):
                n = len(e["input_ids"])
                ids[row, :n], labels[row, :n], mask[row, :n] = (torch.tensor(e["input_ids"]), torch.tensor(e["labels"]),
                                                                1)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            target = labels[:, 1:].to(device)
            keep = target != IGNORE_INDEX
            rows = logits[:, :-1][keep].float()
            total += float(F.cross_entropy(rows, target[keep], reduction="sum"))
            count += int(keep.sum())
    finally:
        model.train(was_training)
    return {"perplexity": math.exp(total / count), "nll_per_token": total / count,
            "tokens": count, "n": len(examples)}


def parse_task_limits(text: str) -> dict[str, int]:
    """``"mmlu=2,hellaswag=50"`` -> ``{"mmlu": 2, "hellaswag": 50}`` (per-task overrides of ``limit``)."""
    out = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, value = part.partition("=")
        if name not in TASKS or not value.isdigit() or int(value) < 1:
            raise EvalDataError(f"task limit {part!r} is not <task>=<positive number> with a task of "
                                f"{', '.join(TASKS)}")
        out[name] = int(value)
    return out


def evaluate(model: torch.nn.Module, tokenizer, tasks: Union[str, Sequence[str]] = "paper",
             data_dir: Optional[Union[str, os.PathLike]] = None, limit: Optional[Union[int, dict[str, int]]] = None,
             num_fewshot: int = 0,
             batch_size: int = 8, max_length: int = 2048, perplexity_records: Optional[Sequence[dict]] = None,
             perplexity_max_length: Optional[int] = None, log: Callable[[str], None] = lambda s: None
             ) -> dict[str, Any]:
    """Every requested task (``limit``: first N examples, or a dict of per-task limits), plus the paper's average
    (when all four of its tasks ran) and, with
    ``perplexity_records``, the response perplexity (records cut to ``perplexity_max_length`` tokens, default
    ``max_length``, as in training). Returns ``{"tasks": {...}, "average": ..., ...}``."""
    names = resolve_tasks(tasks)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if data_dir is None or not data_dir.is_dir():
        raise EvalDataError(f"evaluation data folder not found ({data_dir}); pass --data_dir or set ${EVAL_DIR_ENV}")
    results: dict[str, Any] = {"tasks": {}, "limit": limit, "num_fewshot": num_fewshot, "seconds": {}}
    for name in names:
        task_limit = limit.get(name) if isinstance(limit, dict) else limit
        start = time.perf_counter()
        results["tasks"][name] = evaluate_task(model, tokenizer, name, data_dir, task_limit, num_fewshot, batch_size,
                                               max_length)
        results["seconds"][name] = time.perf_counter() - start
        log(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in results["tasks"][name].items() if k != "n")
            + f" ({results['seconds'][name]:.0f} s)")
    if all(t in results["tasks"] for t in PAPER_TASKS):
        picked = [results["tasks"][t][TASKS[t].paper_metric] for t in PAPER_TASKS]
        chance = [results["tasks"][t][f"chance_{TASKS[t].paper_metric}"] for t in PAPER_TASKS]
        results["average"] = sum(picked) / len(picked)
        results["average_chance"] = sum(chance) / len(chance)
    if perplexity_records:
        start = time.perf_counter()
        results["perplexity"] = response_perplexity(model, tokenizer, perplexity_records,
                                                    perplexity_max_length or max_length, batch_size)
        results["seconds"]["perplexity"] = time.perf_counter() - start
        log(f"response perplexity: {results['perplexity']['perplexity']:.3f} "
            f"({results['seconds']['perplexity']:.0f} s)")
    return results


# ---------------------------------------------------------------------------------------------- command line
def load_for_eval(model_path: Union[str, os.PathLike], adapter: Optional[str] = None,
                  tokenizer_path: Optional[str] = None):
    """A model and tokenizer from a dense folder, an ``apt_hf.export_pruned`` folder, or a base folder plus a saved
    (APT or LoRA) adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .export import STRUCTURE_FILE, load_pruned

    model_path = Path(model_path)
    if not (model_path / "config.json").is_file():
        raise EvalDataError(f"--model {model_path} is not a model folder (no config.json)")
    if (model_path / STRUCTURE_FILE).is_file():
        model = load_pruned(model_path)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path)
    if adapter:
        import peft

        model = peft.PeftModel.from_pretrained(model, adapter)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or (adapter if adapter and Path(
        adapter, "tokenizer_config.json").is_file() else model_path))
    return model.eval(), tokenizer


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m apt_hf.llm_eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="dense model folder, or an apt_hf.export_pruned folder")
    parser.add_argument("--adapter", help="a saved adapter (APT or LoRA) to put on --model")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the adapter's or the model's)")
    parser.add_argument("--tasks", default="paper", help=f"comma-separated: {', '.join(TASKS)}, 'paper' "
                                                          f"({', '.join(PAPER_TASKS)}) or 'all'")
    parser.add_argument("--data_dir", default=None, help=f"evaluation data folder (default ${EVAL_DIR_ENV} or "
                                                         "../shared/data/eval of a source checkout)")
    parser.add_argument("--limit", type=int, default=None, help="first N examples per task (per subject for mmlu)")
    parser.add_argument("--task_limits", default="", help="per-task limits overriding --limit, e.g. mmlu=2")
    parser.add_argument("--num_fewshot", type=int, default=0, help="solved dev examples before each mmlu question")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=2048, help="context tokens kept (cut from the left)")
    parser.add_argument("--perplexity_data", help="Alpaca-format JSON for response perplexity (held-out rows)")
    parser.add_argument("--perplexity_from", type=int, default=0, help="first record of --perplexity_data to use")
    parser.add_argument("--perplexity_limit", type=int, default=None, help="records of --perplexity_data to use")
    parser.add_argument("--perplexity_max_length", type=int, default=None,
                        help="tokens per perplexity record (default --max_length; use the training cut)")
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        names = resolve_tasks(args.tasks)
        data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
        if data_dir is None or not data_dir.is_dir():
            raise EvalDataError(f"evaluation data folder not found ({args.data_dir}); pass --data_dir or set "
                                f"${EVAL_DIR_ENV}")
        for name in names:
            if not (data_dir / TASKS[name].files).exists():
                raise EvalDataError(f"{name} needs {data_dir / TASKS[name].files}, which does not exist")
        records = None
        if args.perplexity_data:
            records = load_instructions(args.perplexity_data)[args.perplexity_from:]
            records = records[:args.perplexity_limit] if args.perplexity_limit else records
            if not records:
                raise EvalDataError(f"--perplexity_from {args.perplexity_from} leaves no record of "
                                    f"{args.perplexity_data}")
        if args.limit is not None and args.limit < 1:
            raise EvalDataError("--limit must be a positive number of examples")
        limits = {**{n: args.limit for n in names}, **parse_task_limits(args.task_limits)}
        model, tokenizer = load_for_eval(args.model, args.adapter, args.tokenizer)
    except (EvalDataError, OSError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    results = evaluate(model, tokenizer, names, data_dir, limits, args.num_fewshot, args.batch_size,
                       args.max_length, records, args.perplexity_max_length, log=print)
    results["model"], results["adapter"] = str(args.model), args.adapter
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2))
    if "average" in results:
        print(f"average (ARC-c acc_norm, HellaSwag acc_norm, MMLU acc, TruthfulQA mc2): {results['average']:.4f} "
              f"(chance {results['average_chance']:.4f})")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
