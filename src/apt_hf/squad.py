"""Extractive question answering in the SQuAD v2 format (the paper's SQuAD v2 column, spec I.1): loading and
checking the JSON files, turning start/end logits into answer spans, and the official exact-match / F1 scores with
unanswerable questions.

The span post-processing follows the usual recipe of transformers' QA examples (best ``n_best`` start and end
positions per feature, spans inside the context and at most ``max_answer_length`` tokens, the null answer when its
score beats the best span by ``null_score_diff_threshold``); the metric follows the SQuAD v2.0 evaluation script
(answers normalised by lower-casing and removing punctuation, articles and extra whitespace; the best score over the
gold answers; a question without gold answers expects the empty answer).
"""

from __future__ import annotations

import collections
import json
import os
import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np


class SquadDataError(ValueError):
    """A SQuAD-format file that cannot be used, with the file and the offending entry named."""


# ---------------------------------------------------------------------------------------------- loading
def load_squad(path: Union[str, os.PathLike]) -> list[dict[str, Any]]:
    """Flatten a SQuAD (v1.1 or v2.0) JSON file into records ``id, title, context, question, answers`` (``answers``
    as ``{"text": [...], "answer_start": [...]}``, empty for unanswerable questions). Every answer must be found in
    its context at ``answer_start``."""
    path = Path(path)
    if not path.is_file():
        raise SquadDataError(f"SQuAD file not found: {path}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SquadDataError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise SquadDataError(f"{path} is not in the SQuAD format: the top level needs a 'data' list of articles "
                             "with 'paragraphs', each with 'context' and 'qas'")
    records, seen = [], set()
    for a, article in enumerate(doc["data"]):
        for p, para in enumerate(_field(article, "paragraphs", list, f"{path}: data[{a}]")):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            context = _field(para, "context", str, where)
            for q, qa in enumerate(_field(para, "qas", list, where)):
                at = f"{where}.qas[{q}]"
                qid = str(_field(qa, "id", (str, int), at))
                question = _field(qa, "question", str, at)
                if qid in seen:
                    raise SquadDataError(f"{at}: question id {qid!r} is used twice")
                seen.add(qid)
                answers = _field(qa, "answers", list, at)
                if qa.get("is_impossible") and answers:
                    raise SquadDataError(f"{at} (id {qid}) is marked is_impossible but has answers")
                texts, starts = [], []
                for k, ans in enumerate(answers):
                    text = _field(ans, "text", str, f"{at}.answers[{k}]")
                    start = _field(ans, "answer_start", int, f"{at}.answers[{k}]")
                    if context[start:start + len(text)] != text:
                        raise SquadDataError(f"{at}.answers[{k}] (id {qid}): {text!r} is not at answer_start={start} "
                                             "of its context")
                    texts.append(text)
                    starts.append(start)
                records.append({"id": qid, "title": str(article.get("title", "")), "context": context,
                                "question": question, "answers": {"text": texts, "answer_start": starts}})
    if not records:
        raise SquadDataError(f"{path} holds no question")
    return records


def _field(obj: Any, key: str, kind, where: str):
    if not isinstance(obj, dict) or key not in obj:
        raise SquadDataError(f"{where} lacks the field '{key}'")
    if not isinstance(obj[key], kind) or isinstance(obj[key], bool):
        raise SquadDataError(f"{where}: '{key}' has the wrong type ({type(obj[key]).__name__})")
    return obj[key]


# ---------------------------------------------------------------------------------------------- spans
def best_answers(examples: Sequence[dict], features: Sequence[dict], start_logits: np.ndarray,
                 end_logits: np.ndarray, n_best: int = 20, max_answer_length: int = 30,
                 null_score_diff_threshold: float = 0.0, version_2: bool = True) -> dict[str, str]:
    """Answer text per example id from the logits of its features (a long context gives several features).

    Each feature needs ``example_id`` and ``offset_mapping`` (``None`` for tokens outside the context). A span's
    score is its start logit plus its end logit; with ``version_2`` the empty answer is predicted when the best
    null score (the first token's start + end logits, over the example's features) exceeds the best span score by
    more than ``null_score_diff_threshold``.
    """
    by_example = collections.defaultdict(list)
    for i, feature in enumerate(features):
        by_example[feature["example_id"]].append(i)
    answers = {}
    for example in examples:
        best_text, best_score, null_score = "", -np.inf, np.inf
        for i in by_example.get(example["id"], []):
            starts, ends, offsets = start_logits[i], end_logits[i], features[i]["offset_mapping"]
            null_score = min(null_score, float(starts[0] + ends[0]))
            for s in np.argsort(starts)[::-1][:n_best]:
                for e in np.argsort(ends)[::-1][:n_best]:
                    if (s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None
                            or e < s or e - s + 1 > max_answer_length):
                        continue
                    score = float(starts[s] + ends[e])
                    if score > best_score:
                        best_score = score
                        best_text = example["context"][offsets[s][0]:offsets[e][1]]
        if version_2 and (best_score == -np.inf or null_score - best_score > null_score_diff_threshold):
            best_text = ""
        answers[example["id"]] = best_text
    return answers


# ---------------------------------------------------------------------------------------------- metric
def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD evaluation)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_score(gold: str, pred: str) -> float:
    return float(normalize_answer(gold) == normalize_answer(pred))


def f1_score(gold: str, pred: str) -> float:
    gold_tokens, pred_tokens = normalize_answer(gold).split(), normalize_answer(pred).split()
    if not gold_tokens or not pred_tokens:  # the empty answer: right only if both are empty
        return float(gold_tokens == pred_tokens)
    common = sum((collections.Counter(gold_tokens) & collections.Counter(pred_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_v2_scores(examples: Sequence[dict], predictions: dict[str, str],
                    missing: Optional[str] = None) -> dict[str, float]:
    """``exact`` and ``f1`` in percent over all questions, and over the answerable (``HasAns_*``) and the
    unanswerable (``NoAns_*``) ones. A question without a prediction counts as answered with ``missing``; ``None``
    raises instead."""
    rows = {"all": [], "HasAns": [], "NoAns": []}
    for ex in examples:
        if ex["id"] not in predictions and missing is None:
            raise KeyError(f"no prediction for question id {ex['id']!r}")
        pred = predictions.get(ex["id"], missing or "")
        golds = [t for t in ex["answers"]["text"] if normalize_answer(t)] or [""]
        score = (max(exact_score(g, pred) for g in golds), max(f1_score(g, pred) for g in golds))
        rows["all"].append(score)
        rows["HasAns" if ex["answers"]["text"] else "NoAns"].append(score)
    out: dict[str, float] = {}
    for name, scores in rows.items():
        if not scores:
            continue
        prefix = "" if name == "all" else f"{name}_"
        out[f"{prefix}exact"] = 100.0 * sum(s[0] for s in scores) / len(scores)
        out[f"{prefix}f1"] = 100.0 * sum(s[1] for s in scores) / len(scores)
        out[f"{prefix}total"] = len(scores)
    return out


__all__ = ["SquadDataError", "best_answers", "exact_score", "f1_score", "load_squad", "normalize_answer",
           "squad_v2_scores"]
