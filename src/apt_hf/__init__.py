"""apt_hf: APT (Adaptive Pruning and Tuning, Zhao, Hajishirzi & Cao, ICML 2024) for the Hugging Face stack.

Importing the package registers the APT tuner type with PEFT, so ``peft.get_peft_model(model, APTConfig())``,
``save_pretrained`` and ``PeftModel.from_pretrained`` work. Pruned models exported with ``export_pruned`` (or
``merge_and_unload().save_pretrained``) load without apt_hf too: see ``apt_hf.remote``.
"""

from __future__ import annotations

from torch import nn

from .arch import describe
from .callback import APTCallback, TrainingDivergedError
from .checkpoint import CheckpointError
from .config import APT_PEFT_TYPE, LEGACY_PEFT_TYPES, APTConfig
from .export import export_pruned, load_pruned
from .layer import APTLinear
from .masks import APTMasks, dense_count
from .model import APTModel, find_apt_model
from .trainer import APTTrainer

__version__ = "0.1.0"


def _register() -> None:
    """Make PEFT aware of the APT tuner (HF_STACK_NOTES: fill peft.mapping's dicts; string peft types work)."""
    from peft import mapping

    for peft_type in (APT_PEFT_TYPE, *LEGACY_PEFT_TYPES):
        mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = APTConfig
        mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = APTModel
        mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = APTModel.prefix


_register()


def get_masks(model: nn.Module) -> APTMasks:
    """The structural masks of an APT model: ``.heads[i]``, ``.neurons[i]`` (writable tensors) and ``.hidden``."""
    return find_apt_model(model).masks


def count_params(model: nn.Module) -> int:
    """Spec B.3 parameter count of the structure kept now (mask > 0). A model without APT adapters (the dense
    original, a LoRA model, an exported pruned model) counts its whole structure."""
    if any(isinstance(m, APTModel) for m in model.modules()):
        return find_apt_model(model).count_params()
    return dense_count(describe(model))


__all__ = ["APTCallback", "APTConfig", "APTTrainer", "find_apt_model", "APTLinear", "APTMasks", "APTModel",
           "CheckpointError", "TrainingDivergedError", "count_params", "export_pruned", "get_masks", "load_pruned",
           "__version__"]
