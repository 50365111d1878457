"""Peak memory of the training phase alone: FT, LoRA, APT and APT w/o D_S on the SST-2 benchmark setting.

Each method runs ``examples/run_glue.py`` in its own process with the settings of ``glue_benchmark.py``
(all-MiniLM-L6-v2, 6,000 SST-2 rows, batch 32 x 64 tokens, dev evaluation every 50 steps, 60 % sparsity for APT)
and glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed for every method (freed large blocks go back to the OS, so the resident
set shows what a method holds rather than how the heap fragments; see the README's memory table). No export and no
speed test run in these processes (``--export False --speed_repeats 0``), and the peak is taken over the training
phase only: ``run_glue.py`` resets the kernel's peak-RSS counter when training starts and reads it when training
ends (evaluations during training are included; APT needs them to refresh its teacher).

Per method it records the peak RSS of training, the RSS when training starts (runtime, libraries, data, model) and
right after the imports (the Python runtime and libraries alone, the same for every method), and the ratios to FT
of the peak and of the peak above that import baseline. Results are written after each method; a rerun skips the
methods already in the file.

    python benchmarks/train_memory.py --max_steps 200     # the committed run (shortened; see --max_steps)
"""

from __future__ import annotations

import json
import shlex
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import glue_benchmark  # noqa: E402
import harness  # noqa: E402

METHODS = ("ft", "lora", "apt", "apt_wo_DS")
KEEP = ("train_peak_rss_mb", "train_start_rss_mb", "imports_rss_mb", "train_peak_is_training_only", "peak_rss_mb",
        "train_rss_trace", "train_time_s", "optimizer_steps", "density", "metric_value", "malloc_mmap_threshold")


def table(runs: dict[str, dict]) -> list[dict]:
    ft = runs.get("ft")
    rows = []
    for name, r in runs.items():
        above = r["train_peak_rss_mb"] - r["imports_rss_mb"]
        row = {"method": name, **{k: r[k] for k in KEEP if k in r and k != "train_rss_trace"},
               "peak_above_imports_mb": above}
        if ft is not None:
            row["peak_vs_ft"] = r["train_peak_rss_mb"] / ft["train_peak_rss_mb"]
            row["peak_above_imports_vs_ft"] = above / (ft["train_peak_rss_mb"] - ft["imports_rss_mb"])
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = glue_benchmark.parser()
    p.description = __doc__.splitlines()[0]
    p.set_defaults(methods=",".join(METHODS), malloc_mmap_threshold=131072, speed_repeats=0,
                   out=str(harness.ROOT / "runs" / "train_memory"))
    p.add_argument("--max_steps", type=int, default=0,
                   help="stop after this many optimizer steps (0: the benchmark's 2 epochs, 376 steps); the APT "
                        "schedule scales with it, so every pruning event and the distillation phase still happen")
    p.add_argument("--result", default=str(harness.RESULTS / "train_memory_sst2.json"))
    p.add_argument("--force", action="store_true", help="re-run methods already in the result file")
    p.add_argument("--jobs", type=int, default=1, help="methods run side by side (each in its own process)")
    args = p.parse_args(argv)
    result_path = Path(args.result)
    previous = json.loads(result_path.read_text()) if result_path.exists() and not args.force else {}
    runs: dict[str, dict] = dict(previous.get("runs", {}))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = ("--export", "False", "--speed_repeats", "0") + (("--max_steps", str(args.max_steps))
                                                             if args.max_steps else ())
    meta = {"command": shlex.join(["python", "benchmarks/train_memory.py", *sys.argv[1:]]),
            "device": f"CPU: {harness.cpu_name()} (shared machine)", "args": vars(args),
            "malloc_mmap_threshold": args.malloc_mmap_threshold,
            "run_glue_flags": {m: glue_benchmark.run_glue_command(m, args, out)[2:] + list(extra)
                               for m in args.methods.split(",")}}
    lock = threading.Lock()

    def one(name: str) -> None:
        print(f"== {name}", flush=True)
        summary = glue_benchmark.run_method(name, args, out, extra)
        run = {k: summary[k] for k in KEEP if k in summary}
        run["apt_events"] = [h["step"] for h in summary.get("log_history", []) if "apt/event" in h]
        run["distillation_logged_at"] = [h["step"] for h in summary.get("log_history", []) if "apt/mu" in h]
        with lock:  # results are written after every method
            runs[name] = run
            ordered = {m: runs[m] for m in [*METHODS, *runs] if m in runs}
            result = {"meta": meta, "table": table(ordered), "runs": ordered}
            result_path.parent.mkdir(parents=True, exist_ok=True)
            result_path.write_text(json.dumps(result, indent=2))
            print(json.dumps(result["table"], indent=2), flush=True)

    todo = [m for m in args.methods.split(",") if m not in runs]
    for name in set(args.methods.split(",")) - set(todo):
        print(f"{name}: already measured (--force to redo)", flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # processes side by side: RSS is per process
        list(pool.map(one, todo))
    ordered = {m: runs[m] for m in [*METHODS, *runs] if m in runs}
    return {"meta": meta, "table": table(ordered), "runs": ordered}


if __name__ == "__main__":
    main()
