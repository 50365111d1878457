"""Render the committed benchmark results as the Markdown tables used in the README.

    python benchmarks/make_table.py            # prints Markdown to stdout
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def fmt(value, spec: str, none: str = "–") -> str:
    return none if value is None else format(value, spec)


def glue_table(path: Path) -> str:
    data = json.loads(path.read_text())
    meta, rows = data["meta"], data["table"]
    lines = [f"`{meta['command']}` — {meta['device']}, metric: dev {meta['metric']}", "",
             "| method | best dev | final dev | best / FT | train time (s) | time to 97% of FT (s) | peak RSS (MB) "
             "| density | throughput vs dense, b32x128 | b1x128 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {fmt(r['best_metric'], '.4f')} | {fmt(r['final_metric'], '.4f')} | "
                     f"{fmt(r['best_vs_ft'], '.3f')} | {fmt(r['train_time_s'], '.0f')} | "
                     f"{fmt(r['time_to_97pct_ft_s'], '.0f', 'not reached')} | {fmt(r['peak_rss_mb'], '.0f')} | "
                     f"{fmt(r['density'], '.3f')} | {speed(r['throughput_b32_vs_dense'])} | "
                     f"{speed(r['throughput_b1_vs_dense'])} |")
    return "\n".join(lines)


def speed(value) -> str:
    return "–" if value is None else f"{value:.2f}x"


def prune_table(path: Path) -> str:
    r = json.loads(path.read_text())
    return (f"all-MiniLM-L6-v2, SST-2 ({r['train_rows']} rows, batch {r['batch_size']} x {r['max_length']} tokens, "
            f"{r['max_steps']} steps, {r['trainer']}): density {r['final_density']:.4f} (target "
            f"{r['target_density']:.2f}); training step {r['step_time_before_first_event_s']:.2f} s before the first "
            f"event, {r['step_time_after_last_event_s']:.2f} s after the last ({r['speedup_after_pruning']:.2f}x); "
            f"peak RSS {r['peak_rss_mb']:.0f} MB.")


if __name__ == "__main__":
    for path in sorted(RESULTS.glob("glue_*.json")):
        print(glue_table(path), "\n")
    for path in sorted(RESULTS.glob("prune_minilm_sst2*.json")):
        print(f"- `{path.name}`: {prune_table(path)}")
