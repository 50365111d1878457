"""Why self-distillation helps or hurts APT in a short run: one instrumented ``examples/run_glue.py`` job per variant.

At every evaluation of an APT run with self-distillation this records, next to the student's dev metric, the current
teacher's dev metric (the teacher's own forward pass over the dev set, masks bypassed, as in training), how often
student and teacher predict the same class, how many teacher refreshes happened so far, the kept density and
whether pruned blocks are held back. Variants change ``APTConfig`` fields (``--set field=value``, e.g. the teacher
choice ``teacher_refresh=eval`` or ``distill_layer_weight=0``) or run_glue flags (``--run_glue_args``).

One JSON file per (task, variant, seed) in ``benchmarks/results/distill_diagnosis/``; a file that exists is not run
again (rerun after an interruption to finish the rest). ``--table`` prints the Markdown summary of all files.

    python benchmarks/distill_diagnosis.py --variant paper                                  # SST-2, benchmark setting
    python benchmarks/distill_diagnosis.py --variant no_layer --set distill_layer_weight=0
    python benchmarks/distill_diagnosis.py --variant mu_half --set distill_mu_max=0.5      # mu's ramp capped
    python benchmarks/distill_diagnosis.py --task mrpc --train_rows 3668 --epochs 3 --max_length 128 --variant paper
    python benchmarks/distill_diagnosis.py --table
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "distill_diagnosis"
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "examples")]

import apt_hf  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from utils_glue import compute_metrics  # noqa: E402


def load_run_glue():
    spec = importlib.util.spec_from_file_location("run_glue_example", ROOT / "examples" / "run_glue.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class TeacherProbe(TrainerCallback):
    """At each evaluation while a teacher exists: the teacher's dev metric and its agreement with the student."""

    def __init__(self, trainer, task: str) -> None:
        self.trainer, self.task, self.records = trainer, task, []
        self.student_predictions = None

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        tr, distiller = self.trainer, self.trainer.distiller
        apt = apt_hf.find_apt_model(model)
        record = {"step": state.global_step, "student": metrics.get(f"eval_{tr.diag_metric}"),
                  "student_loss": metrics.get("eval_loss"), "refreshes": distiller.teacher.refreshes,
                  "density": apt.count_params() / apt.n_params, "held": tr.apt_callback.held is not None,
                  "distilling": distiller.active(state.global_step)}
        if distiller.enabled and distiller.teacher.ready and state.global_step < distiller.end:
            logits, labels = [], []
            for batch in tr.get_eval_dataloader():
                batch = tr._prepare_inputs(batch)
                labels.append(batch["labels"].cpu())
                logits.append(distiller.teacher.outputs(model, apt.masks, batch).logits.float().cpu())
            teacher = torch.cat(logits).numpy()
            gold = torch.cat(labels).numpy()
            record["teacher"] = compute_metrics(self.task, teacher, gold)[tr.diag_metric]
            student = self.student_predictions
            if student is not None and student.shape == teacher.shape:
                record["agreement"] = float((student.argmax(-1) == teacher.argmax(-1)).mean())
        self.records.append(record)
        return control


def instrumented_trainer(task: str, metric: str, probes: list):
    """An APTTrainer subclass that keeps the student's dev predictions and adds a TeacherProbe."""

    class Diagnosed(apt_hf.APTTrainer):
        diag_metric = metric

        def __init__(self, *args, **kwargs):
            compute = kwargs.get("compute_metrics")

            def keep(p):
                probe.student_predictions = np.asarray(p.predictions[0] if isinstance(p.predictions, tuple)
                                                       else p.predictions)
                return compute(p)

            kwargs["compute_metrics"] = keep
            super().__init__(*args, **kwargs)
            probe = TeacherProbe(self, task)
            probes.append(probe)
            self.add_callback(probe)

    return Diagnosed


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, text = item.partition("=")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


