"""GLUE task descriptions, an offline TSV loader and numpy-only GLUE metrics.

This module lets the rest of ``apt_hf`` train and evaluate on GLUE without
the Hugging Face Hub, pandas, scipy or scikit-learn:

* :data:`GLUE_TASKS` describes the nine GLUE tasks (CoLA, SST-2, MRPC,
  STS-B, QQP, MNLI, QNLI, RTE, WNLI): which folder and files hold them, which
  columns carry the text and the label, the label vocabulary and the metrics.
* :func:`load_glue_split` reads one split of the original GLUE distribution
  (the ``glue_data/`` layout with ``CoLA/``, ``SST-2/``, ... folders) into a
  :class:`datasets.Dataset` with the columns ``sentence1``, ``sentence2``
  (sentence-pair tasks only) and ``label``. Problems with the files are
  reported as a :class:`GlueDataError` whose message names the problem, the
  file (and line) and the fix.
* :func:`compute_glue_metrics` and :func:`main_metric_name` give the standard
  GLUE metrics (accuracy, F1, Matthews correlation, Pearson, Spearman).

Reading rules (they matter: the GLUE files are not "real" CSV):

* fields are split on ``\\t`` only and quotes are never interpreted
  (``csv.QUOTE_NONE``): some MRPC and QNLI fields start with a lone ``"``;
* files are decoded as ``utf-8-sig`` so MRPC's byte-order mark is dropped;
* CoLA has no header; its four columns are ``source label original_mark
  sentence``;
* text is kept exactly as written (SST-2 sentences keep their trailing space);
  only label fields are stripped of surrounding whitespace.

Label ids follow the order of :attr:`TaskSpec.labels`, e.g. RTE/QNLI use
``entailment=0, not_entailment=1`` and MNLI uses
``contradiction=0, entailment=1, neutral=2``.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import datasets

__all__ = [
    "GLUE_TASKS",
    "GlueDataError",
    "TaskSpec",
    "compute_glue_metrics",
    "get_task_spec",
    "load_glue_split",
    "main_metric_name",
    "normalize_task_name",
]


class GlueDataError(ValueError):
    """A GLUE task name, split, folder or file is unknown, missing or malformed."""


@dataclass(frozen=True)
class TaskSpec:
    """Static description of one GLUE task as distributed in ``glue_data/``.

    Attributes:
        name: canonical lower-case task name (``"sst2"``, ``"stsb"``, ...).
        folder: folder name inside a GLUE directory (``"SST-2"``).
        text_columns: one or two column names holding the input text(s);
            they become ``sentence1`` (and ``sentence2``).
        label_column: column holding the gold label / score.
        labels: label strings in id order, or ``None`` for regression (STS-B).
        has_header: whether the TSV files start with a header line.
        columns: column names for header-less files (CoLA); empty otherwise.
        split_files: split name -> file name inside :attr:`folder`.
        metrics: names of the metrics :func:`compute_glue_metrics` returns.
        main_metric: the single metric used for model selection.
    """

    name: str
    folder: str
    text_columns: tuple[str, ...]
    label_column: str
    labels: tuple[str, ...] | None
    has_header: bool
    split_files: tuple[tuple[str, str], ...]
    metrics: tuple[str, ...]
    main_metric: str
    columns: tuple[str, ...] = ()

    @property
    def is_regression(self) -> bool:
        """True for STS-B (float scores), False for classification tasks."""
        return self.labels is None

    @property
    def num_labels(self) -> int:
        """Number of model outputs: 1 for regression, else the label count."""
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_pair(self) -> bool:
        """True if the task has two input texts (``sentence2`` is present)."""
        return len(self.text_columns) == 2

    @property
    def splits(self) -> tuple[str, ...]:
        """Names of the splits this task defines (e.g. ``("train", "dev")``)."""
        return tuple(split for split, _ in self.split_files)

    def file_for(self, split: str) -> str:
        """File name of ``split``; accepts ``validation`` as alias of ``dev``.

        Raises:
            GlueDataError: if the split is unknown for this task.
        """
        if not isinstance(split, str):
            raise GlueDataError(
                f"Split must be a string, got {type(split).__name__}. Use one of: {', '.join(self.splits)}."
            )
        key = _SPLIT_ALIASES.get(split.strip().lower(), split.strip().lower())
        for name, file_name in self.split_files:
            if name == key:
                return file_name
        raise GlueDataError(
            f"Unknown split {split!r} for GLUE task {self.name!r}. "
            f"Use one of: {', '.join(self.splits)} ('validation' means 'dev')."
        )


_SPLIT_ALIASES = {
    "validation": "dev",
    "valid": "dev",
    "val": "dev",
    "validation_matched": "dev",
    "dev_matched": "dev",
    "validation_mismatched": "dev_mismatched",
}

_TRAIN_DEV = (("train", "train.tsv"), ("dev", "dev.tsv"))
_BINARY = ("0", "1")
_ENTAIL = ("entailment", "not_entailment")
_ACC = ("accuracy",)
_ACC_F1 = ("accuracy", "f1", "combined_score")

GLUE_TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec(
        name="cola",
        folder="CoLA",
        text_columns=("sentence",),
        label_column="label",
        labels=_BINARY,
        has_header=False,
        columns=("source", "label", "original_mark", "sentence"),
        split_files=_TRAIN_DEV,
        metrics=("matthews_correlation",),
        main_metric="matthews_correlation",
    ),
    "sst2": TaskSpec(
        name="sst2",
        folder="SST-2",
        text_columns=("sentence",),
        label_column="label",
        labels=_BINARY,
        has_header=True,
        split_files=_TRAIN_DEV,
        metrics=_ACC,
        main_metric="accuracy",
    ),
    "mrpc": TaskSpec(
        name="mrpc",
        folder="MRPC",
        text_columns=("#1 String", "#2 String"),
        label_column="Quality",
        labels=_BINARY,
        has_header=True,
        split_files=_TRAIN_DEV,
        metrics=_ACC_F1,
        main_metric="f1",
    ),
    "stsb": TaskSpec(
        name="stsb",
        folder="STS-B",
        text_columns=("sentence1", "sentence2"),
        label_column="score",
        labels=None,
        has_header=True,
        split_files=_TRAIN_DEV,
        metrics=("pearson", "spearmanr", "combined_score"),
        main_metric="pearson",
    ),
    "qqp": TaskSpec(
        name="qqp",
        folder="QQP",
        text_columns=("question1", "question2"),
        label_column="is_duplicate",
        labels=_BINARY,
        has_header=True,
        split_files=_TRAIN_DEV,
        metrics=_ACC_F1,
        main_metric="f1",
    ),
    "mnli": TaskSpec(
        name="mnli",
        folder="MNLI",
        text_columns=("sentence1", "sentence2"),
        label_column="gold_label",
        labels=("contradiction", "entailment", "neutral"),
        has_header=True,
        split_files=(
            ("train", "train.tsv"),
            ("dev", "dev_matched.tsv"),
            ("dev_mismatched", "dev_mismatched.tsv"),
        ),
        metrics=_ACC,
        main_metric="accuracy",
    ),
    "qnli": TaskSpec(
        name="qnli",
        folder="QNLI",
        text_columns=("question", "sentence"),
        label_column="label",
        labels=_ENTAIL,
        has_header=True,
        split_files=_TRAIN_DEV,
        metrics=_ACC,
        main_metric="accuracy",
    ),
    "rte": TaskSpec(
        name="rte",
        folder="RTE",
        text_columns=("sentence1", "sentence2"),
        label_column="label",
        labels=_ENTAIL,
        has_header=True,
        split_files=_TRAIN_DEV,
        metrics=_ACC,
        main_metric="accuracy",
    ),
    "wnli": TaskSpec(
        name="wnli",
        folder="WNLI",
        text_columns=("sentence1", "sentence2"),
        label_column="label",
        labels=_BINARY,
        has_header=True,
        split_files=_TRAIN_DEV,
        metrics=_ACC,
        main_metric="accuracy",
    ),
}
"""The nine GLUE tasks, keyed by canonical lower-case name."""


# --------------------------------------------------------------------------- #
# Task names
# --------------------------------------------------------------------------- #


def normalize_task_name(task: str) -> str:
    """Map ``"SST-2"``, ``"sst_2"``, ``"STS-B"``, ``"glue/mnli"`` ... to a key of :data:`GLUE_TASKS`.

    Raises:
        GlueDataError: if the name is not a GLUE task (the message lists them).
    """
    if not isinstance(task, str):
        raise GlueDataError(
            f"GLUE task name must be a string, got {type(task).__name__}. "
            f"Use one of: {', '.join(GLUE_TASKS)}."
        )
    key = task.strip().lower()
    if key.startswith("glue/") or key.startswith("glue-") or key.startswith("glue_"):
        key = key[5:]
    key = key.replace("-", "").replace("_", "").replace(" ", "")
    if key not in GLUE_TASKS:
        raise GlueDataError(
            f"Unknown GLUE task {task!r}. Use one of: {', '.join(GLUE_TASKS)} "
            "(case-insensitive; dashes allowed, e.g. 'SST-2', 'STS-B')."
        )
    return key


def get_task_spec(task: str) -> TaskSpec:
    """Return the :class:`TaskSpec` for ``task`` (any accepted spelling)."""
    return GLUE_TASKS[normalize_task_name(task)]


def main_metric_name(task: str) -> str:
    """Name of the single metric used to select/compare models on ``task``.

    The choice follows the usual GLUE reporting convention (and what the HF
    examples use for ``metric_for_best_model``): ``accuracy`` for SST-2, QNLI,
    RTE, WNLI and MNLI (matched dev), ``f1`` of the positive class for MRPC
    and QQP (accuracy is reported beside it), ``matthews_correlation`` for
    CoLA and ``pearson`` for STS-B (Spearman is reported beside it).
    """
    return get_task_spec(task).main_metric


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #


def _task_path(glue_dir: str | os.PathLike[str], spec: TaskSpec, split: str) -> Path:
    """Resolve and check the TSV path for ``spec``/``split``."""
    file_name = spec.file_for(split)
    root = Path(glue_dir).expanduser()
    if not root.is_dir():
        raise GlueDataError(
            f"GLUE directory not found: {root} "
            f"({'it is not a directory' if root.exists() else 'it does not exist'}). "
            "Pass the folder that holds the task folders "
            "(CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI)."
        )
    folder = root / spec.folder
    if not folder.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise GlueDataError(
            f"GLUE task folder not found: expected {folder} for task {spec.name!r}. "
            f"Folders present in {root}: {present or 'none'}. "
            f"Put the {spec.folder} data there (folder names are case-sensitive)."
        )
    path = folder / file_name
    if not path.is_file():
        present = sorted(p.name for p in folder.iterdir())
        raise GlueDataError(
            f"GLUE file not found: expected {path} for task {spec.name!r}, "
            f"split {split!r}. Files present in {folder}: {present or 'none'}. "
            f"Add {file_name} to that folder."
        )
    return path


def _read_rows(path: Path, spec: TaskSpec) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Read ``path`` as tab-separated text; return header and (line, fields) rows."""
    rows: list[tuple[int, list[str]]] = []
    header: list[str] | None = None
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            for fields in reader:
                if not fields:  # a blank line (e.g. a trailing one)
                    continue
                if spec.has_header and header is None:
                    header = [name.strip() for name in fields]
                    continue
                rows.append((reader.line_num, fields))
    except UnicodeDecodeError as exc:
        raise GlueDataError(
            f"{path} is not valid UTF-8 ({exc.reason} at byte {exc.start}). "
            "Re-save the file as UTF-8 (the GLUE distribution is UTF-8)."
        ) from None
    except csv.Error as exc:
        raise GlueDataError(
            f"{path} could not be parsed as tab-separated text: {exc}. "
            "Check that the file is an unmodified GLUE TSV."
        ) from None
    if not rows:
        if path.stat().st_size == 0:
            what = "is empty (0 bytes)"
        elif header is not None:
            what = "has a header but no data rows"
        else:
            what = "has no data rows (only blank lines)"
        raise GlueDataError(
            f"GLUE file {path} {what}. Replace it with the complete "
            f"{spec.folder}/{path.name} from the GLUE distribution."
        )
    return (header if header is not None else list(spec.columns)), rows


