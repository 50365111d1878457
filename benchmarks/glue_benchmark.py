"""APT against full fine-tuning, LoRA and LoRA+Prune (plus APT ablations) on real GLUE data, on this CPU.

Every method runs through the same script, ``examples/run_glue.py`` (same data pipeline, evaluation and export),
in its own process so that peak memory (max RSS) is per method. The runner then computes, per method: best and
final dev metric (best: over the evaluations at the delivered density, i.e. after the last pruning event, as in
spec G), the metric relative to FT, wall time, time to reach 97 % of FT's best dev metric (training wall-clock,
evaluation time excluded), peak RSS (loading, training and evaluation; taken before export), kept parameters and
the exported model's inference throughput against the dense model (batch 32 x 128 tokens and batch 1, same
process, medians). Outputs go to
``benchmarks/results/``: ``glue_<task>.json``, ``glue_<task>.csv`` and two PNG plots.

    python benchmarks/glue_benchmark.py                       # SST-2, the committed configuration
    python benchmarks/glue_benchmark.py --task mrpc --train_rows 3668 --epochs 3 --max_length 128 \
        --methods ft,lora,apt,lora_prune,apt_wo_DS,apt_wo_AT,apt_wo_AP --out runs/benchmark_mrpc
    python benchmarks/glue_benchmark.py --malloc_mmap_threshold 131072 --results_tag _mmap128k   # memory run
    python benchmarks/glue_benchmark.py --replot benchmarks/results/glue_sst2.json   # redraw a results file's plots
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "examples")]
from apt_hf.plot import LINESTYLES, MARKERS, plot_schedule  # noqa: E402
from utils_glue import get_task_spec  # noqa: E402

# method name -> run_glue.py flags
METHODS: dict[str, list[str]] = {
    "ft": ["--method", "ft"],
    "lora": ["--method", "lora"],
    "lora_prune": ["--method", "lora_prune"],
    "apt": ["--method", "apt", "--distillation", "True"],
    "apt_wo_AP": ["--method", "apt", "--adaptive_pruning", "False", "--distillation", "False"],
    "apt_wo_AT": ["--method", "apt", "--adaptive_tuning", "False"],
    "apt_wo_DS": ["--method", "apt", "--distillation", "False"],
    # APT with the recovery after distillation pinned to a peak learning-rate factor (spec F.2; issue 13's selection
    # of the default): the paper's 0.1 and the full rate
    "apt_recovery_lr01": ["--method", "apt", "--distillation", "True", "--post_distill_lr_ratio", "0.1"],
    "apt_recovery_lr1": ["--method", "apt", "--distillation", "True", "--post_distill_lr_ratio", "1.0"],
    # APT with mu's ramp capped at 0.5, so the task loss keeps half the weight while distilling (issue 13's
    # diagnosis, first cause; a candidate for the default of APTConfig.distill_mu_max)
    "apt_mu_half": ["--method", "apt", "--distillation", "True", "--distill_mu_max", "0.5"],
    # APT whose teacher is refreshed at every evaluation during distillation that beats it, so it is always the best
    # model evaluated so far (issue 13's diagnosis: early teachers at chance; a candidate for the default of
    # APTConfig.teacher_refresh)
    "apt_teacher_eval": ["--method", "apt", "--distillation", "True", "--teacher_refresh", "eval"],
    # APT that does not distil in a step whose teacher gives the whole batch one answer (issue 13's diagnosis: the
    # first teacher is often a constant model, and the distilled student collapses to it; a candidate for the default
    # of APTConfig.skip_constant_teacher)
    "apt_skip_constant": ["--method", "apt", "--distillation", "True", "--skip_constant_teacher", "True"],
    # APT distilling from spec F.1's teacher whatever it answers: APTConfig's default until skip_constant_teacher was
    # chosen (issue 13), so the suite's APT runs made before that are this method's
    "apt_spec_teacher": ["--method", "apt", "--distillation", "True", "--skip_constant_teacher", "False"],
}


def is_apt(name: str) -> bool:
    """Whether a method is one of APT's variants, which take ``--apt_args``."""
    return name.startswith("apt")


