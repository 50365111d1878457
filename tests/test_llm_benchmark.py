"""Tests of ``benchmarks/llm_benchmark.py``: the table it computes, and a tiny-shape run (tiny random LLaMA, a few
real LIMA rows) that writes one result file per method, resumes by skipping finished methods, and renders the
table and plots."""

from __future__ import annotations

import json

import pytest
from helpers_examples import REPO, loaded_script
from tiny_lm import SHARED_DATA, bpe_tokenizer, tiny_llama_dir

SCRIPT = REPO / "benchmarks" / "llm_benchmark.py"
LIMA = SHARED_DATA / "instruct" / "lima" / "lima.json"


@pytest.fixture(scope="module")
def bench():
    yield from loaded_script(SCRIPT, "llm_benchmark")


@pytest.fixture(scope="module")
def make_table():
    yield from loaded_script(REPO / "benchmarks" / "make_table.py", "make_table")


def fake_result(scores: dict[str, float], chance: float = 0.25, **extra) -> dict:
    tasks = {t: {"acc": v, "acc_norm": v, "chance_acc": chance, "chance_acc_norm": chance} for t, v in scores.items()}
    return {"llm_eval": {"tasks": tasks}, "perplexity": 5.0, "density": 1.0, **extra}


def test_table_is_relative_to_lora(bench):
    tasks = ("arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2")
    lora = fake_result(dict.fromkeys(tasks, 0.45), train_time_s=100.0, peak_rss_mb=1000.0)
    apt = fake_result(dict(zip(tasks, (0.40, 0.40, 0.35, 0.45))), train_time_s=80.0, peak_rss_mb=900.0,
                      density=0.7, generation_speedup={"1": 1.2, "8": 1.4},
                      exported_tokens_per_s={"1": 30.0, "8": 200.0})
    rows = {r["method"]: r for r in bench.table_rows({"lora": lora, "apt_30": apt})}
    assert rows["lora"]["avg_vs_lora"] == 1.0 and rows["lora"]["above_chance_vs_lora"] == 1.0
    assert rows["apt_30"]["average"] == pytest.approx(0.4)
    assert rows["apt_30"]["avg_vs_lora"] == pytest.approx(0.4 / 0.45, abs=1e-4)
    assert rows["apt_30"]["above_chance_vs_lora"] == pytest.approx(0.15 / 0.2, abs=1e-4)
    assert rows["apt_30"]["train_time_vs_lora"] == 0.8 and rows["apt_30"]["peak_rss_vs_lora"] == 0.9
    assert rows["apt_30"]["gen_speedup_b8"] == 1.4 and "gen_speedup_b1" not in rows["lora"]


@pytest.mark.slow
@pytest.mark.skipif(not LIMA.is_file(), reason=f"needs LIMA at {LIMA} (set APT_SHARED_DATA)")
def test_tiny_run_writes_one_file_per_method_and_resumes(bench, make_table, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models in child processes: one thread each
    rows = json.loads(LIMA.read_text())[:40]
    data = tmp_path / "lima40.json"
    data.write_text(json.dumps(rows))
    tok = bpe_tokenizer((r["instruction"] + " " + r["output"] for r in rows), vocab_size=2000)
    model = tiny_llama_dir(tmp_path / "tiny", tok)
    results = tmp_path / "results" / "llm_tiny"
    args = ["--methods", "apt_30", "--model", str(model), "--train_file", str(data), "--eval_dir",
            str(SHARED_DATA / "eval"), "--train_rows", "24", "--heldout_rows", "4", "--max_length", "128",
            "--eval_tasks", "arc_challenge,hellaswag", "--eval_limit", "2", "--eval_steps", "3",
            "--pretune_batches", "2", "--speed_new_tokens", "2",
            "--speed_repeats", "1", "--epochs", "2", "--out", str(tmp_path / "runs"), "--results", str(results)]
    bench.main(args)
    assert sorted(p.name for p in results.iterdir()) == ["apt_30.json", "dense.json"]
    table = json.loads((results.parent / "llm_tiny.json").read_text())["table"]
    by_method = {r["method"]: r for r in table}
    assert set(by_method) == {"dense", "apt_30"}
    assert 0.69 <= by_method["apt_30"]["density"] <= 0.70 and by_method["dense"]["density"] == 1.0
    assert by_method["apt_30"]["gen_speedup_b8"] > 0
    for suffix in (".csv", "_curves.png", "_apt_schedule.png"):
        assert (results.parent / f"llm_tiny{suffix}").is_file()
    markdown = make_table.llm_table(results.parent / "llm_tiny.json").splitlines()
    assert "2 examples per task" in markdown[0] and "1 torch thread(s)" in markdown[0]
    assert [line.split(" | ")[0] for line in markdown[4:]] == ["| dense", "| apt_30"]
    capsys.readouterr()
    bench.main(args)  # resumes: every method is done
    assert capsys.readouterr().out.count("exists, skipped") == 2
