"""Tests for apt_hf.schedule (spec D.1-D.3, E.2, F.3), anchored on the SST-2 example."""

from __future__ import annotations

import math

import pytest
import torch

from apt_hf.schedule import (
    adapter_budget,
    decay_window_start,
    distill_mu,
    mask_step,
    post_distill_lr_factor,
    pruning_event_steps,
    target_density,
)

E = 2105  # SST-2 steps per epoch
START = 200
END = 3 * E  # 6315
WARMUP = E
EVENTS = [811, 1423, 2034, 2646, 3257, 3869, 4480, 5092, 5703, 6315]
DENSITIES = [1.0, 1.0, 1.0, 0.8596, 0.6661, 0.5362, 0.4575, 0.4170, 0.4021, 0.4000]
DELTA0 = 663_552


# ---------------------------------------------------------------- events (D.2)


def test_sst2_events() -> None:
    assert pruning_event_steps(START, END, 10) == EVENTS


def test_events_basic_properties() -> None:
    steps = pruning_event_steps(0, 7, 3)
    assert steps == [2, 4, 7]
    assert pruning_event_steps(5, 6, 1) == [6]
    # more events than steps: truncation repeats steps but the last is always `end`
    steps = pruning_event_steps(0, 2, 4)
    assert steps == [0, 1, 1, 2]


@pytest.mark.parametrize(
    "args, word",
    [((-1, 10, 2), "start"), ((10, 10, 2), "end"), ((10, 5, 2), "end"), ((0, 10, 0), "num_events")],
)
def test_events_errors(args: tuple[int, int, int], word: str) -> None:
    with pytest.raises(ValueError, match=word):
        pruning_event_steps(*args)


# ---------------------------------------------------------------- density (D.2)


def test_sst2_densities() -> None:
    got = [target_density(t, start=START, end=END, warmup_steps=WARMUP, final_density=0.4) for t in EVENTS]
    assert [round(x, 4) for x in got] == DENSITIES
    assert got[:3] == [1.0, 1.0, 1.0]
    assert got[-1] == 0.4


def test_density_plateau_and_end() -> None:
    kw = dict(start=START, end=END, warmup_steps=WARMUP, final_density=0.4)
    assert target_density(0, **kw) == 1.0
    assert target_density(START + WARMUP, **kw) == 1.0
    assert target_density(END, **kw) == 0.4
    assert target_density(END + 1000, **kw) == 0.4
    vals = [target_density(t, **kw) for t in range(START, END + 1, 37)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert all(0.4 <= v <= 1.0 for v in vals)
    assert target_density(5000, start=0, end=10, warmup_steps=0, final_density=1.0) == 1.0


def test_density_errors() -> None:
    with pytest.raises(ValueError, match="warmup"):
        target_density(5, start=0, end=10, warmup_steps=10, final_density=0.4)
    with pytest.raises(ValueError, match="warmup"):
        target_density(5, start=0, end=10, warmup_steps=20, final_density=0.4)
    with pytest.raises(ValueError, match="warmup_steps"):
        target_density(5, start=0, end=10, warmup_steps=-1, final_density=0.4)
    with pytest.raises(ValueError, match="start"):
        target_density(5, start=-1, end=10, warmup_steps=0, final_density=0.4)
    for bad in (0.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="final_density"):
            target_density(5, start=0, end=10, warmup_steps=0, final_density=bad)


# ---------------------------------------------------------------- adapter budget (E.2)


def test_sst2_adapter_budget() -> None:
    got = [adapter_budget(t, start=START, end=END, initial=DELTA0, ratio=4.0) for t in EVENTS]
    ratios = [g / DELTA0 for g in got]
    expected = [1.3, 1.6, 1.9, 2.2, 2.5, 2.8, 3.1, 3.4, 3.7, 4.0]
    assert all(isinstance(g, int) for g in got)
    assert ratios == pytest.approx(expected, abs=0.005)
    assert got[-1] == 4 * DELTA0
    # exact floor of the linear formula
    for t, g in zip(EVENTS, got):
        assert g == math.floor(DELTA0 + 3 * DELTA0 * (t - START) / (END - START) + 1e-9)


def test_adapter_budget_clamped() -> None:
    kw = dict(start=100, end=200, initial=1000, ratio=4.0)
    assert adapter_budget(0, **kw) == 1000
    assert adapter_budget(100, **kw) == 1000
    assert adapter_budget(150, **kw) == 2500
    assert adapter_budget(200, **kw) == 4000
    assert adapter_budget(10_000, **kw) == 4000
    assert adapter_budget(101, start=0, end=3, initial=10, ratio=1.5) == 15
    assert adapter_budget(1, start=0, end=3, initial=10, ratio=1.5) == 11  # 11.66 floored


def test_adapter_budget_errors() -> None:
    with pytest.raises(ValueError, match="end"):
        adapter_budget(0, start=5, end=5, initial=10, ratio=4.0)
    with pytest.raises(ValueError, match="initial"):
        adapter_budget(0, start=0, end=5, initial=-1, ratio=4.0)
    with pytest.raises(ValueError, match="ratio"):
        adapter_budget(0, start=0, end=5, initial=10, ratio=0.0)
    with pytest.raises(ValueError, match="ratio"):
        adapter_budget(0, start=0, end=5, initial=10, ratio=math.inf)


# ---------------------------------------------------------------- mu (F.3)


def test_distill_mu() -> None:
    assert distill_mu(0, start=START, end=END) == 0.0
    assert distill_mu(START, start=START, end=END) == 0.0
    assert distill_mu(END, start=START, end=END) == 1.0
    assert distill_mu(44_747, start=START, end=END) == 1.0
    # spec F.3: at distillation start (step 2647) mu is about 0.4
    assert distill_mu(2647, start=START, end=END) == pytest.approx((2647 - 200) / 6115)
    assert round(distill_mu(2647, start=START, end=END), 1) == 0.4
    with pytest.raises(ValueError, match="end"):
        distill_mu(0, start=10, end=3)


def test_distill_mu_cap() -> None:
    """APTConfig.distill_mu_max: the same ramp, held at the cap, so the task loss keeps weight 1 - cap."""
    ramp = [distill_mu(t, start=START, end=END) for t in (0, 1000, 3257, 5000, END, 44_747)]
    capped = [distill_mu(t, start=START, end=END, cap=0.5) for t in (0, 1000, 3257, 5000, END, 44_747)]
    assert capped == [min(0.5, m) for m in ramp]
    assert capped[1] == ramp[1] < 0.5 and capped[-2:] == [0.5, 0.5]
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="cap"):
            distill_mu(1000, start=START, end=END, cap=bad)


