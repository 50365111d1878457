"""The prediction-distillation loss per task family (spec F.3): extractive QA (mean of the start- and end-position
KL) and causal LMs (KL per target token, on the logits that predict the targets)."""

from __future__ import annotations

import math

import peft
import pytest
import torch
import transformers
from conftest import make_config, make_model
from transformers import TrainingArguments

import apt_hf
from apt_hf.distill import next_token_mask, prediction_logits, prediction_loss

T = 2.0 / 3.0
SCHEDULE = dict(pruning_start=4, pruning_end=24, sparsity_warmup=4, num_pruning_events=4, mask_decay_window=3,
                mask_decay=0.34, distill_end=32)
DISTILL_START, DISTILL_END = 10, 32


class SpanData(torch.utils.data.Dataset):
    """Random tokens; the answer span starts at the position of the largest token id among the first four and
    ends two tokens later (learnable, and every example has a span)."""

    def __init__(self, n: int = 96, seq_len: int = 10, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 101, (n, seq_len), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        x = self.ids[i]
        start = int(x[:4].argmax())
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "start_positions": torch.tensor(start),
                "end_positions": torch.tensor(start + 2)}


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of softmax(./T) along the last axis, term by term in float64."""
    p = torch.softmax(p_logits.double() / T, -1)
    q = torch.softmax(q_logits.double() / T, -1)
    return (p * (p.log() - q.log())).sum(-1)


def qa_model(kind: str) -> transformers.PreTrainedModel:
    cls = transformers.BertForQuestionAnswering if kind == "bert" else transformers.RobertaForQuestionAnswering
    torch.manual_seed(0)
    return cls(make_config(kind, num_attention_heads=8, intermediate_size=96, num_labels=2)).eval()


def train_qa(kind: str, out) -> tuple[apt_hf.APTTrainer, torch.nn.Module]:
    pm = peft.get_peft_model(qa_model(kind), apt_hf.APTConfig(task_type="QUESTION_ANS", **SCHEDULE))
    args = TrainingArguments(str(out), per_device_train_batch_size=8, max_steps=40, learning_rate=1e-3,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             seed=0, eval_strategy="steps", eval_steps=1000)
    ds = SpanData()
    tr = apt_hf.APTTrainer(model=pm, args=args, train_dataset=ds, eval_dataset=torch.utils.data.Subset(ds, range(32)))
    tr.train()
    return tr, pm


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_qa_distillation_uses_start_and_end_kl(kind, tmp_path, monkeypatch):
    # every prediction loss computed in training, with the student's and the teacher's start/end logits
    seen = []
    original = apt_hf.APTTrainer._distill_losses

    def spy(self, student, teacher, inputs, apt, cfg):
        pred, layer = original(self, student, teacher, inputs, apt, cfg)
        seen.append([t.detach().clone() for t in (student.start_logits, student.end_logits, teacher.start_logits,
                                                   teacher.end_logits)] + [float(pred)])
        return pred, layer

    monkeypatch.setattr(apt_hf.APTTrainer, "_distill_losses", spy)
    tr, pm = train_qa(kind, tmp_path)
    logs = [h for h in tr.state.log_history if "loss" in h and "step" in h]
    distill = [h for h in logs if "loss_pred" in h]
    assert [h["step"] for h in distill] == list(range(DISTILL_START, DISTILL_END))
    for h in distill:  # a_pred = 1.0 for QA (spec F.3: 0.1 x 10)
        mu = h["apt/mu"]
        want = mu * (1.0 * h["loss_pred"] + 0.9 * h["loss_layer"]) + (1 - mu) * h["loss_task"]
        assert h["loss"] == pytest.approx(want, rel=1e-5, abs=1e-7)
        assert math.isfinite(h["loss_pred"]) and h["loss_pred"] >= -1e-6
    assert apt_hf.count_params(pm) / apt_hf.find_apt_model(pm).n_params <= 0.41

    # the loss itself: T^2 * (KL_start + KL_end) / 2, each averaged over the batch
    assert len(seen) == DISTILL_END - DISTILL_START
    for s_start, s_end, t_start, t_end, pred in seen:
        want = T * T * (kl(t_start, s_start).mean() + kl(t_end, s_end).mean()) / 2
        assert pred == pytest.approx(float(want), rel=1e-3, abs=2e-6)  # float32 against float64
    assert max(p for *_, p in seen) > 2e-5  # the student moves away from its teacher between refreshes

    # with clearly different start and end logits: the mean of the two KL terms, not either one alone
    batch = {k: torch.stack([SpanData()[i][k] for i in range(6)]) for k in SpanData()[0]}
    apt = apt_hf.find_apt_model(pm)
    pm.eval()
    with torch.no_grad():
        hidden = pm(**batch, output_hidden_states=True).hidden_states
    g = torch.Generator().manual_seed(0)
    qa = transformers.modeling_outputs.QuestionAnsweringModelOutput
    s_start, s_end, t_start, t_end = (torch.randn(6, 10, generator=g) * (1 + i) for i in range(4))
    pred, _ = original(tr, qa(start_logits=s_start, end_logits=s_end, hidden_states=hidden),
                       qa(start_logits=t_start, end_logits=t_end, hidden_states=hidden), batch, apt,
                       apt.peft_config["default"])
    k_start, k_end = kl(t_start, s_start).mean(), kl(t_end, s_end).mean()
    assert abs(float(k_start - k_end)) > 0.1 * float(k_start)
    assert float(pred) == pytest.approx(float(T * T * (k_start + k_end) / 2), rel=1e-5)


def test_prediction_logits_of_each_output_kind():
    cls = transformers.modeling_outputs.SequenceClassifierOutput(logits=torch.ones(2, 3))
    qa = transformers.modeling_outputs.QuestionAnsweringModelOutput(start_logits=torch.zeros(2, 5),
                                                                     end_logits=torch.ones(2, 5))
    assert [t.shape for t in prediction_logits(cls)] == [(2, 3)]
    start, end = prediction_logits(qa)
    assert torch.equal(start, torch.zeros(2, 5)) and torch.equal(end, torch.ones(2, 5))
    with pytest.raises(ValueError, match="distill_pred_weight=0"):
        prediction_logits(transformers.modeling_outputs.BaseModelOutput(last_hidden_state=torch.ones(1, 2, 3)))


def test_next_token_mask_marks_the_logits_that_predict_targets():
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 5, 6, 9, 4]])
    assert next_token_mask(labels).tolist() == [[False, True, True, False, False], [True, True, True, True, False]]


def test_causal_lm_kl_is_taken_on_the_logits_that_predict_the_response(tmp_path):
    """A batch whose labels mask the prompt: the KL must average exactly the positions that predict label tokens
    (what the causal-LM cross-entropy trains), not the label positions themselves."""
    acfg = apt_hf.APTConfig(task_type="CAUSAL_LM", **SCHEDULE)
    pm = peft.get_peft_model(make_model("llama_gqa"), acfg)
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, max_steps=40, report_to=[],
                             save_strategy="no", use_cpu=True)
    tr = apt_hf.APTTrainer(model=pm, args=args, train_dataset=SpanData())
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 101, (2, 9), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[1, 7:] = -100  # padding
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    s_logits = torch.randn(2, 9, 101, generator=g)
    t_logits = torch.randn(2, 9, 101, generator=g)
    out = transformers.modeling_outputs.CausalLMOutputWithPast
    hidden = tuple(torch.zeros(2, 9, 64) for _ in range(4))
    apt = apt_hf.find_apt_model(pm)
    pred, _ = tr._distill_losses(out(logits=s_logits, hidden_states=hidden), out(logits=t_logits, hidden_states=hidden),
                                 batch, apt, acfg)
    per_token = kl(t_logits, s_logits)
    predicting = [(0, 3), (0, 4), (0, 5), (0, 6), (0, 7), (1, 3), (1, 4), (1, 5)]  # positions i with label i + 1
    want = T * T * torch.stack([per_token[b, i] for b, i in predicting]).mean()
    assert float(pred) == pytest.approx(float(want), rel=1e-5)
    assert float(pred) == pytest.approx(float(prediction_loss(s_logits, t_logits, T, next_token_mask(labels))),
                                        rel=1e-6)
