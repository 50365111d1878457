"""The paper-shaped GLUE benchmark (issue 13, section 3): five tasks, three seeds, resumable.

SST-2 on its full training set and MRPC, RTE, STS-B and CoLA, with all-MiniLM-L6-v2 at 60 % sparsity. FT, LoRA,
APT and APT w/o D_S run at seeds 42, 43 and 44; LoRA+Prune, APT w/o A_T and APT w/o A_P at seed 42, and on the
selection tasks SST-2 and MRPC also the candidates for APT's defaults (``SELECTION``). Every run goes
through ``examples/run_glue.py`` in its own process (:func:`glue_benchmark.run_method`), with the same flags for
every task except the per-task rows below (``TASKS``), and ``--train_sampling_strategy group_by_length`` (batches
of similar lengths, so little padding is computed; the same for every method).

One result file per (task, method, seed), ``benchmarks/results/suite/<task>/<method>_seed<seed>.json``; a run whose
file exists is skipped, so an interrupted benchmark is finished by running the same command again. After every run
the per-(task, seed) table ``benchmarks/results/glue_<task>_suite_seed<seed>.{json,csv}`` (the format of
``glue_benchmark.py``: best dev metric after the last pruning event, final dev metric, ratio to FT, time to 97 % of
FT, peak RSS before the export, exported-model throughput at batch 32 x 128 and 1 x 128) and its plots are
rewritten; ``python benchmarks/make_table.py`` renders the means over seeds.

    python benchmarks/glue_suite.py --estimate            # planned runs and estimated CPU time, runs nothing
    python benchmarks/glue_suite.py                       # everything (resumable)
    python benchmarks/glue_suite.py --tasks sst2,mrpc     # the tasks on which settings may be chosen
    python benchmarks/glue_suite.py --tasks rte,stsb,cola # confirmation tasks, settings unchanged
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import glue_benchmark as gb

ROOT = gb.ROOT
SUITE = gb.RESULTS / "suite"
# apt_spec_teacher: APT as spec F.1 distils (from a teacher whatever it answers), the default of the runs before
# skip_constant_teacher was chosen; kept at every seed beside APT so the choice is seen on the confirmation tasks too.
MAIN_METHODS = ("ft", "lora", "apt", "apt_wo_DS", "apt_spec_teacher")
ABLATIONS = ("lora_prune", "apt_wo_AT", "apt_wo_AP")
SEEDS = (42, 43, 44)
ABLATION_SEED = 42
# Settings are chosen on these tasks only (issue 13's protocol); there, at the ablation seed, APT also runs with each
# candidate setting, so that a default is chosen on evidence from these two tasks. Each candidate's rule was fixed
# before its runs (README): the recovery learning rate 1.0 replaces spec F.2's 0.1 if it gives the higher best dev
# metric after the last pruning event on both tasks (it did); mu's cap 0.5 (``apt_mu_half``) becomes the default of
# ``APTConfig.distill_mu_max`` if it beats ``apt`` in the same way on both tasks (it lost on SST-2); the teacher
# refreshed at every better evaluation (``apt_teacher_eval``) makes ``"eval"`` the default of
# ``APTConfig.teacher_refresh`` under the same rule, otherwise spec F.1's ``"window"`` stays (it lost on MRPC). No
# distillation from a teacher that gives the batch one answer (``apt_skip_constant``) makes
# ``APTConfig.skip_constant_teacher`` default to True under the same rule (rule fixed before its runs; it lost:
# never acting on SST-2, it tied there). Its second rule, fixed before its seed-43 runs, is one for an option that
# acts only where the teacher is constant: it becomes the default if at seed 43 it is not lower than ``apt`` on either
# selection task and higher on at least one (``SELECTION_SEEDS``). It won (SST-2 tied, never acting; MRPC higher), so
# ``apt`` now runs with it; the earlier ``apt`` runs are ``apt_spec_teacher``'s.
SELECTION_TASKS = ("sst2", "mrpc")
SELECTION = ("apt_recovery_lr01", "apt_recovery_lr1", "apt_mu_half", "apt_teacher_eval", "apt_skip_constant")
SELECTION_SEEDS = {m: (ABLATION_SEED,) for m in SELECTION} | {"apt_skip_constant": (ABLATION_SEED, 43)}
ALL_METHODS = MAIN_METHODS + ABLATIONS + SELECTION
COMMON_FLAGS = "--train_sampling_strategy group_by_length"

# Per task: training rows (None: the whole training set), epochs, max tokens, evaluation interval (optimizer steps,
# about 20 evaluations per run) and, for --estimate only, the mean padded length of a batch of 32 drawn by
# transformers' LengthGroupedSampler (group_by_length sampling), measured on the training set with the MiniLM
# tokenizer (random batches: SST-2 40.1, MRPC 80.1, RTE 127.9, STS-B 69.5, CoLA 23.1 tokens).
TASKS: dict[str, dict] = {
    "sst2": dict(train_rows=None, epochs=1.0, max_length=64, eval_steps=100, batch_tokens=14.0),
    "mrpc": dict(train_rows=None, epochs=5.0, max_length=128, eval_steps=30, batch_tokens=55.1),
    "rte": dict(train_rows=None, epochs=5.0, max_length=128, eval_steps=20, batch_tokens=70.2),
    "stsb": dict(train_rows=None, epochs=3.0, max_length=128, eval_steps=27, batch_tokens=29.3),
    "cola": dict(train_rows=None, epochs=3.0, max_length=64, eval_steps=40, batch_tokens=11.8),
}
TRAIN_ROWS = {"sst2": 67349, "mrpc": 3668, "rte": 2490, "stsb": 5749, "cola": 8551}

def planned_runs(tasks: list[str], seeds: tuple[int, ...] = SEEDS) -> list[tuple[str, int, str]]:
    """(task, seed, method) in the order they run: per task, per seed, FT first (the others are scored against it)."""
    return [(task, seed, method) for task in tasks for seed in seeds
            for method in MAIN_METHODS + (ABLATIONS if seed == ABLATION_SEED else ())
            + tuple(m for m in SELECTION if seed in SELECTION_SEEDS[m] and task in SELECTION_TASKS)]


def train_rows_of(task: str) -> int:
    """Training rows of a task's runs (the whole training set when its plan names none)."""
    plan = TASKS[task]
    return TRAIN_ROWS[task] if plan["train_rows"] is None else min(plan["train_rows"], TRAIN_ROWS[task])


