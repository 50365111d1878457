"""Exported-model throughput against the dense model, re-measured for finished suite runs on a quiet machine.

Each suite run times its exported model against the dense one in its own process (``examples/run_glue.py``), while
another run trains beside it, so those ratios carry the noise of a shared CPU. This script loads the exports that
``benchmarks/glue_suite.py`` left under ``--runs`` (``<task>/seed<seed>/<method>/export``) and times each against
the dense model again, in one process, with the same measurement (``run_glue.median_latencies``: the two models take
turns on one random full-length batch, medians) at batch 32 x 128 and 1 x 128 and one torch thread (the suite's
setting). Run it when nothing else is running; the 1-minute load average before and after is recorded. Output:
``benchmarks/results/export_speed_seed<seed>.json``.

    python benchmarks/export_speed.py --runs runs/suite --seed 42
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from run_glue import median_latencies  # noqa: E402
from utils_examples import minilm_path  # noqa: E402

import apt_hf  # noqa: E402


def exports(runs: Path, seed: int, methods: list[str]) -> list[tuple[str, str, Path]]:
    """(task, method, export folder) of every finished export of ``seed`` under ``runs``."""
    found = []
    for folder in sorted(runs.glob(f"*/seed{seed}/*/export")):
        task, method = folder.parents[2].name, folder.parent.name
        if method in methods and (folder / "config.json").is_file():
            found.append((task, method, folder))
    return found


def load_pair(folder: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The dense MiniLM classifier (same labels and attention implementation) and the export in ``folder``."""
    pruned = apt_hf.load_pruned(folder)
    dense = transformers.AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=pruned.config.num_labels, attn_implementation=pruned.config._attn_implementation)
    return dense, pruned


def add_run_args(p: argparse.ArgumentParser, methods: str, repeats: int, repeats_help: str) -> None:
    """The options this script shares with ``export_profile.py``: where the exports are, which, and how to time."""
    p.add_argument("--runs", default=str(ROOT / "runs" / "suite"), help="glue_suite.py's --out folder.")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--methods", default=methods, help="Methods whose exports are measured (comma-separated).")
    p.add_argument("--repeats", type=int, default=repeats, help=repeats_help)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)


def parse_and_find(p: argparse.ArgumentParser) -> tuple[argparse.Namespace, list[tuple[str, str, Path]]]:
    """Parse, set the thread count and quiet logging, and find the exports (a clear error when there are none)."""
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # the dense model's fresh task head is expected
    transformers.utils.logging.disable_progress_bar()
    found = exports(Path(args.runs), args.seed, args.methods.split(","))
    if not found:
        p.error(f"no exported model of seed {args.seed} under {args.runs}; run benchmarks/glue_suite.py first")
    return args, found


def measure(task: str, method: str, folder: Path, repeats: int) -> dict:
    dense, pruned = load_pair(folder)
    dense_32, pruned_32 = median_latencies([dense, pruned], 32, 128, repeats)
    dense_1, pruned_1 = median_latencies([dense, pruned], 1, 128, 5 * repeats)
    return {"task": task, "method": method, "export": str(folder), "density": apt_hf.count_params(pruned)
            / apt_hf.count_params(dense), "speedup_b32": dense_32 / pruned_32, "speedup_b1": dense_1 / pruned_1,
            "dense_b32_ms": 1000 * dense_32, "pruned_b32_ms": 1000 * pruned_32, "dense_b1_ms": 1000 * dense_1,
            "pruned_b1_ms": 1000 * pruned_1}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(p, "apt,apt_wo_DS", 10, "Batch-32 passes per model (batch 1: five times as many).")
    args, found = parse_and_find(p)
    load_before, rows = os.getloadavg()[0], []
    for task, method, folder in found:
        rows.append(measure(task, method, folder, args.repeats))
        r = rows[-1]
        print(f"{task} {method}: b32 {r['speedup_b32']:.2f}x ({r['dense_b32_ms']:.0f} -> {r['pruned_b32_ms']:.0f} ms), "
              f"b1 {r['speedup_b1']:.2f}x", flush=True)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"export_speed_seed{args.seed}.json")
    meta = {"command": shlex.join(["python", "benchmarks/export_speed.py", *sys.argv[1:]]), "args": vars(args),
            "device": f"CPU, {os.cpu_count()} cores, {args.threads} torch thread(s)", "torch": torch.__version__,
            "load_average_1min_before_after": [load_before, os.getloadavg()[0]]}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
