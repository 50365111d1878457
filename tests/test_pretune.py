"""Pre-tuning pruning (spec D.6) and the salience pieces it uses: the static (summed) scorer and the
hidden-dimension kurtosis term (spec C.2)."""

from __future__ import annotations

import math

import peft
import pytest
import torch
from conftest import make_model
from scipy import stats as scipy_stats
from transformers import Trainer, TrainerCallback, TrainingArguments

import apt_hf
from apt_hf.arch import base_linear
from apt_hf.callback import resolve_plan
from apt_hf.pretune import calibration_batches, gather_static_salience
from apt_hf.salience import SalienceCollector, outlier_term, row_kurtosis

MAX_STEPS = 30
SCHEDULE = dict(pruning_start=4, pruning_end=20, sparsity_warmup=2, num_pruning_events=3, mask_decay_window=2,
                mask_decay=0.5, distill_end=26)


class LMData(torch.utils.data.Dataset):
    def __init__(self, n: int = 96, seq_len: int = 8, seed: int = 0) -> None:
        self.ids = torch.randint(3, 101, (n, seq_len), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        x = self.ids[i]
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


class DensityRecorder(TrainerCallback):
    """Kept density (spec B.3 count / original) and physical parameter count at the start of every step."""

    def __init__(self) -> None:
        self.density: dict[int, float] = {}
        self.physical: dict[int, int] = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        apt = apt_hf.find_apt_model(model)
        self.density[state.global_step + 1] = apt.count_params() / apt.n_params
        self.physical[state.global_step + 1] = sum(p.numel() for n, p in model.named_parameters() if "apt_" not in n)
        return control


def run(tmp_path, trainer: str, **cfg):
    acfg = apt_hf.APTConfig(task_type="CAUSAL_LM", **{**SCHEDULE, "target_sparsity": 0.5, "pretune_density": 0.75,
                                                      "pretune_batches": 3, **cfg})
    model = make_model("llama_gqa")
    dense_params = sum(p.numel() for p in model.parameters())
    pm = peft.get_peft_model(model, acfg)
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=8, max_steps=MAX_STEPS, learning_rate=1e-3,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             seed=0)
    rec = DensityRecorder()
    if trainer == "stock":
        tr = Trainer(model=pm, args=args, train_dataset=LMData(), callbacks=[apt_hf.APTCallback(), rec])
    else:
        tr = apt_hf.APTTrainer(model=pm, args=args, train_dataset=LMData(), callbacks=[rec])
    tr.train()
    return tr, pm, rec, dense_params


@pytest.mark.parametrize("trainer", ["stock", "apt"])
def test_pretune_density_before_first_step_then_schedule_from_there(trainer, tmp_path):
    tr, pm, rec, dense_params = run(tmp_path, trainer)
    callback = next(c for c in tr.callback_handler.callbacks if isinstance(c, apt_hf.APTCallback))
    # pruned physically, to within 1 % below the pre-tuning density, before the first optimizer step
    assert 0.74 <= rec.density[1] <= 0.75
    assert rec.physical[1] < dense_params
    logs = tr.state.log_history
    assert logs[0]["apt/pretune_batches"] == 3 and logs[0]["apt/density"] == pytest.approx(rec.density[1])
    # the cubic schedule starts from 0.75, not from 1: plateau at 0.75, then down to the target 0.5
    plan = callback.plan
    assert plan.initial_density == 0.75
    assert plan.target(plan.start) == 0.75 and plan.target(plan.events[-1]) == 0.5
    assert 0.5 < plan.target(plan.events[0]) < 0.75
    # training continues from there: density only falls, one step per event, and ends at the target
    steps = sorted(rec.density)
    assert all(rec.density[b] <= rec.density[a] + 1e-9 for a, b in zip(steps, steps[1:]))
    assert rec.density[plan.windows[0]] == pytest.approx(rec.density[1])  # nothing moves before the first window
    assert 0.49 <= apt_hf.count_params(pm) / apt_hf.find_apt_model(pm).n_params <= 0.5
    assert tr.state.global_step == MAX_STEPS
    assert all(math.isfinite(h["loss"]) for h in logs if "loss" in h)
    if trainer == "apt":  # distillation starts after the first event that prunes below the pre-tuned density
        assert tr.distiller.start == plan.events[0] + 1


def test_pretune_straight_to_the_target_prunes_nothing_later(tmp_path):
    tr, pm, rec, _ = run(tmp_path, "stock", pretune_density=0.5)
    assert 0.49 <= rec.density[1] <= 0.5
    assert rec.density[MAX_STEPS] == rec.density[1]


def test_without_pretune_nothing_is_pruned_before_training(tmp_path):
    tr, pm, rec, dense_params = run(tmp_path, "stock", pretune_density=1.0)
    assert rec.density[1] == 1.0 and rec.physical[1] == dense_params
    assert "apt/pretune_batches" not in tr.state.log_history[0]


