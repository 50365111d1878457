"""Tests of ``examples/run_summarization.py`` (seq2seq summarization, ROUGE at evaluation).

Training runs use real DialogSum dialogues (``$APT_SHARED_DATA/summarization/dialogsum``: dev rows train, test rows
with three references each evaluate) and a tiny random T5 (gated-GELU, as t5-lm-adapt) whose BPE tokenizer is trained
on those rows in a second.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import transformers
from helpers_examples import REPO, accelerate_launch, explain, fail_before_training, loaded_script
from tiny_lm import SHARED_DATA, bpe_tokenizer, tiny_t5_dir

import apt_hf

SCRIPT = REPO / "examples" / "run_summarization.py"
DIALOGSUM = SHARED_DATA / "summarization" / "dialogsum"
pytestmark = pytest.mark.skipif(not (DIALOGSUM / "dialogsum.dev.jsonl").is_file(),
                                reason=f"needs DialogSum under {DIALOGSUM} (set APT_SHARED_DATA)")


@pytest.fixture(scope="module")
def run_sum():
    yield from loaded_script(SCRIPT, "run_summarization_example")


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> Path:
    rows = [json.loads(line) for line in (DIALOGSUM / "dialogsum.dev.jsonl").read_text().splitlines()[:60]]
    tok = bpe_tokenizer((r["dialogue"] + " " + r["summary"] for r in rows), vocab_size=800, chat_template=False)
    return tiny_t5_dir(tmp_path_factory.mktemp("t5"), tok)


def sum_run(model: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(model), "--train_file", str(DIALOGSUM / "dialogsum.dev.jsonl"),
            "--validation_file", str(DIALOGSUM / "dialogsum.test.jsonl"), "--max_train_samples", "24",
            "--max_eval_samples", "6", "--max_source_length", "96", "--max_target_length", "24",
            "--generation_max_length", "12", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size",
            "6", "--num_train_epochs", "2", "--logging_steps", "1", "--disable_tqdm", "True", "--seed", "0",
            "--output_dir", str(out), "--pruning_start", "0.1", "--sparsity_warmup", "0.0", "--pruning_end", "0.6",
            "--num_pruning_events", "3", *extra]


def test_rouge_takes_the_best_reference(run_sum):
    scores = run_sum.rouge_scores(["the cat sat on the mat."], [["a dog ran.", "The cat sat on the mat."]])
    assert all(v == pytest.approx(100.0) for v in scores.values())
    half = run_sum.rouge_scores(["the cat"], [["the cat sat down"]])
    assert half["rouge1"] == pytest.approx(100 * 2 * 1 * 0.5 / 1.5)


def test_dialogsum_test_rows_have_three_references(run_sum):
    rows = run_sum.load_rows(str(DIALOGSUM / "dialogsum.test.jsonl"), "dialogue", "summary")
    assert len(rows) == 500 and all(len(r["references"]) == 3 for r in rows)
    assert len(run_sum.load_rows(str(DIALOGSUM / "dialogsum.dev.jsonl"), "dialogue", "summary")[0]["references"]) == 1


@pytest.mark.parametrize("method", ["apt", "lora"])
def test_run_summarization_end_to_end(run_sum, tiny_t5, tmp_path, method):
    extra = ["--target_sparsity", "0.6", "--eval_strategy", "steps", "--eval_steps", "4"] if method == "apt" else []
    summary = run_sum.main(sum_run(tiny_t5, tmp_path, "--method", method, *extra))
    assert json.loads((tmp_path / "summary.json").read_text())["method"] == method
    assert all(0.0 <= summary["rouge"][k] <= 100.0 for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"))
    assert 0 <= summary["gen_len"] <= 12 and math.isfinite(summary["eval_loss"])  # a random model may stop at once
    if method == "apt":
        assert 0.39 <= summary["density"] <= 0.40
        assert [h for h in summary["log_history"] if "loss_pred" in h]  # KL per target token (spec F.3)
        assert [h for h in summary["log_history"] if "eval_rougeL" in h]  # generation at every evaluation
        model = apt_hf.load_pruned(summary["export_dir"])
        tok = transformers.AutoTokenizer.from_pretrained(summary["export_dir"])
        batch = tok(["summarize: #Person1#: Hello. #Person2#: Hi."], return_tensors="pt")
        assert model.generate(**batch, max_new_tokens=4).shape[0] == 1


@pytest.mark.slow
def test_run_summarization_under_accelerate_launch(tiny_t5, tmp_path):
    proc = accelerate_launch(SCRIPT, sum_run(tiny_t5, tmp_path, "--method", "lora", "--num_train_epochs", "1"))
    assert proc.returncode == 0, explain(proc)
    assert "run_summarization summary" in proc.stdout, explain(proc)
    assert "rougeL" in json.loads((tmp_path / "summary.json").read_text())["rouge"]


def test_missing_column(run_sum, tiny_t5, monkeypatch, capsys, tmp_path):
    err = fail_before_training(run_sum, monkeypatch, capsys, sum_run(tiny_t5, tmp_path, "--text_column", "article"))
    assert "record 1 lacks the text column 'article'" in err and "dialogue" in err


def test_missing_file_and_model(run_sum, tiny_t5, monkeypatch, capsys, tmp_path):
    args = sum_run(tiny_t5, tmp_path)
    args[args.index("--train_file") + 1] = str(tmp_path / "none.jsonl")
    assert "data file not found" in fail_before_training(run_sum, monkeypatch, capsys, args)
    err = fail_before_training(run_sum, monkeypatch, capsys, ["--output_dir", str(tmp_path)])
    assert "--model_name_or_path is required" in err


def test_decoder_only_model_is_refused(run_sum, monkeypatch, capsys, tmp_path):
    from tiny_lm import tiny_llama_dir

    llama = tiny_llama_dir(tmp_path / "llama", bpe_tokenizer(["a b c"] * 3, vocab_size=300))
    err = fail_before_training(run_sum, monkeypatch, capsys, sum_run(llama, tmp_path, "--method", "lora"))
    assert "not an encoder-decoder (seq2seq) model" in err and "run_sft.py" in err


def test_apt_on_a_non_t5_seq2seq_model(run_sum, monkeypatch, capsys, tmp_path):
    folder = tmp_path / "bart"
    tok = bpe_tokenizer(["a b c"] * 3, vocab_size=300, chat_template=False)
    transformers.BartConfig(vocab_size=len(tok), d_model=16, encoder_layers=1, decoder_layers=1,
                            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
                            decoder_ffn_dim=16).save_pretrained(folder)
    tok.save_pretrained(folder)
    err = fail_before_training(run_sum, monkeypatch, capsys, sum_run(folder, tmp_path, "--method", "apt"))
    assert "--method apt prunes the seq2seq models of apt_hf's encoder-decoder families" in err and "'bart'" in err
