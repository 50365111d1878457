"""The paper-shaped GLUE benchmark driver (benchmarks/glue_suite.py) and its tables (benchmarks/make_table.py):
which runs it plans, that it resumes by skipping finished runs, and how seeds are aggregated."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def suite(tmp_path, monkeypatch):
    module = _load("glue_suite")
    monkeypatch.setattr(module.gb, "RESULTS", tmp_path)
    monkeypatch.setattr(module, "SUITE", tmp_path / "suite")
    monkeypatch.setattr(module, "majority_share", lambda task, glue_dir: 0.5)
    return module


def _fake_run(final: float, best: float, events=(), density: float = 1.0) -> dict:
    history = [{"step": 10, "metric": best, "train_time_s": 10.0}, {"step": 20, "metric": final, "train_time_s": 20.0}]
    return {"eval_history": history, "log_history": [{"step": e, "apt/event": k + 1} for k, e in enumerate(events)],
            "best_metric": max(best, final), "metric_value": final, "metric": "accuracy", "train_time_s": 20.0,
            "peak_rss_mb": 900.0, "kept_params": 1, "density": density, "speedup": 2.4 if density < 1 else None,
            "speedup_b1": 2.0 if density < 1 else None, "process_wall_s": 30.0}


def test_planned_runs(suite):
    runs = suite.planned_runs(["sst2", "mrpc", "rte"])
    assert len(runs) == 2 * (3 * 5 + 3 + 5 + 1) + (3 * 5 + 3)
    for task in ("sst2", "mrpc", "rte"):
        for seed in (42, 43, 44):
            methods = [m for t, s, m in runs if t == task and s == seed]
            assert methods[0] == "ft" and set(methods) >= {"ft", "lora", "apt", "apt_wo_DS", "apt_spec_teacher"}
            assert ({"lora_prune", "apt_wo_AT", "apt_wo_AP"} <= set(methods)) == (seed == 42)
            # the candidate settings run only where settings are chosen
            candidates = {"apt_recovery_lr01", "apt_recovery_lr1", "apt_mu_half", "apt_teacher_eval",
                          "apt_skip_constant"}
            assert (candidates <= set(methods)) == (seed == 42 and task != "rte")
            # the constant-teacher option has a second rule, judged at seed 43
            expected = candidates if seed == 42 else {"apt_skip_constant"} if seed == 43 else set()
            assert candidates & set(methods) == (expected if task != "rte" else set())


def test_estimate_names_every_task():
    suite = _load("glue_suite")  # calibrated on the committed benchmark files
    text = suite.estimate(list(suite.TASKS), 32)
    assert all(f"| {t} |" in text for t in suite.TASKS) and "| all |" in text


def test_estimate_calibrates_on_the_suites_own_runs(suite):
    def write(task, method, seconds_per_step, overhead=100.0):
        run = {"train_time_s": 100 * seconds_per_step, "optimizer_steps": 100,
               "process_wall_s": 100 * seconds_per_step + overhead}
        path = suite.result_path(task, method, 42)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"meta": {}, "run": run}))

    for name in suite.CALIBRATION:  # the fallback: the committed short benchmark files
        (suite.gb.RESULTS / name).write_text((ROOT / "benchmarks" / "results" / name).read_text())
    write("sst2", "ft", 0.5)
    ft, _, _, source = suite.calibration()
    assert "short benchmark" in source  # one task measured: not enough for a line
    write("mrpc", "ft", 2.0)
    write("mrpc", "apt", 1.2)
    ft, factor, overhead, source = suite.calibration()
    assert "suite" in source and ft["sst2"] == 0.5 and ft["mrpc"] == 2.0 and overhead == 100.0
    tokens = {t: plan["batch_tokens"] for t, plan in suite.TASKS.items()}
    slope = 1.5 / (tokens["mrpc"] - tokens["sst2"])
    assert ft["rte"] == pytest.approx(0.5 + slope * (tokens["rte"] - tokens["sst2"]))
    assert factor["apt"] == pytest.approx(0.6) and "lora" in factor  # unmeasured: the short benchmark's ratio
    assert "FT measured on mrpc, sst2" in suite.estimate(["rte"], 32)


def test_resumes_by_skipping_finished_runs(suite, tmp_path, monkeypatch):
    done = suite.result_path("mrpc", "ft", 42)
    done.parent.mkdir(parents=True)
    done.write_text(json.dumps({"meta": {}, "run": _fake_run(0.80, 0.82)}))
    calls = []

    def fake(method, args, out):
        calls.append((method, args.seed, args.epochs, args.run_glue_args))
        apt = method.startswith("apt") and method != "apt_wo_AP"
        return {**_fake_run(0.5 if method == "apt" else 0.79, 0.81, events=(5,) if apt else (),
                            density=0.4 if apt or method == "lora_prune" else 1.0), "eval_metrics": {}}

    monkeypatch.setattr(suite.gb, "run_method", fake)
    monkeypatch.setattr(sys, "argv", ["glue_suite.py", "--tasks", "mrpc", "--seeds", "42", "--out", str(tmp_path)])
    suite.main()
    assert [c[0] for c in calls] == ["lora", "apt", "apt_wo_DS", "apt_spec_teacher", "lora_prune", "apt_wo_AT",
                                     "apt_wo_AP",
                                     "apt_recovery_lr01", "apt_recovery_lr1", "apt_mu_half", "apt_teacher_eval",
                                     "apt_skip_constant"]
    assert all(c[2] == suite.TASKS["mrpc"]["epochs"] for c in calls)
    assert all("--train_sampling_strategy group_by_length" in c[3] for c in calls)
    table = json.loads((tmp_path / "glue_mrpc_suite_seed42.json").read_text())
    rows = {r["method"]: r for r in table["table"]}
    assert rows["ft"]["best_metric"] == 0.82 and rows["apt"]["best_vs_ft"] == pytest.approx(0.81 / 0.82)
    calls.clear()
    suite.main()  # everything is done now: nothing runs again
    assert calls == []


def test_tables_are_rewritten_from_the_files_present(suite, tmp_path, monkeypatch):
    """``--tables`` runs nothing and rebuilds each (task, seed) table from the result files there, e.g. after a run
    was renamed; the table names the command that reruns its plan."""
    for method, best in (("ft", 0.82), ("apt_spec_teacher", 0.70)):
        path = suite.result_path("mrpc", method, 43)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"meta": {}, "run": _fake_run(best, best)}))
    monkeypatch.setattr(suite.gb, "run_method", lambda *a: pytest.fail("--tables must not run anything"))
    monkeypatch.setattr(sys, "argv", ["glue_suite.py", "--tasks", "mrpc", "--seeds", "43", "--tables"])
    suite.main()
    table = json.loads((tmp_path / "glue_mrpc_suite_seed43.json").read_text())
    assert [r["method"] for r in table["table"]] == ["ft", "apt_spec_teacher"]
    assert table["meta"]["command"] == "python benchmarks/glue_suite.py --tasks mrpc --seeds 43"


def test_longer_runs_keep_their_own_results_and_evaluation_count(suite, tmp_path, monkeypatch):
    """``--epochs`` runs a task longer than its plan, with the evaluation interval scaled (about the same number of
    evaluations), into ``suite/<task>_<N>ep`` and its own table; the plan's results are neither read nor skipped."""
    plan = suite.TASKS["cola"]
    done = tmp_path / "suite" / "cola" / "ft_seed42.json"  # a finished run of the planned 3 epochs
    done.parent.mkdir(parents=True)
    done.write_text(json.dumps({"meta": {}, "run": _fake_run(0.30, 0.30)}))
    calls = []

    def fake(method, args, out):
        calls.append((method, args.epochs, args.eval_steps, out))
        return {**_fake_run(0.4, 0.4), "eval_metrics": {}}

    monkeypatch.setattr(suite.gb, "run_method", fake)
    monkeypatch.setattr(sys, "argv", ["glue_suite.py", "--tasks", "cola", "--seeds", "42", "--methods", "ft",
                                      "--epochs", "10", "--out", str(tmp_path / "runs")])
    suite.main()
    scaled = round(plan["eval_steps"] * 10 / plan["epochs"])
    assert calls == [("ft", 10.0, scaled, tmp_path / "runs" / "cola_10ep" / "seed42")]
    assert (tmp_path / "suite" / "cola_10ep" / "ft_seed42.json").exists()
    assert (tmp_path / "glue_cola_10ep_suite_seed42.json").exists()
    assert suite.variant("cola", plan["epochs"]) == "cola"  # the plan's own epochs are the plan's results


