"""Exact resume of APT training from a checkpoint (USERS.md item 7; spec K.4-K.7).

One uninterrupted reference run (module-scoped) is compared with runs that a FRESH trainer and a FRESH model resume
from a checkpoint written at a chosen step of a second, identical run. The resumed run must end with the same masks,
ranks, parameter count, APT salience state and weights (max abs diff <= 1e-6) as the uninterrupted one.

Schedule (optimizer steps, 70 in all): pruning window [5, 40], warm-up 5, events at 13, 22, 31, 40, mask-decay
windows 8-12, 17-21, 26-30, 35-39 (mask step 0.25, so masks are fractional inside a window), distillation from step
14 to 60 with teacher refreshes at the window starts 8, 17, 26, 35 (the teacher moves into its own copy of the model
at the last event, 40), then fine-tuning at 0.1x learning rate.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import peft
import pytest
import torch
import transformers
from conftest import make_config
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

import apt_hf
from apt_hf import checkpoint
from apt_hf.callback import APTCallback

MAX_STEPS = 70
R = 8
SCHEDULE = dict(pruning_start=5, pruning_end=40, sparsity_warmup=5, num_pruning_events=4, mask_decay_window=5,
                mask_decay=0.25)
EVENTS = (13, 22, 31, 40)
DISTILL = (14, 60)
TOL = 1e-6

# name -> checkpoint step
CASES = {
    "decay_window": 10,  # masks fractional, nothing removed yet, before distillation
    "after_event": 13,  # first event: blocks zero-masked but held (distillation), ranks grown, teacher taken at 8
    "window_in_distill": 19,  # fractional masks on a model pruned physically at the refresh of step 17
    "distill": 33,  # after the third event (held), teacher refreshed at 26 on the physically pruned model
    "after_last_event": 45,  # teacher detached into its own copy at the last event (40), student pruned physically
    "after_distill": 62,  # inside the fresh post-distillation LR schedule (0.1x peak) that starts after step 60
}


# ================================================================================================ helpers
class TokenTask(torch.utils.data.Dataset):
    """Sequence classification (label = first token > 50) or causal LM (labels = inputs) on random tokens."""

    def __init__(self, n: int = 256, seq_len: int = 12, vocab: int = 100, lm: bool = False) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(3, vocab, (n, seq_len), generator=g)
        self.labels = self.ids.clone() if lm else (self.ids[:, 0] > 50).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def bert_model(distillation: bool = True, **overrides) -> peft.PeftModel:
    torch.manual_seed(0)
    fields = dict(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                  num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    fields.update(overrides)
    cfg = apt_hf.APTConfig(task_type="SEQ_CLS", r=R, distillation=distillation, distill_end=DISTILL[1], **SCHEDULE)
    return peft.get_peft_model(BertForSequenceClassification(BertConfig(**fields)), cfg)


def llama_model() -> peft.PeftModel:
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(make_config("llama_gqa"))  # 8 query heads in 2 key/value groups
    cfg = apt_hf.APTConfig(task_type="CAUSAL_LM", r=R, distill_end=DISTILL[1], **SCHEDULE)
    return peft.get_peft_model(base, cfg)


def make_args(out, **kw) -> TrainingArguments:
    fields = dict(per_device_train_batch_size=8, max_steps=MAX_STEPS, learning_rate=1e-3, logging_steps=10,
                  report_to=[], save_strategy="no", use_cpu=True, seed=0, data_seed=0, disable_tqdm=True)
    fields.update(kw)
    return TrainingArguments(str(out), **fields)


class SaveAt(TrainerCallback):
    """Ask for a checkpoint at the given steps (the reference run itself never saves)."""

    def __init__(self, steps) -> None:
        self.steps = set(steps)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            control.should_save = True
        return control


class Recorder(TrainerCallback):
    """Snapshot of the APT state at chosen steps and right after training (re)starts. Added after the APT
    callbacks, so it sees each step's event and teacher refresh."""

    def __init__(self, trainer: Trainer, steps=()) -> None:
        self.trainer, self.steps = trainer, set(steps)
        self.at: dict[int, dict] = {}
        self.begin: Optional[dict] = None

    def snapshot(self, model) -> dict:
        apt = apt_hf.find_apt_model(model)
        masks = apt.masks
        snap = {
            "heads": [m.clone() for m in masks.heads], "neurons": [m.clone() for m in masks.neurons],
            "hidden": masks.hidden.clone(), "ranks": ranks(model), "params": apt.count_params(),
        }
        distiller = getattr(self.trainer, "distiller", None)
        if distiller is not None and distiller.enabled:
            state = distiller.state_dict()
            snap["teacher"] = {k: v.clone() for k, v in state["teacher"].items()}
            snap["refreshes"] = state["refreshes"]
        return snap

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.begin = self.snapshot(model)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            self.at[state.global_step] = self.snapshot(model)
        return control


