"""Tests of self-distillation (spec F, K.7): the losses, teacher-layer sampling and mapping, the shared-backbone
teacher, and the three training phases of `APTTrainer` (plain tuning -> distillation -> 0.1x-LR fine-tuning).

Training runs use a 40-step schedule with pruning events at steps 9, 14, 19, 24 (mask-decay windows from 6, 11, 16,
21), so distillation runs over steps [10, 32) and fine-tuning over [32, 40]. Torch is pinned to one thread for this
module: tiny matrix products are much faster single-threaded on a busy 2-core machine.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import make_inputs, make_model, random_masks, randomize_adapters
from torch import nn
from transformers import TrainerCallback, TrainingArguments

import apt_hf
from apt_hf.distill import (Teacher, alive_layers, default_pred_weight, layer_candidates, layer_loss,
                            make_transform, prediction_loss, sample_teacher_layers)
from apt_hf.schedule import distill_mu

MAX_STEPS = 40
LR = 1e-3
SCHEDULE = dict(pruning_start=4, pruning_end=24, sparsity_warmup=4, num_pruning_events=4, mask_decay_window=3,
                mask_decay=0.34)
EVENTS = (9, 14, 19, 24)
WINDOWS = (6, 11, 16, 21)
DISTILL_START, DISTILL_END = 10, 32  # the step after the first event with target < 1; distill_end
T = 2.0 / 3.0


# ================================================================================================ helpers
class TokenData(torch.utils.data.Dataset):
    """``cls``: label = first token > 50; ``reg``: a float score from the first token; ``lm``: labels = input_ids;
    ``s2s``: decoder targets = reversed input."""

    def __init__(self, kind: str, n: int = 128, seq_len: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 101, (n, seq_len), generator=g)
        self.kind = kind

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        x = self.ids[i]
        item = {"input_ids": x, "attention_mask": torch.ones_like(x)}
        if self.kind == "cls":
            item["labels"] = (x[0] > 50).long()
        elif self.kind == "reg":
            item["labels"] = x[0].float() / 20.0  # a score in [0.15, 5], as STS-B's
        elif self.kind == "lm":
            item["labels"] = x.clone()
        else:
            item["labels"] = x.flip(0).clone()
        return item


def tiny_t5() -> transformers.T5ForConditionalGeneration:
    config = transformers.T5Config(vocab_size=101, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                                   num_decoder_layers=2, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                   relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(config).eval()


# kind -> (model factory, task type as users pass it, data kind, expected default a_pred)
RUNS = {
    "bert": (lambda: make_model("bert", num_labels=2, num_attention_heads=8, intermediate_size=96), "SEQ_CLS", "cls",
             1.0),
    "bert_regression": (lambda: make_model("bert", num_labels=1, num_attention_heads=8, intermediate_size=96),
                        "SEQ_CLS", "reg", 1.0),
    # the enum form of the task type (as in PEFT's docs) must select the LM weight too
    "llama_gqa": (lambda: make_model("llama_gqa"), peft.TaskType.CAUSAL_LM, "lm", 0.1),
    "t5": (tiny_t5, "SEQ_2_SEQ_LM", "s2s", 0.1),
}


class LRRecorder(TrainerCallback):
    """The learning rate of every parameter group used by optimizer step ``s`` (read before the step runs)."""

    def __init__(self) -> None:
        self.lr: dict[int, list[float]] = {}

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.lr[state.global_step + 1] = [g["lr"] for g in optimizer.param_groups]
        return control


def train(kind: str, out, eval_data: bool = True, logging_steps: int = 1, max_steps: int = MAX_STEPS, **cfg):
    factory, task, data, _ = RUNS[kind]
    acfg = apt_hf.APTConfig(task_type=task, **{**SCHEDULE, "distill_end": DISTILL_END, **cfg})
    pm = peft.get_peft_model(factory(), acfg)
    args = TrainingArguments(str(out), per_device_train_batch_size=8, max_steps=max_steps, learning_rate=LR,
                             logging_steps=logging_steps, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, seed=0, eval_strategy="steps" if eval_data else "no",
                             eval_steps=1000)
    ds = TokenData(data)
    rec = LRRecorder()
    tr = apt_hf.APTTrainer(model=pm, args=args, train_dataset=ds, callbacks=[rec],
                           eval_dataset=torch.utils.data.Subset(ds, range(32)) if eval_data else None)
    tr.train()
    return tr, pm, rec


def train_logs(tr) -> list[dict]:
    return [h for h in tr.state.log_history if "loss" in h and "step" in h]


def linear_lr(step: int) -> float:
    """LR used by optimizer step ``step`` under the default linear schedule without warm-up."""
    return LR * (MAX_STEPS - (step - 1)) / MAX_STEPS


def post_distill_lr(step: int) -> float:
    """Peak-relative LR of post-distillation step ``step``: warm-up over ceil(6 % of the phase), then linear decay."""
    phase = MAX_STEPS - DISTILL_END
    warmup, c = math.ceil(0.06 * phase), step - DISTILL_END - 1
    return LR * (c / warmup if c < warmup else (phase - c) / (phase - warmup))


def density(pm) -> float:
    return apt_hf.count_params(pm) / apt_hf.find_apt_model(pm).n_params


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor, t: float) -> torch.Tensor:
    """KL(p || q) of softmax(./t) along the last dim, written out term by term (float64)."""
    p = torch.exp(p_logits.double() / t)
    p = p / p.sum(-1, keepdim=True)
    q = torch.exp(q_logits.double() / t)
    q = q / q.sum(-1, keepdim=True)
    return (p * (torch.log(p) - torch.log(q))).sum(-1)


# ================================================================================================ losses (F.3)
def test_prediction_loss_classification_matches_hand_kl():
    student = torch.tensor([[0.3, -1.2], [2.0, 0.5], [-0.7, 0.1], [1.5, 1.4]])
    teacher = torch.tensor([[1.1, -0.4], [0.2, 0.9], [-2.0, 0.3], [0.0, 2.2]])
    # two-class KL written out with plain floats: p = sigmoid((z0 - z1)/T)
    total = 0.0
    for zs, zt in zip(student.tolist(), teacher.tolist()):
        pt = 1.0 / (1.0 + math.exp(-(zt[0] - zt[1]) / T))
        ps = 1.0 / (1.0 + math.exp(-(zs[0] - zs[1]) / T))
        total += pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))
    expected = T * T * total / 4
    got = prediction_loss(student, teacher, T)
    assert got.dim() == 0
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # the direction KL(p_t || p_s) (F.kl_div(log p_s, p_t)), not KL(p_s || p_t)
    reverse = T * T * float(kl(student, teacher, T).mean())
    assert abs(reverse - expected) > 1e-3
    ref = F.kl_div(F.log_softmax(student / T, -1), F.softmax(teacher / T, -1), reduction="batchmean") * T * T
    assert float(got) == pytest.approx(float(ref), rel=1e-5)
    assert float(prediction_loss(teacher, teacher, T)) == pytest.approx(0.0, abs=1e-7)
    # the gradient reaches the student logits only through the loss (teacher logits come in detached)
    s = student.clone().requires_grad_(True)
    prediction_loss(s, teacher, T).backward()
    assert s.grad is not None and bool(s.grad.abs().sum() > 0)


def test_prediction_loss_of_a_regression_head_is_the_mse_of_the_outputs():
    """A one-output head (STS-B): the KL of a one-element softmax is always 0, so the outputs are matched by MSE."""
    student, teacher = torch.tensor([[0.5], [2.0], [4.0]]), torch.tensor([[1.0], [2.0], [3.0]])
    assert float(prediction_loss(student, teacher, T)) == pytest.approx((0.25 + 0.0 + 1.0) / 3)
    assert float(prediction_loss(teacher, teacher, T)) == 0.0
    s = student.clone().requires_grad_(True)
    prediction_loss(s, teacher, T).backward()
    assert s.grad.abs().sum() > 0  # it pulls the student's outputs towards the teacher's


def test_prediction_loss_tokens_mean_over_masked_tokens():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 7, generator=g) * 2
    teacher = torch.randn(2, 5, 7, generator=g) * 2
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0]], dtype=torch.bool)
    per_token = kl(teacher, student, T)  # (2, 5)
    expected = T * T * float(per_token[mask].sum()) / int(mask.sum())
    got = prediction_loss(student, teacher, T, token_mask=mask)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # an integer attention mask gives the same
    assert float(prediction_loss(student, teacher, T, token_mask=mask.long())) == pytest.approx(expected, rel=1e-5)
    # positions outside the mask do not matter
    changed = student.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 7, generator=g) * 5
    assert float(prediction_loss(changed, teacher, T, token_mask=mask)) == pytest.approx(expected, rel=1e-5)
    # without a mask: mean over every token
    all_tokens = T * T * float(per_token.mean())
    assert float(prediction_loss(student, teacher, T)) == pytest.approx(all_tokens, rel=1e-5)
    assert abs(all_tokens - expected) > 1e-4


def test_default_pred_weight_per_task():
    assert default_pred_weight("SEQ_CLS") == 1.0
    assert default_pred_weight("QUESTION_ANS") == 1.0
    assert default_pred_weight("CAUSAL_LM") == 0.1
    assert default_pred_weight("SEQ_2_SEQ_LM") == 0.1
    # PEFT's TaskType enum (str(TaskType.CAUSAL_LM) is 'TaskType.CAUSAL_LM' on Python >= 3.11)
    assert default_pred_weight(peft.TaskType.CAUSAL_LM) == 0.1
    assert default_pred_weight(peft.TaskType.SEQ_2_SEQ_LM) == 0.1
    assert default_pred_weight(peft.TaskType.SEQ_CLS) == 1.0


# ================================================================================================ layers (F.3)
def test_sample_teacher_layers_one_per_block_and_covering():
    blocks = [range(0, 3), range(3, 6), range(6, 9), range(9, 12)]
    seen = [dict() for _ in blocks]
    for seed in range(300):
        draw = sample_teacher_layers(12, 4, torch.Generator().manual_seed(seed))
        assert len(draw) == 4
        for b, layer in enumerate(draw):
            assert layer in blocks[b], (seed, draw)
            seen[b][layer] = seen[b].get(layer, 0) + 1
        # seeded draws are reproducible
        assert draw == sample_teacher_layers(12, 4, torch.Generator().manual_seed(seed))
    for b, counts in enumerate(seen):
        assert sorted(counts) == list(blocks[b])
        assert min(counts.values()) > 60  # ~100 each: roughly uniform within a block
    # the draw changes from step to step with one generator (redrawn every training step)
    g = torch.Generator().manual_seed(0)
    assert len({tuple(sample_teacher_layers(12, 4, g)) for _ in range(20)}) > 1


def test_sample_teacher_layers_few_layers():
    assert sample_teacher_layers(3, 4) == [0, 1, 2]
    assert sample_teacher_layers(1, 4) == [0]
    assert sample_teacher_layers(0, 4) == []
    assert sample_teacher_layers(4, 4) == [0, 1, 2, 3]
    for seed in range(30):
        draw = sample_teacher_layers(6, 4, torch.Generator().manual_seed(seed))
        assert len(draw) == 4 and len(set(draw)) == 4 and draw == sorted(draw) and all(0 <= i < 6 for i in draw)
        draw = sample_teacher_layers(32, 4, torch.Generator().manual_seed(seed))  # LLaMA: blocks of 8
        assert [i // 8 for i in draw] == [0, 1, 2, 3]


def test_layer_candidates():
    alive = [True, True, True, True]
    assert [layer_candidates(i, alive) for i in range(4)] == [[0], [1], [2], [3]]
    alive = [True, False, False, True, True]
    assert layer_candidates(0, alive) == [0]
    assert layer_candidates(1, alive) == [0, 3]
    assert layer_candidates(2, alive) == [0, 3]
    assert layer_candidates(4, alive) == [4]
    # edges: nothing below / nothing above / nothing at all
    assert layer_candidates(0, [False, False, True]) == [2]
    assert layer_candidates(2, [True, False, False]) == [0]
    assert layer_candidates(1, [False, False, False]) == []


def test_layer_loss_picks_nearer_neighbour_and_sums_mse():
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(2, 3, 8, generator=g) for _ in range(4)]
    student = [torch.randn(2, 3, 8, generator=g) for _ in range(4)]
    alive = [True, False, True, True]
    student[0] = teacher[1] + 0.01 * torch.randn(2, 3, 8, generator=g)  # layer 1 is gone: 0 and 2 compete
    mse = lambda a, b: float(((a - b) ** 2).mean())  # noqa: E731
    expected = mse(student[0], teacher[1]) + mse(student[3], teacher[3])
    got = layer_loss(student, teacher, [1, 3], alive, nn.Identity())
    assert float(got) == pytest.approx(expected, rel=1e-5)
    assert mse(student[2], teacher[1]) > mse(student[0], teacher[1])
    # now the layer above is nearer
    student[2] = teacher[1] + 0.001 * torch.randn(2, 3, 8, generator=g)
    expected = mse(student[2], teacher[1]) + mse(student[3], teacher[3])
    assert float(layer_loss(student, teacher, [1, 3], alive, nn.Identity())) == pytest.approx(expected, rel=1e-5)
    # intact layers map to themselves; a sum over all four drawn layers
    full = [True] * 4
    expected = sum(mse(student[i], teacher[i]) for i in range(4))
    assert float(layer_loss(student, teacher, [0, 1, 2, 3], full, nn.Identity())) == pytest.approx(expected, rel=1e-5)
    # Tr at initialisation is the identity
    tr = make_transform(8, rank=4, scaling=2.0)
    assert float(layer_loss(student, teacher, [0, 1, 2, 3], full, tr).detach()) == pytest.approx(expected, rel=1e-5)
    # no surviving student layer: the pair is skipped
    assert float(layer_loss(student, teacher, [1], [False] * 4, nn.Identity())) == 0.0
    # T5 form: both sides RMS-normalised first
    rms = lambda h: h / torch.sqrt((h ** 2).mean(-1, keepdim=True) + 1e-6)  # noqa: E731
    expected = mse(rms(student[3]), rms(teacher[3]))
    assert float(layer_loss(student, teacher, [3], full, nn.Identity(), normalize=True)) == pytest.approx(
        expected, rel=1e-4)


def test_layer_loss_gradient_reaches_student_and_transform():
    g = torch.Generator().manual_seed(1)
    teacher = [torch.randn(2, 3, 8, generator=g) for _ in range(2)]
    student = [torch.randn(2, 3, 8, generator=g).requires_grad_(True) for _ in range(2)]
    tr = make_transform(8, rank=4, scaling=2.0)
    layer_loss(student, teacher, [0, 1], [True, True], tr).backward()
    assert all(s.grad is not None and bool(s.grad.abs().sum() > 0) for s in student)
    assert tr.apt_B["default"].grad is not None and bool(tr.apt_B["default"].grad.abs().sum() > 0)
    assert tr.base_layer.weight.grad is None


def test_make_transform_identity_and_trainable():
    tr = make_transform(16, rank=8, scaling=2.0)
    x = torch.randn(2, 5, 16)
    assert torch.equal(tr(x), x)
    assert torch.equal(tr.base_layer.weight, torch.eye(16))
    assert tr.base_layer.bias is None and not tr.base_layer.weight.requires_grad
    assert tr.apt_A["default"].requires_grad and tr.apt_B["default"].requires_grad
    assert tr.apt_A["default"].shape == (8, 16) and tr.apt_B["default"].shape == (16, 8)
    with torch.no_grad():
        tr.apt_B["default"].add_(0.1)
    assert not torch.allclose(tr(x), x)
    # inside a PEFT model: Tr's LoRA is trainable, its identity frozen; absent without distillation
    pm = peft.get_peft_model(make_model("bert"), apt_hf.APTConfig(task_type="SEQ_CLS", transform_rank=4))
    names = {n: p.requires_grad for n, p in pm.named_parameters() if "apt_transform" in n}
    assert {n.split("apt_transform.")[1]: v for n, v in names.items()} == {
        "base_layer.weight": False, "apt_A.default": True, "apt_B.default": True}
    tr = apt_hf.find_apt_model(pm).apt_transform
    assert tr.r["default"] == 4 and torch.equal(tr.base_layer.weight, torch.eye(32))
    plain = peft.get_peft_model(make_model("bert"), apt_hf.APTConfig(task_type="SEQ_CLS", distillation=False))
    assert not any("apt_transform" in n for n, _ in plain.named_parameters())


def test_alive_layers_bert_after_removing_all_heads_of_one_layer():
    pm = peft.get_peft_model(make_model("bert"), apt_hf.APTConfig(task_type="SEQ_CLS"))
    apt = apt_hf.find_apt_model(pm)
    assert alive_layers(apt.layout) == {"main": [True, True, True]}
    masks = apt.masks
    masks.heads[1] = torch.zeros(masks.heads[1].numel())
    masks.heads[0] = torch.tensor([1.0, 0.0, 1.0, 0.0])  # a partly pruned layer still exists
    apt.prune_to_masks()
    assert alive_layers(apt.layout) == {"main": [True, False, True]}
    masks.neurons[2] = torch.zeros(masks.neurons[2].numel())  # a layer without FFN neurons is gone too
    apt.prune_to_masks()
    assert alive_layers(apt.layout) == {"main": [True, False, False]}


def test_alive_layers_with_masks_ignores_held_blocks():
    """A layer whose heads are all zero-masked but still physically present (held back while distilling) is not
    alive for the layer mapping (spec F.3); nor is one whose FFN neurons are."""
    pm = peft.get_peft_model(make_model("bert"), apt_hf.APTConfig(task_type="SEQ_CLS"))
    apt = apt_hf.find_apt_model(pm)
    masks = apt.masks
    masks.heads[1] = torch.zeros(masks.heads[1].numel())
    masks.heads[0] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    masks.neurons[2] = torch.zeros(masks.neurons[2].numel())
    assert alive_layers(apt.layout, masks) == {"main": [True, False, False]}
    assert alive_layers(apt.layout) == {"main": [True, True, True]}  # the physical view: nothing removed yet


def test_alive_layers_t5_site_order():
    """T5 head masks: encoder self-attentions, then per decoder block its self- and cross-attention (the T5 spec's
    layout and stacks)."""
    config = tiny_t5().config
    config.num_decoder_layers = 3
    layout = apt_hf.describe(transformers.T5ForConditionalGeneration(config))
    masks = lambda heads, neurons: SimpleNamespace(  # noqa: E731
        heads=[torch.full((4,), float(h)) for h in heads], neurons=[torch.full((8,), float(n)) for n in neurons])
    # 2 encoder blocks, 3 decoder blocks; decoder block 1 lost its cross-attention, block 2 its FFN,
    # encoder block 0 its self-attention
    assert alive_layers(layout, masks((0, 1, 1, 1, 1, 0, 1, 1), (1, 1, 1, 1, 0))) == {
        "encoder": [False, True], "decoder": [True, False, False]}
    assert alive_layers(layout, masks((1, 1, 0, 1, 1, 1, 1, 1), (1, 1, 1, 1, 1))) == {
        "encoder": [True, True], "decoder": [False, True, True]}


# ================================================================================================ teacher (F.1)
def _bert_with_teacher(seed: int = 0):
    pm = peft.get_peft_model(make_model("bert"), apt_hf.APTConfig(task_type="SEQ_CLS"))
    randomize_adapters(pm, seed=seed)
    pm.eval()
    teacher = Teacher()
    teacher.refresh([p for p in pm.parameters() if p.requires_grad])
    return pm, apt_hf.find_apt_model(pm), teacher


def _out(pm, inputs) -> torch.Tensor:
    with torch.no_grad():
        return pm(**inputs).logits


def _teacher_out(pm, teacher, masks, inputs) -> torch.Tensor:
    with torch.no_grad(), teacher.active(masks):
        return pm(**inputs).logits


def test_teacher_shares_backbone_and_snapshots_adapters():
    pm, apt, teacher = _bert_with_teacher()
    inputs = make_inputs("bert")
    trainable = [p for p in pm.parameters() if p.requires_grad]
    frozen = [p for p in pm.parameters() if not p.requires_grad]
    assert teacher.ready and len(teacher.snapshot) == len(trainable)
    assert any(p is apt.apt_transform.apt_A["default"] for p in trainable)
    frozen_ptrs = [p.data_ptr() for p in frozen]
    student_ptrs = [p.data_ptr() for p in trainable]
    snapshot_ptrs = {id(p): v.data_ptr() for p, v in teacher.snapshot.values()}
    # the snapshot is a copy of the trainable tensors, not a view of them
    assert not set(snapshot_ptrs.values()) & set(student_ptrs)

    before = _out(pm, inputs)
    assert torch.allclose(_teacher_out(pm, teacher, apt.masks, inputs), before, atol=1e-6, rtol=0)

    with torch.no_grad(), teacher.active(apt.masks):
        # no copy of the backbone: every frozen tensor is the very same storage
        assert [p.data_ptr() for p in frozen] == frozen_ptrs
        # trainable tensors point at the snapshot (swapped in, not copied)
        assert all(p.data_ptr() == snapshot_ptrs[id(p)] for p in trainable)
        assert apt.masks.bypass

    # change the student's adapters: the teacher snapshot does not move
    saved = {id(p): v.clone() for p, v in teacher.snapshot.values()}
    layer = next(iter(apt.apt_layers().values()))
    with torch.no_grad():
        for layer in apt.apt_layers().values():
            layer.apt_B["default"].add_(1.0)
    assert all(torch.equal(v, saved[i]) for i, (_, v) in teacher.snapshot.items())
    after = _out(pm, inputs)
    assert not torch.allclose(after, before, atol=1e-4)
    expected_params = [p.detach().clone() for p in trainable]
    teacher_logits = _teacher_out(pm, teacher, apt.masks, inputs)
    assert torch.allclose(teacher_logits, before, atol=1e-6, rtol=0)
    assert not torch.allclose(teacher_logits, after, atol=1e-4)
    # the student is restored after the context: same values and same storage
    assert all(torch.equal(p, e) for p, e in zip(trainable, expected_params))
    assert [p.data_ptr() for p in trainable] == student_ptrs
    assert [p.data_ptr() for p in frozen] == frozen_ptrs
    assert not apt.masks.bypass
    assert torch.allclose(_out(pm, inputs), after, atol=1e-6, rtol=0)

    # a refresh makes the teacher the current student
    teacher.refresh(trainable)
    assert teacher.refreshes == 2
    assert torch.allclose(_teacher_out(pm, teacher, apt.masks, inputs), after, atol=1e-6, rtol=0)


def test_teacher_ignores_masks_and_restores_on_error():
    pm, apt, teacher = _bert_with_teacher()
    inputs = make_inputs("bert")
    unmasked = _out(pm, inputs)
    apt.masks.heads[1] = torch.tensor([1.0, 0.5, 0.0, 1.0])
    apt.masks.hidden.copy_(torch.where(torch.arange(32) % 5 == 0, 0.3, 1.0))
    masked = _out(pm, inputs)
    assert not torch.allclose(masked, unmasked, atol=1e-4)
    assert torch.allclose(_teacher_out(pm, teacher, apt.masks, inputs), unmasked, atol=1e-6, rtol=0)
    assert torch.allclose(_out(pm, inputs), masked, atol=1e-6, rtol=0)
    # an exception inside the teacher pass still restores the student and the masks
    trainable = [p for p in pm.parameters() if p.requires_grad]
    with torch.no_grad():
        apt.apt_transform.apt_B["default"].add_(0.5)
    values = [p.detach().clone() for p in trainable]
    with pytest.raises(RuntimeError, match="boom"):
        with teacher.active(apt.masks):
            raise RuntimeError("boom")
    assert not apt.masks.bypass
    assert all(torch.equal(p, v) for p, v in zip(trainable, values))


def test_teacher_follows_physical_pruning():
    pm, apt, teacher = _bert_with_teacher()
    inputs = make_inputs("bert")
    random_masks(pm, seed=3)  # layer 0 loses every head, layer 1 every neuron, a quarter of the hidden dims
    masked_student = _out(pm, inputs)  # student == teacher snapshot here, so this is the masked teacher model
    changes = apt.prune_to_masks()
    teacher.follow(changes)
    live = {id(p): p for p in pm.parameters()}
    for key, (param, value) in teacher.snapshot.items():
        if key in live:  # parameters of modules removed whole may linger; live ones must fit
            assert value.shape == param.shape, param.shape
    assert all(id(p) in teacher.snapshot for p in pm.parameters() if p.requires_grad)
    teacher_logits = _teacher_out(pm, teacher, apt.masks, inputs)
    assert torch.allclose(teacher_logits, masked_student, atol=1e-4, rtol=0)
    assert torch.allclose(_out(pm, inputs), masked_student, atol=1e-4, rtol=0)
    # after the student moves on, the (sliced) teacher still gives the old outputs
    with torch.no_grad():
        for layer in apt.apt_layers().values():
            layer.apt_B["default"].add_(0.3)
    assert not torch.allclose(_out(pm, inputs), masked_student, atol=1e-4)
    assert torch.allclose(_teacher_out(pm, teacher, apt.masks, inputs), masked_student, atol=1e-4, rtol=0)


def test_teacher_keeps_its_rank_when_the_student_grows():
    pm, apt, teacher = _bert_with_teacher()
    inputs = make_inputs("bert")
    ref = _teacher_out(pm, teacher, apt.masks, inputs)
    layer = apt.apt_layers()["bert.encoder.layer.2.intermediate.dense"]
    r = layer.r["default"]
    changes = layer.grow_rank("default", r + 4)
    assert changes
    teacher.follow(changes)
    assert torch.allclose(_out(pm, inputs), ref, atol=1e-6, rtol=0)  # growth alone changes nothing (E.3.6)
    with torch.no_grad():
        layer.apt_B["default"][:, r:] = 2.0  # the new rank directions now change the student
    assert (_out(pm, inputs) - ref).abs().max() > 1e-4
    with torch.no_grad(), teacher.active(apt.masks):
        assert layer.apt_A["default"].shape[0] == r and layer.apt_B["default"].shape[1] == r
        logits = pm(**inputs).logits
    assert torch.allclose(logits, ref, atol=1e-6, rtol=0)
    assert layer.apt_A["default"].shape[0] == r + 4 and layer.apt_B["default"].shape[1] == r + 4
    assert bool((layer.apt_B["default"][:, r:] == 2.0).all())


def test_teacher_state_dict_round_trip():
    pm, apt, teacher = _bert_with_teacher()
    names = {id(p): n for n, p in pm.named_parameters()}
    state = teacher.state_dict(names)
    assert set(state) == {n for n, p in pm.named_parameters() if p.requires_grad}
    other = Teacher()
    other.load_state_dict(state, dict(pm.named_parameters()))
    with torch.no_grad():
        for layer in apt.apt_layers().values():
            layer.apt_B["default"].add_(1.0)
    inputs = make_inputs("bert")
    assert torch.allclose(_teacher_out(pm, other, apt.masks, inputs), _teacher_out(pm, teacher, apt.masks, inputs),
                          atol=1e-6, rtol=0)


def test_teacher_state_from_another_model_is_refused():
    pm, _, teacher = _bert_with_teacher()
    params = dict(pm.named_parameters())
    state = teacher.state_dict({id(p): n for n, p in pm.named_parameters()})
    name = next(iter(state))
    with pytest.raises(ValueError, match="does not have"):
        Teacher().load_state_dict({**state, "base_model.model.extra.apt_A": state[name]}, params)
    with pytest.raises(ValueError, match="larger than"):
        Teacher().load_state_dict({**state, name: torch.zeros(*(n + 1 for n in state[name].shape))}, params)


# ================================================================================================ phases (F.2)
@pytest.mark.parametrize("kind", ["bert", "llama_gqa", "t5"])
def test_training_phases(kind, tmp_path):
    # spec F.2's recovery rate (the default is 1.0) and spec F.1's teacher whatever it answers (the tiny random
    # teacher gives some batches one answer, which the default skips: test_skip_constant_teacher_leaves_only_...)
    tr, pm, rec = train(kind, tmp_path, post_distill_lr_ratio=0.1, skip_constant_teacher=False)
    a_pred = RUNS[kind][3]
    assert tr.state.global_step == MAX_STEPS
    assert (tr.distiller.start, tr.distiller.end) == (DISTILL_START, DISTILL_END)
    logs = train_logs(tr)
    assert [h["step"] for h in logs] == list(range(1, MAX_STEPS + 1))

    # distillation logs exactly during [start, end), with mu = distill_mu over the pruning window
    distill = [h for h in logs if "apt/mu" in h]
    assert [h["step"] for h in distill] == list(range(DISTILL_START, DISTILL_END))
    for h in logs:
        inside = DISTILL_START <= h["step"] < DISTILL_END
        for key in ("apt/mu", "loss_task", "loss_pred", "loss_layer"):
            assert (key in h) == inside, (key, h["step"])
    mus = [h["apt/mu"] for h in distill]
    assert all(b >= a for a, b in zip(mus, mus[1:]))
    for h in distill:
        assert h["apt/mu"] == pytest.approx(distill_mu(h["step"], start=SCHEDULE["pruning_start"],
                                                       end=SCHEDULE["pruning_end"]), abs=1e-9)
    assert mus[0] < 1.0 and mus[-1] == 1.0
    # the logged loss is mu (a_pred L_pred + a_layer L_layer) + (1 - mu) L_task, with the per-task a_pred
    for h in distill:
        assert all(math.isfinite(h[k]) for k in ("loss_task", "loss_pred", "loss_layer"))
        assert h["loss_pred"] >= -1e-6 and h["loss_layer"] >= 0
        mu = h["apt/mu"]
        want = mu * (a_pred * h["loss_pred"] + 0.9 * h["loss_layer"]) + (1 - mu) * h["loss_task"]
        assert h["loss"] == pytest.approx(want, rel=1e-5, abs=1e-7), h
    assert any(h["loss_layer"] > 0 for h in distill)

    # teacher refreshes: considered at the windows of real events before distill_end, taken when eval_loss improves
    assert tr.distiller.refresh_steps == set(WINDOWS)
    evals = {h["step"]: h["eval_loss"] for h in tr.state.log_history if "eval_loss" in h}
    assert set(WINDOWS) <= set(evals)
    best, improvements = None, 0
    for step in WINDOWS:
        if best is None or evals[step] < best:
            best, improvements = evals[step], improvements + 1
    assert tr.distiller.teacher.refreshes == improvements >= 1

    # learning rate: the linear schedule until distill_end, then 0.1 x LR (as set above) with a fresh 6 % warm-up and
    # linear decay (spec F.2), used and logged
    for step in range(1, MAX_STEPS + 1):
        want = linear_lr(step) if step <= DISTILL_END else 0.1 * post_distill_lr(step)
        assert rec.lr[step] == pytest.approx([want] * len(rec.lr[step]), rel=1e-6, abs=1e-12), step
        assert logs[step - 1]["learning_rate"] == pytest.approx(want, rel=1e-6, abs=1e-12), step

    # the fine-tuning phase started from a fresh optimizer state (spec F.2): Adam counted only its own steps
    inner = tr.optimizer.optimizer if hasattr(tr.optimizer, "optimizer") else tr.optimizer
    steps = {int(st["step"]) for p, st in inner.state.items() if p.requires_grad}
    assert steps == {MAX_STEPS - DISTILL_END}

    # pruned to the target; finite losses throughout
    assert density(pm) <= 0.41
    assert all(math.isfinite(h["loss"]) for h in logs)
    assert math.isfinite(tr.state.log_history[-1]["train_loss"])


class StructureRecorder(TrainerCallback):
    """After each step (added after the APT callbacks): the teacher's logits on a fixed batch, the physical and the
    kept (mask > 0) head/neuron counts, the masks, and the number of teacher refreshes so far."""

    def __init__(self, trainer, batch: dict) -> None:
        self.trainer, self.batch, self.at = trainer, batch, {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        apt, distiller = apt_hf.find_apt_model(model), self.trainer.distiller
        masks = apt.masks
        teacher = None
        if distiller.teacher.ready:
            teacher = distiller.teacher.outputs(model, masks, self.batch).logits.clone()
        self.at[state.global_step] = SimpleNamespace(
            teacher=teacher, refreshes=distiller.teacher.refreshes, detached=distiller.teacher.model is not None,
            physical=(sum(s.num_heads for s in apt.layout.attentions), sum(f.num_neurons for f in apt.layout.ffns)),
            kept=(sum(int((m > 0).sum()) for m in masks.heads), sum(int((m > 0).sum()) for m in masks.neurons)),
            masks=[m.clone() for m in [*masks.heads, *masks.neurons]], held=self.trainer.apt_callback.held)
        return control


@pytest.mark.parametrize("kind", ["bert", "llama_gqa"])
def test_teacher_keeps_its_structure_until_refresh(kind, tmp_path):
    """Spec D.4.2 / D.5: while distilling, blocks pruned at an event stay physically present (zero-masked) so the
    mask-bypassing teacher keeps exactly the model it was snapshotted from; they are removed at the next teacher
    refresh and at the end of distillation, and never selected again in between."""
    factory, task, data, _ = RUNS[kind]
    pm = peft.get_peft_model(factory(), apt_hf.APTConfig(task_type=task, **SCHEDULE, distill_end=DISTILL_END))
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=8, max_steps=MAX_STEPS, learning_rate=LR,
                             logging_steps=5, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             seed=0)
    ds = TokenData(data)
    tr = apt_hf.APTTrainer(model=pm, args=args, train_dataset=ds)  # no eval data: refresh at every window start
    batch = {k: torch.stack([ds[i][k] for i in range(4)]) for k in ("input_ids", "attention_mask")}
    rec = StructureRecorder(tr, batch)
    tr.add_callback(rec)
    tr.train()
    at = rec.at
    assert [s for s in range(2, MAX_STEPS + 1) if at[s].refreshes > at[s - 1].refreshes] == list(WINDOWS)

    for step in range(DISTILL_START - 1, DISTILL_END):
        now, before = at[step], at[step - 1]
        if step in EVENTS[:-1]:  # pruned in the masks (they may reach 0 inside the window already), held physically
            pre = at[WINDOWS[EVENTS.index(step)] - 1]
            assert now.kept[0] + now.kept[1] < pre.kept[0] + pre.kept[1], step
            assert now.physical == before.physical and now.held is not None and not now.detached, step
        if step >= EVENTS[-1]:  # no refresh left: the teacher has its own copy, the student drops held blocks
            assert now.detached and now.held is None and now.physical[1] == now.kept[1], step
            if kind == "bert":
                assert now.physical[0] == now.kept[0] < before.physical[0] or step > EVENTS[-1], step
        if step in WINDOWS:  # refresh: held blocks removed first, then the new snapshot
            assert now.held is None and now.physical[1] == now.kept[1], step
            if kind == "bert":  # (GQA keeps padding heads of surviving groups physically)
                assert now.physical[0] < before.physical[0], step
        elif before.teacher is not None:  # no refresh: the teacher computes exactly what it computed before
            torch.testing.assert_close(now.teacher, before.teacher, rtol=0, atol=1e-5, msg=f"step {step}")
        if now.physical == before.physical and before.held is not None:  # held blocks never come back
            for m_now, m_before in zip(now.masks, before.masks):
                assert not bool(((m_before == 0) & (m_now != 0)).any()), step
    # distillation ends with nothing held and no teacher: the physical model is exactly the kept structure
    end = at[DISTILL_END]
    assert end.held is None and not end.detached and not tr.distiller.teacher.ready
    assert end.physical[1] == end.kept[1]
    if kind == "bert":
        assert end.physical[0] == end.kept[0]
    assert density(pm) <= 0.41


def test_mu_is_averaged_over_the_logging_window(tmp_path):
    tr, _, _ = train("bert", tmp_path, logging_steps=5, skip_constant_teacher=False)  # mu on its ramp at every step
    logs = train_logs(tr)
    steps = [h["step"] for h in logs]
    # every 5 steps, plus a log at each pruning event
    assert steps == sorted(set(range(5, MAX_STEPS + 1, 5)) | set(EVENTS))
    distill = []
    for prev, h in zip([0] + steps, logs):
        window = [s for s in range(prev + 1, h["step"] + 1) if DISTILL_START <= s < DISTILL_END]
        assert ("apt/mu" in h) == bool(window) == ("loss_pred" in h) == ("loss_layer" in h), h["step"]
        if window:
            want = sum(distill_mu(s, start=4, end=24) for s in window) / len(window)
            assert h["apt/mu"] == pytest.approx(want, abs=1e-9), h["step"]
            distill.append(h["apt/mu"])
    assert len(distill) >= 6 and all(b >= a for a, b in zip(distill, distill[1:]))


def test_regression_student_is_pulled_towards_the_teachers_outputs(tmp_path):
    """A one-output head (STS-B): the prediction term is the outputs' MSE, not a KL that is 0 by construction."""
    tr, _, _ = train("bert_regression", tmp_path)
    distill = [h for h in train_logs(tr) if "loss_pred" in h]
    assert distill and all(math.isfinite(h["loss_pred"]) for h in distill)
    assert sum(h["loss_pred"] > 1e-6 for h in distill) >= len(distill) // 2


