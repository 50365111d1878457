"""Export a trained APT model as a small dense model, and load it back (spec G, K.9).

The export is the stock ``save_pretrained`` layout plus ``apt_structure.json``: the per-site numbers of heads,
key/value heads, neurons and the hidden width, which stock ``from_pretrained`` cannot express.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

import torch
import transformers
from torch import nn

from .arch import describe
from .masks import APTMasks, sizes_of
from .model import find_apt_model
from .prune import apply_structure
from .t5 import kept_heads as t5_kept_heads

STRUCTURE_FILE = "apt_structure.json"
FORMAT_VERSION = 1


def structure_record(model: nn.Module) -> dict[str, Any]:
    """Per-site shapes of a (pruned) transformers model."""
    layout = describe(model)
    heads, neurons, hidden = sizes_of(layout)
    record = {
        "format_version": FORMAT_VERSION,
        "family": layout.family,
        "hidden_size": hidden,
        "heads": heads,
        "kv_heads": [s.num_kv_heads for s in layout.attentions],
        "neurons": neurons,
    }
    if layout.family == "t5":  # which original heads each block keeps: its slice of the shared position bias
        record["t5_kept_heads"] = [t5_kept_heads(s.core) for s in layout.attentions]
    return record


def export_pruned(model: nn.Module, output_dir: Union[str, os.PathLike], overwrite: bool = False,
                  **save_kwargs: Any) -> transformers.PreTrainedModel:
    """Merge adapters, remove masked structure physically and save; returns the pruned model.

    The training model is left untouched (the export works on a copy). ``output_dir`` must be empty or absent
    unless ``overwrite=True``, so nothing a user saved is replaced by accident.
    """
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pick a new folder or pass overwrite=True to replace its files.")
    pruned = find_apt_model(model).binarized_export_copy()
    pruned.eval()
    out.mkdir(parents=True, exist_ok=True)
    pruned.save_pretrained(out, **save_kwargs)
    (out / STRUCTURE_FILE).write_text(json.dumps(structure_record(pruned), indent=2))
    return pruned


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


def _shape_model(model: nn.Module, record: dict[str, Any]) -> None:
    """Resize a freshly built model to the recorded per-site shapes."""
    layout = describe(model)
    heads, neurons, hidden = sizes_of(layout)
    if len(record["heads"]) != len(heads) or len(record["neurons"]) != len(neurons):
        raise ValueError(f"{STRUCTURE_FILE} describes {len(record['heads'])} attention and {len(record['neurons'])} "
                         f"FFN sites but config.json builds {len(heads)} and {len(neurons)}; the export is corrupted.")
    for key, want, full in (("heads", record["heads"], heads), ("neurons", record["neurons"], neurons),
                            ("hidden_size", [record["hidden_size"]], [hidden])):
        if any(w > f for w, f in zip(want, full)):
            raise ValueError(f"{STRUCTURE_FILE} has {key} {want}, more than config.json's unpruned model has "
                             f"({full}); the export is corrupted.")
    head_idx = []
    for site, n_q, n_kv in zip(layout.attentions, record["heads"], record["kv_heads"]):
        g = site.group_size
        per_group = n_q // n_kv if n_kv else 0
        if n_kv and (n_q % n_kv or per_group > g or n_kv > site.num_kv_heads):
            raise ValueError(f"{STRUCTURE_FILE} asks for {n_q} query / {n_kv} key-value heads, which this "
                             f"architecture cannot hold; the export is corrupted.")
        head_idx.append(torch.tensor([j * g + t for j in range(n_kv) for t in range(per_group)], dtype=torch.long)
                        if g > 1 else torch.arange(n_q))
    if "t5_kept_heads" in record:  # the fresh model is full, so original indices are current indices
        kept = record["t5_kept_heads"]
        if len(kept) != len(heads) or any(len(k) != n or len(set(k)) != n or any(not 0 <= i < h for i in k)
                                          for k, n, h in zip(kept, record["heads"], heads)):
            raise ValueError(f"{STRUCTURE_FILE} has t5_kept_heads that disagree with its head counts; "
                             "the export is corrupted.")
        head_idx = [torch.tensor(k, dtype=torch.long) for k in kept]
    masks = APTMasks(heads, neurons, hidden)
    apply_structure(layout, masks, head_idx, [torch.arange(n) for n in record["neurons"]],
                    torch.arange(record["hidden_size"]))


def load_pruned(path: Union[str, os.PathLike], **kwargs: Any) -> transformers.PreTrainedModel:
    """Load a model saved by :func:`export_pruned`, ready for inference.

    ``kwargs`` go to the model class's ``_from_config`` (e.g. ``dtype=torch.bfloat16``,
    ``attn_implementation="sdpa"``); ``device_map``-style placement is done with ``.to()`` afterwards.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder; pass the output_dir given to apt_hf.export_pruned.")
    record_file = path / STRUCTURE_FILE
    if not record_file.exists():
        raise FileNotFoundError(f"{path} has no {STRUCTURE_FILE}, so it was not written by apt_hf.export_pruned "
                                "(an unpruned model loads with transformers' from_pretrained).")
    try:
        record = json.loads(record_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{record_file} is not valid JSON ({err}); the export is corrupted.") from None
    wanted = {"heads", "kv_heads", "neurons", "hidden_size"}
    missing = wanted - set(record) if isinstance(record, dict) else wanted
    if missing:
        raise ValueError(f"{record_file} lacks {sorted(missing)}; the export is corrupted or incomplete.")

    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    for key in ("heads", "kv_heads", "neurons"):
        if not isinstance(record[key], list) or not all(count(v) for v in record[key]):
            raise ValueError(f"{record_file} has {key}={record[key]!r}; it must be a list of non-negative integers, "
                             "one per site. The export is corrupted.")
    if not count(record["hidden_size"]):
        raise ValueError(f"{record_file} has hidden_size={record['hidden_size']!r}; it must be a non-negative "
                         "integer. The export is corrupted.")
    if len(record["kv_heads"]) != len(record["heads"]):
        raise ValueError(f"{record_file} lists {len(record['heads'])} heads entries but {len(record['kv_heads'])} "
                         "kv_heads entries; the export is corrupted.")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json; the export is incomplete.")
    config = transformers.AutoConfig.from_pretrained(path)
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ValueError(f"config.json names architecture {arch!r}, which transformers does not provide.")
    device = kwargs.pop("device", None)
    model = cls._from_config(config, **kwargs)
    dtype = next(model.parameters()).dtype
    _shape_model(model, record)
    state = _read_state_dict(path)
    # Check shapes before load_state_dict, which raises a bare RuntimeError on a size mismatch even when strict=False.
    expected = model.state_dict()
    for name, tensor in state.items():
        target = expected.get(name)
        if target is not None and target.shape != tensor.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} in the weights but {tuple(target.shape)} in "
                             f"{STRUCTURE_FILE}; the export is corrupted.")
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing_keys = [k for k in result.missing_keys if k not in tied]
    if missing_keys or result.unexpected_keys:
        raise ValueError(f"{path} does not match its {STRUCTURE_FILE}: missing {missing_keys[:5]}, unexpected "
                         f"{result.unexpected_keys[:5]}; the export is corrupted.")
    model.to(dtype)
    if device is not None:
        model.to(device)
    return model.eval()