@pytest.mark.parametrize("value, message", [(0.4, r"\[0.5, 1\]"), (1.2, r"\[0.5, 1\]"), (0.0, r"\[0.5, 1\]")])
def test_pretune_density_is_validated(value, message):
    with pytest.raises(ValueError, match=rf"APTConfig.pretune_density={value}.*{message}"):
        apt_hf.APTConfig(target_sparsity=0.5, pretune_density=value)
    with pytest.raises(ValueError, match="APTConfig.pretune_batches=0"):
        apt_hf.APTConfig(pretune_density=0.8, pretune_batches=0)


def test_plan_starts_from_the_pretuned_density():
    plan = resolve_plan(apt_hf.APTConfig(target_sparsity=0.6, pretune_density=0.85, **SCHEDULE), MAX_STEPS)
    assert [plan.prunes(e) for e in plan.events] == [plan.target(e) < 0.85 for e in plan.events]
    assert plan.target(0) == 0.85 and plan.target(plan.end) == pytest.approx(0.4)


# ------------------------------------------------------------------------------------------ salience pieces
def test_calibration_batches_are_seeded_and_leave_the_dataset_order_alone():
    data = LMData(n=20)
    collate = torch.utils.data.default_collate
    first = list(calibration_batches(data, collate, 4, 3, seed=7))
    again = list(calibration_batches(data, collate, 4, 3, seed=7))
    assert len(first) == 3 and all(b["input_ids"].shape == (4, 8) for b in first)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again))
    rows = torch.cat([b["input_ids"] for b in first])
    assert len({tuple(r.tolist()) for r in rows}) == 12  # 12 distinct examples, no repeats
    assert len(list(calibration_batches(data, collate, 8, 5, seed=7))) == 3  # 20 rows: 8 + 8 + 4


def test_row_kurtosis_matches_scipy():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(5, 40, generator=g), torch.randn(40, generator=g)
    want = scipy_stats.kurtosis((w * x).numpy(), axis=1, fisher=True, bias=True)
    assert torch.allclose(row_kurtosis(w, x).double(), torch.from_numpy(want).double(), atol=1e-4)


def _collector_after_one_batch(pm, use_kurtosis: bool) -> SalienceCollector:
    col = SalienceCollector(apt_hf.find_apt_model(pm).layout, beta=0.85, use_kurtosis=use_kurtosis)
    batch = torch.utils.data.default_collate([LMData(n=4)[i] for i in range(4)])
    assert gather_static_salience(pm, col, [batch], torch.device("cpu")) == 1
    return col


def test_hidden_kurtosis_term_is_summed_over_output_and_down_projections():
    pm = peft.get_peft_model(make_model("llama_gqa"), apt_hf.APTConfig(task_type="CAUSAL_LM"))
    plain = _collector_after_one_batch(pm, use_kurtosis=False)
    # the same batch again, keeping the mean activations the kurtosis term is computed from
    apt = apt_hf.find_apt_model(pm)
    col = SalienceCollector(apt.layout, beta=0.85, use_kurtosis=True)
    means = {}
    original = col.end_step

    def spy() -> bool:
        means["context"], means["inter"] = list(col.mean_context), list(col.mean_inter)
        return original()

    col.end_step = spy
    batch = torch.utils.data.default_collate([LMData(n=4)[i] for i in range(4)])
    gather_static_salience(pm, col, [batch], torch.device("cpu"))
    expected = sum(outlier_term(row_kurtosis(base_linear(s.o).weight, m)) for s, m in
                   zip(apt.layout.attentions, means["context"]))
    expected = expected + sum(outlier_term(row_kurtosis(base_linear(f.down).weight, m)) for f, m in
                              zip(apt.layout.ffns, means["inter"]))
    assert float(expected.abs().sum()) > 0
    assert torch.allclose(col.ema_hidden - plain.ema_hidden, expected, rtol=1e-4, atol=1e-5)


def test_static_mode_sums_instead_of_averaging():
    pm = peft.get_peft_model(make_model("llama_gqa"), apt_hf.APTConfig(task_type="CAUSAL_LM"))
    apt = apt_hf.find_apt_model(pm)
    data = [LMData(n=8)[i] for i in range(8)]
    loader = [torch.utils.data.default_collate(data[:4]), torch.utils.data.default_collate(data[4:])]
    singles = []
    for batch in loader:
        col = SalienceCollector(apt.layout, beta=0.85, use_kurtosis=True)
        gather_static_salience(pm, col, [batch], torch.device("cpu"))
        singles.append(col)
    both = SalienceCollector(apt.layout, beta=0.85, use_kurtosis=True)
    gather_static_salience(pm, both, loader, torch.device("cpu"))
    assert not both.static  # restored afterwards
    assert torch.allclose(both.ema_hidden, singles[0].ema_hidden + singles[1].ema_hidden, rtol=1e-5)
    for i in range(len(both.ema_heads)):
        assert torch.allclose(both.ema_heads[i], singles[0].ema_heads[i] + singles[1].ema_heads[i], rtol=1e-5)
    assert all(p.grad is None for p in pm.parameters())  # gradients cleared for the first real step
