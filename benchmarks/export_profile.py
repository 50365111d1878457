"""Where an exported model's time goes, against the dense model: the operator profile behind the throughput ratio.

``benchmarks/export_speed.py`` gives one number per export (dense latency over pruned latency). This script says
why it is what it is: it runs the dense all-MiniLM-L6-v2 classifier and each finished suite export under
``torch.profiler`` on the same random full-length batch (batch 32 x 128, one torch thread, the suite's setting;
the models take turns, ``--repeats`` passes each after a warm-up) and sums the operators' own CPU time into
groups: the projections (matrix products of the linear layers), the attention kernel, the activation, the layer
norms, and everything else (embedding lookup, residual additions, reshapes). Per group it records milliseconds per
pass for both models and their ratio, next to the share of the B.3-counted parameters the export keeps, so that a
missed throughput target can be traced to the part of the model that does not shrink with the count. Output:
``benchmarks/results/export_profile_seed<seed>.json``.

    python benchmarks/export_profile.py --runs runs/suite --seed 44 --methods apt
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from export_speed import add_run_args, load_pair, parse_and_find  # noqa: E402

import apt_hf  # noqa: E402

# Operator name -> group (the first group whose words appear in the name; the rest is "other").
GROUPS = (
    ("projections", ("addmm", "aten::mm", "aten::matmul", "aten::linear")),
    ("attention", ("scaled_dot_product", "aten::bmm", "aten::baddbmm", "softmax")),
    ("activation", ("gelu", "silu", "relu", "tanh")),
    ("layer_norm", ("layer_norm",)),
)


def group_of(op: str) -> str:
    """The group of a profiled operator (see ``GROUPS``)."""
    for name, words in GROUPS:
        if any(w in op for w in words):
            return name
    return "other"


@torch.no_grad()
def profile_ms(models: list[torch.nn.Module], batch_size: int, seq_length: int, repeats: int) -> list[dict]:
    """Per model: milliseconds per pass of each operator group (self CPU time, leaf operators only) and in total."""
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(1000, models[0].config.vocab_size, (batch_size, seq_length), generator=g),
              "attention_mask": torch.ones(batch_size, seq_length, dtype=torch.long)}
    out = []
    for model in models:
        model.eval()(**inputs)  # warm-up
    profiles: list[list] = [[] for _ in models]
    for _ in range(repeats):  # the models take turns, so that a busy machine slows them alike
        for model, record in zip(models, profiles):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model(**inputs)
            record.append(prof.key_averages())
    for record in profiles:
        groups: dict[str, float] = {}
        for averages in record:
            for evt in averages:
                groups[group_of(evt.key)] = groups.get(group_of(evt.key), 0.0) + evt.self_cpu_time_total / 1000.0
        per_pass = {k: v / repeats for k, v in sorted(groups.items())}
        out.append({"groups_ms": per_pass, "total_ms": sum(per_pass.values())})
    return out


def layer_shapes(model: torch.nn.Module, head_dim: int) -> dict:
    """Kept heads and neurons per layer and the hidden width of a BERT-family export, read from the output
    projections' input widths (a layer without heads has an ``EmptyAttention`` core but keeps its output projection)."""
    layers = model.base_model.encoder.layer
    return {"heads": [l.attention.output.dense.in_features // head_dim for l in layers],
            "neurons": [l.output.dense.in_features for l in layers],
            "hidden": model.base_model.embeddings.word_embeddings.embedding_dim}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(p, "apt", 5, "Profiled batch-32 passes per model.")
    args, found = parse_and_find(p)
    load_before, rows = os.getloadavg()[0], []
    for task, method, folder in found:
        dense, pruned = load_pair(folder)
        head_dim = dense.config.hidden_size // dense.config.num_attention_heads
        d, q = profile_ms([dense, pruned], 32, 128, args.repeats)
        ratio = {k: d["groups_ms"][k] / q["groups_ms"][k] for k in d["groups_ms"] if q["groups_ms"].get(k)}
        rows.append({"task": task, "method": method, "export": str(folder),
                     "density": apt_hf.count_params(pruned) / apt_hf.count_params(dense),
                     "dense": d, "pruned": q, "speedup_total": d["total_ms"] / q["total_ms"],
                     "speedup_by_group": ratio, "pruned_shapes": layer_shapes(pruned, head_dim)})
        print(f"{task} {method}: total {rows[-1]['speedup_total']:.2f}x; "
              + ", ".join(f"{k} {d['groups_ms'][k]:.0f}->{q['groups_ms'].get(k, 0):.0f} ms" for k in d["groups_ms"]),
              flush=True)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"export_profile_seed{args.seed}.json")
    meta = {"command": shlex.join(["python", "benchmarks/export_profile.py", *sys.argv[1:]]), "args": vars(args),
            "device": f"CPU, {os.cpu_count()} cores, {args.threads} torch thread(s)", "torch": torch.__version__,
            "batch": [32, 128], "load_average_1min_before_after": [load_before, os.getloadavg()[0]]}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