def test_mu_cap_keeps_the_task_loss_in_the_objective(tmp_path):
    """APTConfig.distill_mu_max (beyond spec F.3): mu follows the pruning-window ramp up to the cap and stays there,
    and the logged loss keeps (1 - cap) of the task loss after the window."""
    tr, _, _ = train("bert", tmp_path, distill_mu_max=0.5, skip_constant_teacher=False)  # mu on its ramp every step
    distill = [h for h in train_logs(tr) if "apt/mu" in h]
    assert [h["step"] for h in distill] == list(range(DISTILL_START, DISTILL_END))
    for h in distill:
        ramp = distill_mu(h["step"], start=SCHEDULE["pruning_start"], end=SCHEDULE["pruning_end"])
        assert h["apt/mu"] == pytest.approx(min(0.5, ramp), abs=1e-9)
        want = h["apt/mu"] * (RUNS["bert"][3] * h["loss_pred"] + 0.9 * h["loss_layer"]) + (1 - h["apt/mu"]) * h["loss_task"]
        assert h["loss"] == pytest.approx(want, rel=1e-5, abs=1e-7), h
    assert any(h["apt/mu"] < 0.5 for h in distill) and distill[-1]["apt/mu"] == 0.5


class EvaluateAt(TrainerCallback):
    """Ask for an evaluation at the given steps and record the model's logits on a fixed batch at each evaluation
    (added before the APT callbacks, so it sees the model before any reload) and at the start of each step."""

    def __init__(self, steps, batch: dict) -> None:
        self.steps, self.batch = set(steps), batch
        self.at_eval: dict[int, torch.Tensor] = {}
        self.at_begin: dict[int, torch.Tensor] = {}

    def _logits(self, model) -> torch.Tensor:
        was = model.training
        model.eval()
        with torch.no_grad():
            out = model(**self.batch).logits.clone()
        model.train(was)
        return out

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.at_begin[state.global_step + 1] = self._logits(model)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            control.should_evaluate = True
        return control

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.at_eval[state.global_step] = self._logits(model)
        return control


