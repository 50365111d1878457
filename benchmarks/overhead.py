"""APT's per-step cost against PEFT LoRA at equal shapes, and the step at 40 % density.

Variants, all built from the same base weights with the same adapter modules (rank 8, alpha 16) and timed on the
same fixed batches, one optimizer step each in turn (interleaved rounds in one process, so a busy machine slows
them alike; the order rotates every round):

- ``lora``: PEFT LoRA;
- ``apt``: APT between pruning events: salience hooks (block salience, kurtosis for LLaMA) and mask hooks on,
  salience and adapter importance folded into their EMAs every step, no event;
- ``apt_window``: APT inside a mask-decay window: as ``apt``, plus the salience-density search and a mask move
  after every step, fractional masks and masked norms in the forward pass;
- ``apt_hooks_off``: the same APT adapters with every hook removed (no callback, no masks);
- ``apt_40``: the APT model after its last pruning event, physically pruned to 40 % density (the callback's own
  event, ranks kept at 8 so the adapters stay comparable), salience collection over as after the last event.

Reported: the median seconds per step of each variant and the medians of the per-round ratios. Targets (issue 17):
``apt / lora <= 1.05`` and ``apt_40 / apt <= 0.5``. ``--profile`` also writes a torch.profiler table of the
``apt`` and ``apt_hooks_off`` steps.

    python benchmarks/overhead.py --model minilm            # all-MiniLM-L6-v2, SST-2 benchmark batch (32 x 64)
    python benchmarks/overhead.py --model llama100m         # LLaMA-shaped, 134 M parameters, batch 4 x 128
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import apt_hf  # noqa: E402

VARIANTS = ("lora", "apt", "apt_window", "apt_hooks_off", "apt_40")
RATIOS = {"apt_vs_lora": ("apt", "lora"), "apt_window_vs_lora": ("apt_window", "lora"),
          "apt_hooks_off_vs_lora": ("apt_hooks_off", "lora"), "apt_vs_apt_hooks_off": ("apt", "apt_hooks_off"),
          "apt_40_vs_apt": ("apt_40", "apt"), "apt_40_vs_lora": ("apt_40", "lora")}


def base_model(name: str, device: torch.device, tiny: bool) -> tuple[transformers.PreTrainedModel, str]:
    """A fresh copy of the base model and its PEFT task type (same weights at every call)."""
    if name == "minilm":
        torch.manual_seed(0)  # the classifier head
        if tiny:
            config = transformers.BertConfig(**{**harness.TINY_ROBERTA, "max_position_embeddings": 140},
                                             num_labels=2)
            return harness.random_model(config, transformers.BertForSequenceClassification, device), "SEQ_CLS"
        model = transformers.AutoModelForSequenceClassification.from_pretrained(harness.minilm_path(), num_labels=2)
        return model.to(device).train(), "SEQ_CLS"
    shape = harness.TINY_LLAMA if tiny else harness.LLAMA_100M
    return harness.random_model(harness.llama_config(**shape), transformers.LlamaForCausalLM, device), "CAUSAL_LM"


def build(name: str, variant: str, device: torch.device, batch: dict, tiny: bool) -> harness.Stepper:
    model, task_type = base_model(name, device, tiny)
    torch.manual_seed(1)  # identical adapter initialisation in every variant
    if variant == "lora":
        return harness.Stepper(harness.wrap(model, "lora", task_type))
    apt_fields = dict(harness.SCHEDULE, adaptive_tuning=variant != "apt_40", target_sparsity=0.6)
    model = harness.wrap(model, "apt", task_type, **apt_fields)
    if variant == "apt_hooks_off":
        apt_hf.find_apt_model(model).detach_masking()
        return harness.Stepper(model)
    stepper = harness.Stepper(model, callback=apt_hf.APTCallback(), max_steps=harness.LONG_RUN)
    points = harness.schedule_points(stepper.callback)
    stepper.state.global_step = points["window" if variant == "apt_window" else "between"]
    if variant == "apt_40":
        for _ in range(2):  # salience and importance from real gradients before the event
            stepper.step(batch)
        harness.prune_with_event(stepper, batch, 0.4)
    return stepper


def profile(steppers: dict[str, harness.Stepper], data: list[dict], steps: int, path: Path) -> None:
    """torch.profiler tables (operators by self CPU time) of ``steps`` steps of each variant."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    parts = []
    for name in ("apt", "apt_hooks_off", "lora"):
        with torch_profile(activities=activities) as prof:
            for i in range(steps):
                steppers[name].step(data[i % len(data)])
            harness.sync(steppers[name].device)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=50)
        parts.append(f"== {name}: {steps} steps\n{table}")
    path.write_text("\n\n".join(parts))


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def summarize(times: dict[str, dict[str, list[float]]], clock: str) -> dict:
    """Medians per variant for both clocks, and per-round ratios on ``clock`` (the figure the targets use)."""
    out: dict = {"clock": clock, "variants": {}, "ratios": {}}
    for name, t in times.items():
        out["variants"][name] = {}
        for c in ("wall", "cpu"):
            p25, med, p75 = quartiles(t[c])
            out["variants"][name][c] = {"median_s": med, "p25_s": p25, "p75_s": p75, "times_s": t[c]}
    for key, (a, b) in RATIOS.items():
        entry = {}
        for c in ("wall", "cpu"):
            p25, med, p75 = quartiles(harness.per_round_ratio(times, a, b, c))
            entry[c] = {"median": med, "p25": p25, "p75": p75}
        out["ratios"][key] = {"median": entry[clock]["median"], **entry}
    r = out["ratios"]
    out["targets"] = {"apt_overhead_vs_lora_le_5pct": r["apt_vs_lora"]["median"] <= 1.05,
                      "step_at_40pct_le_half_dense": r["apt_40_vs_apt"]["median"] <= 0.5}
    return out


