"""Everything GPU-specific in one command: training steps, training memory, inference and APT's per-step overhead.

    python benchmarks/gpu_suite.py            # on a GPU: full shapes, at most ~8 minutes on an H200-class GPU
    python benchmarks/gpu_suite.py --tiny     # tiny shapes (the default without a GPU; tests/test_benchmarks_cpu.py)

Two models with random weights (no download): a RoBERTa-base-shaped classifier (12 layers, hidden 768, 12 heads,
FFN 3072) and a LLaMA-2-7B-shaped causal LM (32 layers, hidden 4096, 32 heads, FFN 11008, vocabulary 32000) in
bf16. For each:

- training step time (median of ``--steps`` timed steps after warm-up) and training memory for FT (RoBERTa only),
  PEFT LoRA and APT (adapters on the same modules, rank 8) before pruning (dense, salience and mask hooks on) and
  after pruning events to 70 % and then 40 % density (the callback's own events; ranks grow as in a run). RoBERTa
  keeps fp32 weights and runs under fp16 autocast with a grad scaler and under bf16 autocast (what
  ``TrainingArguments(fp16=True)`` / ``bf16=True`` do); the LLaMA-2-7B shape runs with bf16 weights under bf16
  autocast, and with its frozen weights cast to fp16 under fp16 autocast with a grad scaler (the adapters stay in
  fp32, as PEFT casts them).
- the seconds of each pruning event;
- APT's per-step overhead over LoRA at dense shapes: interleaved LoRA / APT steps, median of the per-round ratios;
- inference latency (median of ``--repeats`` forward passes) and memory at batch 128 x 128 (RoBERTa) and
  32 x 128 (LLaMA) for the dense model and the exported (merged, physically pruned) models at 70 % and 40 %.

Memory is ``torch.cuda.max_memory_allocated`` counted for the measured model alone: its parameters, buffers and
optimizer state plus the peak allocated above what was allocated before the measured steps (other models held by
the suite at the same time do not count). Off the GPU it is ``null``. Results go to one JSON file (written after
each section, with the device name); a section that would start after ``--budget_s`` is skipped and marked so.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before torch is imported

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

import apt_hf  # noqa: E402
from apt_hf.arch import spec_for  # noqa: E402

DENSITIES = (0.7, 0.4)


class Suite:
    """Shared settings, the clock against the time budget, and the result file."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        self.start = time.perf_counter()
        self.out = Path(args.out)
        self.result: dict = {"meta": {"command": shlex.join(["python", "benchmarks/gpu_suite.py", *sys.argv[1:]]),
                                      **harness.machine(device), "tiny": args.tiny, "budget_s": args.budget_s,
                                      "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats,
                                      "memory": "torch.cuda.max_memory_allocated of the measured model alone (MB)"}}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self) -> bool:
        return self.elapsed() > self.args.budget_s

    def save(self) -> None:
        self.result["meta"]["elapsed_s"] = self.elapsed()
        if not self.args.no_write:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(self.result, indent=2))

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {message}", flush=True)