def test_tagged_runs_take_the_apt_flags_and_the_plans_reference(suite, tmp_path, monkeypatch):
    """``--tag`` runs only the APT methods, with ``--apt_args``, into ``suite/<task>_<tag>`` and its own table, whose
    FT row is the plan's own FT run; the plan's APT results are neither read nor skipped."""
    monkeypatch.setattr(suite, "SUITE", tmp_path / "suite")
    for method, best in (("ft", 0.30), ("apt", 0.0)):
        done = tmp_path / "suite" / "cola" / f"{method}_seed42.json"
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps({"meta": {}, "run": _fake_run(best, best)}))
    calls = []

    def fake(method, args, out):
        calls.append((method, args.apt_args, out))
        return {**_fake_run(0.2, 0.2, events=(5,), density=0.4), "eval_metrics": {}}

    monkeypatch.setattr(suite.gb, "run_method", fake)
    monkeypatch.setattr(sys, "argv", ["glue_suite.py", "--tasks", "cola", "--seeds", "42", "--methods", "ft,apt",
                                      "--apt_args", "--pruning_start_gate 0.05", "--tag", "gate005",
                                      "--out", str(tmp_path / "runs")])
    suite.main()
    assert calls == [("apt", "--pruning_start_gate 0.05", tmp_path / "runs" / "cola_gate005" / "seed42")]
    assert (tmp_path / "suite" / "cola_gate005" / "apt_seed42.json").exists()
    rows = {r["method"]: r for r in json.loads((tmp_path / "glue_cola_gate005_suite_seed42.json").read_text())["table"]}
    assert rows["ft"]["best_metric"] == 0.30 and rows["apt"]["best_vs_ft"] == pytest.approx(0.2 / 0.3)


