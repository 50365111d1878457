"""Tests of examples/utils_glue.py: task table, GLUE TSV loading through ``datasets``, error messages, metrics."""

from __future__ import annotations

import math
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from utils_glue import (  # noqa: E402
    GLUE_TASKS,
    DataError,
    TaskSpec,
    compute_metrics,
    get_task_spec,
    load_glue_split,
    normalize_task_name,
    top_class_share,
)

GLUE_DIR = Path(
    os.environ.get("APT_GLUE_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
)

# (task, split) -> data rows, from shared/data/README.md
EXPECTED_ROWS = {
    ("sst2", "train"): 67_349,
    ("sst2", "dev"): 872,
    ("mrpc", "train"): 3_668,
    ("mrpc", "dev"): 408,
    ("rte", "train"): 2_490,
    ("rte", "dev"): 277,
    ("cola", "train"): 8_551,
    ("cola", "dev"): 1_043,
    ("stsb", "train"): 5_749,
    ("stsb", "dev"): 1_500,
    ("qnli", "dev"): 5_463,
}


def _present(task: str, split: str) -> bool:
    spec = GLUE_TASKS[task]
    return (GLUE_DIR / spec.folder / spec.file_for(split)).is_file()


def _need(task: str, split: str) -> None:
    if not _present(task, split):
        pytest.skip(f"{task}/{split} not present under {GLUE_DIR}")


# --------------------------------------------------------------------------- #
# Task table and names
# --------------------------------------------------------------------------- #


def test_task_table_covers_glue() -> None:
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}
    folders = {spec.folder for spec in GLUE_TASKS.values()}
    assert folders == {"CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE", "WNLI"}
    for name, spec in GLUE_TASKS.items():
        assert isinstance(spec, TaskSpec) and spec.name == name
        assert len(spec.text_columns) in (1, 2)
        assert spec.main_metric in spec.metrics
        assert "train" in spec.splits and "dev" in spec.splits
    with pytest.raises(Exception):
        GLUE_TASKS["sst2"].name = "x"  # type: ignore[misc]  # frozen
    assert GLUE_TASKS["stsb"].is_regression and GLUE_TASKS["stsb"].num_labels == 1
    assert GLUE_TASKS["mnli"].num_labels == 3
    assert GLUE_TASKS["mnli"].labels == ("contradiction", "entailment", "neutral")
    assert GLUE_TASKS["mnli"].file_for("dev") == "dev_matched.tsv"
    assert GLUE_TASKS["mnli"].file_for("validation_mismatched") == "dev_mismatched.tsv"
    assert GLUE_TASKS["mnli"].label_column == "gold_label"
    assert GLUE_TASKS["qqp"].text_columns == ("question1", "question2")
    assert GLUE_TASKS["qqp"].label_column == "is_duplicate"
    assert GLUE_TASKS["wnli"].text_columns == ("sentence1", "sentence2")
    assert all(not spec.columns for name, spec in GLUE_TASKS.items() if name != "cola")  # CoLA alone has no header
    assert GLUE_TASKS["cola"].columns == ("source", "label", "original_mark", "sentence")


@pytest.mark.parametrize(
    "raw, expected",
    [("SST-2", "sst2"), ("sst2", "sst2"), ("sts-b", "stsb"), ("STS-B", "stsb"), ("CoLA", "cola"),
     ("MNLI", "mnli"), (" qqp ", "qqp"), ("glue/rte", "rte"), ("sst_2", "sst2")],
)
def test_normalize_task_name(raw: str, expected: str) -> None:
    assert normalize_task_name(raw) == expected
    assert get_task_spec(raw) is GLUE_TASKS[expected]


def test_main_metric_name() -> None:
    expected = {"sst2": "accuracy", "qnli": "accuracy", "rte": "accuracy", "wnli": "accuracy",
                "mnli": "accuracy", "mrpc": "f1", "qqp": "f1", "cola": "matthews_correlation",
                "stsb": "pearson"}
    for task, metric in expected.items():
        assert get_task_spec(task).main_metric == metric
    assert get_task_spec("STS-B").main_metric == "pearson"


# --------------------------------------------------------------------------- #
# Loading the real local data
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("task, split", sorted(EXPECTED_ROWS))
def test_row_counts(task: str, split: str) -> None:
    _need(task, split)
    ds = load_glue_split(GLUE_DIR, task, split)
    assert ds.num_rows == EXPECTED_ROWS[(task, split)]
    spec = GLUE_TASKS[task]
    expected_cols = ["sentence1", "sentence2", "label"] if spec.is_pair else ["sentence1", "label"]
    assert ds.column_names == expected_cols
    assert all(isinstance(s, str) and s for s in ds["sentence1"][:50])