def test_best_post_pruning_student_is_reloaded_at_distill_end(tmp_path):
    """Spec F.2 step 3: at distill_end the best student evaluated after the last pruning event (on
    metric_for_best_model) is reloaded before the task-loss fine-tuning starts; evaluations before the last event
    never count, however good."""
    factory, task, data, _ = RUNS["bert"]
    pm = peft.get_peft_model(factory(), apt_hf.APTConfig(task_type=task, **SCHEDULE, distill_end=DISTILL_END))
    scores = {w: 0.5 + 0.01 * i for i, w in enumerate(WINDOWS)}  # every window refreshes the teacher
    scores.update({20: 0.99, 26: 0.70, 28: 0.80, 30: 0.60, DISTILL_END: 0.65})  # 20 is before the last event (24)
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=8, max_steps=MAX_STEPS, learning_rate=LR,
                             logging_steps=5, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             seed=0, eval_strategy="steps", eval_steps=1000, metric_for_best_model="score")
    ds = TokenData(data)
    batch = {k: torch.stack([ds[i][k] for i in range(4)]) for k in ("input_ids", "attention_mask")}
    rec = EvaluateAt([20, 26, 28, 30], batch)
    tr = None
    tr = apt_hf.APTTrainer(model=pm, args=args, train_dataset=ds, eval_dataset=torch.utils.data.Subset(ds, range(16)),
                           callbacks=[rec], compute_metrics=lambda p: {"score": scores.get(tr.state.global_step, 0.0)})
    tr.train()
    assert set(WINDOWS) | {20, 26, 28, 30, DISTILL_END} <= set(rec.at_eval)
    assert tr.distiller.teacher.refreshes == len(WINDOWS)
    # fine-tuning starts from the student of step 28, not from the one distillation ended with
    start = rec.at_begin[DISTILL_END + 1]
    assert float((rec.at_eval[DISTILL_END] - rec.at_eval[28]).abs().max()) > 1e-4  # the two students differ
    torch.testing.assert_close(start, rec.at_eval[28], rtol=0, atol=1e-6)
    assert tr.apt_callback.held is None and not tr.distiller.best_student.ready
    assert density(pm) <= 0.41