def steps_of(task: str, plan: dict, batch_size: int) -> int:
    return int(-(-train_rows_of(task) // batch_size) * plan["epochs"])


# --estimate is calibrated on the suite's own finished runs (one torch thread per process, the suite's flags): a
# task's FT seconds per optimizer step where its FT run exists, otherwise a line through the measured tasks' FT step
# times against their mean padded batch length; every method's step time relative to FT at the same (task, seed);
# the per-run overhead (loading, evaluations, export, throughput timing) as process wall time minus training time.
# Before two tasks' FT runs exist it falls back to the short committed benchmark files in CALIBRATION (their random
# batches average 40.1 and 80.1 padded tokens); those ran without a thread limit, so they underestimate a suite run.
CALIBRATION = {"glue_sst2.json": 40.1, "glue_mrpc.json": 80.1}


def _suite_runs() -> dict[tuple[str, int], dict[str, dict]]:
    """The finished suite runs: (task, seed) -> method -> run summary."""
    found: dict[tuple[str, int], dict[str, dict]] = {}
    for path in sorted(SUITE.glob("*/*_seed*.json")):
        method, seed = path.stem.rsplit("_seed", 1)
        found.setdefault((path.parent.name, int(seed)), {})[method] = json.loads(path.read_text())["run"]
    return found


def calibration() -> tuple[dict[str, float], dict[str, float], float, str]:
    """(FT s/step per task, step time per method relative to FT, overhead s per run, source of the figures)."""
    per_step = lambda run: run["train_time_s"] / run["optimizer_steps"]  # noqa: E731

    def collect(groups) -> tuple[dict, dict, list]:
        ft, factors, overheads = {}, {}, []
        for key, runs in groups:
            if "ft" not in runs:
                continue
            ft.setdefault(key, []).append(per_step(runs["ft"]))
            for method, run in runs.items():
                factors.setdefault(method, []).append(per_step(run) / per_step(runs["ft"]))
                overheads.append(run["process_wall_s"] - run["train_time_s"])
        return {k: sum(v) / len(v) for k, v in ft.items()}, {m: sum(v) / len(v) for m, v in factors.items()}, overheads

    short = [(CALIBRATION[name], json.loads((gb.RESULTS / name).read_text())["runs"]) for name in CALIBRATION]
    short_ft, factors, overheads = collect(short)
    suite_ft, suite_factors, suite_overheads = collect(
        (task, runs) for (task, _), runs in _suite_runs().items() if task in TASKS)
    factors.update(suite_factors)  # methods the suite has not run yet keep the short benchmark's ratio
    if len(suite_ft) >= 2:
        source = "the suite's finished runs (FT measured on " + ", ".join(sorted(suite_ft)) + ")"
        points = sorted((TASKS[t]["batch_tokens"], v) for t, v in suite_ft.items())
        overheads = suite_overheads
    else:
        source = "the short benchmark files " + ", ".join(CALIBRATION) + " (no thread limit: an underestimate)"
        points, suite_ft = sorted(short_ft.items()), {}
    (x0, y0), (x1, y1) = points[0], points[-1]  # the line through the shortest and longest measured batches
    slope = (y1 - y0) / (x1 - x0) if x1 != x0 else 0.0
    ft = {t: suite_ft.get(t, y0 + slope * (plan["batch_tokens"] - x0)) for t, plan in TASKS.items()}
    return ft, factors, sum(overheads) / len(overheads), source


def estimate(tasks: list[str], batch_size: int, epochs: float | None = None) -> str:
    ft, factor, overhead, source = calibration()
    fallback = factor.get("apt", 1.0)  # a method not measured yet: APT's step time
    lines = [f"calibrated on {source}; step time / FT: " + ", ".join(f"{m} {v:.2f}" for m, v in factor.items())
             + f"; overhead {overhead:.0f} s per run", "",
             "| task | rows x epochs | steps | FT s/step | runs | est. CPU time (h) |", "|---|---|---|---|---|---|"]
    total = 0.0
    for task in tasks:
        plan = plan_of(task, epochs)
        steps = steps_of(task, plan, batch_size)
        runs = [m for t, _, m in planned_runs([task])]
        seconds = sum(steps * ft[task] * factor.get(m, fallback) + overhead for m in runs)
        total += seconds
        lines.append(f"| {task} | {train_rows_of(task)} x {plan['epochs']:g} | {steps} | "
                     f"{ft[task]:.2f} | {len(runs)} | {seconds / 3600:.2f} |")
    lines.append(f"| all | | | | {len(planned_runs(tasks))} | {total / 3600:.2f} |")
    return "\n".join(lines)


def plan_of(task: str, epochs: float | None = None) -> dict:
    """A task's plan (``TASKS``), or with ``epochs`` a longer (or shorter) run of it whose evaluation interval is
    scaled with the run, so it keeps about 20 evaluations."""
    plan = dict(TASKS[task])
    if epochs is not None and epochs != plan["epochs"]:
        plan["eval_steps"] = max(1, round(plan["eval_steps"] * epochs / plan["epochs"]))
        plan["epochs"] = epochs
    return plan


def variant(task: str, epochs: float | None = None, tag: str | None = None) -> str:
    """Folder and table name of a task's runs: the task itself for its planned epochs, else e.g. ``cola_10ep``; a
    ``--tag`` (APT methods with extra flags, a diagnostic) adds ``_<tag>``, e.g. ``cola_gate005``."""
    name = task if epochs is None or epochs == TASKS[task]["epochs"] else f"{task}_{epochs:g}ep"
    return f"{name}_{tag}" if tag else name


def run_args(task: str, seed: int, args: argparse.Namespace) -> argparse.Namespace:
    """The ``glue_benchmark.run_method`` arguments of one run."""
    plan = plan_of(task, args.epochs)
    return argparse.Namespace(
        task=task, glue_dir=args.glue_dir, train_rows=plan["train_rows"] or 10**9, epochs=plan["epochs"],
        batch_size=args.batch_size, max_length=plan["max_length"], eval_steps=plan["eval_steps"], ft_lr=args.ft_lr,
        adapter_lr=args.adapter_lr, target_sparsity=args.target_sparsity, speed_repeats=args.speed_repeats,
        seed=seed, apt_args=args.apt_args, run_glue_args=COMMON_FLAGS, malloc_mmap_threshold=0)


def result_path(task: str, method: str, seed: int, epochs: float | None = None, tag: str | None = None) -> Path:
    """A run's result file; under a tag only the APT methods have their own, the others are the untagged runs."""
    return SUITE / variant(task, epochs, tag if gb.is_apt(method) else None) / f"{method}_seed{seed}.json"


def majority_share(task: str, glue_dir: str) -> float | None:
    """Dev-set share of the most frequent class (the accuracy of a constant model); None for regression."""
    sys.path.insert(0, str(ROOT / "examples"))
    from utils_glue import get_task_spec, load_glue_split

    spec = get_task_spec(task)
    if spec.is_regression:
        return None
    labels = list(load_glue_split(glue_dir, spec.name, "dev")["label"])
    return max(labels.count(v) for v in set(labels)) / len(labels)


def write_table(task: str, seed: int, args: argparse.Namespace, command: str | None = None) -> None:
    """The per-(task, seed) table in glue_benchmark's format, from the result files present; ``command`` (default:
    this process's) is the one recorded as the table's source."""
    runs, epochs = {}, args.epochs
    for method in ALL_METHODS:
        path = result_path(task, method, seed, epochs, args.tag)
        if path.exists():
            runs[method] = json.loads(path.read_text())["run"]
    if "ft" not in runs:
        return
    command = command or shlex.join(["python", "benchmarks/glue_suite.py", *sys.argv[1:]])
    meta = {"task": task, "command": command,
            "args": {**vars(run_args(task, seed, args)), "train_rows": train_rows_of(task), "suite": True},
            "device": "CPU, 2 cores (shared machine)",
            "metric": runs["ft"]["metric"], "majority_share": majority_share(task, args.glue_dir)}
    gb.save(gb.RESULTS / f"glue_{variant(task, epochs, args.tag)}_suite_seed{seed}", meta, runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--glue_dir", default=str(ROOT.parent / "shared" / "data" / "glue"))
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--ft_lr", type=float, default=5e-5)
    p.add_argument("--adapter_lr", type=float, default=5e-4)
    p.add_argument("--target_sparsity", type=float, default=0.6)
    p.add_argument("--speed_repeats", type=int, default=10)
    p.add_argument("--apt_args", default="", help="Extra run_glue.py flags for the APT methods (same on every task).")
    p.add_argument("--out", default=str(ROOT / "runs" / "suite"), help="Working folder of the runs.")
    p.add_argument("--methods", default=None, help="Only these planned methods (comma-separated), e.g. to run the "
                   "main comparison first; a later run without it completes the plan.")
    p.add_argument("--epochs", type=float, default=None, help="Train the tasks for this many epochs instead of their "
                   "plan's (evaluation interval scaled to match); results go to <task>_<N>ep, apart from the plan's.")
    p.add_argument("--tag", default=None, help="Run only the APT methods, with --apt_args, into <task>_<tag> and its "
                   "own table (a diagnostic apart from the plan's results); the plan's FT and LoRA runs are its "
                   "reference.")
    p.add_argument("--estimate", action="store_true", help="Print the planned runs' estimated CPU time and exit.")
    p.add_argument("--tables", action="store_true", help="Rewrite the per-(task, seed) tables of --tasks and --seeds "
                   "from the result files present (e.g. after results were added by hand) and exit; runs nothing.")
    args = p.parse_args()
    if args.tag is not None and (not args.apt_args or not args.tag.replace("_", "").isalnum()
                                 or args.tag != args.tag.lower()):
        p.error(f"--tag {args.tag!r} needs --apt_args (the flags that set the tagged runs apart) and a name of "
                "lower-case letters, digits and _")
    tasks = args.tasks.split(",")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        p.error(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    seeds = tuple(int(s) for s in args.seeds.split(","))
    methods = None if args.methods is None else set(args.methods.split(","))
    if methods is not None and methods - set(ALL_METHODS):
        p.error(f"unknown method(s) {sorted(methods - set(ALL_METHODS))}; choose from {list(ALL_METHODS)}")
    if args.estimate:
        print(estimate(tasks, args.batch_size, args.epochs))
        return
    if args.tables:
        for task in tasks:
            for seed in seeds:
                flags = ["--tasks", task, "--seeds", str(seed)]
                flags += ["--epochs", f"{args.epochs:g}"] if args.epochs else []
                flags += ["--apt_args", args.apt_args, "--tag", args.tag] if args.tag else []
                write_table(task, seed, args, command=shlex.join(["python", "benchmarks/glue_suite.py", *flags]))
        return
    plan = planned_runs(tasks, seeds)
    if methods is not None and methods - {m for _, _, m in plan}:
        p.error(f"method(s) {sorted(methods - {m for _, _, m in plan})} are not planned for tasks {tasks} at seeds "
                f"{list(seeds)} (ablations run at seed {ABLATION_SEED}, the selection candidates at the seeds of "
                f"SELECTION_SEEDS and on {', '.join(SELECTION_TASKS)} only)")
    for task, seed, method in plan:
        if (methods is not None and method not in methods) or (args.tag is not None and not gb.is_apt(method)):
            continue
        path = result_path(task, method, seed, args.epochs, args.tag)
        if path.exists():
            print(f"== {task} {method} seed {seed}: done ({path})", flush=True)
            continue
        print(f"== {task} {method} seed {seed}", flush=True)
        out = Path(args.out) / variant(task, args.epochs, args.tag) / f"seed{seed}"
        out.mkdir(parents=True, exist_ok=True)
        run = gb.run_method(method, run_args(task, seed, args), out)
        run = {k: v for k, v in run.items() if k != "eval_metrics"}
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": shlex.join(["python", "benchmarks/glue_suite.py", *sys.argv[1:]]), "task": task,
                "method": method, "seed": seed, "args": vars(run_args(task, seed, args))}
        path.write_text(json.dumps({"meta": meta, "run": run}, indent=1))
        write_table(task, seed, args)


if __name__ == "__main__":
    main()