def test_post_distill_lr_factor() -> None:
    # spec F.2 for SST-2: distillation ends at epoch 20, training at epoch 40 -> 42100 post steps, 2526 of warm-up
    end, total = 20 * E, 40 * E
    f = lambda s: post_distill_lr_factor(s, end=end, total=total)  # noqa: E731
    assert f(end + 1) == 0.0  # the first step of a fresh warm-up, as transformers' linear schedule
    assert f(end + 1 + 1263) == pytest.approx(0.5)
    assert f(end + 1 + 2526) == 1.0  # peak right after the warm-up
    assert f(end + 1 + 2526 + 39574 // 2) == pytest.approx(0.5)
    assert f(total) == pytest.approx(1 / 39574)
    values = [f(s) for s in range(end + 1, total + 1)]
    assert max(values) == 1.0 and values.index(1.0) == 2526
    assert all(b >= a for a, b in zip(values[:2527], values[1:2527]))  # rising, then falling
    assert all(b < a for a, b in zip(values[2526:], values[2527:]))
    # no warm-up: linear decay from the peak; a one-step phase has only its warm-up step
    assert post_distill_lr_factor(11, end=10, total=20, warmup_ratio=0.0) == 1.0
    assert post_distill_lr_factor(20, end=10, total=20, warmup_ratio=0.0) == pytest.approx(0.1)
    assert post_distill_lr_factor(11, end=10, total=11) == 0.0
    for step in (10, 21):
        with pytest.raises(ValueError, match="post-distillation phase"):
            post_distill_lr_factor(step, end=10, total=20)
    with pytest.raises(ValueError, match="warmup_ratio"):
        post_distill_lr_factor(11, end=10, total=20, warmup_ratio=1.0)


# ---------------------------------------------------------------- decay window (D.3)


def test_decay_window_start() -> None:
    assert decay_window_start(2646, 2034, 200, START) == 2446  # spec section 0 timeline
    assert decay_window_start(811, None, 200, START) == 611
    assert decay_window_start(300, None, 200, START) == START  # never before the pruning start
    assert decay_window_start(1000, 900, 200, START) == 900  # never before the previous event
    assert decay_window_start(1000, 0, 2000, 0) == 0  # previous event 0 is honoured
    starts = []
    prev = None
    for ev in EVENTS:
        starts.append(decay_window_start(ev, prev, 200, START))
        prev = ev
    assert starts == [e - 200 for e in EVENTS]


def test_decay_window_errors() -> None:
    with pytest.raises(ValueError, match="window"):
        decay_window_start(10, None, -1, 0)
    with pytest.raises(ValueError, match="previous_event_step"):
        decay_window_start(10, 10, 5, 0)
    with pytest.raises(ValueError, match="first_start"):
        decay_window_start(10, None, 5, 11)


# ---------------------------------------------------------------- mask moves (D.1 step 5)


def test_mask_step_soft() -> None:
    m = torch.tensor([1.0, 0.995, 0.5, 0.5, 0.004, 0.0])
    keep = torch.tensor([True, True, True, False, False, False])
    out = mask_step(m, keep, 0.01, hard=False)
    assert torch.allclose(out, torch.tensor([1.0, 1.0, 0.51, 0.49, 0.0, 0.0]))
    assert out.dtype == m.dtype
    assert m[2] == 0.5  # input untouched
    assert out.data_ptr() != m.data_ptr()


def test_mask_step_hard_and_dtype() -> None:
    m = torch.tensor([[0.3, 0.7], [0.0, 1.0]], dtype=torch.float16)
    keep = torch.tensor([[True, False], [True, False]])
    out = mask_step(m, keep, 0.01, hard=True)
    assert out.dtype == torch.float16
    assert torch.equal(out, torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float16))