def test_label_counts_sst2_rte_cola_qnli() -> None:
    for task, split, expected in [
        ("sst2", "dev", {0: 428, 1: 444}),
        ("sst2", "train", {0: 29_780, 1: 37_569}),
        ("rte", "train", {0: 1_249, 1: 1_241}),  # entailment=0
        ("rte", "dev", {0: 146, 1: 131}),
        ("cola", "dev", {0: 322, 1: 721}),
        ("mrpc", "train", {0: 1_194, 1: 2_474}),
        ("qnli", "dev", {0: 2_702, 1: 2_761}),
    ]:
        if not _present(task, split):
            continue
        ds = load_glue_split(GLUE_DIR, task, split)
        assert dict(Counter(ds["label"])) == expected, (task, split)
        assert ds.features["label"].names == list(GLUE_TASKS[task].labels)


def test_stsb_scores_and_aliases() -> None:
    _need("stsb", "dev")
    ds = load_glue_split(GLUE_DIR, "STS-B", "validation")
    scores = np.asarray(ds["label"], dtype=np.float64)
    assert scores.min() >= 0.0 and scores.max() <= 5.0
    assert scores.mean() == pytest.approx(2.364, abs=1e-3)
    assert ds[0]["sentence1"] == "A man with a hard hat is dancing."


def test_quotes_and_bom_kept_verbatim() -> None:
    _need("mrpc", "dev")
    ds = load_glue_split(GLUE_DIR, "mrpc", "dev")
    # the second sentence starts with a lone quote: it must not be swallowed
    assert ds[0]["sentence2"].startswith('" The foodservice pie business')
    assert ds[0]["label"] == 1
    if _present("sst2", "dev"):
        assert load_glue_split(GLUE_DIR, "sst2", "dev")[0]["sentence1"].endswith(". ")


# --------------------------------------------------------------------------- #
# Loading small synthetic files (including MNLI/QQP/WNLI layouts)
# --------------------------------------------------------------------------- #


def _write(root: Path, folder: str, name: str, text: str, encoding: str = "utf-8") -> Path:
    path = root / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def test_synthetic_mnli_qqp_wnli_cola(tmp_path: Path) -> None:
    _write(tmp_path, "MNLI", "dev_matched.tsv",
           "index\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n"
           "0\tfic\tA b.\tC d.\tneutral\tneutral\n"
           "1\tfic\tE \"f.\tG h.\tentailment\tcontradiction\n")
    ds = load_glue_split(tmp_path, "MNLI", "dev")
    assert ds["label"] == [2, 0]
    assert ds["sentence1"] == ["A b.", 'E "f.']

    _write(tmp_path, "QQP", "train.tsv",
           "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\r\n1\t1\t2\tWhy?\tHow?\t1\r\n2\t3\t4\tA?\tB?\t0\r\n")
    ds = load_glue_split(tmp_path, "qqp", "train")
    assert ds["label"] == [1, 0] and ds["sentence2"] == ["How?", "B?"]

    _write(tmp_path, "WNLI", "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\tX.\tY.\t1\n")
    assert load_glue_split(tmp_path, "wnli", "dev")["label"] == [1]

    # CoLA: no header, no final newline, BOM tolerated
    _write(tmp_path, "CoLA", "dev.tsv", "gj04\t1\t\tGood.\ngj04\t0\t*\tBad good.", encoding="utf-8-sig")
    ds = load_glue_split(tmp_path, "cola", "dev")
    assert ds["sentence1"] == ["Good.", "Bad good."] and ds["label"] == [1, 0]


# --------------------------------------------------------------------------- #
# Error cases
# --------------------------------------------------------------------------- #


