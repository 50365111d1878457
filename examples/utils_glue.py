# Copyright 2024 The apt_hf authors. Licensed under the Apache License, Version 2.0.
"""Data and metrics for ``run_glue.py``: the nine GLUE tasks from their TSV files, your own CSV/JSON files or a Hub
dataset, each turned into ``sentence1`` [, ``sentence2``], ``label``; metrics from scikit-learn and SciPy.

Why here and not in ``apt_hf``: the library is the APT method; reading a benchmark and scoring it is example code,
as in transformers' own examples (``task_to_keys`` inside ``run_glue.py``, ``utils_qa.py`` beside ``run_qa.py``).
Files are parsed by ``datasets`` (pandas underneath) and metrics computed by scikit-learn and SciPy. What stays here
is what those libraries do not know: the GLUE folder layout and label sets, and checks that turn a bad file into one
message naming the file, the row and the fix.

GLUE reading rules (``shared/data/README.md``): fields split on tabs only with quotes left alone
(``quoting=csv.QUOTE_NONE``: some MRPC and QNLI fields start with a lone ``"``), ``utf-8-sig`` for MRPC's byte-order
mark, no header in CoLA, every field read as a string exactly as written (SST-2 sentences keep their trailing space).
Label ids follow :attr:`TaskSpec.labels` (RTE/QNLI: ``entailment=0``; MNLI: ``contradiction=0, entailment=1,
neutral=2``).
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import datasets
import numpy as np
import pandas as pd

__all__ = ["DataError", "GLUE_TASKS", "TaskSpec", "compute_metrics", "get_task_spec", "load_data_files",
           "load_glue_split", "load_hub_dataset", "normalize_task_name", "standardize", "top_class_share"]


class DataError(ValueError):
    """A task name, split, folder, file or column is unknown, missing or malformed (the message says how to fix it)."""


@dataclass(frozen=True)
class TaskSpec:
    """A classification or regression task: its labels and metrics, and for GLUE where its files are.

    Attributes:
        name: task name (``"sst2"``, or the data's name for your own files).
        text_columns: the one or two columns holding the input text(s); they become ``sentence1`` [, ``sentence2``].
        label_column: the column holding the label or score.
        labels: label strings in id order, or ``None`` for regression.
        metrics: the metrics :func:`compute_metrics` returns.
        main_metric: the one used for model selection (greater is better).
        folder: GLUE folder name (``"SST-2"``); empty for other data.
        split_files: GLUE split name -> file name inside :attr:`folder`.
        columns: column names of header-less files (CoLA); empty when the file has a header.
    """

    name: str
    text_columns: tuple[str, ...]
    label_column: str
    labels: Optional[tuple[str, ...]]
    metrics: tuple[str, ...]
    main_metric: str
    folder: str = ""
    split_files: tuple[tuple[str, str], ...] = ()
    columns: tuple[str, ...] = ()

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(split for split, _ in self.split_files)

    def file_for(self, split: str) -> str:
        """File name of ``split`` (``validation`` means ``dev``)."""
        key = _SPLIT_ALIASES.get(str(split).strip().lower(), str(split).strip().lower())
        for name, file_name in self.split_files:
            if name == key:
                return file_name
        raise DataError(f"Unknown split {split!r} for GLUE task {self.name!r}. Use one of: {', '.join(self.splits)} "
                        "('validation' means 'dev').")


_SPLIT_ALIASES = {"validation": "dev", "valid": "dev", "val": "dev", "validation_matched": "dev",
                  "dev_matched": "dev", "validation_mismatched": "dev_mismatched"}
_TRAIN_DEV = (("train", "train.tsv"), ("dev", "dev.tsv"))
_BINARY = ("0", "1")
_ENTAIL = ("entailment", "not_entailment")
_ACC = ("accuracy",)
_ACC_F1 = ("accuracy", "f1", "combined_score")
_CORR = ("pearson", "spearmanr", "combined_score")


def _glue(name, folder, text, label, labels, metrics, main, split_files=_TRAIN_DEV, columns=()) -> TaskSpec:
    return TaskSpec(name, text, label, labels, metrics, main, folder, split_files, columns)


GLUE_TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    _glue("cola", "CoLA", ("sentence",), "label", _BINARY, ("matthews_correlation",), "matthews_correlation",
          columns=("source", "label", "original_mark", "sentence")),
    _glue("sst2", "SST-2", ("sentence",), "label", _BINARY, _ACC, "accuracy"),
    _glue("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", _BINARY, _ACC_F1, "f1"),
    _glue("stsb", "STS-B", ("sentence1", "sentence2"), "score", None, _CORR, "pearson"),
    _glue("qqp", "QQP", ("question1", "question2"), "is_duplicate", _BINARY, _ACC_F1, "f1"),
    _glue("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", ("contradiction", "entailment", "neutral"), _ACC,
          "accuracy", (("train", "train.tsv"), ("dev", "dev_matched.tsv"), ("dev_mismatched", "dev_mismatched.tsv"))),
    _glue("qnli", "QNLI", ("question", "sentence"), "label", _ENTAIL, _ACC, "accuracy"),
    _glue("rte", "RTE", ("sentence1", "sentence2"), "label", _ENTAIL, _ACC, "accuracy"),
    _glue("wnli", "WNLI", ("sentence1", "sentence2"), "label", _BINARY, _ACC, "accuracy"),
)}
"""The nine GLUE tasks, keyed by canonical lower-case name."""


def normalize_task_name(task: str) -> str:
    """``"SST-2"``, ``"sst_2"``, ``"glue/mnli"`` ... -> a key of :data:`GLUE_TASKS`."""
    key = re.sub(r"^glue[/_-]", "", str(task).strip().lower())
    key = key.replace("-", "").replace("_", "").replace(" ", "")
    if key not in GLUE_TASKS:
        raise DataError(f"Unknown GLUE task {task!r}. Use one of: {', '.join(GLUE_TASKS)} (case-insensitive; dashes "
                        "allowed, e.g. 'SST-2', 'STS-B').")
    return key


def get_task_spec(task: str) -> TaskSpec:
    return GLUE_TASKS[normalize_task_name(task)]


# ---------------------------------------------------------------------------------------------------- GLUE files
def _task_path(glue_dir: str | os.PathLike[str], spec: TaskSpec, split: str) -> Path:
    file_name = spec.file_for(split)
    root = Path(glue_dir)
    if not root.is_dir():
        state = "it is not a directory" if root.exists() else "it does not exist"
        raise DataError(f"GLUE directory not found: {root} ({state}). Pass the folder that holds the task folders "
                        "(CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI).")
    folder = root / spec.folder
    if not folder.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(f"GLUE task folder not found: expected {folder} for task {spec.name!r}. Folders present in "
                        f"{root}: {present or 'none'}. Put the {spec.folder} data there (names are case-sensitive).")
    path = folder / file_name
    if not path.is_file():
        present = sorted(p.name for p in folder.iterdir())
        raise DataError(f"GLUE file not found: expected {path} for task {spec.name!r}, split {split!r}. Files present "
                        f"in {folder}: {present or 'none'}. Add {file_name} to that folder.")
    return path


def _read_failure(path: Path, err: BaseException) -> DataError:
    """One message for a file pandas could not read (``datasets`` wraps pandas' error in its own)."""
    cause = err.__cause__ or err.__context__ or err
    for candidate in (err, cause):
        if isinstance(candidate, UnicodeDecodeError):
            return DataError(f"{path} is not valid UTF-8 ({candidate.reason} at byte {candidate.start}). Re-save the "
                             "file as UTF-8.")
        if isinstance(candidate, pd.errors.EmptyDataError):
            return DataError(f"{path} has no data rows (the file is empty or blank). Replace it with the complete "
                             "file.")
        if isinstance(candidate, pd.errors.ParserError):
            match = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(candidate))
            where = f"{path}:{match[2]}: expected {match[1]} tab-separated fields, found {match[3]}" if match else \
                f"{path} could not be parsed ({candidate})"
            return DataError(f"{where}. Fix or remove that line (fields are split on tabs only, quotes are not "
                             "interpreted), or pass skip_bad_rows=True.")
    return DataError(f"{path} could not be read: {cause}")


def load_glue_split(glue_dir: str | os.PathLike[str], task: str, split: str, *,
                    skip_bad_rows: bool = False) -> datasets.Dataset:
    """One split of a GLUE task from the original TSV files (``glue_data/`` layout), read by ``datasets``.

    Returns a ``Dataset`` with ``sentence1``, ``sentence2`` (pair tasks) and ``label`` (a ``ClassLabel`` in the
    order of :attr:`TaskSpec.labels`, or a ``float32`` score for STS-B). ``skip_bad_rows`` drops lines with too
    many fields instead of raising. Every problem raises :class:`DataError` naming the file, the row and the fix.
    """
    spec = get_task_spec(task)
    path = _task_path(glue_dir, spec, split)
    tsv = dict(sep="\t", quoting=csv.QUOTE_NONE, encoding="utf-8-sig")
    try:  # the header decides the column names, so that every column can be read as a string
        names = list(spec.columns) or [str(c) for c in pd.read_csv(path, nrows=0, **tsv).columns]
    except (ValueError, UnicodeDecodeError) as err:
        raise _read_failure(path, err) from None
    required = [*spec.text_columns, spec.label_column]
    missing = [c for c in required if c not in names]
    if missing:
        raise DataError(f"{path}: missing required column(s) {missing} for task {spec.name!r}. Header found: {names}. "
                        f"Expected a tab-separated header containing {required} (is this the right file, and is it "
                        "split on tabs?).")
    try:
        table = datasets.load_dataset(
            "csv", data_files=str(path), split="train", delimiter="\t", quoting=csv.QUOTE_NONE,
            encoding="utf-8-sig", na_filter=False, on_bad_lines="skip" if skip_bad_rows else "error",
            column_names=list(spec.columns) or None,
            features=datasets.Features({c: datasets.Value("string") for c in names}))
    except (ValueError, datasets.exceptions.DatasetGenerationError) as err:
        if "corresponds to no data" not in str(err):  # datasets' wording for a file with a header and no rows
            raise _read_failure(path, err) from None
        table = datasets.Dataset.from_dict({c: [] for c in names})
    if table.num_rows == 0:
        raise DataError(f"GLUE file {path} has a header but no data rows. Replace it with the complete "
                        f"{spec.folder}/{path.name} from the GLUE distribution.")
    first_line = 1 if spec.columns else 2  # line number of the first data row
    for column in spec.text_columns:  # a line with too few fields leaves its last column empty
        empty = [i for i, text in enumerate(table[column]) if not text]
        if empty:
            raise DataError(f"{path}:{empty[0] + first_line}: empty {column!r} field ({len(empty)} row(s) in total); "
                            f"expected {len(names)} tab-separated fields {names} on every line. Fix those lines.")
    raw = [v.strip() for v in table[spec.label_column]]
    if spec.labels is None:
        labels = pd.to_numeric(pd.Series(raw), errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(labels))
        if len(bad):
            shown = list(dict.fromkeys(raw[i] for i in bad))[:5]
            raise DataError(f"{path}:{bad[0] + first_line}: non-numeric {spec.name} score(s) in column "
                            f"{spec.label_column!r}: {shown} ({len(bad)} row(s) in total). Scores must be numbers; "
                            "fix those rows.")
        label_feature = datasets.Value("float32")
    else:
        to_id = {name: i for i, name in enumerate(spec.labels)}
        bad = [i for i, v in enumerate(raw) if v not in to_id]
        if bad:
            shown = list(dict.fromkeys(raw[i] for i in bad))[:5]
            raise DataError(f"{path}:{bad[0] + first_line}: label(s) {shown} in column {spec.label_column!r} are not "
                            f"in the {spec.name} label set {list(spec.labels)} ({len(bad)} row(s) in total). Fix "
                            "those rows or check that this is the right task's file.")
        labels = [to_id[v] for v in raw]
        label_feature = datasets.ClassLabel(names=list(spec.labels))
    columns = {f"sentence{i + 1}": table[c] for i, c in enumerate(spec.text_columns)}
    features = {name: datasets.Value("string") for name in columns}
    return datasets.Dataset.from_dict({**columns, "label": labels},
                                      features=datasets.Features({**features, "label": label_feature}))


# ---------------------------------------------------------------------------------------------------- your own data
_FORMATS = {".csv": ("csv", ","), ".tsv": ("csv", "\t"), ".json": ("json", None), ".jsonl": ("json", None)}


def load_data_files(train_file: str, validation_file: str) -> datasets.DatasetDict:
    """Your own train/validation files (CSV, TSV, JSON or JSON lines, by extension) as a ``DatasetDict``.

    CSV fields keep their text as written (``"NA"`` is a string); only an empty field counts as missing.
    """
    kinds = set()
    for flag, name in (("--train_file", train_file), ("--validation_file", validation_file)):
        path = Path(name)
        if not path.is_file():
            raise DataError(f"{flag} {name}: no such file.")
        if path.suffix.lower() not in _FORMATS:
            raise DataError(f"{flag} {name}: unknown file type {path.suffix!r}; use .csv, .tsv, .json or .jsonl.")
        kinds.add(_FORMATS[path.suffix.lower()])
    if len(kinds) > 1:
        raise DataError(f"--train_file {train_file} and --validation_file {validation_file} are of different types; "
                        "use the same format (CSV, TSV or JSON) for both.")
    builder, delimiter = kinds.pop()
    options = {"delimiter": delimiter, "keep_default_na": False, "na_values": [""]} if builder == "csv" else {}
    try:
        return datasets.load_dataset(builder, data_files={"train": train_file, "validation": validation_file},
                                     **options)
    except Exception as err:  # datasets/pandas/pyarrow raise many types; the message names the file
        raise DataError(f"cannot read --train_file {train_file} / --validation_file {validation_file} as {builder}: "
                        f"{err.__cause__ or err}") from None


def load_hub_dataset(name: str, config_name: Optional[str], validation_split: str) -> datasets.DatasetDict:
    """A dataset from the Hugging Face Hub (or a local dataset folder) with a train and a validation split."""
    try:
        raw = datasets.load_dataset(name, config_name)
    except Exception as err:  # offline, unknown name, missing config: datasets' own message says which
        offline = " Downloads are off (HF_HUB_OFFLINE=1): set HF_HUB_OFFLINE=0 to allow them, or pass " \
                  "--train_file/--validation_file." if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise DataError(f"cannot load --dataset_name {name}"
                        f"{f' --dataset_config_name {config_name}' if config_name else ''}: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}.{offline}") from None
    for split in ("train", validation_split):
        if split not in raw:
            raise DataError(f"--dataset_name {name} has no {split!r} split; its splits are {list(raw)} (pick the "
                            "evaluation split with --validation_split_name).")
    return datasets.DatasetDict(train=raw["train"], validation=raw[validation_split])


def standardize(raw: datasets.DatasetDict, name: str, text_columns: Optional[Sequence[str]] = None,
                label_column: str = "label") -> tuple[datasets.DatasetDict, TaskSpec]:
    """Rename the text column(s) to ``sentence1`` [, ``sentence2``], turn labels into ids, and describe the task.

    Text columns: ``text_columns`` if given, else ``sentence1``/``sentence2`` if present, else the one or two string
    columns besides the label. Labels: a ``ClassLabel`` keeps its names; string, integer or boolean labels become
    classes in sorted order (validation labels must occur in training); float labels make a regression task.
    Metrics: accuracy for classification; Pearson, Spearman and MSE for regression (main: Pearson).
    """
    train = raw["train"]
    columns = train.column_names
    if label_column not in columns:
        raise DataError(f"{name}: no label column {label_column!r}; the columns are {columns}. Name the label column "
                        "'label' or pass --label_column_name.")
    if text_columns:
        unknown = [c for c in text_columns if c not in columns]
        if unknown or len(text_columns) > 2:
            raise DataError(f"{name}: --text_column_names {list(text_columns)} must name one or two of the columns "
                            f"{columns}.")
        text = list(text_columns)
    elif "sentence1" in columns:
        text = ["sentence1", "sentence2"] if "sentence2" in columns else ["sentence1"]
    else:
        text = [c for c in columns
                if c != label_column and getattr(train.features[c], "dtype", None) in ("string", "large_string")]
        if len(text) not in (1, 2):
            raise DataError(f"{name}: cannot tell which of the text columns {text or columns} hold the input; pass "
                            "--text_column_names with one or two of them.")
    for split, table in raw.items():
        for column in [*text, label_column]:
            if column not in table.column_names:
                raise DataError(f"{name}: the {split} data has no {column!r} column; its columns are "
                                f"{table.column_names}.")
            missing = [i for i, v in enumerate(table[column]) if v is None or v == "" or v != v]  # v != v: NaN
            if missing:
                raise DataError(f"{name}: {len(missing)} {split} row(s) have no {column!r} (first: row "
                                f"{missing[0] + 1}); fill or remove them.")
    feature = train.features[label_column]
    label_names: Optional[list[str]] = None
    if isinstance(feature, datasets.ClassLabel):
        label_names, to_id = list(feature.names), None
    elif getattr(feature, "dtype", "") in ("float16", "float32", "float64"):
        to_id = None
    else:
        values = sorted(set(train[label_column]))
        label_names, to_id = [str(v) for v in values], {v: i for i, v in enumerate(values)}
        for split, table in raw.items():
            unseen = sorted(set(table[label_column]) - set(to_id), key=str)
            if unseen:
                raise DataError(f"{name}: the {split} labels {unseen[:5]} never occur in the training data (labels "
                                f"there: {label_names[:10]}); every class needs training examples.")

    def convert(batch: dict[str, list]) -> dict[str, list]:
        out = {f"sentence{i + 1}": batch[c] for i, c in enumerate(text)}
        labels = batch[label_column]
        out["label"] = [to_id[v] for v in labels] if to_id is not None else labels
        return out

    label_feature = datasets.Value("float32") if label_names is None else datasets.ClassLabel(names=label_names)
    features = datasets.Features({**{f"sentence{i + 1}": datasets.Value("string") for i in range(len(text))},
                                  "label": label_feature})
    data = datasets.DatasetDict({split: table.map(convert, batched=True, remove_columns=table.column_names,
                                                  features=features, desc=f"Preparing {split}")
                                 for split, table in raw.items()})
    metrics = ("pearson", "spearmanr", "mse") if label_names is None else _ACC
    spec = TaskSpec(name, tuple(text), label_column, None if label_names is None else tuple(label_names), metrics,
                    metrics[0])
    return data, spec


# ---------------------------------------------------------------------------------------------------- metrics
def _class_ids(values: Any, what: str) -> np.ndarray:
    """Class ids from ids or logits of shape (n, k) (argmax over the last axis)."""
    arr = np.asarray(values)
    if arr.ndim == 2:
        arr = arr.argmax(axis=-1) if arr.shape[1] > 1 else arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{what} must be class ids of shape (n,) or logits of shape (n, k); got shape {arr.shape}.")
    if arr.dtype.kind == "f" and not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
        raise ValueError(f"{what} must be integer class ids (or 2-D logits); got non-integer floats.")
    if arr.dtype.kind not in "iubf":
        raise ValueError(f"{what} must be numeric class ids; got dtype {arr.dtype}.")
    return arr.astype(np.int64)


def _scores(values: Any, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{what} must be scores of shape (n,) or (n, 1); got shape {arr.shape}.")
    return arr


def top_class_share(predictions: Any) -> float:
    """Share of the examples given the most frequent predicted class (class ids or logits); 1.0 means the model
    answered one class for every example, a constant model, whatever that class's share of the labels."""
    ids = _class_ids(predictions, "predictions")
    if len(ids) == 0:
        raise ValueError("cannot compute the top class share of empty predictions.")
    return float(np.bincount(ids - ids.min()).max() / len(ids))


def _correlation(fn, x: np.ndarray, y: np.ndarray) -> float:
    """SciPy's correlation, NaN (not an error) for fewer than two points or a constant input."""
    if len(x) < 2:
        return float("nan")
    from scipy.stats import ConstantInputWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        return float(fn(x, y).statistic)


def compute_metrics(task: str | TaskSpec, predictions: Any, references: Any) -> dict[str, float]:
    """The metrics of ``task`` (:attr:`TaskSpec.metrics`), computed by scikit-learn and SciPy.

    ``predictions``: class ids ``(n,)`` or logits ``(n, k)`` for classification, scores ``(n,)`` or ``(n, 1)`` for
    regression. ``f1`` is the F1 of class 1 (0 without positives); ``combined_score`` the mean of the other metrics
    (GLUE's convention); Pearson and Spearman are NaN for a constant input, Matthews correlation is 0 then.
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, mean_squared_error

    spec = task if isinstance(task, TaskSpec) else get_task_spec(task)
    convert = _scores if spec.is_regression else _class_ids
    pred, ref = convert(predictions, "predictions"), convert(references, "references")
    if len(pred) != len(ref):
        raise ValueError(f"predictions and references differ in length: {len(pred)} vs {len(ref)}.")
    if len(pred) == 0:
        raise ValueError("cannot compute metrics on empty predictions/references.")
    functions = {
        "accuracy": lambda: accuracy_score(ref, pred),
        "f1": lambda: f1_score(ref, pred, zero_division=0.0),
        "matthews_correlation": lambda: matthews_corrcoef(ref, pred),
        "pearson": lambda: _correlation(pearsonr, pred, ref),
        "spearmanr": lambda: _correlation(spearmanr, pred, ref),
        "mse": lambda: mean_squared_error(ref, pred),
    }
    out = {name: float(functions[name]()) for name in spec.metrics if name != "combined_score"}
    if "combined_score" in spec.metrics:
        out["combined_score"] = float(np.mean(list(out.values())))
    return out