def test_mask_step_hundred_steps_reach_zero() -> None:
    m = torch.ones(3)
    keep = torch.tensor([False, True, False])
    for _ in range(100):
        m = mask_step(m, keep, 0.01, hard=False)
    assert torch.allclose(m, torch.tensor([0.0, 1.0, 0.0]), atol=1e-5)
    assert bool((m >= 0).all()) and bool((m <= 1).all())


def test_mask_step_errors() -> None:
    m = torch.ones(3)
    with pytest.raises(ValueError, match="bool"):
        mask_step(m, torch.ones(3), 0.01, hard=False)
    with pytest.raises(ValueError, match="shape"):
        mask_step(m, torch.ones(4, dtype=torch.bool), 0.01, hard=False)
    with pytest.raises(ValueError, match="decay"):
        mask_step(m, torch.ones(3, dtype=torch.bool), -0.01, hard=False)


# ---------------------------------------------------------------- a run's schedule: defaults and the paper's preset
def test_default_schedule_fits_short_and_long_runs() -> None:
    """Issue 16: APTConfig()'s schedule is fractions of the run (window 5 %-60 %, 5 events, decay windows of half an
    event gap up to 200 steps, distillation ending with the window), so it fits 2-epoch and 40-epoch runs alike. The
    former defaults (the paper's absolute steps) failed below about 2,700 steps."""
    from apt_hf import APTConfig

    cfg = APTConfig(target_sparsity=0.6)
    for steps in (9, 20, 60, 376, 2_000, 84_200):
        plan = cfg.resolve_schedule(steps)
        assert plan.end == round(0.6 * steps) and len(plan.events) == 5 and plan.target(plan.end) == pytest.approx(0.4)
        gaps = [b - a for a, b in zip((plan.start, *plan.events), plan.events)]
        assert all(0 <= e - w <= min(200, g) for e, w, g in zip(plan.events, plan.windows, gaps))
        assert plan.distill_start == plan.first_real_event + 1 and plan.distill_end == plan.end
    plan = cfg.resolve_schedule(376)  # the README benchmark's run: the first teacher at step 40
    assert plan.events == (60, 101, 143, 184, 226) and plan.windows == (40, 81, 123, 164, 206)
    assert cfg.resolve_schedule(84_200).windows[-1] == 50_520 - 200
    assert cfg.resolve_schedule(84_200, distill=False).distill_start is None  # a stock Trainer does not distil
    with pytest.raises(ValueError, match="schedule"):  # was: "window [200, 2]"
        APTConfig.paper_preset(distillation=False).resolve_schedule(20)