def run(args: argparse.Namespace) -> dict:
    device = harness.pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch, seq = (args.batch, args.seq) if not args.tiny else (2, 16)
    probe, _ = base_model(args.model, torch.device("cpu"), args.tiny)
    data = harness.batches(probe.config, args.model != "minilm", batch, seq, args.n_batches, device)
    del probe
    steppers = {v: build(args.model, v, device, data[0], args.tiny) for v in VARIANTS}
    flops = {}
    for name, stepper in steppers.items():  # warm-up; the first step also counts the step's FLOPs
        with FlopCounterMode(display=False) as counter:
            stepper.step(data[0])
        flops[name] = counter.get_total_flops()
        for i in range(1, args.warmup):
            stepper.step(data[i % len(data)])
    clock = "wall" if device.type == "cuda" else "cpu"
    out_path = Path(args.out or harness.RESULTS / f"overhead_{args.model}.json")
    meta = {"command": shlex.join(["python", "benchmarks/overhead.py", *sys.argv[1:]]), **harness.machine(device),
            "model": args.model, "batch": batch, "seq": seq, "rounds": args.rounds,
            "params": {v: harness.n_params(s.model) for v, s in steppers.items()},
            "flops_per_step": flops, "flops_apt_40_vs_apt": flops["apt_40"] / flops["apt"],
            "kept_density_apt_40": apt_hf.count_params(steppers["apt_40"].model)
            / apt_hf.find_apt_model(steppers["apt_40"].model).n_params,
            "note": "ratios: medians of per-round ratios on the 'clock' measure (CPU: process CPU time, since the "
                    "machine is shared with other jobs; GPU: wall-clock after synchronising)"}
    start = time.perf_counter()
    result: dict = {}

    def on_round(r: int, times: dict) -> None:
        if args.verbose:
            print(f"round {r + 1}/{args.rounds} ({time.perf_counter() - start:.0f}s), {clock} s: "
                  + ", ".join(f"{v} {times[v][clock][-1]:.3f}" for v in VARIANTS), flush=True)
        if (r + 1) % 5 == 0 or r + 1 == args.rounds:  # incremental output
            result.update({"meta": {**meta, "rounds_done": r + 1}, **summarize(times, clock)})
            if not args.no_write:
                out_path.parent.mkdir(parents=True, exist_ok=True)
                out_path.write_text(json.dumps(result, indent=2))

    harness.interleave(steppers, data, args.rounds, on_round)
    if args.profile:
        profile(steppers, data, args.profile, out_path.with_name(out_path.stem + "_profile.txt"))
    if args.plot and not args.no_write:
        plot(result, out_path.with_suffix(".png"))
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clock = result["clock"]
    v = {n: x[clock] for n, x in result["variants"].items()}
    names = list(v)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(names, [v[n]["median_s"] for n in names], yerr=[[v[n]["median_s"] - v[n]["p25_s"] for n in names],
                                                          [v[n]["p75_s"] - v[n]["median_s"] for n in names]],
           color=["C0", "C1", "C3", "C2", "C4"][:len(names)], capsize=3)
    ax.set_ylabel(f"{clock} seconds per optimizer step\n(median, IQR)")
    ax.set_title(f"{result['meta']['model']}, batch {result['meta']['batch']} x {result['meta']['seq']}", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["minilm", "llama100m"], default="minilm")
    p.add_argument("--batch", type=int, default=None, help="default: 32 (minilm), 4 (llama100m)")
    p.add_argument("--seq", type=int, default=None, help="default: 64 (minilm), 128 (llama100m)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--n_batches", type=int, default=4)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (0: torch's default). 1 by default: on a CPU shared with other jobs, more "
                        "threads than free cores make step times erratic (threads wait for each other)")
    p.add_argument("--device", default=None)
    p.add_argument("--profile", type=int, default=0, metavar="STEPS", help="also profile STEPS steps per variant")
    p.add_argument("--plot", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny random shapes (tests)")
    p.add_argument("--out", default=None)
    p.add_argument("--no_write", action="store_true")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    defaults = {"minilm": (32, 64), "llama100m": (4, 128)}[args.model]
    args.batch = args.batch or defaults[0]
    args.seq = args.seq or defaults[1]
    result = run(args)
    print(json.dumps({"ratios": result["ratios"], "targets": result["targets"],
                      "median_s": {k: v[result["clock"]]["median_s"] for k, v in result["variants"].items()}},
                     indent=2))
    return result


if __name__ == "__main__":
    main()