def _error(*args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_glue_split(*args, **kwargs)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_error_unknown_task(tmp_path: Path) -> None:
    msg = _error(tmp_path, "sst3", "train")
    assert "Unknown GLUE task 'sst3'" in msg
    for name in GLUE_TASKS:
        assert name in msg
    with pytest.raises(DataError, match="Unknown GLUE task"):
        compute_metrics("imdb", [0], [0])
    with pytest.raises(DataError, match="Unknown GLUE task"):
        get_task_spec("squad")


def test_error_unknown_split(tmp_path: Path) -> None:
    msg = _error(tmp_path, "sst2", "test")
    assert "Unknown split 'test'" in msg and "train" in msg and "dev" in msg


def test_error_missing_glue_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    msg = _error(missing, "sst2", "train")
    assert "GLUE directory not found" in msg and str(missing) in msg


def test_error_missing_task_folder(tmp_path: Path) -> None:
    (tmp_path / "RTE").mkdir()
    msg = _error(tmp_path, "sst2", "train")
    assert "task folder not found" in msg
    assert str(tmp_path / "SST-2") in msg and "RTE" in msg


def test_error_missing_file(tmp_path: Path) -> None:
    _write(tmp_path, "MNLI", "dev_mismatched.tsv", "x\n")
    msg = _error(tmp_path, "mnli", "dev")
    assert "GLUE file not found" in msg
    assert str(tmp_path / "MNLI" / "dev_matched.tsv") in msg
    assert "dev_mismatched.tsv" in msg  # lists what is there


def test_error_missing_columns(tmp_path: Path) -> None:
    _write(tmp_path, "RTE", "train.tsv", "index\tpremise\thypothesis\tlabel\n0\ta\tb\tentailment\n")
    msg = _error(tmp_path, "rte", "train")
    assert "missing required column" in msg
    assert "'sentence1'" in msg and "'sentence2'" in msg
    assert "['index', 'premise', 'hypothesis', 'label']" in msg  # the header found


def test_error_comma_separated_file(tmp_path: Path) -> None:
    _write(tmp_path, "SST-2", "train.tsv", "sentence,label\ngood,1\n")
    msg = _error(tmp_path, "sst2", "train")
    assert "missing required column" in msg and "sentence,label" in msg


def test_error_wrong_field_count(tmp_path: Path) -> None:
    path = _write(tmp_path, "SST-2", "dev.tsv", "sentence\tlabel\ngood\t1\nbad\t0\textra\nok\t1\n")
    msg = _error(tmp_path, "sst2", "dev")
    assert f"{path}:3" in msg
    assert "expected 2" in msg and "found 3" in msg
    ds = load_glue_split(tmp_path, "sst2", "dev", skip_bad_rows=True)
    assert ds["label"] == [1, 1]


def test_error_wrong_field_count_headerless_cola(tmp_path: Path) -> None:
    # a short line leaves its last column (the sentence) empty: reported with its line and the expected fields
    path = _write(tmp_path, "CoLA", "train.tsv", "gj04\t1\t\tFine.\ngj04\t1\tFine too.\n")
    msg = _error(tmp_path, "cola", "train")
    assert f"{path}:2" in msg and "empty 'sentence'" in msg and "expected 4" in msg


def test_error_bad_labels(tmp_path: Path) -> None:
    rows = ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment"]
    bad = ["neutral", "contradiction", "yes", "no", "maybe", "perhaps", "neutral"]
    rows += [f"{i + 1}\ta\tb\t{lab}" for i, lab in enumerate(bad)]
    path = _write(tmp_path, "RTE", "dev.tsv", "\n".join(rows) + "\n")
    msg = _error(tmp_path, "rte", "dev")
    assert f"{path}:3" in msg  # first offending line (line 1 is the header)
    assert "not in the rte label set" in msg
    assert "['neutral', 'contradiction', 'yes', 'no', 'maybe']" in msg  # at most 5, deduplicated
    assert "perhaps" not in msg
    assert "7 row(s)" in msg


def test_error_numeric_label_out_of_range(tmp_path: Path) -> None:
    _write(tmp_path, "SST-2", "train.tsv", "sentence\tlabel\na\t1\nb\t2\n")
    msg = _error(tmp_path, "sst2", "train")
    assert "['2']" in msg and "label set" in msg


def test_error_non_numeric_stsb(tmp_path: Path) -> None:
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    path = _write(tmp_path, "STS-B", "train.tsv",
                  header + "0\tg\tf\ty\t0\tn\tn\tA.\tB.\t4.2\n"
                           "1\tg\tf\ty\t1\tn\tn\tC.\tD.\thigh\n"
                           "2\tg\tf\ty\t2\tn\tn\tE.\tF.\tnan\n")
    msg = _error(tmp_path, "stsb", "train")
    assert f"{path}:3" in msg and "non-numeric" in msg and "'high'" in msg


def test_error_empty_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "SST-2", "train.tsv", "")
    msg = _error(tmp_path, "sst2", "train")
    assert "empty" in msg and str(path) in msg
    _write(tmp_path, "SST-2", "dev.tsv", "sentence\tlabel\n")
    assert "no data rows" in _error(tmp_path, "sst2", "dev")
    _write(tmp_path, "CoLA", "dev.tsv", "\n\n")
    assert "no data rows" in _error(tmp_path, "cola", "dev")


# --------------------------------------------------------------------------- #
# Metrics
# --------------------------------------------------------------------------- #


