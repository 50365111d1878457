"""What APT reports, and where (issue 16, item 5): ``apt/*`` figures reach the ``report_to`` integrations (read back
from TensorBoard's event files) with a stock ``Trainer`` + ``APTCallback`` and with ``APTTrainer``; evaluation
results are not padded with them; routine events log at INFO; a stock Trainer says that distillation needs
``APTTrainer``."""

from __future__ import annotations

import logging

import peft
import pytest
from conftest import TokenTask, make_model
from transformers import Trainer, TrainerCallback, TrainingArguments

import apt_hf

pytest.importorskip("tensorboard")
SCHEDULE = dict(pruning_start=2, pruning_end=10, sparsity_warmup=0, num_pruning_events=2, mask_decay_window=2)
STEPS = 12


def train(tmp_path, trainer_cls, distillation: bool, callbacks=(), report_to=("tensorboard",)):
    model = make_model("bert", num_labels=2, num_attention_heads=8, intermediate_size=96)
    pm = peft.get_peft_model(model, apt_hf.APTConfig(task_type="SEQ_CLS", distillation=distillation, **SCHEDULE))
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=8, max_steps=STEPS, learning_rate=1e-3,
                             logging_steps=2, report_to=list(report_to), save_strategy="no", use_cpu=True,
                             disable_tqdm=True, seed=0)
    callbacks = list(callbacks) + ([apt_hf.APTCallback()] if trainer_cls is Trainer else [])
    trainer = trainer_cls(model=pm, args=args, train_dataset=TokenTask(64), eval_dataset=TokenTask(16, seed=1),
                          callbacks=callbacks)
    trainer.train()
    return trainer


def tensorboard_scalars(folder) -> dict[str, list[int]]:
    """Tag -> steps of every scalar in the TensorBoard event files under ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[int]] = {}
    for events in folder.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, []).extend(e.step for e in acc.Scalars(tag))
    return found


@pytest.mark.parametrize("trainer_cls, distillation", [(Trainer, False), (apt_hf.APTTrainer, True)],
                         ids=["Trainer+APTCallback", "APTTrainer"])
def test_apt_figures_reach_tensorboard(tmp_path, trainer_cls, distillation):
    trainer = train(tmp_path, trainer_cls, distillation)
    scalars = tensorboard_scalars(tmp_path)
    for name in ("density", "target_density", "params", "heads", "neurons", "mean_rank", "adapter_params"):
        assert sorted(set(scalars.get(f"train/apt/{name}", []))) == list(range(2, STEPS + 1, 2)), (name, scalars)
    assert set(scalars["train/apt/event"]) == {6, 10}  # the events' own logs
    if distillation:
        assert "train/apt/mu" in scalars and "train/loss_pred" in scalars
    # TensorBoard logs what state.log_history records
    last = [h for h in trainer.state.log_history if "loss" in h][-1]
    assert last["apt/density"] == pytest.approx(apt_hf.count_params(trainer.model) /
                                                apt_hf.find_apt_model(trainer.model).n_params)


class Order(TrainerCallback):
    """Records the order in which callbacks see each step's end (user callbacks keep their order)."""

    def __init__(self, name: str, seen: list) -> None:
        self.name, self.seen = name, seen

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.seen.append(self.name)


def test_only_the_integrations_move(tmp_path):
    seen: list[str] = []
    model = make_model("bert", num_labels=2, num_attention_heads=8, intermediate_size=96)
    pm = peft.get_peft_model(model, apt_hf.APTConfig(task_type="SEQ_CLS", distillation=False, **SCHEDULE))
    apt_cb = apt_hf.APTCallback()
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=8, max_steps=STEPS, report_to=["tensorboard"],
                             save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=pm, args=args, train_dataset=TokenTask(16),
                      callbacks=[Order("before", seen), apt_cb, Order("after", seen)])
    trainer.train()
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names.index("APTCallback") < names.index("TensorBoardCallback")
    assert names.index("Order") < names.index("APTCallback")  # the user's own order is kept
    assert seen == ["before", "after"]


@pytest.mark.parametrize("trainer_cls", [Trainer, apt_hf.APTTrainer], ids=["Trainer+APTCallback", "APTTrainer"])
def test_evaluation_results_are_not_padded(tmp_path, trainer_cls):
    trainer = train(tmp_path, trainer_cls, distillation=False, report_to=())
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and not any(k.startswith("apt/") for k in metrics), metrics
    eval_logs = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert eval_logs and not any(k.startswith("apt/") for h in eval_logs for k in h)
    train_logs = [h for h in trainer.state.log_history if "loss" in h or "train_loss" in h]
    assert all("apt/density" in h for h in train_logs)


def test_events_log_at_info_and_stock_trainer_warns_about_distillation(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="apt_hf"):
        train(tmp_path, Trainer, distillation=True, report_to=())
    events = [r for r in caplog.records if r.getMessage().startswith("APT event")]
    assert len(events) == 2 and all(r.levelno == logging.INFO for r in events)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "self-distillation needs apt_hf.APTTrainer" in warnings[0], warnings


def test_apt_trainer_distils_without_that_warning(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="apt_hf"):
        trainer = train(tmp_path, apt_hf.APTTrainer, distillation=True, report_to=())
    assert not any("needs apt_hf.APTTrainer" in r.getMessage() for r in caplog.records)
    routine = [r for r in caplog.records if r.getMessage().startswith(("APT event", "APT: held-back",
                                                                        "APT distillation: teacher refreshed",
                                                                        "APT distillation ended"))]
    assert trainer.distiller.enabled and len(routine) >= 4 and all(r.levelno == logging.INFO for r in routine)
