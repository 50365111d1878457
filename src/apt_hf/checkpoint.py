"""APT's training state inside every checkpoint's adapter file (resume; RELIABILITY.md).

A resumed run needs more than weights: the salience EMAs, the event counter, blocks whose removal is held back,
adapter importance, the distillation teacher. The training callbacks register that state here; the APT tuner's save
hook (:meth:`apt_hf.model.APTModel._get_adapter_state_dict`) writes it into ``adapter_model.safetensors`` under the
``apt_train_`` prefix, and its load hook hands it back. So the state is

- written by the Trainer's ``save_model``, i.e. before checkpoint rotation and together with the weights it belongs
  to (a checkpoint folder that has the adapter file has the APT state);
- read from exactly the checkpoint the Trainer resumes (never looked up by step in ``output_dir``);
- stored as tensors plus a JSON skeleton (safetensors): loading it never unpickles anything.

Registries are keyed weakly by the :class:`~apt_hf.model.APTModel`, so deep copies of the model (export) carry none.
"""

from __future__ import annotations

import json
import os
import weakref
from typing import Any, Optional, Protocol

import torch
from torch import nn

PREFIX = "apt_train_"  # no dot: PEFT's key translation strips a trailing ".<adapter name>" segment
SKELETON = PREFIX + "skeleton"
FORMAT_VERSION = 1
ADAPTER_FILE = "adapter_model.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"


class TrainingStateProvider(Protocol):
    """What a component that keeps resumable state offers (``APTCallback``, ``DistillCallback``)."""

    def state_dict(self) -> dict[str, Any]: ...


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message names the folder, the file and the reason."""


_providers: "weakref.WeakKeyDictionary[nn.Module, dict[str, TrainingStateProvider]]" = weakref.WeakKeyDictionary()
_loaded: "weakref.WeakKeyDictionary[nn.Module, dict[str, Any]]" = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------------------------- registries
def register(owner: nn.Module, name: str, provider: TrainingStateProvider) -> None:
    """Save ``provider.state_dict()`` under ``name`` with every adapter checkpoint of ``owner`` from now on."""
    _providers.setdefault(owner, {})[name] = provider


def unregister(owner: nn.Module, name: str) -> None:
    _providers.get(owner, {}).pop(name, None)


def collect(owner: nn.Module) -> dict[str, torch.Tensor]:
    """The registered state of ``owner`` as flat tensors for the adapter file (empty when nothing is registered)."""
    providers = _providers.get(owner)
    if not providers:
        return {}
    return encode({"format_version": FORMAT_VERSION, **{n: p.state_dict() for n, p in providers.items()}})


def stash(owner: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the ``apt_train_`` entries from a loaded adapter state dict and keep them for :func:`take`."""
    ours = {k: state_dict[k] for k in [k for k in state_dict if _is_ours(k)]}
    rest = {k: v for k, v in state_dict.items() if not _is_ours(k)}
    if ours:
        tree = decode(ours)
        version = tree.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"The checkpoint's APT training state has format_version {version!r}; this apt_hf "
                                  f"reads version {FORMAT_VERSION}. Resume it with the apt_hf release that wrote it.")
        _loaded[owner] = tree
    else:
        _loaded.pop(owner, None)
    return rest


def take(owner: nn.Module) -> Optional[dict[str, Any]]:
    """The training state that came with the adapter last loaded into ``owner`` (once; ``None`` if none)."""
    return _loaded.pop(owner, None)


def _is_ours(key: str) -> bool:
    return key.startswith(PREFIX)


