"""Alpaca-format instruction data for causal-LM tuning (the paper's LLaMA setting, spec H.2; offline here: LIMA).

A record has ``instruction`` and ``output`` (non-empty strings), optionally ``input`` (extra context, appended to
the instruction) and ``history`` (earlier ``[user, assistant]`` turns, as in LLaMA-Factory's conversions).
:func:`tokenize_example` renders a record with the tokenizer's chat template when it has one (otherwise with the
Stanford Alpaca prompt) and labels only the response tokens, so the loss is the response's alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

IGNORE_INDEX = -100
# The Stanford Alpaca prompt (for tokenizers without a chat template).
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                 "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                            "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                            "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


class InstructDataError(ValueError):
    """An instruction-data file that cannot be used, with the file, record and field named."""


def load_instructions(path: Union[str, os.PathLike]) -> list[dict[str, Any]]:
    """Read and check an Alpaca-format JSON list (or JSON Lines) file; every problem names the record and field."""
    path = Path(path)
    if not path.is_file():
        raise InstructDataError(f"instruction data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as err:
        raise InstructDataError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(records, list) or not records:
        raise InstructDataError(f"{path} must hold a non-empty JSON list of records with 'instruction' and 'output'")
    for i, record in enumerate(records):
        check_record(record, f"{path}: record {i}")
    return records


def check_record(record: Any, where: str) -> None:
    if not isinstance(record, dict):
        raise InstructDataError(f"{where} is a {type(record).__name__}, not an object with 'instruction' and 'output'")
    missing = [k for k in ("instruction", "output") if k not in record]
    if missing:
        raise InstructDataError(f"{where} lacks the field(s) {missing}; Alpaca-format records need 'instruction' and "
                                f"'output' (and optionally 'input'); it has {sorted(record)}")
    for key in ("instruction", "output"):
        if not isinstance(record[key], str) or not record[key].strip():
            raise InstructDataError(f"{where}: '{key}' must be a non-empty string")
    if not isinstance(record.get("input", ""), (str, type(None))):
        raise InstructDataError(f"{where}: 'input' must be a string")
    history = record.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(s, str) for s in t) for t in history):
        raise InstructDataError(f"{where}: 'history' must be a list of [user, assistant] string pairs")


def user_text(record: dict[str, Any]) -> str:
    extra = (record.get("input") or "").strip()
    return record["instruction"] + (f"\n\n{extra}" if extra else "")


def to_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """Chat messages of a record: its history turns, the instruction (+ input) and the output."""
    messages = []
    for user, assistant in record.get("history") or []:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages + [{"role": "user", "content": user_text(record)},
                       {"role": "assistant", "content": record["output"]}]


def prompt_and_response(tokenizer, record: dict[str, Any]) -> tuple[str, str]:
    """The text before the response (with the generation prompt) and the response text (with its end marker)."""
    if getattr(tokenizer, "chat_template", None):
        messages = to_messages(record)
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise InstructDataError("the tokenizer's chat template renders the conversation without its generation "
                                    "prompt as a prefix, so the response tokens cannot be told apart; pass a "
                                    "tokenizer whose template does")
        return prompt, full[len(prompt):]
    history = "".join(f"{u}\n\n{a}\n\n" for u, a in record.get("history") or [])
    template = ALPACA_PROMPT_WITH_INPUT if (record.get("input") or "").strip() else ALPACA_PROMPT
    prompt = history + template.format(instruction=record["instruction"], input=(record.get("input") or "").strip())
    return prompt, record["output"] + (tokenizer.eos_token or "")


def tokenize_example(tokenizer, record: dict[str, Any], max_length: int) -> Optional[dict[str, list[int]]]:
    """``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on the prompt) of one record, cut to ``max_length``
    tokens; ``None`` when the prompt alone fills ``max_length`` (no response token would be trained)."""
    prompt, response = prompt_and_response(tokenizer, record)
    with_template = bool(getattr(tokenizer, "chat_template", None))  # the template writes its own special tokens
    prompt_ids = tokenizer(prompt, add_special_tokens=not with_template)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


__all__ = ["IGNORE_INDEX", "InstructDataError", "check_record", "load_instructions", "prompt_and_response",
           "to_messages", "tokenize_example"]