def test_accuracy_and_logits() -> None:
    assert compute_metrics("sst2", [1, 0, 1, 1], [1, 0, 0, 1]) == {"accuracy": 0.75}
    logits = np.array([[2.0, -1.0], [0.1, 0.3], [0.0, 5.0], [3.0, 1.0]])  # argmax 0,1,1,0
    assert compute_metrics("rte", logits, [0, 1, 0, 0])["accuracy"] == 0.75
    mnli_logits = np.eye(3)[[0, 1, 2, 2]]
    assert compute_metrics("MNLI", mnli_logits, np.array([0, 1, 2, 1]))["accuracy"] == 0.75


def test_f1_mrpc_hand_computed() -> None:
    pred = [1, 1, 1, 0, 0, 1]
    ref = [1, 0, 1, 1, 0, 1]
    # tp=3, fp=1, fn=1 -> precision=recall=0.75, F1=0.75; accuracy 4/6
    out = compute_metrics("mrpc", pred, ref)
    assert out["f1"] == pytest.approx(0.75)
    assert out["accuracy"] == pytest.approx(4 / 6)
    assert out["combined_score"] == pytest.approx((0.75 + 4 / 6) / 2)
    assert set(out) == {"accuracy", "f1", "combined_score"}
    # no positives anywhere: F1 defined as 0
    assert compute_metrics("qqp", [0, 0], [0, 0])["f1"] == 0.0


def test_matthews_hand_computed() -> None:
    pred = [1, 1, 0, 0, 1, 0, 1, 1]
    ref = [1, 0, 0, 1, 1, 0, 1, 0]
    # tp=3 tn=2 fp=2 fn=1 -> (6 - 2) / sqrt(5*4*4*3)
    expected = (3 * 2 - 2 * 1) / math.sqrt(5 * 4 * 4 * 3)
    out = compute_metrics("cola", pred, ref)
    assert out == {"matthews_correlation": pytest.approx(expected)}
    assert compute_metrics("cola", ref, ref)["matthews_correlation"] == pytest.approx(1.0)
    assert compute_metrics("cola", [1] * 8, ref)["matthews_correlation"] == 0.0


def test_pearson_spearman_hand_computed() -> None:
    pred = [1.0, 2.0, 3.0, 4.0, 5.0]
    ref = [2.0, 4.0, 6.0, 8.0, 10.0]
    out = compute_metrics("stsb", pred, ref)
    assert out["pearson"] == pytest.approx(1.0) and out["spearmanr"] == pytest.approx(1.0)
    assert out["combined_score"] == pytest.approx(1.0)
    # monotone but non-linear: Spearman 1, Pearson < 1
    out = compute_metrics("stsb", [1.0, 2.0, 3.0, 100.0], [1.0, 2.0, 3.0, 4.0])
    assert out["spearmanr"] == pytest.approx(1.0) and out["pearson"] < 0.9
    # ties: x ranks [1.5, 1.5, 3, 4], y ranks [1, 2, 3, 4] -> rho = 4.5 / sqrt(4.5 * 5)
    out = compute_metrics("stsb", np.array([[1.0], [1.0], [2.0], [3.0]]), [1.0, 2.0, 3.0, 4.0])
    assert out["spearmanr"] == pytest.approx(4.5 / math.sqrt(4.5 * 5.0))
    # hand Pearson: x=[1,2,3], y=[1,3,2] -> 0.5
    assert compute_metrics("stsb", [1.0, 2.0, 3.0], [1.0, 3.0, 2.0])["pearson"] == pytest.approx(0.5)
    assert math.isnan(compute_metrics("stsb", [2.0, 2.0, 2.0], [1.0, 2.0, 3.0])["pearson"])


def test_metric_input_validation() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        compute_metrics("sst2", [0, 1], [0])
    with pytest.raises(ValueError, match="empty"):
        compute_metrics("sst2", [], [])
    with pytest.raises(ValueError, match="shape"):
        compute_metrics("stsb", np.zeros((3, 2)), np.zeros(3))
    with pytest.raises(ValueError, match="integer"):
        compute_metrics("sst2", [0.5, 1.0], [0, 1])
    out = compute_metrics("sst2", np.array([1.0, 0.0]), np.array([1, 0]))
    assert out == {"accuracy": 1.0} and all(type(v) is float for v in out.values())


def test_top_class_share_is_one_only_for_a_constant_model() -> None:
    assert top_class_share([1, 1, 1, 1]) == 1.0 and top_class_share([0, 0, 0]) == 1.0
    assert top_class_share([0, 1, 1, 1]) == 0.75
    logits = np.array([[0.1, 2.0, -1.0], [0.0, 3.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert top_class_share(logits) == 0.5  # argmax 1, 1, 0, 2
    with pytest.raises(ValueError, match="empty"):
        top_class_share(np.zeros((0, 2)))
