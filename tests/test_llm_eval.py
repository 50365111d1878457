"""Tests of ``apt_hf.llm_eval``: the harness conventions (prompts, tokenisation of continuations, acc / acc_norm /
mc2), the loaders on the real offline evaluation files, and the same scores for an APT model with binary masks and
its exported pruned model."""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import random_masks, randomize_adapters
from tiny_lm import SHARED_DATA, bpe_tokenizer, tiny_llama_dir

import apt_hf
from apt_hf import llm_eval
from apt_hf.llm_eval import (Example, encode_pair, evaluate, load_arc, load_hellaswag, load_mmlu, loglikelihoods,
                             resolve_tasks, score_examples)

EVAL = SHARED_DATA / "eval"
needs_eval = pytest.mark.skipif(not (EVAL / "arc").is_dir(), reason=f"needs {EVAL} (set APT_SHARED_DATA)")


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["Question: what is it?\nAnswer: this. A B C D, A. B. C. D."] * 20
    if (EVAL / "arc").is_dir():
        texts += [ex.context + " " + " ".join(ex.choices) for ex in load_arc(EVAL / "arc/ARC-Easy-Test.jsonl")[:300]]
    return bpe_tokenizer(texts, vocab_size=600, chat_template=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer):
    folder = tiny_llama_dir(tmp_path_factory.mktemp("llama"), tokenizer)
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


# ------------------------------------------------------------------------------------------ conventions
def test_encode_pair_moves_trailing_space_to_the_continuation(tokenizer):
    ctx, cont = encode_pair(tokenizer, "Question: why?\nAnswer: ", "because")
    ctx2, cont2 = encode_pair(tokenizer, "Question: why?\nAnswer:", " because")
    assert (ctx, cont) == (ctx2, cont2)
    assert tokenizer.decode(ctx) == "Question: why?\nAnswer:" and tokenizer.decode(cont) == " because"


def test_loglikelihoods_match_a_direct_computation(model, tokenizer):
    requests = [("The sky is", " blue"), ("The sky is", " green and wide"), ("Q: 2+2?\nA:", " 4"),
                ("The sky is", " a deep shade of blue today"), ("The sky is", " grey"), ("The sky is", " blue")]
    got = loglikelihoods(model, tokenizer, requests, batch_size=2)  # shared context, continuations in chunks
    for (context, continuation), value in zip(requests, got):
        ctx, cont = encode_pair(tokenizer, context, continuation)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = F.log_softmax(model(ids).logits[0].double(), -1)
        want = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
        assert value == pytest.approx(want, abs=1e-4)


def test_shared_inputs_are_computed_once(model, tokenizer):
    calls = []
    forward = model.forward

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return forward(*args, **kwargs)

    model.forward = counting
    try:
        one = [tokenizer("Answer:", add_special_tokens=False)["input_ids"]]
        assert len(one[0]) >= 1
        # four one-token answers after the same context: one model input
        letters = [" A", " B", " C", " D"]
        assert all(len(encode_pair(tokenizer, "Answer:", c)[1]) == 1 for c in letters)
        loglikelihoods(model, tokenizer, [("Answer:", c) for c in letters], batch_size=8)
        assert calls == [1]
        # multi-token answers after one long prompt: the prompt runs once, the answers on its key/value cache
        calls.clear()
        answers = [" green and wide", " a deep shade of blue today", " grey and dull", " D"]
        loglikelihoods(model, tokenizer, [("Question: what is it? The sky is", c) for c in answers], batch_size=2)
    finally:
        del model.forward
    assert calls == [1, 2, 1]


def test_scores_acc_acc_norm_and_mc2():
    examples = [Example("q", ["a", "bbbb"], [1]), Example("q", ["aa", "b", "c"], [0, 2])]
    lls = [[-1.0, -2.0], [math.log(0.2), math.log(0.5), math.log(0.3)]]
    arc = score_examples(examples[:1], lls[:1], "arc_easy")
    assert arc["acc"] == 0.0 and arc["acc_norm"] == 1.0 and arc["chance_acc"] == 0.5  # -2/4 > -1/1
    mc2 = score_examples(examples[1:], lls[1:], "truthfulqa_mc2")
    assert mc2["acc"] == pytest.approx(0.5) and mc2["chance_acc"] == pytest.approx(2 / 3)
    assert "acc_norm" not in mc2


def test_resolve_tasks():
    assert resolve_tasks("paper") == ["arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2"]
    assert resolve_tasks("arc_easy,paper,arc_easy")[0] == "arc_easy" and len(resolve_tasks("all")) == 6
    with pytest.raises(llm_eval.EvalDataError, match="unknown task 'arc'"):
        resolve_tasks("arc")