@pytest.mark.parametrize("argv, message", [
    (["--tag", "gate005"], "--tag 'gate005' needs --apt_args"),
    (["--tag", "Gate 5", "--apt_args", "--pruning_start_gate 0.05"], "lower-case letters"),
    (["--methods", "apt_mu_half", "--tasks", "cola"], "not planned for tasks ['cola']"),
    (["--methods", "lora_prune", "--seeds", "43"], "run at seed 42"),
])
def test_bad_suite_flags_are_named(suite, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(sys, "argv", ["glue_suite.py", *argv])
    monkeypatch.setattr(suite.gb, "run_method", lambda *a: pytest.fail("nothing may run"))
    with pytest.raises(SystemExit) as exit_info:
        suite.main()
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_suite_table_means_over_seeds_and_flags_constant_models(suite, tmp_path, monkeypatch):
    make_table = _load("make_table")
    monkeypatch.setattr(make_table, "RESULTS", tmp_path)
    runs = {42: {"ft": _fake_run(0.90, 0.90), "apt": _fake_run(0.88, 0.89, events=(5,), density=0.4)},
            43: {"ft": _fake_run(0.80, 0.80), "apt": _fake_run(0.50, 0.50, events=(5,), density=0.4)}}
    for seed, by_method in runs.items():
        meta = {"task": "sst2", "command": "python benchmarks/glue_suite.py", "args": {"seed": seed},
                "metric": "accuracy", "majority_share": 0.5}
        suite.gb.save(tmp_path / f"glue_sst2_suite_seed{seed}", meta, by_method)
    text = make_table.suite_table("sst2")
    apt = next(line for line in text.splitlines() if line.startswith("| apt |"))
    cells = [c.strip() for c in apt.split("|")[1:-1]]
    assert cells[1] == "2" and cells[2] == "0.6950 ± 0.2758"  # best dev over the two seeds
    assert cells[4] == f"{(0.89 / 0.90 + 0.50 / 0.80) / 2:.3f}"  # per-seed ratio to that seed's FT, averaged
    assert cells[5] == "1 of 2" and cells[-1] == "1"  # seed 43 ended at the majority class
    summary = make_table.suite_summary(["sst2"])
    assert "| apt | 0.807 | 0.807 |" in summary
    best = make_table.suite_best(["sst2", "cola"])  # a task without results has no column
    assert best.splitlines()[0] == "| method | sst2 (accuracy) |"
    assert "| ft | 0.8500 (2 seeds) |" in best and "| apt | 0.6950 (2 seeds), 1 constant |" in best


def test_the_runs_own_constant_check_decides_over_the_accuracy_heuristic(suite, tmp_path, monkeypatch):
    """run_glue's ``constant_model`` (one answer for every dev example) is what counts where a run has it: a model
    that always answers the minority class is constant, one at the majority share by chance is not; runs from before
    that check still fall back to the majority share, and the CSV takes rows with and without the field."""
    make_table = _load("make_table")
    monkeypatch.setattr(make_table, "RESULTS", tmp_path)
    runs = {"ft": _fake_run(0.50, 0.90),  # an older run: no flag, so the majority share decides (constant)
            "apt": {**_fake_run(0.47, 0.60, events=(5,), density=0.4), "constant_model": True},
            "apt_wo_DS": {**_fake_run(0.50, 0.70, events=(5,), density=0.4), "constant_model": False}}
    meta = {"task": "rte", "command": "python benchmarks/glue_suite.py", "args": {"seed": 42},
            "metric": "accuracy", "majority_share": 0.5}
    suite.gb.save(tmp_path / "glue_rte_suite_seed42", meta, runs)
    best = make_table.suite_best(["rte"])
    assert "| ft | 0.9000, 1 constant |" in best and "| apt | 0.6000, 1 constant |" in best
    assert "| apt_wo_DS | 0.7000 |" in best
    header = (tmp_path / "glue_rte_suite_seed42.csv").read_text().splitlines()[0]
    assert header.endswith(",constant_model")
