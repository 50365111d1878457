"""Multi-process APT run used by tests/test_multiprocess.py (launch it with torchrun or accelerate launch).

    python -m torch.distributed.run --nproc_per_node 2 tests/mp_script.py OUT [--kind bert|gqa] [--grad-accum N]
        [--kurtosis] [--sparsity S] [--no-find-unused] [--stock-trainer]

Trains a tiny random model with :class:`apt_hf.APTTrainer` (``use_cpu=True``, gloo) for 45 optimizer steps with
pruning events at steps 13, 22, 31 and 40 (self-distillation on). Every rank writes ``OUT/rank<r>/event<step>.pt``
right after each event (masks and kept-index records, ranks, parameter shapes and values, salience EMAs, whether
the DDP wrapper covers exactly the module's trainable parameters), ``OUT/rank<r>/grads<step>.pt`` with the
synchronized gradients of the step after each event, and ``OUT/rank<r>/final.pt``. Rank 0 also exports the pruned
model to ``OUT/export`` and stores the trained model's logits on fixed inputs for the reload check.
``--stock-trainer`` uses ``transformers.Trainer`` + ``APTCallback`` instead, which must refuse to start under DDP.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peft  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402
from conftest import TokenTask, make_model  # noqa: E402
from transformers import TrainerCallback, TrainingArguments  # noqa: E402

import apt_hf  # noqa: E402
from apt_hf.callback import APTCallback  # noqa: E402

MAX_STEPS = 45
SCHEDULE = dict(pruning_start=5, pruning_end=40, sparsity_warmup=5, num_pruning_events=4, mask_decay_window=5,
                mask_decay=0.25)
EVENTS = (13, 22, 31, 40)


def snapshot(pm, trainer, collector) -> dict:
    apt = apt_hf.find_apt_model(pm)
    ddp = trainer.model_wrapped
    ddp_params = {id(p) for p in getattr(ddp, "_module_parameters", [])}
    ignored = set(getattr(pm, "_ddp_params_and_buffers_to_ignore", []))  # the distillation transform
    current = {id(p) for n, p in pm.named_parameters() if n not in ignored}
    return {
        "masks": {k: v.detach().clone() for k, v in apt.masks.state_dict().items()},
        "ranks": {n: l.r["default"] for n, l in apt.apt_layers().items()},
        "shapes": {n: tuple(p.shape) for n, p in pm.named_parameters()},
        "params": {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad},
        "salience": {k: [t.clone() for t in v] if isinstance(v, list) else v.clone()
                     for k, v in collector.state_dict().items()},
        "density": apt_hf.count_params(pm) / apt.n_params,
        "ddp_type": type(ddp).__name__,
        "ddp_covers_params": ddp_params == current,
        "ddp_ignored": sorted(ignored),
        "ddp_id": id(ddp),
    }


class Recorder(TrainerCallback):
    """Runs after APTCallback (it is passed after it): records each event and the gradients one step later."""

    def __init__(self, out: str, apt_cb: APTCallback) -> None:
        self.out, self.apt_cb, self.trainer = out, apt_cb, None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        step = state.global_step + 1
        if step - 1 in EVENTS:  # the first step on the new structure: were its gradients synchronized?
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                     if p.requires_grad and p.grad is not None}
            torch.save(grads, os.path.join(self.out, f"grads{step}.pt"))

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step in EVENTS:
            rec = snapshot(model, self.trainer, self.apt_cb.collector)
            rec["step"] = state.global_step
            torch.save(rec, os.path.join(self.out, f"event{state.global_step}.pt"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--kind", default="bert", choices=["bert", "gqa"])
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--kurtosis", action="store_true")
    parser.add_argument("--sparsity", type=float, default=0.6)
    parser.add_argument("--no-find-unused", action="store_true", help="ddp_find_unused_parameters=False")
    parser.add_argument("--stock-trainer", action="store_true")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()

    if opts.kind == "gqa":
        base = make_model("llama_cls", num_labels=2, num_key_value_heads=2)
    else:
        base = make_model("bert", num_labels=2, num_attention_heads=8, intermediate_size=96)
    cfg = apt_hf.APTConfig(task_type="SEQ_CLS", target_sparsity=opts.sparsity, use_kurtosis=opts.kurtosis, **SCHEDULE)
    pm = peft.get_peft_model(base, cfg)
    args = TrainingArguments(opts.out, per_device_train_batch_size=8, gradient_accumulation_steps=opts.grad_accum,
                             max_steps=MAX_STEPS, learning_rate=1e-3, logging_steps=5, report_to=[],
                             save_strategy="no", use_cpu=True, ddp_backend="gloo", disable_tqdm=True, seed=0,
                             ddp_find_unused_parameters=False if opts.no_find_unused else None)
    rank = args.process_index
    out = os.path.join(opts.out, f"rank{rank}")
    os.makedirs(out, exist_ok=True)
    apt_cb = APTCallback()
    rec = Recorder(out, apt_cb)
    trainer_cls = transformers.Trainer if opts.stock_trainer else apt_hf.APTTrainer
    trainer = trainer_cls(model=pm, args=args, train_dataset=TokenTask(), callbacks=[apt_cb, rec])
    rec.trainer = trainer
    trainer.train()

    final = snapshot(pm, trainer, apt_cb.collector)
    final.update(
        world_size=dist.get_world_size() if dist.is_initialized() else 1,
        global_step=trainer.state.global_step,
        events_done=apt_cb.events_done,
        losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
        target=1.0 - opts.sparsity,
        state_dict={k: v.detach().clone() for k, v in pm.state_dict().items()},
        finite=all(bool(torch.isfinite(p).all()) for p in pm.parameters()),
    )
    if rank == 0:
        inputs = TokenTask(n=6, seed=7)[:6]
        pm.eval()
        with torch.no_grad():
            final["logits"] = pm(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        final["inputs"] = {k: v for k, v in inputs.items() if k != "labels"}
        apt_hf.export_pruned(pm, os.path.join(opts.out, "export"))
    torch.save(final, os.path.join(out, "final.pt"))
    assert all(math.isfinite(x) for x in final["losses"])
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