def run_glue_command(name: str, args: argparse.Namespace, out: Path) -> list[str]:
    """The ``examples/run_glue.py`` command line of one method in this benchmark's setting."""
    lr = args.ft_lr if name == "ft" else args.adapter_lr
    cmd = [sys.executable, str(ROOT / "examples" / "run_glue.py"), *METHODS[name],
           "--task_name", args.task, "--glue_dir", args.glue_dir, "--max_train_samples", str(args.train_rows),
           "--max_seq_length", str(args.max_length), "--per_device_train_batch_size", str(args.batch_size),
           "--per_device_eval_batch_size", "64", "--num_train_epochs", str(args.epochs), "--learning_rate", str(lr),
           "--eval_strategy", "steps", "--eval_steps", str(args.eval_steps), "--logging_steps", "10",
           "--save_strategy", "no", "--report_to", "none", "--seed", str(args.seed), "--disable_tqdm", "True",
           "--overwrite_output_dir", "True",
           "--target_sparsity", str(args.target_sparsity), "--output_dir", str(out / name),
           "--export_dir", str(out / name / "export"), "--overwrite_export", "True",
           "--speed_repeats", str(args.speed_repeats), "--speed_batch_size", "32", "--speed_seq_length", "128"]
    cmd += shlex.split(getattr(args, "run_glue_args", ""))  # every method (glue_suite.py)
    if is_apt(name):
        cmd += shlex.split(args.apt_args)
    return cmd


def run_method(name: str, args: argparse.Namespace, out: Path, extra: tuple[str, ...] = ()) -> dict:
    """Run one method in its own process (``extra``: more run_glue.py flags) and return its summary."""
    cmd = run_glue_command(name, args, out) + list(extra)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    if args.malloc_mmap_threshold:  # same allocator setting for every method (see --malloc_mmap_threshold)
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); see {out / f'{name}.log'}")
    summary = json.loads((out / name / "summary.json").read_text())
    summary["process_wall_s"] = time.perf_counter() - start
    return summary


def time_to(history: list[dict], threshold: float) -> float | None:
    """Training wall-clock at the first evaluation whose metric reaches ``threshold``."""
    return next((h["train_time_s"] for h in history if h["metric"] >= threshold), None)


def pruned_history(name: str, run: dict) -> list[dict]:
    """Evaluations of models at the density a method delivers (spec G: the reported score is the best dev score
    after the last pruning event). LoRA+Prune's model exists only after its final pruning step; an APT run's
    evaluations count from its last pruning event on (``apt/event`` in its log history); methods that deliver a
    dense model (FT, LoRA, APT w/o A_P, whose events only grow ranks) keep all."""
    if name == "lora_prune":
        return run["eval_history"][-1:]
    events = [h["step"] for h in run.get("log_history", []) if "apt/event" in h]
    if not events or run["density"] >= 1.0:
        return run["eval_history"]
    return [h for h in run["eval_history"] if h["step"] >= max(events)]