def load_glue_split(
    glue_dir: str | os.PathLike[str],
    task: str,
    split: str,
    *,
    skip_bad_rows: bool = False,
) -> datasets.Dataset:
    """Load one GLUE split from the original TSV files into a ``datasets.Dataset``.

    Args:
        glue_dir: folder holding the task folders (``CoLA``, ``SST-2``, ...).
        task: task name, any spelling accepted by :func:`normalize_task_name`.
        split: ``"train"`` or ``"dev"`` (alias ``"validation"``); MNLI also
            has ``"dev_mismatched"`` (``"dev"`` is ``dev_matched.tsv``).
        skip_bad_rows: drop rows whose field count differs from the header
            instead of raising (useful for damaged QQP copies). Labels are
            always validated.

    Returns:
        A :class:`datasets.Dataset` with ``sentence1``, ``sentence2`` (pair
        tasks only) and ``label``: a ``ClassLabel`` id in the order of
        :attr:`TaskSpec.labels`, or a ``float32`` score for STS-B.

    Raises:
        GlueDataError: unknown task/split, missing directory/folder/file,
            empty file, missing columns, rows with the wrong number of fields,
            labels outside the label set, or non-numeric STS-B scores.
    """
    import datasets  # lazily: task specs and metrics work without it

    spec = get_task_spec(task)
    path = _task_path(glue_dir, spec, split)
    header, rows = _read_rows(path, spec)

    required = [*spec.text_columns, spec.label_column]
    missing = [name for name in required if name not in header]
    if missing:
        raise GlueDataError(
            f"{path}: missing required column(s) {missing} for task {spec.name!r}. "
            f"Header found: {header}. Expected a tab-separated header containing "
            f"{required} (is this the right file, and is it split on tabs?)."
        )
    text_idx = [header.index(name) for name in spec.text_columns]
    label_idx = header.index(spec.label_column)
    n_fields = len(header)

    texts: list[list[str]] = [[] for _ in text_idx]
    raw_labels: list[str] = []
    label_lines: list[int] = []
    for line, fields in rows:
        if len(fields) != n_fields:
            if skip_bad_rows:
                continue
            raise GlueDataError(
                f"{path}:{line}: expected {n_fields} tab-separated fields "
                f"({'header' if spec.has_header else 'fixed columns'}: {header}), "
                f"found {len(fields)}. Fix or remove that line (fields must be "
                "split on tabs only, with no quoting), or pass skip_bad_rows=True."
            )
        for store, idx in zip(texts, text_idx):
            store.append(fields[idx])
        raw_labels.append(fields[label_idx].strip())
        label_lines.append(line)

    if not raw_labels:
        raise GlueDataError(
            f"GLUE file {path} has no usable rows (all {len(rows)} rows were "
            "malformed and skipped). Replace it with an unmodified GLUE file."
        )

    labels: list[Any]
    if spec.labels is None:
        labels = []
        bad: list[tuple[int, str]] = []
        for line, value in zip(label_lines, raw_labels):
            try:
                score = float(value)
            except ValueError:
                score = math.nan
            if not math.isfinite(score):
                bad.append((line, value))
            else:
                labels.append(score)
        if bad:
            shown = list(dict.fromkeys(v for _, v in bad))[:5]
            raise GlueDataError(
                f"{path}:{bad[0][0]}: non-numeric {spec.name} score(s) in column "
                f"{spec.label_column!r}: {shown} ({len(bad)} row(s) in total). "
                "STS-B scores must be numbers between 0 and 5; fix those rows."
            )
        label_feature = datasets.Value("float32")
    else:
        to_id = {name: i for i, name in enumerate(spec.labels)}
        labels = [to_id.get(value, -1) for value in raw_labels]
        if -1 in labels:
            bad_lines = [ln for ln, lab in zip(label_lines, labels) if lab == -1]
            bad_values = [v for v, lab in zip(raw_labels, labels) if lab == -1]
            shown = list(dict.fromkeys(bad_values))[:5]
            raise GlueDataError(
                f"{path}:{bad_lines[0]}: label(s) {shown} in column "
                f"{spec.label_column!r} are not in the {spec.name} label set "
                f"{list(spec.labels)} ({len(bad_lines)} row(s) in total). "
                "Fix those rows or check that this is the right task's file."
            )
        label_feature = datasets.ClassLabel(names=list(spec.labels))

    columns: dict[str, list[Any]] = {"sentence1": texts[0]}
    feature_map: dict[str, Any] = {"sentence1": datasets.Value("string")}
    if spec.is_pair:
        columns["sentence2"] = texts[1]
        feature_map["sentence2"] = datasets.Value("string")
    columns["label"] = labels
    feature_map["label"] = label_feature
    return datasets.Dataset.from_dict(columns, features=datasets.Features(feature_map))