def test_distillation_waits_for_first_real_event(tmp_path):
    # warm-up plateau until step 10: the event at 9 keeps density 1, the first real event is at 14
    tr, pm, _ = train("bert", tmp_path, max_steps=24, sparsity_warmup=6, distill_end=20)
    assert (tr.distiller.start, tr.distiller.end) == (15, 20)
    assert tr.distiller.refresh_steps == {11, 16}
    assert [h["step"] for h in train_logs(tr) if "loss_pred" in h] == list(range(15, 20))


@pytest.mark.parametrize("metric, greater, evals, refreshed", [
    # F1 flat at the majority-class plateau: ties are broken by the eval loss, worse metrics never win
    ("f1", None, [(0.81, 0.62), (0.81, 0.60), (0.81, 0.61), (0.79, 0.40), (0.83, 0.70), (0.83, 0.69)],
     [True, True, False, False, True, True]),
    # the eval loss itself as the metric: lower is better, equal is not
    (None, None, [(0.7, 0.7), (0.6, 0.6), (0.6, 0.6), (0.65, 0.65)], [True, True, False, False]),
    # an explicit greater_is_better=False metric (e.g. a perplexity) with a loss tie-break
    ("ppl", False, [(9.0, 2.2), (9.0, 2.1), (9.5, 1.0)], [True, True, False]),
])
def test_teacher_refresh_rule(metric, greater, evals, refreshed):
    """Spec F.1: refresh when the dev metric improves; beyond the spec, an exact tie refreshes if eval loss drops."""
    cb = apt_hf.trainer.DistillCallback(apt_callback=None, has_eval=True)
    taken = []
    cb._refresh = lambda model, optimizer: taken.append(True)
    args = SimpleNamespace(metric_for_best_model=metric, greater_is_better=greater)
    for value, loss in evals:
        cb._awaiting_eval = True
        before = len(taken)
        metrics = {"eval_loss": loss} if metric is None else {f"eval_{metric}": value, "eval_loss": loss}
        cb.on_evaluate(args, None, None, metrics=metrics, model=None)
        taken_now = len(taken) > before
        assert taken_now == refreshed.pop(0), (value, loss)
        assert not cb._awaiting_eval