def ranks(model) -> dict[str, int]:
    return {n: l.r["default"] for n, l in apt_hf.find_apt_model(model).apt_layers().items()}


def train(make_model, out, trainer_cls=apt_hf.APTTrainer, save_at=(), record_at=(), resume=None, callbacks=(),
          eval_data=None, **arg_kw):
    """Train a fresh model; returns (trainer, model, recorder)."""
    pm = make_model()
    args = make_args(out, **arg_kw)
    lm = getattr(pm.peft_config["default"], "task_type", None) == "CAUSAL_LM"
    cbs = [SaveAt(save_at)] if save_at else []
    tr = trainer_cls(model=pm, args=args, train_dataset=TokenTask(lm=lm), callbacks=cbs + list(callbacks),
                     eval_dataset=eval_data)
    rec = Recorder(tr, record_at)
    tr.add_callback(rec)  # after APTCallback / DistillCallback
    tr.train(resume_from_checkpoint=resume)
    return tr, pm, rec


def final_state(tr, pm) -> dict:
    apt = apt_hf.find_apt_model(pm)
    cb = next(c for c in tr.callback_handler.callbacks if isinstance(c, APTCallback))
    return {"weights": {k: v.detach().clone() for k, v in pm.state_dict().items()}, "ranks": ranks(pm),
            "params": apt.count_params(), "callback": cb.state_dict(), "lr": tr.optimizer.param_groups[0]["lr"]}


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(set(a) ^ set(b))[:5]}"
    for k in a:
        assert a[k].shape == b[k].shape, f"{what}: {k} has shape {tuple(a[k].shape)} vs {tuple(b[k].shape)}"
        if a[k].numel():
            diff = (a[k].double() - b[k].double()).abs().max().item()
            assert diff <= TOL, f"{what}: {k} differs by {diff}"


def assert_same_run(ref: dict, got: dict) -> None:
    assert got["ranks"] == ref["ranks"]
    assert got["params"] == ref["params"]
    assert got["lr"] == pytest.approx(ref["lr"], rel=1e-9, abs=1e-15)
    assert_same_tensors(ref["weights"], got["weights"], "weights/masks")  # masks and kept records are buffers
    ref_cb, got_cb = ref["callback"], got["callback"]
    assert got_cb["events_done"] == ref_cb["events_done"] == len(EVENTS)
    assert got_cb["initial_adapter_size"] == ref_cb["initial_adapter_size"]
    for key in ("heads", "neurons"):
        for x, y in zip(ref_cb["salience"][key], got_cb["salience"][key]):
            assert torch.allclose(x, y, atol=TOL, rtol=0)


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def training_state(folder: Path) -> dict:
    """The APT training state a checkpoint's adapter file carries (apt_hf.checkpoint)."""
    tensors = checkpoint_tensors(folder)
    return checkpoint.decode({k: v for k, v in tensors.items() if k.startswith(checkpoint.PREFIX)})


