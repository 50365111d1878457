"""The GLUE benchmark's scoring rules (benchmarks/glue_benchmark.py): what counts as a method's best score."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("glue_benchmark", ROOT / "benchmarks" / "glue_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(metrics: dict[int, float], events=(), best=None, final=None) -> dict:
    history = [{"step": s, "metric": m, "train_time_s": float(s)} for s, m in metrics.items()]
    return {"eval_history": history, "log_history": [{"step": e, "apt/event": k + 1} for k, e in enumerate(events)],
            "best_metric": best if best is not None else max(metrics.values()),
            "metric_value": final if final is not None else history[-1]["metric"], "metric": "accuracy",
            "train_time_s": 1.0, "peak_rss_mb": 1.0, "kept_params": 1, "density": 1.0}


def test_pruning_runs_are_scored_after_their_last_event(bench):
    runs = {"ft": _run({50: 0.80, 100: 0.90}),
            "apt": _run({50: 0.85, 206: 0.95, 250: 0.80, 300: 0.88}, events=(60, 226)),
            "lora_prune": _run({50: 0.92, 100: 0.95, 101: 0.86}),
            "lora": _run({50: 0.89, 100: 0.86}),
            "apt_wo_AP": _run({50: 0.89, 100: 0.86}, events=(60,))}  # events grow ranks only: density stays 1
    runs["apt"]["density"] = runs["lora_prune"]["density"] = 0.4
    rows = {r["method"]: r for r in bench.table_rows(runs)}
    assert rows["apt"]["best_metric"] == 0.88  # 0.95 at step 206 is before the last event (226)
    assert rows["apt"]["time_to_97pct_ft_s"] == 300.0  # 0.97 * 0.90 = 0.873 first reached at the final density
    assert rows["lora_prune"]["best_metric"] == 0.86 and rows["lora_prune"]["time_to_97pct_ft_s"] is None
    assert rows["lora"]["best_metric"] == 0.89 and rows["lora"]["time_to_97pct_ft_s"] == 50.0
    assert rows["apt_wo_AP"]["best_metric"] == 0.89 and rows["apt_wo_AP"]["time_to_97pct_ft_s"] == 50.0
    assert rows["ft"]["best_vs_ft"] == 1.0


def test_rescore_rewrites_the_table_and_keeps_the_command(bench, tmp_path, monkeypatch):
    runs = {"ft": _run({50: 0.9}), "apt": {**_run({50: 0.95, 300: 0.85}, events=(100,)), "density": 0.4}}
    stale = [{"method": "apt", "best_metric": 0.95}]
    path = tmp_path / "glue_x.json"
    path.write_text(json.dumps({"meta": {"command": "python original", "metric": "accuracy"}, "table": stale,
                                "runs": runs}))
    monkeypatch.setattr("sys.argv", ["glue_benchmark.py", "--rescore", str(path)])
    bench.main()
    data = json.loads(path.read_text())
    assert data["meta"]["command"] == "python original"
    assert "--rescore" in data["meta"]["rescored_by"]
    assert {r["method"]: r["best_metric"] for r in data["table"]} == {"ft": 0.9, "apt": 0.85}
    assert (tmp_path / "glue_x.csv").read_text().startswith("method,best_metric")
    assert (tmp_path / "glue_x_curves.png").exists()


def test_f1_tasks_also_report_final_accuracy(bench):
    runs = {name: {**_run({100: f1}), "metric": "f1"} for name, f1 in (("ft", 0.86), ("apt", 0.81))}
    runs["ft"]["eval_history"][-1]["metrics"] = {"eval_f1": 0.86, "eval_accuracy": 0.80}
    runs["apt"]["eval_history"][-1]["metrics"] = {"eval_f1": 0.81, "eval_accuracy": 0.68}  # the majority class
    assert [r["final_accuracy"] for r in bench.table_rows(runs)] == [0.80, 0.68]
    assert all("final_accuracy" not in r for r in bench.table_rows({"ft": _run({100: 0.9})}))


def test_seed_table(tmp_path):
    spec = importlib.util.spec_from_file_location("make_table", ROOT / "benchmarks" / "make_table.py")
    make_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_table)
    paths = []
    for seed, (ft, apt, t97) in {42: (0.90, 0.88, 10.0), 43: (0.80, 0.70, None)}.items():
        table = [{"method": "ft", "best_metric": ft, "time_to_97pct_ft_s": 1.0},
                 {"method": "apt", "best_metric": apt, "time_to_97pct_ft_s": t97}]
        if seed == 42:
            table.append({"method": "lora", "best_metric": 0.5, "time_to_97pct_ft_s": None})  # not in every run
        path = tmp_path / f"glue_x_seed{seed}.json"
        path.write_text(json.dumps({"meta": {"command": f"run {seed}", "args": {"seed": seed}}, "table": table}))
        paths.append(path)
    lines = make_table.seed_table(paths).splitlines()
    assert lines[:2] == ["- `run 42`", "- `run 43`"] and "seeds 42 / 43" in lines[3]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines[5:]}
    assert set(rows) == {"ft", "apt"}
    assert rows["apt"] == "| apt | 0.8800 / 0.7000 | 0.7900 ± 0.1273 | 0.929 | 1 of 2 |"
    assert rows["ft"].endswith("| 0.8500 ± 0.0707 | 1.000 | 2 of 2 |")