# --------------------------------------------------------------------------- #
# Metrics (numpy only)
# --------------------------------------------------------------------------- #


def _as_class_ids(values: Any, what: str) -> np.ndarray:
    """Class ids from ids or logits of shape (n, k) (argmax over the last axis)."""
    arr = np.asarray(values)
    if arr.ndim == 2 and arr.shape[1] > 1:
        arr = arr.argmax(axis=-1)
    elif arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{what} must be class ids of shape (n,) or logits of shape (n, k); got shape {arr.shape}.")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{what} must be integer class ids (or 2-D logits); got non-integer floats.")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iub":
        raise ValueError(f"{what} must be numeric class ids; got dtype {arr.dtype}.")
    return arr.astype(np.int64)


def _as_scores(values: Any, what: str) -> np.ndarray:
    """1-D float64 scores; an (n, 1) array is squeezed."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{what} must be scores of shape (n,) or (n, 1); got shape {arr.shape}.")
    return arr


def _accuracy(pred: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean(pred == ref))


def _f1_positive(pred: np.ndarray, ref: np.ndarray, positive: int = 1) -> float:
    """F1 of class ``positive``; 0.0 when there are no true or predicted positives."""
    tp = float(np.sum((pred == positive) & (ref == positive)))
    fp = float(np.sum((pred == positive) & (ref != positive)))
    fn = float(np.sum((pred != positive) & (ref == positive)))
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2 * tp / denom


def _matthews(pred: np.ndarray, ref: np.ndarray) -> float:
    """Matthews correlation (multi-class R_K form); 0.0 if either side is constant."""
    classes, inverse = np.unique(np.concatenate([ref, pred]), return_inverse=True)
    k = len(classes)
    n = len(ref)
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (inverse[:n], inverse[n:]), 1.0)
    true_count = conf.sum(axis=1)
    pred_count = conf.sum(axis=0)
    correct = np.trace(conf)
    total = conf.sum()
    cov_tp = correct * total - true_count @ pred_count
    cov_pp = total**2 - pred_count @ pred_count
    cov_tt = total**2 - true_count @ true_count
    denom = cov_pp * cov_tt
    return 0.0 if denom == 0 else float(cov_tp / math.sqrt(denom))


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN if either input is constant (as scipy)."""
    xc = x - x.mean()
    yc = y - y.mean()
    denom = math.sqrt(float(xc @ xc) * float(yc @ yc))
    if denom == 0.0:
        return math.nan
    return float(np.clip((xc @ yc) / denom, -1.0, 1.0))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given the mean of the ranks they span."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts).astype(np.float64)
    mean_rank = last_rank - (counts - 1) / 2.0
    return mean_rank[inverse.reshape(-1)]


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (Pearson of tie-averaged ranks)."""
    return _pearson(_average_ranks(x), _average_ranks(y))


def compute_glue_metrics(task: str, predictions: Any, references: Any) -> dict[str, float]:
    """Compute the GLUE metrics of ``task`` with numpy only.

    Args:
        task: GLUE task name (any accepted spelling).
        predictions: classification: class ids ``(n,)`` or logits ``(n, k)``
            (argmax is taken); STS-B: scores ``(n,)`` or ``(n, 1)``.
        references: gold class ids, or gold scores for STS-B.

    Returns:
        ``{"accuracy"}`` for SST-2/MNLI/QNLI/RTE/WNLI;
        ``{"accuracy", "f1", "combined_score"}`` for MRPC/QQP (F1 of class 1,
        combined = mean of the two); ``{"matthews_correlation"}`` for CoLA;
        ``{"pearson", "spearmanr", "combined_score"}`` for STS-B. Values are
        Python floats. Pearson/Spearman are NaN when an input is constant;
        Matthews is 0.0 then.

    Raises:
        GlueDataError: unknown task.
        ValueError: bad shapes, length mismatch or empty inputs.
    """
    spec = get_task_spec(task)
    if spec.is_regression:
        pred = _as_scores(predictions, "predictions")
        ref = _as_scores(references, "references")
    else:
        pred = _as_class_ids(predictions, "predictions")
        ref = _as_class_ids(references, "references")
    if pred.shape[0] != ref.shape[0]:
        raise ValueError(f"predictions and references differ in length: {pred.shape[0]} vs {ref.shape[0]}.")
    if pred.shape[0] == 0:
        raise ValueError("cannot compute GLUE metrics on empty predictions/references.")

    if spec.name == "stsb":
        pearson = _pearson(pred, ref)
        spearman = _spearman(pred, ref)
        return {"pearson": pearson, "spearmanr": spearman, "combined_score": (pearson + spearman) / 2}
    if spec.name == "cola":
        return {"matthews_correlation": _matthews(pred, ref)}
    accuracy = _accuracy(pred, ref)
    if spec.name in ("mrpc", "qqp"):
        f1 = _f1_positive(pred, ref)
        return {"accuracy": accuracy, "f1": f1, "combined_score": (accuracy + f1) / 2}
    return {"accuracy": accuracy}