# ---------------------------------------------------------------------------------------------- tree codec
def encode(tree: Any) -> dict[str, torch.Tensor]:
    """Nested dicts/lists of tensors and JSON scalars -> ``{apt_train_t<i>: tensor, apt_train_skeleton: uint8}``."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any) -> Any:
        if isinstance(node, torch.Tensor):
            key = f"{PREFIX}t{len(tensors)}"
            tensors[key] = node.detach().cpu().contiguous()
            return {"$tensor": key}
        if isinstance(node, dict):
            if any(not isinstance(k, str) for k in node):
                raise TypeError(f"APT training state keys must be strings, got {sorted(map(repr, node))[:3]}")
            return {"$dict": {k: walk(v) for k, v in node.items()}}
        if isinstance(node, (list, tuple)):
            return [walk(v) for v in node]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"APT training state cannot hold a {type(node).__name__}; use tensors, numbers or strings.")

    skeleton = json.dumps(walk(tree)).encode()
    tensors[SKELETON] = torch.frombuffer(bytearray(skeleton), dtype=torch.uint8)
    return tensors


def decode(tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode`."""
    by_name = tensors
    if SKELETON not in by_name:
        raise CheckpointError(f"The checkpoint's APT training state has tensors but no '{SKELETON}' entry; the file "
                              "is incomplete or was edited.")
    try:
        skeleton = json.loads(bytes(by_name[SKELETON].to(torch.uint8).tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"The checkpoint's APT training state is corrupted ({err}).") from None

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {"$tensor"}:
                if node["$tensor"] not in by_name:
                    raise CheckpointError(f"The checkpoint's APT training state lacks tensor {node['$tensor']!r}.")
                return by_name[node["$tensor"]]
            if set(node) == {"$dict"} and isinstance(node["$dict"], dict):
                return {k: walk(v) for k, v in node["$dict"].items()}
            raise CheckpointError("The checkpoint's APT training state has an unknown entry; it was edited or "
                                  "written by another program.")
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(skeleton)


# ---------------------------------------------------------------------------------------------- checkpoint folders
def check_resumable(folder: str) -> None:
    """Raise :class:`CheckpointError` unless ``folder`` is a complete checkpoint that a run can resume from.

    Complete means: the Trainer wrote ``trainer_state.json`` (it is written after model, optimizer, scheduler and
    RNG states), and the adapter file is readable and holds APT's training state.
    """
    from safetensors import SafetensorError, safe_open

    if not os.path.isdir(folder):
        raise CheckpointError(f"Checkpoint folder {folder} does not exist.")
    if not os.path.isfile(os.path.join(folder, TRAINER_STATE_FILE)):
        raise CheckpointError(f"{folder} has no {TRAINER_STATE_FILE}: the Trainer did not finish writing this "
                              "checkpoint (a crash while saving?). Resume from an earlier checkpoint.")
    path = os.path.join(folder, ADAPTER_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder} has no {ADAPTER_FILE}; it is not a checkpoint of a PEFT/APT model.")
    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}); the file is truncated or corrupted. Resume from an "
                              "earlier checkpoint.") from None
    if SKELETON not in keys:
        raise CheckpointError(f"{path} holds no APT training state ({SKELETON}): the checkpoint was not written by a "
                              "run with APTCallback / APTTrainer (or by an older apt_hf), so the pruning schedule, "
                              "salience and teacher cannot be resumed.")


def read_training_state(folder: str) -> Optional[dict[str, Any]]:
    """The APT training state saved in ``folder``'s adapter file, read without loading the weights (``None`` if
    the file holds none)."""
    from safetensors import safe_open

    with safe_open(os.path.join(folder, ADAPTER_FILE), framework="pt") as f:
        ours = {k: f.get_tensor(k) for k in f.keys() if _is_ours(k)}
    return decode(ours) if ours else None


def last_resumable_checkpoint(output_dir: str, logger=None) -> str:
    """The newest complete ``checkpoint-<step>`` in ``output_dir``; newer incomplete ones are skipped, saying why."""
    steps = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            head, _, tail = name.partition("-")
            if head == "checkpoint" and tail.isdigit() and os.path.isdir(os.path.join(output_dir, name)):
                steps.append(int(tail))
    for step in sorted(steps, reverse=True):
        folder = os.path.join(output_dir, f"checkpoint-{step}")
        try:
            check_resumable(folder)
        except CheckpointError as err:
            if logger is not None:
                logger.warning("APT: skipping checkpoint %s: %s", folder, err)
            continue
        return folder
    raise CheckpointError(f"No complete APT checkpoint in {output_dir} (found {len(steps)} checkpoint folders); "
                          "train from the start or pass resume_from_checkpoint=<folder>.")