def test_without_eval_teacher_refreshes_every_window(tmp_path):
    tr, pm, _ = train("bert", tmp_path, eval_data=False, max_steps=MAX_STEPS)
    assert tr.distiller.teacher.refreshes == len(WINDOWS)
    assert [h["step"] for h in train_logs(tr) if "loss_pred" in h] == list(range(DISTILL_START, DISTILL_END))


# ================================================================================================ w/o D_S (F.5)
def test_without_distillation(tmp_path):
    tr, pm, rec = train("bert", tmp_path, distillation=False)
    logs = train_logs(tr)
    assert len(logs) == MAX_STEPS
    assert not any(k in h for h in logs for k in ("loss_pred", "loss_layer", "loss_task", "apt/mu"))
    assert not tr.distiller.enabled and tr.distiller.teacher.refreshes == 0
    assert not hasattr(apt_hf.find_apt_model(pm), "apt_transform")
    # still pruned to the target at the events
    assert 0.99 * 0.4 <= density(pm) <= 0.4
    assert tr.apt_callback.events_done == len(EVENTS)
    # plain linear schedule: no post-distillation drop
    for step in range(1, MAX_STEPS + 1):
        assert rec.lr[step] == pytest.approx([linear_lr(step)] * len(rec.lr[step]), rel=1e-6, abs=1e-12)
    assert all(math.isfinite(h["loss"]) for h in logs)


