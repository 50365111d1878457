"""Dev-set evaluation in the file's order against evaluation in order of token count (what ``examples/run_glue.py``
does), with all-MiniLM-L6-v2 on real GLUE dev sets, one torch thread.

The Trainer evaluates in sequential batches padded to their longest row; sorted by length, a batch carries little
padding. Both orders run in one process, alternating, ``--repeats`` times per task; the figure is the ratio of the
median times. The logits of each row must be the same in both orders (the largest difference is reported), so the
metrics do not change. Output: ``benchmarks/results/eval_order.json``.

    python benchmarks/eval_order.py
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from utils_examples import minilm_path, sorted_by_length  # noqa: E402
from utils_glue import get_task_spec, load_glue_split  # noqa: E402


def logits_in_order(model, collator, rows: list[dict], batch_size: int) -> tuple[float, torch.Tensor]:
    """Seconds to run ``rows`` through ``model`` in sequential padded batches, and the logits in ``rows``' order."""
    start, out = time.perf_counter(), []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            out.append(model(**collator(rows[i:i + batch_size])).logits)
    return time.perf_counter() - start, torch.cat(out)


def padded_tokens(rows: list[dict], batch_size: int) -> int:
    """Tokens computed when ``rows`` go in sequential batches, each padded to its longest row."""
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    return sum(len(b) * max(len(r["input_ids"]) for r in b) for b in batches)


def measure(task: str, glue_dir: str, batch_size: int, max_length: int, repeats: int) -> dict:
    path = minilm_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    spec = get_task_spec(task)
    columns = ["sentence1", "sentence2"] if spec.is_pair else ["sentence1"]
    dev = load_glue_split(glue_dir, spec.name, "dev")
    dev = dev.map(lambda b: tokenizer(*(b[c] for c in columns), truncation=True, max_length=max_length),
                  batched=True, remove_columns=columns)
    dev = dev.add_column("row", list(range(len(dev))))
    ordered = sorted_by_length(dev)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in dev.column_names]
    plain, by_length = ([{k: ds[i][k] for k in keys} for i in range(len(ds))] for ds in (dev, ordered))
    position = ordered["row"]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=spec.num_labels).eval()
    collator = transformers.DataCollatorWithPadding(tokenizer)
    plain_s, sorted_s, diff = [], [], 0.0
    for _ in range(repeats):
        t, a = logits_in_order(model, collator, plain, batch_size)
        plain_s.append(t)
        t, b = logits_in_order(model, collator, by_length, batch_size)
        sorted_s.append(t)
        diff = max(diff, (a[position] - b).abs().max().item())
    return {"task": task, "rows": len(dev), "tokens": sum(len(r["input_ids"]) for r in plain),
            "padded_tokens_file_order": padded_tokens(plain, batch_size),
            "padded_tokens_sorted": padded_tokens(by_length, batch_size), "file_order_s": plain_s, "sorted_s": sorted_s,
            "speedup": statistics.median(plain_s) / statistics.median(sorted_s), "max_logit_diff": diff}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="sst2,mrpc,stsb")
    p.add_argument("--glue_dir", default=str(ROOT.parent / "shared" / "data" / "glue"))
    p.add_argument("--batch_size", type=int, default=64, help="The suite's --per_device_eval_batch_size.")
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_order.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    results = [measure(t, args.glue_dir, args.batch_size, args.max_length, args.repeats)
               for t in args.tasks.split(",")]
    for r in results:
        print(f"{r['task']}: {r['speedup']:.2f}x, padded tokens {r['padded_tokens_file_order']} -> "
              f"{r['padded_tokens_sorted']} ({r['tokens']} real), max logit difference {r['max_logit_diff']:.1e}")
    meta = {"command": shlex.join(["python", "benchmarks/eval_order.py", *sys.argv[1:]]), "args": vars(args),
            "device": "CPU, 1 torch thread (shared 2-core machine)", "torch": torch.__version__,
            "transformers": transformers.__version__}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
