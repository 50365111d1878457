"""The architecture registry: one module per family, each defining ``SPECS`` (its :class:`ArchSpec` objects).

Every module of this package that defines ``SPECS`` is a family module and is found here without being listed
(docs/ADDING_AN_ARCHITECTURE.md). :func:`spec_for` dispatches in the PEFT style: the specs' match tests are tried in
order (module name, then order within ``SPECS``), the first that accepts the config wins; two specs may not claim
the same model_type. An unknown family raises :class:`UnsupportedArchitectureError` naming the supported ones.

``describe(model)`` unwraps a PEFT model and returns the :class:`~apt_hf.runtime.Layout` of the transformers model
inside: every attention site, FFN site, hidden-dimension embedding, norm and task-head reader, with direct module
references.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Optional

from torch import nn

from ..runtime import ArchSpec, AttentionSite, FFNSite, Layout, Stack, base_linear
from .count import CountModel

__all__ = ["FAMILIES", "SPECS", "ArchSpec", "AttentionSite", "FFNSite", "Layout", "Stack", "base_linear",
           "describe", "family_of", "find_spec", "spec_for", "CountModel",
           "UnsupportedArchitectureError"]


class UnsupportedArchitectureError(ValueError):
    """The model is not one apt_hf knows how to prune."""


def _discover() -> tuple[ArchSpec, ...]:
    specs: list[ArchSpec] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        specs += list(getattr(module, "SPECS", ()))
    claimed: dict[str, str] = {}
    for spec in specs:
        for model_type in spec.model_types:
            if model_type in claimed and spec.match is None:
                raise RuntimeError(f"model_type {model_type!r} is claimed by the {claimed[model_type]!r} and "
                                   f"{spec.family!r} specs; give the later one a match test.")
            claimed.setdefault(model_type, spec.family)
    if len({s.family for s in specs}) != len(specs):
        raise RuntimeError(f"two specs share a family name ({[s.family for s in specs]}); each needs its own.")
    return tuple(specs)


SPECS: tuple[ArchSpec, ...] = _discover()
# stock model_type -> family, for listings and error messages
FAMILIES: dict[str, str] = {}
for _spec in SPECS:
    for _type in _spec.model_types:
        FAMILIES.setdefault(_type, _spec.family)


def _supported() -> str:
    return ", ".join(f"{s.family} ({', '.join(s.model_types)})" for s in SPECS)


def find_spec(config: Any) -> Optional[ArchSpec]:
    """The spec that serves a transformers config (or config dict), or ``None`` if apt_hf does not support it."""
    return next((spec for spec in SPECS if spec.matches(config)), None)


def spec_for(config: Any, what: str = "") -> ArchSpec:
    """The spec that serves a transformers config (or config dict): the first whose match test accepts it."""
    spec = find_spec(config)
    if spec is not None:
        return spec
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    raise UnsupportedArchitectureError(
        f"apt_hf does not support model_type={model_type!r}{f' ({what})' if what else ''}. Supported: "
        f"{_supported()}. Open an issue with the architecture you need (docs/ADDING_AN_ARCHITECTURE.md).")


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel / PEFT tuner, or the model itself."""
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, BaseTuner):
        return model.model
    inner = getattr(model, "base_model", None)
    return inner.model if isinstance(inner, BaseTuner) else model


def family_of(model: nn.Module) -> str:
    """The family name of a transformers model (PEFT-wrapped or not)."""
    hf = _hf_model(model)
    return spec_for(getattr(hf, "config", None) or {}, type(hf).__name__).family


def describe(model: nn.Module) -> Layout:
    """Return the :class:`Layout` of a transformers model (PEFT-wrapped or not)."""
    hf = _hf_model(model)
    return spec_for(getattr(hf, "config", None) or {}, type(hf).__name__).layout(hf)
