"""`APTModel`: the PEFT tuner that wires APT adapters, structural masks and physical pruning into a model."""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Optional

import torch
from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from . import checkpoint
from .arch import SPECS, CountModel, Layout, describe, spec_for
from .config import APTConfig
from .distill import make_transform
from .layer import APTLinear, ParamChange
from .masks import APTMasks, dense_count, install_mask_hooks, remove_mask_hooks, sizes_of
from .prune import apply_structure, fold_unit_masks, kept_after
from .remote import make_exportable, structure_record

MASKS_ATTR = "apt_masks"
BASE_SIZES_ATTR = "apt_base_sizes"  # heads per attention, neurons per FFN, hidden width of the unpruned base model
_PEFT_PREFIX = "base_model.model."


class APTModel(BaseTuner):
    """Injects :class:`~apt_hf.layer.APTLinear` adapters and owns the model's :class:`~apt_hf.masks.APTMasks`.

    Besides PEFT's usual duties (injection, merging, saving), it keeps the structural masks and the record of which
    original heads / neurons / hidden dimensions are still physically present, so a pruned adapter reloads onto a
    fresh base model (the structure is rebuilt in :meth:`_remap_adapter_state_dict_for_load`).
    """

    prefix: str = "apt_"
    tuner_layer_cls = APTLinear
    target_module_mapping = {t: list(s.target_modules) for s in SPECS for t in s.model_types}  # spec A.2 defaults

    # ------------------------------------------------------------------------------------------ PEFT hooks
    def _prepare_adapter_config(self, peft_config: APTConfig, model_config: dict) -> APTConfig:
        spec = spec_for(model_config)  # an unknown family fails here, naming the supported ones
        if peft_config.target_modules is None:
            peft_config.target_modules = list(spec.target_modules)
        return peft_config

    def _check_new_adapter_config(self, config: APTConfig) -> None:
        if len(self.peft_config) > 1:
            raise ValueError("An APT model holds a single adapter; train one APT adapter per model.")

    def _create_and_replace(self, peft_config: APTConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, parameter_name: Optional[str] = None) -> None:
        if isinstance(target, APTLinear):
            raise ValueError(f"{current_key} already has an APT adapter; an APT model holds a single adapter.")
        if not isinstance(target, nn.Linear):
            raise TypeError(
                f"target_modules matched {current_key} ({type(target).__name__}); APT adapters wrap torch.nn.Linear "
                "layers only. Narrow target_modules to linear projections."
            )
        r = int(peft_config.rank_pattern.get(current_key, peft_config.r))
        new = APTLinear(target, adapter_name, r=r, scaling=peft_config.scaling, dropout=peft_config.lora_dropout)
        self._replace_module(parent, target_name, new, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Plain swap: APT layers are built on the base layer's device, and on unload the base layer goes back as
        is (PEFT's default would copy ``.weight`` from modules that have none, e.g. RoBERTa's task head)."""
        setattr(parent, child_name, new_module)

    def _post_injection_hook(self, model: nn.Module, config: APTConfig, adapter_name: str) -> None:
        layout = describe(model)
        heads, neurons, hidden = sizes_of(layout)
        masks = APTMasks(heads, neurons, hidden)
        device = next(model.parameters()).device
        if device.type == "meta":  # masks are tiny and must hold values (count_params of a weight-less model)
            device = torch.device("cpu")
        setattr(self, MASKS_ATTR, masks.to(device))
        self.register_buffer(BASE_SIZES_ATTR, torch.tensor(heads + neurons + [hidden], dtype=torch.long,
                                                           device=device))
        self._mask_handles = install_mask_hooks(layout, masks)
        if config.distillation:
            weight = next(model.parameters())
            self.apt_transform = make_transform(hidden, config.transform_rank, config.scaling, weight.device,
                                                weight.dtype)
        self._layout: Optional[Layout] = None
        self.n_params = dense_count(layout)

    # ------------------------------------------------------------------------------------------ structure
    @property
    def masks(self) -> APTMasks:
        return getattr(self, MASKS_ATTR)

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            self._layout = describe(self.model)
            transform = getattr(self, "apt_transform", None)
            self._layout.transforms = [transform] if transform is not None else []
        return self._layout

    def count_model(self) -> CountModel:
        return CountModel.from_layout(self.layout)

    def count_params(self) -> int:
        """Spec B.3 count of the structure kept now (mask > 0)."""
        m = self.masks
        return self.count_model().count([h > 0 for h in m.heads], [n > 0 for n in m.neurons], m.hidden > 0)

    def apt_layers(self) -> dict[str, APTLinear]:
        """Adapter layers by module name (relative to the transformers model)."""
        return {name: mod for name, mod in self.model.named_modules() if isinstance(mod, APTLinear)}

    def prune_to_masks(self) -> list[ParamChange]:
        """Physically remove every head, neuron and hidden dimension whose mask is 0 (spec K.4)."""
        heads, neurons, hidden = kept_after(self.masks, self.layout)
        return self.apply_structure(heads, neurons, hidden)

    def apply_structure(self, heads, neurons, hidden) -> list[ParamChange]:
        changes = apply_structure(self.layout, self.masks, heads, neurons, hidden)
        if changes:
            self._layout = None
        return changes

    def restore_structure(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Physically prune a fresh model to the kept-index record found in a saved adapter state dict."""
        masks = self.masks
        base = next((v for k, v in state_dict.items() if k.rsplit(".", 1)[-1] == BASE_SIZES_ATTR), None)
        mine = getattr(self, BASE_SIZES_ATTR, None)
        if base is not None and mine is not None and not torch.equal(base.cpu().long(), mine.cpu()):
            raise ValueError(f"The saved APT adapter was trained on a base model of sizes {base.tolist()} but this "
                             f"base model has {mine.tolist()} (heads per attention, neurons per FFN, hidden width, "
                             "before pruning); load it onto the base model it was trained on.")
        keys = {k.split(f"{MASKS_ATTR}.", 1)[1]: v for k, v in state_dict.items() if f"{MASKS_ATTR}." in k}
        if not keys:
            return

        def record(name: str, current: torch.Tensor) -> Optional[torch.Tensor]:
            if name not in keys:
                raise ValueError(f"The saved APT adapter has no '{name}' record; it is incomplete or was not "
                                 "saved by apt_hf. Save it again with save_pretrained.")
            saved = _checked_record(name, keys[name])
            _check_mask_values(name.replace("kept_", "", 1), keys, len(saved))
            cur = current.cpu()
            if saved.numel() and int(saved.max()) >= int(cur.max() + 1 if cur.numel() else 0):
                raise ValueError(f"The saved APT record '{name}' refers to positions {saved.max().item()} beyond this "
                                 f"model's {cur.numel()}; the adapter was trained on a different base model.")
            if torch.equal(saved, cur):
                return None
            position = {int(v): j for j, v in enumerate(cur.tolist())}
            try:
                return torch.tensor([position[int(v)] for v in saved.tolist()], dtype=torch.long)
            except KeyError as err:
                raise ValueError(f"The saved APT record '{name}' keeps position {err} that this model has already "
                                 "removed; load the adapter onto the original base model.") from None

        n_heads = sum(1 for k in keys if re.fullmatch(r"kept_heads_\d+", k))
        n_ffn = sum(1 for k in keys if re.fullmatch(r"kept_neurons_\d+", k))
        if n_heads != len(masks.heads) or n_ffn != len(masks.neurons):
            raise ValueError(f"The saved APT adapter describes {n_heads} attention and {n_ffn} FFN sites; this model "
                             f"has {len(masks.heads)} and {len(masks.neurons)}. Use the base model it was trained on.")
        heads = [record(f"kept_heads_{i}", masks.kept("heads", i)) for i in range(n_heads)]
        neurons = [record(f"kept_neurons_{i}", masks.kept("neurons", i)) for i in range(n_ffn)]
        hidden = record("kept_hidden", masks.kept_hidden)
        self.apply_structure(heads, neurons, hidden)
        for name, layer in self.apt_layers().items():
            for key, value in state_dict.items():
                if key.endswith((f".{name}.apt_A", f".{name}.apt_A.{self.active_adapter}")) or key == f"{name}.apt_A":
                    layer.grow_rank(next(iter(layer.r)), value.shape[0])

    # ------------------------------------------------------------------------------------------ save / load
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        for name, module in model.named_modules():
            if isinstance(module, APTLinear) and adapter_name in module.r:
                config.rank_pattern[name.removeprefix(_PEFT_PREFIX)] = module.r[adapter_name]
        saved = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        saved.update(checkpoint.collect(find_apt_model(model)))  # training state while a run is in progress
        return saved

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        tuner = model.base_model if isinstance(getattr(model, "base_model", None), APTModel) else model
        if isinstance(tuner, APTModel):
            state_dict = checkpoint.stash(tuner, state_dict)
            tuner.restore_structure(state_dict)
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        current = model.state_dict()
        for key, value in remapped.items():
            if key in current and current[key].shape != value.shape:
                raise ValueError(f"The saved APT adapter has {key} of shape {tuple(value.shape)} but this model's is "
                                 f"{tuple(current[key].shape)}; load it onto the base model it was trained on.")
        return remapped

    # ------------------------------------------------------------------------------------------ masking on/off
    def detach_masking(self) -> None:
        """Remove mask hooks and masked norms (before deep copies or unloading)."""
        remove_mask_hooks(self.layout, self._mask_handles)

    def attach_masking(self) -> None:
        self._mask_handles = install_mask_hooks(self.layout, self.masks)

    def mask_free_copy(self, root: Optional[nn.Module] = None) -> nn.Module:
        """A deep copy of ``root`` (default: this tuner; e.g. the PeftModel around it) without mask hooks or masked
        norms: it computes the physically present model as if every mask were 1."""
        self.detach_masking()
        try:
            clone = copy.deepcopy(self if root is None else root)
        finally:
            self.attach_masking()
        find_apt_model(clone)._mask_handles = []
        return clone

    def binarized_export_copy(self) -> nn.Module:
        """A merged, physically pruned, mask-free deep copy of the transformers model (spec G, K.9)."""
        self._check_binary_hidden()
        clone = self.mask_free_copy()
        return clone.merge_and_unload()

    def _check_binary_hidden(self) -> None:
        hidden = self.masks.hidden
        if bool(((hidden > 0) & (hidden < 1)).any()):
            raise ValueError("The hidden-dimension mask holds fractional values (inside a mask-decay window); "
                             "export after the pruning event, or set it to 0/1 first.")

    def training_info(self) -> dict:
        """How the model was trained, for an export's config.json and model card."""
        config = next(iter(self.peft_config.values()))  # an APT model holds a single adapter
        fields = {f.name for f in dataclasses.fields(APTConfig)} - {f.name for f in dataclasses.fields(PeftConfig)}
        settings = {k: v for k, v in config.to_dict().items() if k in fields - {"rank_pattern"} and v is not None}
        return {"base_model": getattr(self.model, "name_or_path", None) or config.base_model_name_or_path,
                "density": self.count_params() / self.n_params, "apt_config": settings}

    def _unload_and_optionally_merge(self, merge: bool = True, *args, **kwargs):
        """PEFT's unload; merging also removes every masked block and folds mask values in (as the export does),
        so ``merge_and_unload()`` returns the model the masks describe. A physically pruned result becomes an
        ``AptPruned`` model whose ``save_pretrained`` writes a loadable export (``apt_hf.remote``)."""
        if merge:
            self._check_binary_hidden()
            self.prune_to_masks()
        layout, masks, info = self.layout, self.masks, self.training_info()
        base_sizes = getattr(self, BASE_SIZES_ATTR).tolist()
        self.detach_masking()
        model = super()._unload_and_optionally_merge(merge, *args, **kwargs)
        if merge:
            fold_unit_masks(layout, masks)  # after merging, so adapters on o/down projections are folded too
        record = structure_record(model)
        if record["heads"] + record["neurons"] + [record["hidden_size"]] != base_sizes:
            make_exportable(model, record, info)
        return model


def _checked_record(name: str, saved: torch.Tensor) -> torch.Tensor:
    """A saved kept-index record: integer, 1-D, strictly increasing original positions (else a clear error)."""
    if saved.is_floating_point() or saved.is_complex() or saved.dtype == torch.bool or saved.dim() != 1:
        raise ValueError(f"The saved APT record '{name}' must be a 1-D integer tensor of kept positions, got "
                         f"{saved.dtype} of shape {tuple(saved.shape)}; the adapter file was edited or corrupted.")
    saved = saved.to(torch.long).cpu()
    if saved.numel() and (int(saved.min()) < 0 or not bool((saved[1:] > saved[:-1]).all())):
        raise ValueError(f"The saved APT record '{name}' must list distinct kept positions in increasing order, got "
                         f"{saved.tolist()[:12]}; the adapter file was edited or corrupted.")
    return saved


def _check_mask_values(name: str, keys: dict[str, torch.Tensor], length: int) -> None:
    """A saved mask (``heads_<i>``, ``neurons_<i>``, ``hidden``) matches its record and holds values in [0, 1]."""
    mask = keys.get(name)
    if mask is None:
        raise ValueError(f"The saved APT adapter has a 'kept_{name}' record but no '{name}' mask; it is incomplete.")
    if not mask.is_floating_point() or mask.shape != (length,):
        raise ValueError(f"The saved APT mask '{name}' must be a float vector of length {length} (its kept record), "
                         f"got {mask.dtype} of shape {tuple(mask.shape)}; the adapter file was edited or corrupted.")
    if not bool(torch.isfinite(mask).all()) or bool(((mask < 0) | (mask > 1)).any()):
        raise ValueError(f"The saved APT mask '{name}' holds values outside [0, 1] (or NaN/inf); the adapter file is "
                         "corrupted or comes from a diverged run.")


def find_apt_model(model: nn.Module) -> APTModel:
    """The :class:`APTModel` inside a PeftModel (or the model itself); a clear error otherwise."""
    candidates = [model, getattr(model, "base_model", None), getattr(getattr(model, "module", None), "base_model", None)]
    for c in candidates:
        if isinstance(c, APTModel):
            return c
    for m in model.modules():
        if isinstance(m, APTModel):
            return m
    raise ValueError(
        f"{type(model).__name__} has no APT adapters. Wrap it first: "
        "model = peft.get_peft_model(model, apt_hf.APTConfig(...))."
    )