def run(args: argparse.Namespace) -> Path:
    path = OUT / f"{args.task}_{args.variant}_seed{args.seed}.json"
    if path.exists():
        print(f"exists, skipped: {path}")
        return path
    run_glue = load_run_glue()
    overrides = parse_set(args.set)
    build = run_glue.build_apt_config

    def build_with_overrides(*a, **kw):
        config = build(*a, **kw)
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise SystemExit(f"--set {key}: APTConfig has no such field")
            setattr(config, key, value)
        config.validate()
        return config

    run_glue.build_apt_config = build_with_overrides
    spec = run_glue.get_task_spec(args.task)
    probes: list[TeacherProbe] = []
    apt_hf.APTTrainer = instrumented_trainer(spec.name, spec.main_metric, probes)  # this process only
    work = ROOT / "runs" / "distill_diagnosis" / path.stem
    argv = ["--task_name", args.task, "--glue_dir", args.glue_dir, "--method", "apt",
            "--max_train_samples", str(args.train_rows),
            "--max_seq_length", str(args.max_length), "--per_device_train_batch_size", "32",
            "--per_device_eval_batch_size", "64", "--num_train_epochs", str(args.epochs), "--learning_rate", "5e-4",
            "--eval_strategy", "steps", "--eval_steps", str(args.eval_steps), "--logging_steps", "10",
            "--save_strategy", "no", "--report_to", "none", "--seed", str(args.seed), "--disable_tqdm", "True",
            "--target_sparsity", "0.6", "--output_dir", str(work), "--overwrite_export", "True",
            "--export_dir", str(work / "export"), "--speed_repeats", "0", *shlex.split(args.run_glue_args)]
    start = time.perf_counter()
    summary = run_glue.main(argv)
    history = summary["eval_history"]
    events = [h["step"] for h in summary["log_history"] if "apt/event" in h]
    final = [h["metric"] for h in history if h["step"] >= max(events)] if events else [h["metric"] for h in history]
    result = {
        "meta": {"command": shlex.join(["python", "benchmarks/distill_diagnosis.py", *sys.argv[1:]]),
                 "task": args.task, "variant": args.variant, "seed": args.seed, "overrides": overrides,
                 "run_glue_args": args.run_glue_args, "argv": argv, "wall_s": time.perf_counter() - start},
        "best_after_last_event": max(final), "final": summary["metric_value"], "metric": spec.main_metric,
        "final_accuracy": summary["eval_metrics"].get("eval_accuracy"), "density": summary["density"],
        "train_time_s": summary["train_time_s"], "events": events,
        "evaluations": probes[0].records if probes else [],
        "train_logs": [{k: v for k, v in h.items() if k in ("step", "loss", "apt/mu", "loss_task", "loss_pred",
                                                             "loss_layer", "learning_rate", "apt/density")}
                       for h in summary["log_history"] if "loss" in h],
    }
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}: best after last event {result['best_after_last_event']:.4f}, final {result['final']:.4f}")
    return path


def table() -> str:
    """One row per result file: best dev after the last event, final dev, refreshes, teacher metric at the end."""
    lines = ["| task | variant | seed | best after last event | final | final acc | teacher refreshes | last teacher "
             "metric | student-teacher agreement (last) | train s |", "|---" * 10 + "|"]
    for path in sorted(OUT.glob("*.json")):
        r = json.loads(path.read_text())
        ev = r["evaluations"]
        with_teacher = [e for e in ev if "teacher" in e]
        last = with_teacher[-1] if with_teacher else {}
        fa = r.get("final_accuracy")
        lines.append(f"| {r['meta']['task']} | {r['meta']['variant']} | {r['meta']['seed']} | "
                     f"{r['best_after_last_event']:.4f} | {r['final']:.4f} | {'' if fa is None else f'{fa:.4f}'} | "
                     f"{ev[-1]['refreshes'] if ev else 0} | {last.get('teacher', float('nan')):.4f} | "
                     f"{last.get('agreement', float('nan')):.3f} | {r['train_time_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="sst2")
    p.add_argument("--variant", default="paper", help="Name of the variant (part of the result file name).")
    p.add_argument("--glue_dir", default=str(ROOT.parent / "shared" / "data" / "glue"))
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--train_rows", type=int, default=6000)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--eval_steps", type=int, default=50)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="APTConfig field override.")
    p.add_argument("--run_glue_args", default="", help="Extra run_glue.py flags, e.g. \"--distill_end 0.85\".")
    p.add_argument("--table", action="store_true", help="Print the summary table of all result files and exit.")
    args = p.parse_args()
    if args.table:
        print(table())
        return
    run(args)


if __name__ == "__main__":
    main()