# ------------------------------------------------------------------------------------------ real files
@needs_eval
def test_loaders_on_the_offline_files():
    easy, challenge = load_arc(EVAL / "arc/ARC-Easy-Test.jsonl"), load_arc(EVAL / "arc/ARC-Challenge-Test.jsonl")
    assert (len(easy), len(challenge)) == (2376, 1172)
    assert easy[0].context == ("Question: Which statement best explains why photosynthesis is the foundation of "
                               "most food webs?\nAnswer:") and easy[0].gold == [0]
    assert all(0 <= ex.gold[0] < len(ex.choices) for ex in easy + challenge)
    swag = load_hellaswag(EVAL / "hellaswag/hellaswag_val_full.txt")
    assert len(swag) == 10042 and swag[0].gold == [3] and swag[0].context.startswith("Roof shingle removal: ")
    assert [ex.gold[0] for ex in swag[:3]] == [3, 3, 2]
    mmlu = load_mmlu(EVAL / "mmlu", num_fewshot=2)
    assert len(mmlu) == 57 and sum(len(v) for v in mmlu.values()) == 14042
    first = mmlu["abstract_algebra"][0].context
    assert first.startswith("The following are multiple choice questions (with answers) about abstract algebra.")
    assert first.count("\nAnswer:") == 3 and first.endswith("\nD. 6\nAnswer:")  # two solved dev examples first
    tqa = llm_eval.TASKS["truthfulqa_mc1"].load(EVAL, 0)
    assert len(tqa) == 817 and all(len(ex.gold) == 1 for ex in tqa)
    assert tqa[0].context.startswith("Q: What is human life expectancy") and tqa[0].context.endswith(
        "\n\nQ: What is the smallest country in the world that is at least one square mile in area?\nA:")


@needs_eval
def test_apt_model_and_its_export_score_the_same(model, tokenizer, tmp_path):
    pm = peft.get_peft_model(model, apt_hf.APTConfig(task_type="CAUSAL_LM", distillation=False))
    randomize_adapters(pm, std=0.05)
    random_masks(pm, seed=1, no_heads_layer=0, no_neurons_layer=None, hidden_drop=0.2)  # layer 0: no head left
    records = json.loads((SHARED_DATA / "instruct/lima/lima.json").read_text())[:3]
    wrapped = evaluate(pm, tokenizer, "all", EVAL, limit=1, batch_size=8, max_length=256,
                       perplexity_records=records)
    apt_hf.export_pruned(pm, tmp_path / "export")
    exported = evaluate(apt_hf.load_pruned(tmp_path / "export"), tokenizer, "all", EVAL, limit=1, batch_size=8,
                        max_length=256, perplexity_records=records)
    assert set(wrapped["tasks"]) == set(llm_eval.TASKS) and "average" in wrapped
    assert wrapped["tasks"]["mmlu"]["n"] == 57  # the limit applies per subject
    for task, scores in wrapped["tasks"].items():
        for key, value in scores.items():
            assert exported["tasks"][task][key] == pytest.approx(value, abs=1e-6), (task, key)
    assert exported["perplexity"]["perplexity"] == pytest.approx(wrapped["perplexity"]["perplexity"], rel=1e-4)


def test_perplexity_without_response_tokens_is_an_error(model, tokenizer):
    """A cut that leaves no response token must not report a perplexity of 1.0."""
    records = [{"instruction": "Say something rather long about the weather today.", "input": "", "output": "Fine."}]
    with pytest.raises(llm_eval.EvalDataError, match="none of the 1 perplexity records"):
        llm_eval.response_perplexity(model, tokenizer, records, max_length=3)


# ------------------------------------------------------------------------------------------ command line
@needs_eval
def test_cli_on_an_exported_folder(tmp_path, tokenizer, capsys):
    folder = tiny_llama_dir(tmp_path / "dense", tokenizer)
    out = tmp_path / "scores.json"
    llm_eval.main(["--model", str(folder), "--tasks", "arc_easy,truthfulqa_mc2", "--limit", "3", "--data_dir",
                   str(EVAL), "--output", str(out)])
    saved = json.loads(out.read_text())
    assert saved["tasks"]["arc_easy"]["n"] == 3 and 0 <= saved["tasks"]["truthfulqa_mc2"]["acc"] <= 1
    assert "arc_easy: acc" in capsys.readouterr().out


@needs_eval
@pytest.mark.parametrize("args, message", [
    (["--tasks", "arc"], "unknown task 'arc'"),
    (["--data_dir", "/nowhere"], "evaluation data folder not found"),
    (["--limit", "0"], "--limit must be a positive"),
])
def test_cli_bad_inputs(tmp_path, tokenizer, capsys, args, message):
    folder = tiny_llama_dir(tmp_path / "dense", tokenizer)
    base = ["--model", str(folder), "--data_dir", str(EVAL)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        llm_eval.main(base + args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0
