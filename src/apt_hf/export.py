"""Export a trained APT model as a small dense model, and load it back (spec G, K.9).

The export (written by the pruned model's ``save_pretrained``, see :mod:`apt_hf.remote`) loads three ways: with
``apt_hf.load_pruned`` (no code from the folder runs), with stock transformers' ``AutoModel….from_pretrained(folder,
trust_remote_code=True)`` or ``pipeline(task, model=folder, trust_remote_code=True)`` in a process without apt_hf,
and all three give the same model.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch
import transformers
from torch import nn

from . import runtime
from .arch import FAMILIES
from .model import find_apt_model
from .remote import (CLASS_PREFIX, STRUCTURE_FILE, check_finite, is_model_file, listed_files, make_exportable,
                     pruned_config_class, pruned_model_class, structure_record)

__all__ = ["export_pruned", "load_pruned", "structure_record", "STRUCTURE_FILE"]

_FORMAT1_TOKENIZER = re.compile(r"(tokenizer|tokenizer_config|special_tokens_map|added_tokens|vocab)\.json"
                                r"|vocab\.txt|merges\.txt|spiece\.model|chat_template\.jinja")


def _replaceable(folder: Path) -> list[Path]:
    """Files of an earlier export in ``folder`` that ``overwrite=True`` may remove; refuses anything else."""
    listed = listed_files(folder)
    if listed is None and (folder / STRUCTURE_FILE).is_file():  # format 1 listed no files: the names it (and
        listed = [p.name for p in folder.iterdir()  # run_glue's tokenizer save next to it) used
                  if is_model_file(p.name) or _FORMAT1_TOKENIZER.fullmatch(p.name) or p.name == STRUCTURE_FILE]
    present = {p.name for p in folder.iterdir()}
    foreign = sorted(present - set(listed or []))
    if foreign:
        raise FileExistsError(f"{folder} holds {foreign[:8]}, which no earlier apt_hf export wrote there; "
                              "overwrite=True only replaces an earlier export. Pick a new folder or move those out.")
    return [folder / name for name in present]


def export_pruned(model: nn.Module, output_dir: Union[str, os.PathLike], tokenizer: Optional[Any] = None,
                  overwrite: bool = False, **save_kwargs: Any) -> transformers.PreTrainedModel:
    """Merge adapters, remove masked structure physically and save; returns the pruned model.

    The folder loads with :func:`load_pruned` and with stock transformers (``trust_remote_code=True``, see the
    module docstring); ``tokenizer`` is saved with it (so ``pipeline`` works) and a model card ``README.md``
    describes what was kept and how to load it. The training model is left untouched (the export works on a copy).
    ``output_dir`` must be empty or absent unless ``overwrite=True``, which replaces an earlier export there (and
    refuses a folder holding anything else). ``save_kwargs`` go to ``save_pretrained`` (e.g. ``max_shard_size``).
    """
    out = Path(output_dir)
    stale: list[Path] = []
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pick a new folder or pass overwrite=True to replace an "
                                  "earlier export there.")
        stale = _replaceable(out)
    apt = find_apt_model(model)
    pruned = apt.binarized_export_copy()
    if not isinstance(pruned, runtime.PrunedModelMixin):  # nothing was pruned: still an export of this format
        make_exportable(pruned, structure_record(pruned), apt.training_info())
    pruned.eval()
    check_finite(pruned)
    for path in stale:
        path.unlink()
    pruned.save_pretrained(out, tokenizer=tokenizer, **save_kwargs)
    return pruned


def _own_names(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the model's own parameter names. transformers 5 saves some families under their
    original checkpoint names (ViT: ``vit.encoder.layer.0.attention.attention.query``) and renames them as it loads
    (its conversion mapping); the same renamings apply here. Conversions that merge or split tensors are refused."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    out = {}
    for key, tensor in state.items():
        name, converted = rename_source_key(key, renamings, converters)
        if converted is not None:
            raise ValueError(f"{key} must be converted by transformers ({converted!r}) before it fits the model; "
                             "apt_hf.load_pruned does not convert weights. Load the folder with from_pretrained("
                             "trust_remote_code=True) instead.")
        out[name] = tensor
    return out


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file as _load

    def load_file(name: str) -> dict[str, torch.Tensor]:
        try:
            return _load(name)
        except SafetensorError as err:
            raise ValueError(f"{name} cannot be read ({err}); the file is truncated or corrupted. "
                             "Export the model again.") from None

    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.exists() and index.exists():
        raise ValueError(f"{path} holds both model.safetensors and a sharded index; one of them is stale. Export "
                         "the model again into an empty folder.")
    if single.exists():
        return load_file(str(single))
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            if not (path / shard).exists():
                raise FileNotFoundError(f"{path} lists weight shard {shard} in its index but the file is missing.")
            state.update(load_file(str(path / shard)))
        return state
    raise FileNotFoundError(f"{path} has no model.safetensors (or sharded index); it is not a complete export.")


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON ({err}); the export is corrupted.") from None


def _stock_classes(path: Path, config: dict) -> tuple[type, type]:
    """The stock config and model classes named by an export's config.json (format 1: stock names; format 2: the
    ``apt_pruned_`` model_type and ``AptPruned`` architecture)."""
    model_type = runtime.stock_model_type(config.get("model_type"))
    if model_type not in FAMILIES:
        raise ValueError(f"{path}/config.json has model_type={config.get('model_type')!r}; apt_hf exports are of "
                         f"{sorted(FAMILIES)}. The export is corrupted.")
    arch = (config.get("architectures") or [None])[0]
    name = arch[len(CLASS_PREFIX):] if isinstance(arch, str) and arch.startswith(CLASS_PREFIX) else arch
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    config_cls = transformers.CONFIG_MAPPING[model_type]
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) and cls.config_class is config_cls):
        raise ValueError(f"{path}/config.json names architectures={config.get('architectures')!r}; expected a "
                         f"transformers model class of model_type {model_type!r} (e.g. {config_cls.__name__[:-6]}"
                         "ForSequenceClassification). The export is corrupted.")
    return config_cls, cls


def load_pruned(path: Union[str, os.PathLike], **kwargs: Any) -> transformers.PreTrainedModel:
    """Load a model saved by :func:`export_pruned` (or by a pruned model's ``save_pretrained``), ready for inference.

    Runs no code from the folder. ``kwargs`` go to the model class's ``_from_config`` (e.g.
    ``dtype=torch.bfloat16``, ``attn_implementation="sdpa"``); ``device=`` moves the model afterwards.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder; pass the output_dir given to apt_hf.export_pruned.")
    record_file = path / STRUCTURE_FILE
    if not record_file.exists():
        raise FileNotFoundError(f"{path} has no {STRUCTURE_FILE}, so it was not written by apt_hf.export_pruned or "
                                "the save_pretrained of a pruned APT model (a model that was never pruned, e.g. "
                                "merge_and_unload() of an APT model at density 1, loads with from_pretrained).")
    record = _read_json(record_file)
    if isinstance(record, dict):
        record = {k: v for k, v in record.items() if k != "files"}
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json; the export is incomplete.")
    config_dict = _read_json(path / "config.json")
    in_config = config_dict.pop(runtime.RECORD_KEY, None)
    config_cls, stock = _stock_classes(path, config_dict)
    runtime.check_record(record, pruned_model_class(stock).apt_spec, str(record_file))
    drop = ("model_type", "architectures", "auto_map")
    config = pruned_config_class(config_cls).from_dict({k: v for k, v in config_dict.items() if k not in drop})
    setattr(config, runtime.RECORD_KEY, record)
    config.architectures = [CLASS_PREFIX + stock.__name__]
    device = kwargs.pop("device", None)
    model = pruned_model_class(stock)._from_config(config, **kwargs)  # built at the recorded sizes
    dtype = next(model.parameters()).dtype
    if in_config is not None and in_config != record:  # (after shaping, whose errors name the bad entry)
        raise ValueError(f"{record_file} and config.json's {runtime.RECORD_KEY} describe different structures; "
                         "the export is corrupted.")
    state = _own_names(model, _read_state_dict(path))
    # Check shapes before load_state_dict, which raises a bare RuntimeError on a size mismatch even when strict=False.
    expected = model.state_dict(keep_vars=True)
    for name, tensor in state.items():
        target = expected.get(name)
        if target is not None and target.shape != tensor.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} in the weights but {tuple(target.shape)} in "
                             f"{STRUCTURE_FILE}; the export is corrupted.")
    result = model.load_state_dict(state, strict=False)
    loaded = {id(expected[k]) for k in state if k in expected}
    missing = [k for k in result.missing_keys if id(expected[k]) not in loaded]  # a tied weight came with its twin
    if missing or result.unexpected_keys:
        raise ValueError(f"{path} does not match its {STRUCTURE_FILE}: missing {missing[:5]}, unexpected "
                         f"{result.unexpected_keys[:5]}; the export is corrupted. Export it again.")
    model.to(dtype)
    if device is not None:
        model.to(device)
    return model.eval()