def test_paper_preset_reproduces_the_reference_schedule() -> None:
    """Spec D.2/D.3/F.2 (RoBERTa SST-2, E = 2105, 40 epochs): events 811 ... 6315, 200-step windows before each,
    distillation from step 2647 for 20 epochs."""
    from apt_hf import APTConfig

    cfg = APTConfig.paper_preset(steps_per_epoch=E)
    assert (cfg.pruning_start, cfg.pruning_end, cfg.sparsity_warmup, cfg.num_pruning_events) == (START, END, E, 10)
    plan = cfg.resolve_schedule(40 * E)
    assert list(plan.events) == EVENTS and list(plan.windows) == [e - 200 for e in EVENTS]
    assert [round(plan.target(e), 4) for e in EVENTS] == DENSITIES
    assert (plan.distill_start, plan.distill_end) == (2647, 2647 + 20 * E)
    by_fraction = APTConfig.paper_preset().resolve_schedule(40 * E)  # fractions of a 40-epoch run
    assert list(by_fraction.events) == EVENTS and abs(by_fraction.distill_end - plan.distill_end) <= 0.01 * 40 * E
    # spec F.2's recovery at 0.1x the learning rate; the default for other runs is the full rate (chosen on SST-2 and
    # MRPC, README "The paper-shaped GLUE benchmark")
    assert cfg.post_distill_lr_ratio == APTConfig.paper_preset().post_distill_lr_ratio == 0.1
    assert APTConfig().post_distill_lr_ratio == 1.0
    assert APTConfig.paper_preset(post_distill_lr_ratio=0.5).post_distill_lr_ratio == 0.5
    # spec F.1 distils from its teacher whatever it answers; the default skips a teacher that gives a batch one answer
    # (chosen on SST-2 and MRPC, README)
    assert cfg.skip_constant_teacher is APTConfig.paper_preset().skip_constant_teacher is False
    assert APTConfig().skip_constant_teacher is True
    fewer = APTConfig.paper_preset(num_pruning_events=4, steps_per_epoch=E)  # overrides shape the distillation too
    first = fewer.resolve_schedule(40 * E).first_real_event
    assert fewer.num_pruning_events == 4 and first == 3257 and fewer.distill_end == first + 1 + 20 * E
    with pytest.raises(ValueError, match="steps_per_epoch"):
        APTConfig.paper_preset(steps_per_epoch=0)


# ---------------------------------------------------------------- the pruning-start gate (beyond spec D.2)


def test_gated_plan_maps_the_planned_schedule_onto_the_steps_left() -> None:
    """A window opened at step 200 of a 540-step run (STS-B at 3 epochs) instead of the planned 27: every planned step
    from 27 on moves by t -> 200 + (t - 27) * 340 / 513, so the window end 324 -> 397, the 27-step warm-up -> 18 and
    distill_end 432 -> 468; opening at or before the planned start keeps the plan."""
    from apt_hf import APTConfig
    from apt_hf.schedule import gated_plan, resolve_plan

    cfg = APTConfig(target_sparsity=0.6, pruning_start_gate=0.05)
    planned = resolve_plan(cfg, 540)
    assert (planned.start, planned.end, planned.warmup) == (27, 324, 27)
    assert gated_plan(cfg, 540, 27) == planned and gated_plan(cfg, 540, 10) == planned
    moved = gated_plan(cfg, 540, 200)
    assert (moved.start, moved.end, moved.warmup) == (200, 397, 18)
    assert moved.events == (239, 278, 318, 357, 397) and moved.final_density == planned.final_density
    assert (moved.distill_start, moved.distill_end) == (240, 397)  # distill_end follows the window end
    with_end = gated_plan(APTConfig(target_sparsity=0.6, distill_end=0.8), 540, 200)
    assert with_end.distill_end == 468
    latest = gated_plan(cfg, 540, planned.end)  # the latest opening: the planned window end
    assert latest.start == 324 and latest.end == 324 + round(297 * 216 / 513) and latest.events[-1] < 540
    with pytest.raises(ValueError, match="pruning_start_gate.*step 7.*train longer"):
        gated_plan(APTConfig(target_sparsity=0.6, num_pruning_events=5), 9, 7)


@pytest.mark.parametrize("value, baseline, delta, greater, want", [
    (0.55, 0.50, 0.05, True, True), (0.54, 0.50, 0.05, True, False), (0.0, 0.0, 0.0, True, True),
    (0.60, 0.69, 0.05, False, True), (0.66, 0.69, 0.05, False, False),  # a loss: lower is better
])
def test_gate_opens_on_a_gain_over_the_untrained_model(value, baseline, delta, greater, want) -> None:
    from apt_hf.schedule import gate_opens

    assert gate_opens(value, baseline, delta, greater) is want


def test_pruning_start_gate_is_checked() -> None:
    from apt_hf import APTConfig

    with pytest.raises(ValueError, match="pruning_start_gate=-0.1 is invalid"):
        APTConfig(pruning_start_gate=-0.1)
    with pytest.raises(ValueError, match="pruning_start_gate='0.1' is invalid"):
        APTConfig(pruning_start_gate="0.1")
    assert APTConfig().pruning_start_gate is None  # the paper's fixed start
    with pytest.raises(ValueError, match="skip_constant_teacher='yes' is invalid: use True or False"):
        APTConfig(skip_constant_teacher="yes")