def measure_training(suite: Suite, stepper: harness.Stepper, data: list[dict]) -> dict:
    """Median step time and the model's training memory over ``--steps`` steps after ``--warmup`` steps."""
    for i in range(suite.args.warmup):
        stepper.step(data[i % len(data)])
    device = suite.device
    harness.sync(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    harness.reset_peak(device)
    times = [stepper.timed_step(data[i % len(data)])[0] for i in range(suite.args.steps)]
    peak = harness.peak_mb(device)
    own = harness.static_bytes(stepper.model, stepper.optimizer) / 2 ** 20
    return {"step_s": statistics.median(times), "step_times_s": times,
            "max_memory_allocated_mb": None if peak is None else own + peak - before / 2 ** 20,
            "params": harness.n_params(stepper.model),
            "trainable_params": sum(p.numel() for p in stepper.model.parameters() if p.requires_grad),
            "trainable_dtype": str(next(p for p in stepper.model.parameters() if p.requires_grad).dtype)}


@torch.no_grad()
def measure_inference(suite: Suite, model: torch.nn.Module, batch: int, seq: int, precision: str) -> dict:
    """Median latency and memory of forward passes on a ``batch x seq`` batch of random tokens."""
    device = suite.device
    model.eval()
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    if spec_for(model.config).kind == "decoder":
        inputs["use_cache"] = False
    amp = harness.AMP[precision]
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        for _ in range(min(3, suite.args.repeats)):
            model(**inputs)
        harness.sync(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        harness.reset_peak(device)
        times = []
        for _ in range(suite.args.repeats):
            start = harness.now(device)
            model(**inputs)
            times.append(harness.now(device) - start)
    peak = harness.peak_mb(device)
    own = harness.static_bytes(model) / 2 ** 20
    return {"latency_ms": 1000 * statistics.median(times), "batch": batch, "seq": seq, "precision": precision,
            "max_memory_allocated_mb": None if peak is None else own + peak - before / 2 ** 20,
            "params": harness.n_params(model)}


def overhead(suite: Suite, lora: harness.Stepper, apt: harness.Stepper, data: list[dict]) -> dict:
    """APT (dense, hooks on, between events) over LoRA: interleaved steps, median of the per-round ratios."""
    times = harness.interleave({"lora": lora, "apt": apt}, data, suite.args.rounds)
    ratios = harness.per_round_ratio(times, "apt", "lora", "wall")
    return {"apt_vs_lora_step": statistics.median(ratios), "rounds": suite.args.rounds,
            "lora_step_s": statistics.median(times["lora"]["wall"]),
            "apt_step_s": statistics.median(times["apt"]["wall"])}


# ---------------------------------------------------------------------------------------------- models
def roberta(suite: Suite, method: str, weights: torch.dtype) -> harness.Stepper:
    shape = harness.TINY_ROBERTA if suite.args.tiny else harness.ROBERTA_BASE
    model = harness.random_model(harness.roberta_config(**shape), transformers.RobertaForSequenceClassification,
                                 suite.device, weights)
    return stepper_for(suite, model, method, "SEQ_CLS", precision=None)


def llama(suite: Suite, method: str) -> harness.Stepper:
    shape = harness.TINY_LLAMA if suite.args.tiny else harness.LLAMA_2_7B
    model = harness.random_model(harness.llama_config(**shape), transformers.LlamaForCausalLM, suite.device,
                                 torch.bfloat16)
    return stepper_for(suite, model, method, "CAUSAL_LM", precision="bf16")


def stepper_for(suite: Suite, model, method: str, task_type: str, precision: Optional[str]) -> harness.Stepper:
    lr = 5e-5 if method == "ft" else 5e-4
    if method == "apt":
        wrapped = harness.wrap(model, "apt", task_type, **harness.SCHEDULE, target_sparsity=0.6)
        stepper = harness.Stepper(wrapped, lr=lr, precision=precision or "fp32", callback=apt_hf.APTCallback(),
                                  max_steps=harness.LONG_RUN)
        stepper.state.global_step = harness.schedule_points(stepper.callback)["between"]
        return stepper
    return harness.Stepper(harness.wrap(model, method, task_type), lr=lr, precision=precision or "fp32")


def free() -> None:
    """Return the GPU memory of models the caller has deleted (reference cycles included)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def switch(stepper: harness.Stepper, precision: str, half_weights: bool) -> None:
    """Use ``precision`` for the next steps; with ``half_weights`` the frozen weights are cast to that half type
    too (a model loaded in bf16 or fp16; trainable parameters stay as they are)."""
    if half_weights:
        dtype = harness.AMP[precision]
        for p in stepper.model.parameters():
            if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
    stepper.precision = precision


def pruned_runs(suite: Suite, apt: harness.Stepper, data: list[dict], batch: int, seq: int, precisions: list[str],
                section: dict, half_weights: bool) -> None:
    """Prune the APT model to each density in turn (an event), measure its steps and its exported model."""
    train, infer, events = section["train"], section["inference"], section["events_s"]
    for density in DENSITIES:
        key = f"apt_{int(round(density * 100))}"
        switch(apt, precisions[0], half_weights)
        events[key] = harness.prune_with_event(apt, data[0], density)
        events[key + "_density"] = apt_hf.count_params(apt.model) / apt_hf.find_apt_model(apt.model).n_params
        for precision in precisions:
            switch(apt, precision, half_weights)
            train[precision][key] = measure_training(suite, apt, data)
        switch(apt, precisions[0], half_weights)
        exported = apt_hf.find_apt_model(apt.model).binarized_export_copy()
        for precision in infer:
            infer[precision][f"exported_{int(round(density * 100))}"] = measure_inference(
                suite, exported, batch, seq, precision)
        del exported
        free()
        suite.log(f"{key}: event {events[key]:.2f}s, " + ", ".join(
            f"{p} step {train[p][key]['step_s'] * 1000:.1f} ms" for p in precisions))


def run_roberta(suite: Suite) -> dict:
    tiny = suite.args.tiny
    config = harness.roberta_config(**(harness.TINY_ROBERTA if tiny else harness.ROBERTA_BASE))
    batch, seq = (4, 16) if tiny else (32, 128)
    infer_batch = (8, 16) if tiny else (128, 128)
    data = harness.batches(config, False, batch, seq, 2, suite.device)
    precisions = ["fp16", "bf16"]
    section: dict = {"shape": "tiny" if tiny else "roberta-base", "train_batch": [batch, seq], "weights": "fp32",
                     "train": {p: {} for p in precisions}, "overhead": {}, "events_s": {},
                     "inference": {p: {} for p in ("fp32", "bf16")}}
    ft = roberta(suite, "ft", torch.float32)
    for precision in precisions:
        ft.precision = precision
        section["train"][precision]["ft"] = measure_training(suite, ft, data)
    for precision in section["inference"]:
        section["inference"][precision]["dense"] = measure_inference(suite, ft.model, *infer_batch, precision)
    del ft
    free()
    lora, apt = roberta(suite, "lora", torch.float32), roberta(suite, "apt", torch.float32)
    for precision in precisions:
        lora.precision = apt.precision = precision
        section["train"][precision]["lora"] = measure_training(suite, lora, data)
        section["train"][precision]["apt_dense"] = measure_training(suite, apt, data)
        section["overhead"][precision] = overhead(suite, lora, apt, data)
    del lora
    free()
    suite.log("roberta dense: " + json.dumps({p: round(section["overhead"][p]["apt_vs_lora_step"], 3)
                                              for p in precisions}))
    pruned_runs(suite, apt, data, *infer_batch, precisions, section, half_weights=False)
    del apt
    free()
    return section


def run_llama(suite: Suite) -> dict:
    tiny = suite.args.tiny
    config = harness.llama_config(**(harness.TINY_LLAMA if tiny else harness.LLAMA_2_7B))
    batch, seq = (2, 16) if tiny else (4, 512)
    infer_batch = (4, 16) if tiny else (32, 128)
    data = harness.batches(config, True, batch, seq, 2, suite.device)
    precisions = ["bf16", "fp16"]
    section: dict = {"shape": "tiny" if tiny else "llama-2-7b", "train_batch": [batch, seq],
                     "weights": "bf16 (frozen weights cast to fp16 for the fp16 runs)",
                     "train": {p: {} for p in precisions}, "overhead": {}, "events_s": {}, "inference": {"bf16": {}}}
    lora = llama(suite, "lora")
    apt = llama(suite, "apt")
    for precision in precisions:
        switch(lora, precision, half_weights=True)
        switch(apt, precision, half_weights=True)
        section["train"][precision]["lora"] = measure_training(suite, lora, data)
        section["train"][precision]["apt_dense"] = measure_training(suite, apt, data)
        section["overhead"][precision] = overhead(suite, lora, apt, data)
        suite.log(f"llama {precision}: lora step {section['train'][precision]['lora']['step_s'] * 1000:.1f} ms, "
                  f"apt {section['train'][precision]['apt_dense']['step_s'] * 1000:.1f} ms, "
                  f"overhead {section['overhead'][precision]['apt_vs_lora_step']:.3f}")
    switch(lora, "bf16", half_weights=True)
    dense = lora.model.merge_and_unload()
    del lora
    free()
    section["inference"]["bf16"]["dense"] = measure_inference(suite, dense, *infer_batch, "bf16")
    del dense
    free()
    pruned_runs(suite, apt, data, *infer_batch, precisions, section, half_weights=True)
    del apt
    free()
    return section


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes (automatic without a GPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per configuration (3; tiny: 1)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per configuration (5; tiny: 2)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved LoRA / APT rounds (10; tiny: 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed forward passes per inference (10; tiny: 2)")
    p.add_argument("--budget_s", type=float, default=420.0, help="no section starts after this many seconds")
    p.add_argument("--sections", default="roberta,llama")
    p.add_argument("--out", default=None, help="default: benchmarks/results/gpu_suite.json (gpu_suite_tiny.json)")
    p.add_argument("--no_write", action="store_true")
    args = p.parse_args(argv)
    device = harness.pick_device(args.device)
    args.tiny = args.tiny or device.type != "cuda"
    for name, full, small in (("warmup", 3, 1), ("steps", 5, 2), ("rounds", 10, 2), ("repeats", 10, 2)):
        if getattr(args, name) is None:
            setattr(args, name, small if args.tiny else full)
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes: more threads only wait for each other on a shared CPU
    args.out = args.out or str(harness.RESULTS / ("gpu_suite_tiny.json" if args.tiny else "gpu_suite.json"))
    suite = Suite(args, device)
    suite.log(f"device: {suite.result['meta']['device']}")
    for name, fn in (("roberta", run_roberta), ("llama", run_llama)):
        if name not in args.sections.split(","):
            continue
        if suite.over_budget():
            suite.result[name] = {"skipped": f"time budget of {args.budget_s:.0f}s used up"}
        else:
            suite.result[name] = fn(suite)
        suite.save()
    suite.log("done")
    return suite.result


if __name__ == "__main__":
    main()