def plot(results: dict, path_curves: Path, path_apt: Path, meta: dict) -> None:
    """Dev metric vs training time per method (a distinct colour, marker and line style each, so that overlapping
    curves stay apart) and APT's schedule (``apt_hf.plot.plot_schedule``), titled with the task and setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = get_task_spec(meta["task"]).folder if "task" in meta else "GLUE"
    metric, args = meta["metric"], meta.get("args", {})
    parts = [f"{args['train_rows']} rows" if args.get("train_rows") else None,
             f"{args['epochs']:g} epochs" if args.get("epochs") is not None else None,
             f"seed {args['seed']}" if args.get("seed") is not None else None,
             f"{1 - args['target_sparsity']:.0%} density" if args.get("target_sparsity") is not None else None]
    setting = ", ".join(p for p in parts if p)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (name, r) in enumerate(results.items()):  # thin: evaluations before the delivered density
        full, h = r["eval_history"], pruned_history(name, r)
        style = dict(color=f"C{i}", marker=MARKERS[i % len(MARKERS)], ls=LINESTYLES[i % len(LINESTYLES)])
        if len(h) < len(full):
            ax.plot([p["train_time_s"] for p in full], [p["metric"] for p in full], lw=0.7, ms=2.5, alpha=0.45,
                    **style)
        ax.plot([p["train_time_s"] for p in h], [p["metric"] for p in h], lw=1.4, ms=5, label=name, **style)
    ft_best = max(h["metric"] for h in results["ft"]["eval_history"])
    ax.axhline(0.97 * ft_best, color="grey", ls=(0, (1, 3)), lw=1.2, label="97% of FT best")
    ax.set_xlabel("training wall-clock (s, evaluation excluded)")
    ax.set_ylabel(f"dev {metric}")
    ax.set_title(f"{task}: dev {metric} during training" + (f"\n({setting})" if setting else ""), fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path_curves, dpi=120)
    plt.close(fig)
    if any("apt/density" in h for h in results["apt"]["log_history"]):
        plot_schedule(results["apt"]["log_history"], path_apt,
                      title=f"{task}: APT schedule (kept density, mean rank)" + (f"\n({setting})" if setting else ""))


def parser() -> argparse.ArgumentParser:
    """The benchmark's settings (also read by ``train_memory.py``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="sst2")
    p.add_argument("--glue_dir", default=str(ROOT.parent / "shared" / "data" / "glue"))
    p.add_argument("--train_rows", type=int, default=6000)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--eval_steps", type=int, default=50)
    p.add_argument("--ft_lr", type=float, default=5e-5)
    p.add_argument("--adapter_lr", type=float, default=5e-4)
    p.add_argument("--target_sparsity", type=float, default=0.6)
    p.add_argument("--speed_repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default=str(ROOT / "runs" / "benchmark"))
    p.add_argument("--malloc_mmap_threshold", type=int, default=0,
                   help="glibc MALLOC_MMAP_THRESHOLD_ for every method's process (0: glibc's default). A fixed "
                        "threshold (e.g. 131072) returns freed large blocks to the OS, so peak RSS shows what a "
                        "method needs rather than how much the heap fragments, at the cost of slower steps.")
    p.add_argument("--apt_args", default="", help="Extra run_glue.py flags for the APT methods (diagnostic variants, "
                                                  "e.g. \"--distill_layer_weight 0\"); use with --results_tag.")
    p.add_argument("--results_tag", default="", help="Suffix of the result files: glue_<task><tag>.json etc.")
    p.add_argument("--replot", metavar="RESULTS_JSON", help="Redraw the plots of a results file; nothing else changes.")
    p.add_argument("--rescore", metavar="RESULTS_JSON",
                   help="Recompute the table (and plots) of a committed results file from its recorded runs with "
                        "this script's current scoring rules; nothing is re-run. The file's meta.command is kept "
                        "and this invocation is recorded as meta.rescored_by.")
    return p


def main() -> None:
    args = parser().parse_args()
    if args.replot:
        data = json.loads(Path(args.replot).read_text())
        draw(Path(args.replot).with_suffix(""), data["meta"], data["runs"])
        return
    if args.rescore:
        rescore(Path(args.rescore))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for name in args.methods.split(","):
        print(f"== {name}", flush=True)
        results[name] = run_method(name, args, out)
        print(json.dumps({k: results[name].get(k) for k in ("metric_value", "best_metric", "density", "speedup",
                                                             "train_time_s", "peak_rss_mb")}), flush=True)
        write_results(results, args)


def table_rows(results: dict[str, dict]) -> list[dict]:
    """One row per method: the figures listed in the module docstring."""
    ft_best = results["ft"]["best_metric"] if "ft" in results else None
    rows = []
    for name, r in results.items():
        history = pruned_history(name, r)
        best = max(h["metric"] for h in history)
        rows.append({
            "method": name, "best_metric": best, "final_metric": r["metric_value"],
            "best_vs_ft": best / ft_best if ft_best else None,
            "train_time_s": r["train_time_s"],
            "time_to_97pct_ft_s": time_to(history, 0.97 * ft_best) if ft_best else None,
            "peak_rss_mb": r["peak_rss_mb"], "kept_params": r["kept_params"], "density": r["density"],
            "throughput_b32_vs_dense": r.get("speedup"), "throughput_b1_vs_dense": r.get("speedup_b1"),
        })
        if r.get("constant_model") is not None:  # run_glue's own check of the final model (not in older runs)
            rows[-1]["constant_model"] = r["constant_model"]
        final = r["eval_history"][-1].get("metrics", {}) if r["eval_history"] else {}
        if r["metric"] != "accuracy" and "eval_accuracy" in final:  # e.g. MRPC: F1 flatters a majority-class model
            rows[-1]["final_accuracy"] = final["eval_accuracy"]
    return rows


def write_results(results: dict[str, dict], args: argparse.Namespace) -> None:
    """Write the JSON/CSV table (and the plots once FT and APT are in); called after every method."""
    meta = {"task": args.task, "command": shlex.join(["python", "benchmarks/glue_benchmark.py", *sys.argv[1:]]),
            "args": vars(args), "device": "CPU, 2 cores (shared machine)",
            "metric": next(iter(results.values()))["metric"]}
    slim = {n: {k: v for k, v in r.items() if k != "eval_metrics"} for n, r in results.items()}
    save(RESULTS / f"glue_{args.task}{args.results_tag}", meta, slim)


def rescore(path: Path) -> None:
    data = json.loads(path.read_text())
    data["meta"]["rescored_by"] = shlex.join(["python", "benchmarks/glue_benchmark.py", *sys.argv[1:]])
    save(path.with_suffix(""), data["meta"], data["runs"])


def save(stem: Path, meta: dict, runs: dict[str, dict]) -> None:
    rows = table_rows(runs)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "table": rows, "runs": runs}, indent=2))
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))  # rows can differ
        writer.writeheader()
        writer.writerows(rows)
    draw(stem, meta, runs)
    print(json.dumps(rows, indent=2), flush=True)


def draw(stem: Path, meta: dict, runs: dict[str, dict]) -> None:
    if "ft" in runs and "apt" in runs:
        plot(runs, stem.parent / f"{stem.name}_curves.png", stem.parent / f"{stem.name}_apt_schedule.png", meta)


if __name__ == "__main__":
    main()