@pytest.mark.parametrize("cfg", [{"target_sparsity": 0.0}, {"adaptive_pruning": False}])
def test_no_pruning_means_no_distillation_phase(cfg, tmp_path):
    """No event with target < 1 (nothing pruned): training runs with the task loss only and an undropped LR."""
    tr, pm, rec = train("bert", tmp_path, eval_data=False, max_steps=24, distill_end=20, **cfg)
    assert tr.state.global_step == 24 and not tr.distiller.enabled
    assert not any("loss_pred" in h or "apt/mu" in h for h in train_logs(tr))
    assert density(pm) == 1.0
    assert rec.lr[22] == pytest.approx([LR * (24 - 21) / 24] * len(rec.lr[22]))


# ================================================================================================ errors
@pytest.mark.parametrize("distill_end", [5, 9, 10, 0.2])
def test_distill_end_before_first_real_event_raises(distill_end, tmp_path):
    factory, task, data, _ = RUNS["bert"]
    pm = peft.get_peft_model(factory(), apt_hf.APTConfig(task_type=task, **SCHEDULE, distill_end=distill_end))
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=8, max_steps=MAX_STEPS, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True)
    tr = apt_hf.APTTrainer(model=pm, args=args, train_dataset=TokenData(data))
    with pytest.raises(ValueError, match="distill_end"):
        tr.train()
    assert tr.state.global_step == 0