def strip_training_state(folder: Path, component: Optional[str] = None) -> None:
    """Rewrite a checkpoint's adapter file without its APT training state (or without one component of it)."""
    from safetensors.torch import save_file

    tensors = checkpoint_tensors(folder)
    rest = {k: v for k, v in tensors.items() if not k.startswith(checkpoint.PREFIX)}
    if component is not None:
        tree = training_state(folder)
        del tree[component]
        rest.update(checkpoint.encode(tree))
    save_file(rest, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def masks_in(tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [v for k, v in tensors.items() if ".apt_masks." in k and ".kept_" not in k]


# ================================================================================================ fixtures
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted BERT run, never saved."""
    tr, pm, rec = train(bert_model, tmp_path_factory.mktemp("ref"), record_at=CASES.values())
    return final_state(tr, pm), rec


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """An identical BERT run that saves at every case's step; returns its output_dir and its recorder."""
    out = tmp_path_factory.mktemp("ckpt")
    tr, pm, rec = train(bert_model, out, save_at=CASES.values(), record_at=CASES.values())
    return out, rec, final_state(tr, pm)


# ================================================================================================ BERT resume
def test_saving_checkpoints_does_not_change_the_run(reference, checkpoints):
    """Writing checkpoints mid-run (APT state, teacher) leaves the training trajectory untouched."""
    assert_same_run(reference[0], checkpoints[2])


@pytest.mark.parametrize("case", list(CASES))
def test_resume_is_exact(case, reference, checkpoints, tmp_path):
    step = CASES[case]
    ref_final, ref_rec = reference
    out, ck_rec, _ = checkpoints
    folder = out / f"checkpoint-{step}"
    tree = training_state(folder)
    assert set(tree) == {"format_version", "pruning", "distillation"} and tree["pruning"]["step"] == step
    assert not list(folder.glob("*.pt*")) or {p.name for p in folder.glob("*.pt*")} <= {
        "optimizer.pt", "scheduler.pt", "rng_state.pth"}, "APT writes no pickle files"
    saved = checkpoint_tensors(folder)
    masks = masks_in(saved)
    kept_heads = [v for k, v in saved.items() if ".apt_masks.kept_heads_" in k]
    saved_ranks = json.loads((folder / "adapter_config.json").read_text())["rank_pattern"]

    # The checkpoint really is in the situation the case names.
    fractional = any(bool(((m > 0) & (m < 1)).any()) for m in masks)
    if case in ("decay_window", "window_in_distill"):
        assert fractional, "checkpoint inside a mask-decay window should hold fractional masks"
    else:
        assert not fractional
    events_done = tree["pruning"]["events_done"]
    assert events_done == sum(e <= step for e in EVENTS)
    if step >= EVENTS[0]:
        assert max(ck_rec.at[step]["ranks"].values()) > R, "ranks should have grown at the first event"
        head_masks = [v for k, v in saved.items() if ".apt_masks.heads_" in k]
        assert sum(int((m > 0).sum()) for m in head_masks) < 4 * 4, "heads should be pruned at the first event"
        if step == EVENTS[0]:  # distillation holds physical removal back until the next teacher refresh (step 17)
            assert sum(len(k) for k in kept_heads) == 4 * 4
        else:
            assert sum(len(k) for k in kept_heads) < 4 * 4, "held heads should be removed at the refresh of step 17"
        assert any(v.shape[0] > R for k, v in saved.items() if ".apt_A" in k and "apt_transform" not in k)
    else:
        assert set(saved_ranks.values()) <= {R} and sum(len(k) for k in kept_heads) == 16

    # The checkpointing run matched the reference at that step.
    for key in ("heads", "neurons"):
        for x, y in zip(ref_rec.at[step][key], ck_rec.at[step][key]):
            assert torch.equal(x, y)
    # rank_pattern (written on save) holds every adapter alive at the step; removed modules keep a stale entry
    assert ref_rec.at[step]["ranks"] == ck_rec.at[step]["ranks"] == {k: saved_ranks[k] for k in ck_rec.at[step]["ranks"]}

    tr, pm, rec = train(bert_model, tmp_path / "resumed", resume=str(folder))
    # State right after the restart equals the saved state at that step.
    begin, at = rec.begin, ck_rec.at[step]
    assert begin["ranks"] == at["ranks"] and begin["params"] == at["params"]
    for key in ("heads", "neurons"):
        for x, y in zip(at[key], begin[key]):
            assert torch.equal(x, y)
    assert torch.equal(at["hidden"], begin["hidden"])
    # Teacher snapshot restored exactly: equal to the file and to the live teacher of the checkpointing run; after
    # distillation has ended no teacher is saved (nor needed).
    teacher_file = tree["distillation"]
    assert begin["refreshes"] == at["refreshes"] == teacher_file["refreshes"]
    if step >= DISTILL[1]:
        assert teacher_file["teacher"] == {} and begin["teacher"] == {}
    else:
        assert_same_tensors(teacher_file["teacher"], begin["teacher"], "restored teacher vs file")
        assert_same_tensors(at["teacher"], begin["teacher"], "restored teacher vs saved run")
    if DISTILL[0] <= step < DISTILL[1]:
        assert begin["teacher"], "a run resumed during distillation must have its teacher back"
    elif step >= DISTILL[1]:
        assert not begin["teacher"], "the teacher is released when distillation ends"
    if EVENTS[-1] <= step < DISTILL[1]:  # the detached teacher is rebuilt with the structure it had
        assert teacher_file["teacher_structure"] and tr.distiller.teacher.model is None  # released at distill_end
        student_kept = sum(len(v) for k, v in saved.items() if ".apt_masks.kept_" in k)
        teacher_kept = sum(len(v) for k, v in teacher_file["teacher_structure"].items() if k.startswith("kept_"))
        assert student_kept < teacher_kept

    assert_same_run(ref_final, final_state(tr, pm))


def test_resume_keeps_the_best_post_pruning_student(tmp_path):
    """Spec F.2 step 3 across a restart: a checkpoint between the last pruning event (40) and distill_end (60)
    carries the best student evaluated so far (on eval loss here), and the resumed run reloads the same one."""
    kw = dict(eval_data=torch.utils.data.Subset(TokenTask(), range(48)), eval_strategy="steps", eval_steps=3)
    ref_tr, ref_pm, _ = train(bert_model, tmp_path / "ref", **kw)
    ck_tr, ck_pm, _ = train(bert_model, tmp_path / "ckpt", save_at=[50], **kw)
    assert_same_run(final_state(ref_tr, ref_pm), final_state(ck_tr, ck_pm))
    saved = training_state(tmp_path / "ckpt" / "checkpoint-50")["distillation"]
    assert saved["best_student"] and EVENTS[-1] <= saved["best_student_step"] <= 50
    assert saved["teacher_structure"]  # the teacher was detached at the last event
    tr, pm, _ = train(bert_model, tmp_path / "resumed", resume=str(tmp_path / "ckpt" / "checkpoint-50"), **kw)
    assert tr.distiller.best_student_step == ref_tr.distiller.best_student_step
    assert_same_run(final_state(ref_tr, ref_pm), final_state(tr, pm))


def test_resume_true_picks_last_checkpoint(reference, checkpoints, tmp_path):
    """``resume_from_checkpoint=True`` resumes from the newest checkpoint in output_dir (APTTrainer)."""
    out, _, _ = checkpoints
    work = tmp_path / "run"
    shutil.copytree(out / f"checkpoint-{CASES['after_event']}", work / f"checkpoint-{CASES['after_event']}")
    tr, pm, rec = train(bert_model, work, resume=True)
    assert rec.begin["ranks"] != {n: R for n in rec.begin["ranks"]}
    assert_same_run(reference[0], final_state(tr, pm))


# ================================================================================================ stock Trainer
STOCK_STEP = 19  # inside the second mask-decay window, after the first event


def stock_model():
    return bert_model(distillation=False)


@pytest.fixture(scope="module")
def stock_checkpoint(tmp_path_factory):
    """A stock-Trainer run that saved only ``checkpoint-19``, and the final state of that (uninterrupted) run."""
    out = tmp_path_factory.mktemp("stock")
    tr, pm, _ = train(stock_model, out, trainer_cls=Trainer, callbacks=[APTCallback()], save_at=[STOCK_STEP])
    return out / f"checkpoint-{STOCK_STEP}", final_state(tr, pm)


def test_stock_trainer_with_callback_resumes_exactly(stock_checkpoint, tmp_path):
    """``transformers.Trainer`` + ``APTCallback()``: the callback's state comes back with the adapter the Trainer
    loads, and the resumed run matches an uninterrupted stock run."""
    ref_tr, ref_pm, _ = train(stock_model, tmp_path / "ref", trainer_cls=Trainer, callbacks=[APTCallback()])
    ref = final_state(ref_tr, ref_pm)
    assert_same_run(ref, stock_checkpoint[1])  # saving did not change the run
    out = tmp_path / "run"
    shutil.copytree(stock_checkpoint[0], out / stock_checkpoint[0].name)
    folder = out / f"checkpoint-{STOCK_STEP}"
    assert set(training_state(folder)) == {"format_version", "pruning"}
    assert any(bool(((m > 0) & (m < 1)).any()) for m in masks_in(checkpoint_tensors(folder)))
    tr, pm, rec = train(stock_model, out, trainer_cls=Trainer, callbacks=[APTCallback()], resume=True)
    assert max(rec.begin["ranks"].values()) > R  # restarted from the pruned, grown checkpoint
    assert tr.state.global_step == MAX_STEPS
    assert_same_run(ref, final_state(tr, pm))


def test_stock_trainer_missing_apt_state(stock_checkpoint, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(stock_checkpoint[0], work / stock_checkpoint[0].name)
    strip_training_state(work / stock_checkpoint[0].name)
    with pytest.raises(checkpoint.CheckpointError, match="carries no APT training state"):
        train(stock_model, work, trainer_cls=Trainer, callbacks=[APTCallback()], resume=True)


# ================================================================================================ broken checkpoints
@pytest.mark.parametrize("missing,message", [(None, "holds no APT training state"),
                                             ("pruning", "carries no APT training state"),
                                             ("distillation", "carries no teacher")])
def test_missing_training_state_during_distillation_is_named(missing, message, checkpoints, tmp_path):
    """A checkpoint taken while distilling but without APT's state (or without the teacher) must not resume with a
    restarted schedule or with distillation silently off (no teacher until the next refresh)."""
    out, _, _ = checkpoints
    folder = tmp_path / "ckpt"
    shutil.copytree(out / f"checkpoint-{CASES['distill']}", folder)
    strip_training_state(folder, missing)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        train(bert_model, tmp_path / "resumed", resume=str(folder))


@pytest.mark.parametrize("overrides", [
    dict(num_hidden_layers=3),
    dict(num_hidden_layers=5),
    dict(hidden_size=48),
    dict(hidden_size=48, num_attention_heads=6),  # same head width, more heads
    dict(intermediate_size=96),  # wider FFN: the kept-neuron record alone would fit
    dict(intermediate_size=48),
])
@pytest.mark.parametrize("case", ["decay_window", "after_event"])
def test_mismatched_base_model_is_refused(overrides, case, checkpoints, tmp_path):
    """Resuming onto a base model of another shape raises ValueError before any step, instead of loading part of
    the checkpoint (or silently pruning the new model to the recorded positions)."""
    out, _, _ = checkpoints
    folder = out / f"checkpoint-{CASES[case]}"
    pm = bert_model(**overrides)
    tr = apt_hf.APTTrainer(model=pm, args=make_args(tmp_path / "resumed"), train_dataset=TokenTask())
    with pytest.raises(ValueError, match="base model|trained on|describes"):
        tr.train(resume_from_checkpoint=str(folder))
    assert tr.state.global_step == 0


@pytest.mark.parametrize("overrides", [dict(intermediate_size=96), dict(num_hidden_layers=5)])
def test_pruned_adapter_refuses_other_base_model(overrides, checkpoints):
    """The same guard on ``PeftModel.from_pretrained``: a pruned adapter names the base sizes it was trained on."""
    out, _, _ = checkpoints
    torch.manual_seed(0)
    fields = dict(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                  num_labels=2)
    base = BertForSequenceClassification(BertConfig(**{**fields, **overrides}))
    with pytest.raises(ValueError, match="base model"):
        peft.PeftModel.from_pretrained(base, out / f"checkpoint-{CASES['distill']}")
    same = peft.PeftModel.from_pretrained(BertForSequenceClassification(BertConfig(**fields)),
                                          out / f"checkpoint-{CASES['distill']}")
    assert apt_hf.count_params(same) < apt_hf.find_apt_model(same).n_params  # the matching base loads, pruned


# ================================================================================================ LLaMA GQA
def test_llama_gqa_resume_after_event(tmp_path):
    """Case (b) on LLaMA with grouped-query attention: resume right after the second event."""
    step = EVENTS[1]
    ref_tr, ref_pm, _ = train(llama_model, tmp_path / "ref")
    ref = final_state(ref_tr, ref_pm)
    out = tmp_path / "run"
    train(llama_model, out, save_at=[step])
    folder = out / f"checkpoint-{step}"
    saved = checkpoint_tensors(folder)
    saved_ranks = json.loads((folder / "adapter_config.json").read_text())["rank_pattern"]
    assert max(saved_ranks.values()) > R
    kept = [v for k, v in saved.items() if ".apt_masks.kept_heads_" in k]
    n_kept = sum(len(v) for k, v in saved.items() if ".apt_masks.kept_" in k)
    assert n_kept < 3 * 8 + 3 * 80 + 64, "the event should have removed heads, neurons or hidden dimensions"
    for k in kept:  # every surviving key/value group keeps the same number of query heads
        groups = torch.bincount(k // 4, minlength=2)
        assert len(set(groups[groups > 0].tolist())) <= 1
    tr, pm, rec = train(llama_model, tmp_path / "resumed", resume=str(folder))
    assert rec.begin["teacher"]
    assert_same_run(ref, final_state(tr, pm))


# ================================================================================================ crashes and files
CRASH_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
import transformers
from transformers import TrainerCallback
from test_resume import bert_model, train

class CrashOnSave(TrainerCallback):
    # runs after Trainer._save_checkpoint has written checkpoint-{step} and rotated the older ones away
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == {step}:
            os._exit(3)

transformers.logging.set_verbosity_error()
train(bert_model, {out!r}, save_at=({first}, {step}), save_total_limit=1, callbacks=[CrashOnSave()])
"""


def test_crash_after_checkpoint_rotation_resumes_exactly(reference, tmp_path):
    """save_total_limit=1: the Trainer deletes the older checkpoint before the callbacks' on_save runs. A process
    killed right there still leaves a complete checkpoint (APT's state is inside its adapter file), and
    ``resume_from_checkpoint=True`` continues exactly as the uninterrupted run."""
    import subprocess
    import sys

    out, step = tmp_path / "run", CASES["distill"]
    code = CRASH_SCRIPT.format(tests=str(Path(__file__).parent), step=step, first=CASES["after_event"], out=str(out))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == [f"checkpoint-{step}"]
    tr, pm, rec = train(bert_model, out, resume=True)
    assert rec.begin["teacher"]
    assert_same_run(reference[0], final_state(tr, pm))


def test_resume_true_skips_a_half_written_checkpoint(reference, checkpoints, tmp_path, caplog):
    """A crash while the Trainer was writing the newest checkpoint (no trainer_state.json yet, or a truncated adapter
    file): ``True`` falls back to the newest complete one and says which folder it skipped and why."""
    out, _, _ = checkpoints
    work = tmp_path / "run"
    for case in ("after_event", "distill"):
        shutil.copytree(out / f"checkpoint-{CASES[case]}", work / f"checkpoint-{CASES[case]}")
    newest = work / f"checkpoint-{CASES['distill']}"
    os.remove(newest / "trainer_state.json")
    with caplog.at_level("WARNING", logger="apt_hf.trainer"):
        tr, pm, rec = train(bert_model, work, resume=True)
    assert any(f"skipping checkpoint {newest}" in r.getMessage() and "trainer_state.json" in r.getMessage()
               for r in caplog.records)
    assert rec.begin["params"] == checkpoints[1].at[CASES["after_event"]]["params"]
    assert_same_run(reference[0], final_state(tr, pm))


def test_truncated_adapter_file_is_named(checkpoints, tmp_path):
    out, _, _ = checkpoints
    folder = tmp_path / "ckpt"
    shutil.copytree(out / f"checkpoint-{CASES['distill']}", folder)
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(checkpoint.CheckpointError, match="adapter_model.safetensors cannot be read"):
        train(bert_model, tmp_path / "resumed", resume=str(folder))
    with pytest.raises(checkpoint.CheckpointError, match="No complete APT checkpoint"):
        train(bert_model, tmp_path, resume=True)  # tmp_path holds only the broken checkpoint


def test_pickled_files_in_a_checkpoint_are_never_loaded(reference, checkpoints, tmp_path):
    """Earlier releases kept APT state in pickled ``apt_state.pt`` / ``apt_distill.pt``. A crafted one (code run on
    unpickling) in a checkpoint folder is ignored: nothing apt_hf loads can execute code."""
    out, _, _ = checkpoints
    folder = tmp_path / "ckpt"
    shutil.copytree(out / f"checkpoint-{CASES['distill']}", folder)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("apt_state.pt", "apt_distill.pt"):
        torch.save({"events_done": Payload()}, folder / name)
    tr, pm, _ = train(bert_model, tmp_path / "resumed", resume=str(folder))
    assert not marker.exists()
    assert_same_run(reference[0], final_state(tr, pm))


def test_stock_trainer_reads_the_checkpoint_it_resumes(stock_checkpoint, tmp_path):
    """Resuming ``A/checkpoint-19`` with ``output_dir=B`` that holds another run's ``checkpoint-19``: APT's state
    comes from A's folder (the one the Trainer loads), and an adapter / trainer-state pair from different steps is
    refused instead of resuming a silently different run."""
    folder, ref = stock_checkpoint
    other = tmp_path / "B"
    decoy = other / folder.name
    shutil.copytree(folder, decoy)
    tree = training_state(decoy)
    tree["pruning"]["salience"]["heads"] = [torch.rand_like(t) for t in tree["pruning"]["salience"]["heads"]]
    tree["pruning"]["events_done"] = 0
    tensors = {k: v for k, v in checkpoint_tensors(decoy).items() if not k.startswith(checkpoint.PREFIX)}
    from safetensors.torch import save_file
    save_file({**tensors, **checkpoint.encode(tree)}, str(decoy / "adapter_model.safetensors"))
    tr, pm, _ = train(stock_model, other, trainer_cls=Trainer, callbacks=[APTCallback()], resume=str(folder))
    assert_same_run(ref, final_state(tr, pm))

    mixed = tmp_path / "mixed" / folder.name
    shutil.copytree(folder, mixed)
    state = json.loads((mixed / "trainer_state.json").read_text())
    state["global_step"] = 13
    (mixed / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(checkpoint.CheckpointError, match="saved at step 19, but the Trainer resumes at step 13"):
        train(stock_model, tmp_path / "C", trainer_cls=Trainer, callbacks=[APTCallback()], resume=str(mixed))


def test_load_best_model_at_end_is_refused_at_train_start(tmp_path):
    pm = bert_model()
    args = make_args(tmp_path, load_best_model_at_end=True, eval_strategy="steps", eval_steps=10,
                     save_strategy="steps", save_steps=10)
    tr = apt_hf.APTTrainer(model=pm, args=args, train_dataset=TokenTask(), eval_dataset=TokenTask(n=16))
    with pytest.raises(ValueError, match="load_best_model_at_end"):
        tr.train()
    assert tr.state.global_step == 0
