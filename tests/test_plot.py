"""apt_hf.plot (issue 16, item 7): the pictures come out of a finished run's folder, from the Python API and from
``python -m apt_hf.plot``, and the kept-structure data they draw match the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import peft
import pytest
from conftest import TokenTask, make_model
from transformers import TrainingArguments

import apt_hf

pytest.importorskip("matplotlib")
from apt_hf import plot  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCHEDULE = dict(pruning_start=2, pruning_end=10, sparsity_warmup=0, num_pruning_events=2, mask_decay_window=2)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny APTTrainer run with evaluation and a final checkpoint, and its export."""
    out = tmp_path_factory.mktemp("run")
    model = make_model("bert", num_labels=2, num_attention_heads=8, intermediate_size=96)
    pm = peft.get_peft_model(model, apt_hf.APTConfig(task_type="SEQ_CLS", **SCHEDULE))
    args = TrainingArguments(str(out), per_device_train_batch_size=8, max_steps=12, learning_rate=1e-3,
                             logging_steps=2, eval_strategy="steps", eval_steps=4, save_strategy="steps",
                             save_steps=12, report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    trainer = apt_hf.APTTrainer(model=pm, args=args, train_dataset=TokenTask(64), eval_dataset=TokenTask(16, seed=1))
    trainer.train()
    apt_hf.export_pruned(pm, out / "pruned_model")
    return out, pm, trainer


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 5000


def test_cli_writes_the_pictures_of_a_finished_run(finished_run, tmp_path):
    out, _, _ = finished_run
    proc = subprocess.run([sys.executable, "-m", "apt_hf.plot", str(out), "--out", str(tmp_path)],
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("apt_schedule.png", "apt_structure.png"):
        assert is_png(tmp_path / name), (name, proc.stdout)


def test_tradeoff_across_runs_and_into_run_folders(finished_run, tmp_path):
    out, _, _ = finished_run
    other = tmp_path / "other"  # a second run: the same history with another final density and metric
    other.mkdir()
    original = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())["log_history"]
    history = [{**h, "apt/density": 0.7} if "apt/density" in h else h for h in original]
    (other / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    written = plot.main([str(out / "checkpoint-12"), str(other), "--out", str(tmp_path / "pics"), "--metric", "loss"])
    assert {p.name for p in written} == {"checkpoint-12_apt_schedule.png", "checkpoint-12_apt_structure.png",
                                         "other_apt_schedule.png", "apt_tradeoff.png"}
    assert all(is_png(p) for p in written)
    points = plot.load_runs([out / "checkpoint-12", other], metric="loss")
    assert [p["density"] for p in points] == [[h["apt/density"] for h in original if "apt/density" in h][-1], 0.7]
    assert points[0]["value"] == [h["eval_loss"] for h in original if "eval_loss" in h][-1]


def test_benchmark_results_file_gives_one_point_per_method(tmp_path):
    results = REPO / "benchmarks" / "results" / "glue_sst2.json"
    points = plot.load_runs([results])
    runs = json.loads(results.read_text())["runs"]
    assert [p["name"] for p in points] == list(runs)
    assert [p["value"] for p in points] == [r["metric_value"] for r in runs.values()]
    assert {p["name"]: p["speedup"] for p in points}["ft"] == 1.0  # the dense reference
    assert is_png(plot.main([str(results), "--out", str(tmp_path), "--x", "speedup"])[0])


def test_structure_records_match_the_model(finished_run):
    out, pm, _ = finished_run
    masks = apt_hf.get_masks(pm)
    from_model = plot.load_structure(pm)
    assert from_model.heads_kept == [int((m > 0).sum()) for m in masks.heads]
    assert from_model.neurons_kept == [int((m > 0).sum()) for m in masks.neurons]
    for row, kept, mask in zip(from_model.heads, (masks.kept("heads", i) for i in range(len(masks.heads))),
                               masks.heads):
        assert len(row) == 8 and set(np.flatnonzero(row)) == set(kept[mask > 0].tolist())
    saved = plot.load_structure(out)  # the run folder: its newest checkpoint's adapter
    assert saved.heads_kept == from_model.heads_kept and all(np.array_equal(a, b) for a, b in
                                                             zip(saved.neurons, from_model.neurons))
    export = plot.load_structure(out / "pruned_model")  # counts only
    assert export.heads is None and export.heads_kept == from_model.heads_kept
    assert export.neurons_kept == from_model.neurons_kept
    assert sum(from_model.heads_kept) < 3 * 8  # something was pruned


def test_schedule_needs_an_apt_run():
    with pytest.raises(ValueError, match="not from an APT run"):
        plot.plot_schedule([{"step": 1, "loss": 0.5}])


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"apt_hf\[plot\]"):
        plot.plot_schedule([{"step": 1, "apt/density": 1.0, "apt/target_density": 1.0, "apt/mean_rank": 8}])