def test_distill_end_after_plateau_event_but_before_real_event_raises(tmp_path):
    factory, task, data, _ = RUNS["bert"]
    cfg = apt_hf.APTConfig(task_type=task, **{**SCHEDULE, "sparsity_warmup": 6}, distill_end=12)
    pm = peft.get_peft_model(factory(), cfg)
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=8, max_steps=MAX_STEPS, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True)
    tr = apt_hf.APTTrainer(model=pm, args=args, train_dataset=TokenData(data))
    with pytest.raises(ValueError, match="distill_end"):
        tr.train()


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def test_run_stopped_while_removal_is_held_ends_pruned(tmp_path):
    """A run that stops (early stopping, max time) between an event and the next teacher refresh still ends with
    the held blocks removed physically, so what is saved is the small model."""
    factory, task, data, _ = RUNS["bert"]
    pm = peft.get_peft_model(factory(), apt_hf.APTConfig(task_type=task, **SCHEDULE, distill_end=DISTILL_END))
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=8, max_steps=MAX_STEPS, learning_rate=LR,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    tr = apt_hf.APTTrainer(model=pm, args=args, train_dataset=TokenData(data), callbacks=[StopAt(EVENTS[1])])
    seen = {}

    class Peek(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen[state.global_step] = tr.apt_callback.held is not None
            return control

    tr.add_callback(Peek())
    tr.train()
    assert tr.state.global_step == EVENTS[1] and seen[EVENTS[1]], "the run should stop with removal held back"
    apt = apt_hf.find_apt_model(pm)
    assert tr.apt_callback.held is None
    assert [s.num_heads for s in apt.layout.attentions] == [int((m > 0).sum()) for m in apt.masks.heads]
    assert [f.num_neurons for f in apt.layout.ffns] == [int((m > 0).sum()) for m in apt.masks.neurons]


# ================================================================================================ constant teachers
@pytest.mark.parametrize("logits, want", [
    (torch.tensor([[2.0, 1.0], [3.0, -1.0], [0.5, 0.4]]), True),  # class 0 for every example
    (torch.tensor([[2.0, 1.0], [1.0, 3.0], [0.5, 0.4]]), False),
    (torch.tensor([[0.7], [0.7], [0.7]]), True),  # regression: one score
    (torch.tensor([[0.7], [0.9], [0.7]]), False),
    (torch.tensor([[2.0, 1.0]]), False),  # one example says nothing
    (torch.zeros(2, 3, 5), False),  # per-token logits are not judged
])
def test_gives_one_answer(logits, want):
    assert apt_hf.distill.gives_one_answer(logits) is want


@pytest.mark.parametrize("constant", [True, False])
def test_skip_constant_teacher_leaves_only_the_task_loss(constant, tmp_path, monkeypatch):
    """APTConfig.skip_constant_teacher: a step whose teacher gives the batch one answer takes mu = 0 (the task loss
    alone) and logs apt/teacher_one_answer = 1; otherwise mu follows its ramp."""
    monkeypatch.setattr(apt_hf.trainer, "gives_one_answer", lambda logits: constant)
    tr, _, _ = train("bert", tmp_path, skip_constant_teacher=True)
    distill = [h for h in train_logs(tr) if "apt/mu" in h]
    assert distill and all(h["apt/teacher_one_answer"] == float(constant) for h in distill)
    for h in distill:
        ramp = distill_mu(h["step"], start=SCHEDULE["pruning_start"], end=SCHEDULE["pruning_end"])
        assert h["apt/mu"] == (0.0 if constant else pytest.approx(ramp, abs=1e-9))
        if constant:
            assert h["loss"] == pytest.approx(h["loss_task"], rel=1e-5, abs=1e-7)
