"""What one APT pruning event costs as LLaMA-shaped models grow from ~10 M to ~1 B parameters.

For each size: a random LLaMA-shaped causal LM (fp32, MHA, vocabulary 32000) with APT adapters on q/v (the
default), two optimizer steps with salience hooks on (the second one timed: the reference training step), then the
schedule's first pruning event (dense -> its first target density, about 0.88) through ``APTCallback`` as the
Trainer would call it, timed whole and in parts (salience-density search, budget fill, physical removal, rank
growth, optimizer surgery and re-hooking, the logged statistics), then one timed step of the pruned model.

The event's share of a training run is ``events x event / (steps x step)``: for the paper's 10 events over its
RoBERTa SST-2 run (84,200 steps) and over its LLaMA Alpaca-GPT4 run (24,376 steps), with this script's own step of
``--batch x --seq`` tokens on this machine (a small step, so the share is an upper bound: the paper's steps hold
4,096 to 16,384 tokens). Results are written after every size; a rerun skips the sizes already in the file.

    python benchmarks/event_cost.py                      # the committed sweep (CPU, ~15 min)
    python benchmarks/event_cost.py --sizes 10M,35M      # a subset
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import apt_hf  # noqa: E402
import apt_hf.callback as apt_callback_module  # noqa: E402

# name -> LLaMA shape (hidden, layers, heads, FFN); vocabulary 32000, head width 64 or 128.
SIZES = {
    "10M": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=2, intermediate_size=384),
    "35M": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1024),
    "134M": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=2048),
    "374M": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=2816),
    "1.2B": dict(hidden_size=2048, num_hidden_layers=20, num_attention_heads=16, intermediate_size=5632),
}
TINY = {"tiny": dict(harness.TINY_LLAMA)}
PAPER_RUNS = {"roberta_sst2": 84_200, "llama_alpaca": 24_376}  # optimizer steps of the paper's runs (spec D.2, H.2)
PAPER_EVENTS = 10
PARTS = (("search", apt_callback_module, "search_kept"), ("fill_budget", apt_callback_module, "fill_budget"),
         ("rank_plan", apt_callback_module, "plan_rank_growth"), ("rank_growth", apt_callback_module, "grow_ranks"))
METHOD_PARTS = (("masks_total", "_move_masks"), ("removal", "_remove_masked"), ("optimizer_and_hooks", "_commit"),
                ("stats", "stats"))


def rss_mb(field: str = "VmHWM") -> float:
    """Resident memory (``VmRSS``) or its peak since the last reset (``VmHWM``), MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_rss_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def measure(name: str, shape: dict, batch: int, seq: int, device: torch.device) -> dict:
    shape = {"num_key_value_heads": shape["num_attention_heads"], "vocab_size": 32000, **shape}
    config = harness.llama_config(**shape)
    start = time.perf_counter()
    model = harness.random_model(config, transformers.LlamaForCausalLM, device)
    built_s = time.perf_counter() - start
    total = harness.n_params(model)
    model = harness.wrap(model, "apt", "CAUSAL_LM", **harness.SCHEDULE, target_sparsity=0.6)
    stepper = harness.Stepper(model, callback=apt_hf.APTCallback(), max_steps=harness.LONG_RUN)
    cb = stepper.callback
    stepper.state.global_step = harness.schedule_points(cb)["between"]
    data = harness.batches(config, True, batch, seq, 2, device)
    stepper.step(data[0])  # warm-up (allocations), salience and importance from real gradients
    dense_wall, dense_cpu = stepper.timed_step(data[1])
    n_main = apt_hf.find_apt_model(model).n_params
    timers = harness.Timers(device)
    for label, module, fn in PARTS:
        timers.wrap(module, fn, label)
    for label, method in METHOD_PARTS:
        timers.wrap(cb, method, label)
    model_mb = harness.tensor_bytes(model.parameters()) / 2 ** 20
    reset_rss_peak()
    rss_before = rss_mb("VmRSS")
    try:
        harness.run_event(stepper, data[0], 0, timers)
    finally:
        timers.restore()
    event_extra_mb = rss_mb("VmHWM") - rss_before  # what the event step needs above the resident model
    parts, parts_cpu = dict(timers.spent), dict(timers.cpu)
    for p in (parts, parts_cpu):
        p["mask_moves"] = p.get("masks_total", 0.0) - p.get("search", 0.0) - p.get("fill_budget", 0.0)
    stepper.step(data[1])  # first step on the new shapes (re-hooking, allocations)
    pruned_wall, pruned_cpu = stepper.timed_step(data[0])
    row = {
        "size": name, "shape": shape, "params_total": total, "params_main": n_main, "dtype": "float32",
        "target_density": cb.plan.target(cb.plan.events[0]),
        "density_after": apt_hf.count_params(model) / n_main,
        "event_s": parts.pop("event"), "event_cpu_s": parts_cpu.pop("event"), "event_parts_s": parts,
        "event_parts_cpu_s": parts_cpu,
        "step_dense_s": {"wall": dense_wall, "cpu": dense_cpu},
        "step_after_event_s": {"wall": pruned_wall, "cpu": pruned_cpu},
        "event_in_steps": {},
        "share_of_training_at_10_events": {},
        "build_s": built_s, "model_mb": model_mb, "event_step_extra_rss_mb": event_extra_mb,
    }
    row["event_in_steps"] = {"wall": row["event_s"] / dense_wall, "cpu": row["event_cpu_s"] / dense_cpu}
    for clock in ("wall", "cpu"):
        row["share_of_training_at_10_events"][clock] = {
            run: PAPER_EVENTS * row["event_in_steps"][clock] / steps for run, steps in PAPER_RUNS.items()}
    del stepper, model, cb
    gc.collect()
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["params_total"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.loglog(x, [r["event_cpu_s"] for r in rows], "o-", color="C3", label="one pruning event (total)")
    for i, (label, key) in enumerate((("search + budget fill", ("search", "fill_budget")),
                                      ("physical removal", ("removal",)),
                                      ("optimizer surgery + re-hooking", ("optimizer_and_hooks",)))):
        y = [sum(r["event_parts_cpu_s"].get(k, 0.0) for k in key) for r in rows]
        ax.loglog(x, [max(v, 1e-4) for v in y], ".--", color=f"C{i}", lw=0.9, label=label)
    ax.loglog(x, [r["step_dense_s"]["cpu"] for r in rows], "s:", color="grey",
              label=f"one training step ({rows[0]['batch']} x {rows[0]['seq']} tokens)")
    ax.set_xlabel("parameters")
    ax.set_ylabel("CPU seconds (1 thread)")
    ax.set_title("APT event cost vs model size (random LLaMA shapes, CPU)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch threads (see overhead.py)")
    p.add_argument("--device", default=None)
    p.add_argument("--tiny", action="store_true", help="one tiny shape (tests)")
    p.add_argument("--out", default=str(harness.RESULTS / "event_cost.json"))
    p.add_argument("--force", action="store_true", help="re-measure sizes already in the output file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = harness.pick_device(args.device)
    sizes = TINY if args.tiny else {k: SIZES[k] for k in args.sizes.split(",")}
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.exists() and not args.force else {}
    rows = {r["size"]: r for r in done.get("rows", [])}
    meta = {"command": shlex.join(["python", "benchmarks/event_cost.py", *sys.argv[1:]]), **harness.machine(device),
            "batch": args.batch, "seq": args.seq, "paper_runs_steps": PAPER_RUNS, "paper_events": PAPER_EVENTS,
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    for name, shape in sizes.items():
        if name in rows:
            print(f"{name}: already measured (--force to redo)", flush=True)
            continue
        row = measure(name, shape, args.batch, args.seq, device)
        row.update(batch=args.batch, seq=args.seq)
        rows[name] = row
        print(json.dumps({k: row[k] for k in ("size", "params_total", "event_s", "event_cpu_s", "event_parts_cpu_s",
                                              "step_dense_s", "share_of_training_at_10_events", "model_mb",
                                              "event_step_extra_rss_mb")}),
              flush=True)
        ordered = sorted(rows.values(), key=lambda r: r["params_total"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "rows": ordered}, indent=2))
    ordered = sorted(rows.values(), key=lambda r: r["params_total"])
    if not args.tiny and len(ordered) > 1:
        plot(ordered, out.with_suffix(".png"))
    return {"meta": meta, "rows": ordered}


if __name__ == "__main__":
    main()
